"""Helpers shared by the browser tests: Debian's Chromium (never downloaded) driven through
Playwright's sync API, and `Page`, one fresh browser context on the chat page."""

from __future__ import annotations

import os
from contextlib import contextmanager

CHROMIUM = os.environ.get("TREECHAT_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


@contextmanager
def chromium():
    """A headless Chromium for one test module's fixture."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Page:
    """A fresh browser context (empty localStorage) on the page, recording console errors."""

    def __init__(self, browser, url: str, **ctx):
        self.ctx = browser.new_context(**ctx)
        self.ctx.set_default_timeout(20_000)
        self.page = self.ctx.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))
        self.url = url
        self.open()

    def open(self):
        self.page.goto(self.url + "/")
        self.page.wait_for_selector("html[data-ready]")

    def reload(self):
        self.page.reload()
        self.page.wait_for_selector("html[data-ready]")

    def button(self, name: str, scope=None):
        return (scope or self.page).get_by_role("button", name=name, exact=True)

    @property
    def input(self):
        return self.page.get_by_label("Message", exact=True)

    def send(self, text: str):
        self.input.fill(text)
        self.button("Send").click()

    def answers(self):
        return self.page.locator("article.msg.assistant")

    def last_answer(self):
        return self.answers().last

    def wait_done(self):
        """Waits until the last answer finished (its stats line is drawn) and returns its text."""
        ans = self.last_answer()
        ans.locator(".stats").wait_for()
        return ans.locator(".content").inner_text().strip()

    def conv_titles(self) -> list[str]:
        return [t.strip() for t in self.page.locator("#conv-list .conv-open").all_inner_texts()]

    def close(self):
        self.ctx.close()

"""Browser tests of the chat page (web/) against a real `treechat up` with the fake engine.

Each system runs as a subprocess on free loopback ports; Chromium (Debian's, never downloaded)
drives the page through Playwright's sync API. The fake engine echoes the last user message's
words one token per step, so every answer is known in advance.

Screenshots of a Markdown conversation go to the test's tmp dir, or to docs/screenshot-*.png when
TREECHAT_SCREENSHOTS=1 (so a normal run leaves the tree clean).
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from conftest import free_ports
from web_helpers import CHROMIUM, Page, chromium

playwright_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 60.0

if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM}", allow_module_level=True)


# ------------------------------------------------------------------ the system under test

def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except (OSError, urllib.error.URLError):
        return False


class System:
    """`treechat up --engine fake` on free ports; `url` is the HTTP gateway's base."""

    def __init__(self, tmp: Path, *extra: str, delay: float = 0.05):
        root_port = free_ports(1, span=4)[0]  # the root takes three, the HTTP gateway the fourth
        self.http_port = root_port + 3
        self.url = f"http://127.0.0.1:{self.http_port}"
        self.log_path = tmp / f"treechat-up-{self.http_port}.log"
        argv = [
            sys.executable, "-m", "treechat.cli", "up", "--engine", "fake",
            "--fake-delay", str(delay), "--nodes", "1", "--http-port", str(self.http_port),
            "--tcp-port", "0", "--port", str(root_port), *extra,
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"treechat up exited {self.proc.returncode}:\n{self.logs()}")
            if http_ok(self.url + "/healthz") and http_ok(self.url + "/readyz"):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"treechat up not ready in {START_TIMEOUT:.0f}s:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def tree(self) -> dict:
        with urllib.request.urlopen(self.url + "/v1/tree", timeout=5) as r:
            return json.load(r)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    s = System(tmp_path_factory.mktemp("up"))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture()
def desk(browser, system):
    p = Page(browser, system.url, viewport={"width": 1280, "height": 800})
    yield p
    p.close()


def words(n: int, stem: str = "w") -> str:
    return " ".join(f"{stem}{i}" for i in range(n))


# ------------------------------------------------------------------ streaming and stop

def test_answer_streams_then_shows_stats(desk):
    page = desk.page
    # Record every distinct text the answer shows while it grows.
    page.evaluate("""() => {
        window.__snaps = [];
        new MutationObserver(() => {
            const a = [...document.querySelectorAll('article.msg.assistant .content')].at(-1);
            const t = a ? a.textContent.trim() : '';
            if (t && window.__snaps.at(-1) !== t) window.__snaps.push(t);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    text = words(24)
    desk.input.fill(text)
    desk.input.press("Enter")  # desktop: Enter sends
    assert desk.wait_done() == text
    snaps = page.evaluate("window.__snaps")
    assert len(snaps) >= 4, snaps  # it grew over several frames, not all at once
    assert all(text.startswith(s) for s in snaps), snaps
    assert all(len(a) < len(b) for a, b in zip(snaps, snaps[1:])), snaps
    assert snaps[-1] == text
    stats = desk.last_answer().locator(".stats").inner_text()
    assert "24 tokens" in stats and "tok/s" in stats
    assert desk.button("Send").is_visible() and not desk.button("Stop").is_visible()
    assert desk.page.locator("#conv-list .conv").count() == 1
    assert desk.errors == []


def test_shift_enter_makes_a_new_line_on_desktop(desk):
    desk.input.fill("first")
    desk.input.press("Shift+Enter")
    desk.input.type("second")
    assert desk.input.input_value() == "first\nsecond"
    assert desk.answers().count() == 0


def test_stop_keeps_the_partial_answer(desk, system):
    full = words(200, "s")  # 200 steps at 0.05 s: ten seconds if nothing stops it
    desk.send(full)
    content = desk.last_answer().locator(".content")
    desk.page.wait_for_function(
        "() => ([...document.querySelectorAll('article.msg.assistant .content')].at(-1)?.textContent"
        " || '').trim().split(/\\s+/).length >= 5")
    desk.button("Stop").click()
    stats = desk.last_answer().locator(".stats")
    stats.wait_for()
    assert "stopped" in stats.inner_text()
    partial = content.inner_text().strip()
    assert partial and full.startswith(partial) and len(partial) < len(full)
    time.sleep(0.6)  # a dozen more steps would have arrived by now if it had not stopped
    assert content.inner_text().strip() == partial
    assert desk.button("Send").is_visible()
    # The gateway saw the closed request and the tree let it go.
    deadline = time.monotonic() + 15
    while system.tree()["root"].get("in_flight", 0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert system.tree()["root"].get("in_flight", 0) == 0
    # The partial answer survives a reload.
    desk.reload()
    assert desk.last_answer().locator(".content").inner_text().strip() == partial
    assert desk.errors == []


def test_sse_parser_handles_split_lines_comments_and_crlf(desk):
    events = desk.page.evaluate("""async () => {
        const { SSEParser } = await import('/static/api.js');
        const p = new SSEParser();
        const out = [];
        for (const part of [': keep-alive\\n\\n', 'data: {"a"', ':1}\\r', '\\n\\r\\ndata: x\\ndata: y\\n',
                            '\\n', 'data: [DONE]']) out.push(...p.push(part));
        out.push(...p.end());
        return out;
    }""")
    assert events == ['{"a":1}', "x\ny", "[DONE]"]


# ------------------------------------------------------------------ conversations

def test_conversations_survive_reload_and_switch(desk):
    desk.send("alpha bravo")
    assert desk.wait_done() == "alpha bravo"
    desk.button("New chat").click()
    assert desk.answers().count() == 0
    desk.send("charlie delta echo")
    assert desk.wait_done() == "charlie delta echo"

    desk.reload()
    assert desk.conv_titles() == ["charlie delta echo", "alpha bravo"]
    assert desk.wait_done() == "charlie delta echo"  # the open one comes back open
    desk.page.locator("#conv-list .conv-open", has_text="alpha bravo").click()
    assert desk.page.locator("article.msg.user .bubble").inner_text() == "alpha bravo"
    assert desk.wait_done() == "alpha bravo"
    assert desk.errors == []


def test_rename_and_delete(desk):
    desk.send("one two")
    desk.wait_done()
    desk.button("New chat").click()
    desk.send("three four")
    desk.wait_done()

    row = desk.page.locator("#conv-list .conv", has_text="one two")
    row.hover()
    desk.button("Rename conversation", row).click()
    name = desk.page.get_by_label("Conversation name", exact=True)
    name.fill("My renamed chat")
    name.press("Enter")
    assert desk.conv_titles() == ["three four", "My renamed chat"]
    desk.reload()
    assert desk.conv_titles() == ["three four", "My renamed chat"]

    row = desk.page.locator("#conv-list .conv", has_text="three four")
    row.hover()
    desk.button("Delete conversation", row).click()
    desk.button("Confirm delete", row).click()
    assert desk.conv_titles() == ["My renamed chat"]
    assert desk.answers().count() == 0  # the open conversation was the deleted one
    desk.reload()
    assert desk.conv_titles() == ["My renamed chat"]
    assert desk.errors == []


def test_edit_resend_and_regenerate(desk):
    desk.send("alpha beta")
    assert desk.wait_done() == "alpha beta"
    user = desk.page.locator("article.msg.user").first
    user.hover()
    desk.button("Edit message", user).click()
    box = desk.page.get_by_label("Edit message text", exact=True)
    box.fill("gamma delta")
    desk.button("Save & send").click()
    assert desk.wait_done() == "gamma delta"
    assert desk.page.locator("article.msg").count() == 2
    assert desk.page.locator("article.msg.user .bubble").inner_text() == "gamma delta"

    desk.button("Regenerate").click()
    desk.page.wait_for_selector("article.msg.assistant.streaming", state="detached")
    assert desk.wait_done() == "gamma delta"
    assert desk.page.locator("article.msg").count() == 2
    assert desk.errors == []


def test_settings_are_sent(desk):
    playwright_api.expect(desk.page.locator("#model")).to_be_disabled()  # one model: no choice
    assert desk.page.locator("#model option").all_inner_texts() == ["fake"]
    desk.button("Settings").click()
    temp = desk.page.get_by_label("Temperature", exact=True)
    label = desk.page.locator("#temp-out")
    assert "model default" in label.inner_text() and "unset" in temp.get_attribute("class")
    temp.fill("1.2")  # moving the slider sets a value, and the label says it
    assert label.inner_text() == "1.20" and "unset" not in temp.get_attribute("class")
    desk.page.get_by_label("System prompt", exact=True).fill("You are terse.")
    desk.page.get_by_label("Max tokens", exact=True).fill("3")
    desk.button("Save settings").click()
    desk.send("uno dos tres cuatro cinco seis")
    assert desk.wait_done() == "uno dos tres"
    stats = desk.last_answer().locator(".stats").inner_text()
    assert "3 tokens" in stats and "cut at max tokens" in stats
    desk.reload()
    desk.button("Settings").click()
    assert desk.page.get_by_label("Max tokens", exact=True).input_value() == "3"
    assert desk.page.get_by_label("System prompt", exact=True).input_value() == "You are terse."
    assert desk.errors == []


# ------------------------------------------------------------------ rendering and safety

def test_markdown_renders_and_model_output_cannot_run_script(desk):
    text = ('**bold** and `code` <script>window.__pwned=1</script> '
            '<img src=x onerror="window.__pwned=2"> [click](javascript:window.__pwned=3) '
            '<a href="https://example.com" onclick="window.__pwned=4">ex</a>')
    desk.send(text)
    desk.wait_done()
    content = desk.last_answer().locator(".content")
    assert content.locator("strong").inner_text() == "bold"
    assert content.locator("code").first.inner_text() == "code"
    assert content.locator("script").count() == 0
    assert content.locator("[onerror], [onclick]").count() == 0
    for href in content.locator("a").evaluate_all("els => els.map(e => e.getAttribute('href') || '')"):
        assert not href.lower().startswith("javascript:")
    content.get_by_text("click").click()  # its javascript: URL was stripped: nothing runs
    time.sleep(0.3)
    assert desk.page.evaluate("window.__pwned") is None
    # The user's own message is shown as plain text, not HTML.
    assert desk.page.locator("article.msg.user .bubble").inner_text() == text
    assert [e for e in desk.errors if "pageerror" in e] == []


def test_json_answers_and_tool_calls_are_shown_readably(desk):
    desk.send('{"city": "Paris", "days": [1, 2]}')
    desk.wait_done()
    block = desk.last_answer().locator(".content .code-block")
    assert block.locator(".code-lang").inner_text() == "json"
    assert block.locator("code").inner_text().strip() == '{\n  "city": "Paris",\n  "days": [\n    1,\n    2\n  ]\n}'
    desk.send('Checking. <tool_call> {"name": "get_weather", "arguments": {"city": "Oslo"}} '
              '</tool_call>')
    desk.wait_done()
    content = desk.last_answer().locator(".content")
    assert "Checking." in content.inner_text() and "<tool_call>" not in content.inner_text()
    assert content.locator("strong").inner_text() == "Tool call"
    assert content.locator("p code").inner_text() == "get_weather"
    assert content.locator(".code-block code").inner_text().strip() == '{\n  "city": "Oslo"\n}'
    assert [e for e in desk.errors if "pageerror" in e] == []


# ------------------------------------------------------------------ tree panel

def test_tree_panel_shows_nodes_live(desk):
    desk.button("Show node tree").click()
    panel = desk.page.get_by_role("complementary", name="Node tree")
    panel.locator(".tnode", has_text="node-1").wait_for()
    assert "alive" in panel.locator(".tnode", has_text="node-1").inner_text()
    assert "policy" in panel.locator(".troot").inner_text()
    first = panel.locator(".tree-status").inner_text()
    desk.page.wait_for_function(
        "t => document.getElementById('tree-status').textContent !== t", arg=first, timeout=10_000)
    desk.button("Hide node tree").click()
    assert panel.is_hidden()
    desk.button("Show node tree").click()
    desk.button("Close node tree").click()
    assert panel.is_hidden()
    assert desk.errors == []


# ------------------------------------------------------------------ errors

def _route_json(status: int, body: dict, headers: dict | None = None):
    def handler(route):
        route.fulfill(status=status, content_type="application/json", body=json.dumps(body),
                      headers=headers or {})
    return handler


def test_error_messages(desk):
    """Prompt too long, a bad API key and a server that went away, each with its own message."""
    page = desk.page
    page.route("**/v1/chat/completions", _route_json(400, {"error": {
        "message": "This model's maximum context length is 32 tokens.", "type": "invalid_request_error",
        "param": "messages", "code": "context_length_exceeded"}}))
    desk.send("too long")
    card = page.get_by_role("alert")
    card.wait_for()
    assert "Prompt too long" in card.inner_text() and "maximum context length" in card.inner_text()
    assert desk.button("Edit message", card).is_visible()

    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", _route_json(401, {"error": {
        "message": "Invalid API key.", "type": "authentication_error", "param": None,
        "code": "invalid_api_key"}}))
    desk.button("New chat").click()
    desk.send("who am i")
    card = page.get_by_role("alert")
    card.wait_for()
    assert "API key" in card.inner_text()
    desk.button("Open settings", card).click()
    assert page.get_by_label("API key", exact=True).is_visible()
    desk.button("Close settings").click()

    page.unroute("**/v1/chat/completions")
    page.route("**/v1/chat/completions", lambda route: route.abort("connectionrefused"))
    desk.button("New chat").click()
    desk.send("anyone there")
    card = page.get_by_role("alert")
    card.wait_for()
    assert "Server unreachable" in card.inner_text()

    page.unroute("**/v1/chat/completions")
    desk.button("Retry", card).click()
    assert desk.wait_done() == "anyone there"
    assert page.get_by_role("alert").count() == 0


def test_error_mid_stream_keeps_the_partial_answer(desk):
    chunk = {"choices": [{"index": 0, "delta": {"content": "partial answer "}, "finish_reason": None}]}
    error = {"error": {"message": "node-1 stopped answering", "type": "server_error", "param": None,
                       "code": "node_lost"}}
    body = f"data: {json.dumps(chunk)}\n\n: keep-alive\n\ndata: {json.dumps(error)}\n\n"
    desk.page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, content_type="text/event-stream", body=body))
    desk.send("tell me")
    card = desk.page.get_by_role("alert")
    card.wait_for()
    assert "interrupted" in card.inner_text() and "node-1 stopped answering" in card.inner_text()
    assert desk.last_answer().locator(".content").inner_text().strip() == "partial answer"
    assert desk.button("Retry", card).is_visible()


def test_overloaded_shows_message_and_retries(browser, tmp_path):
    system = System(tmp_path, "--max-slots", "1", "--max-queue", "0", "--node-queue", "0")
    blockers: list[http.client.HTTPConnection] = []
    p = None
    try:
        host, port = "127.0.0.1", system.http_port
        body = json.dumps({"model": "fake", "stream": True, "max_tokens": 100000,
                           "messages": [{"role": "user", "content": words(3000, "b")}]})
        saw_503 = False
        for _ in range(8):  # fill every slot and queue place until the tree refuses
            conn = http.client.HTTPConnection(host, port, timeout=3)
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            try:
                resp = conn.getresponse()
            except TimeoutError:
                blockers.append(conn)  # queued without headers yet: it still holds a place
                continue
            if resp.status == 503:
                resp.read()
                conn.close()
                saw_503 = True
                break
            resp.readline()  # streaming: it holds a slot for as long as we leave it open
            blockers.append(conn)
        assert saw_503, "the tree never said it was full"

        p = Page(browser, system.url, viewport={"width": 1280, "height": 800})
        p.send("hello again")
        card = p.page.get_by_role("alert")
        card.wait_for()
        text = card.inner_text()
        assert "busy" in text.lower() and "503" in text
        assert p.button("Retry", card).is_visible()

        for conn in blockers:  # free the tree: the page retries on its own (Retry-After)
            conn.close()
        blockers.clear()
        try:
            p.last_answer().locator(".stats").wait_for(timeout=20_000)
        except playwright_api.TimeoutError:  # it gave up retrying before the tree let go
            p.button("Retry", p.page.get_by_role("alert")).click()
            p.last_answer().locator(".stats").wait_for(timeout=20_000)
        assert p.wait_done() == "hello again"
        assert p.page.get_by_role("alert").count() == 0
    finally:
        for conn in blockers:
            conn.close()
        if p:
            p.close()
        system.stop()


# ------------------------------------------------------------------ phone and screenshots

SEEDED_ANSWER = """Here is a **binary search** in Python. It runs in `O(log n)` on a sorted list:

```python
def bsearch(xs: list[int], x: int) -> int:
    lo, hi = 0, len(xs)
    while lo < hi:
        mid = (lo + hi) // 2
        if xs[mid] < x: lo = mid + 1
        else: hi = mid
    return lo
```

| n | steps |
|---|---|
| 1,000 | 10 |
| 1,000,000 | 20 |
"""


def _seed(p: Page):
    """A conversation with Markdown and code, written the way the page stores it."""
    now = int(time.time() * 1000)
    conv = {
        "id": "seeded", "title": "Binary search in Python", "created": now, "updated": now,
        "messages": [
            {"role": "user", "content": "Show me a binary search in Python, with its cost."},
            {"role": "assistant", "content": SEEDED_ANSWER,
             "stats": {"completion_tokens": 118, "prompt_tokens": 14, "tps": 41.7, "ttft": 0.09,
                       "seconds": 2.9, "finish": "stop", "stopped": False}},
        ],
    }
    p.page.evaluate("""c => {
        localStorage.setItem('treechat.conversations.v1', JSON.stringify({[c.id]: c}));
        localStorage.setItem('treechat.current.v1', JSON.stringify(c.id));
    }""", conv)
    p.reload()


def _shot_path(name: str, tmp_path: Path) -> Path:
    if os.environ.get("TREECHAT_SCREENSHOTS") == "1":
        return REPO / "docs" / f"screenshot-{name}.png"
    return tmp_path / f"screenshot-{name}.png"


def test_desktop_screenshot(browser, system, tmp_path):
    p = Page(browser, system.url, viewport={"width": 1280, "height": 800})
    try:
        _seed(p)
        p.page.locator(".code-block .hljs-keyword").first.wait_for()
        assert p.page.get_by_role("button", name="Copy code").count() == 1
        p.send("In short: **halve** the range until `lo == hi`")
        assert p.wait_done() == "In short: halve the range until lo == hi"
        p.button("Show node tree").click()
        p.page.locator(".tnode", has_text="node-1").wait_for()
        p.page.mouse.move(640, 400)
        p.page.screenshot(path=str(_shot_path("desktop", tmp_path)))
        assert p.errors == []
    finally:
        p.close()


def test_phone_layout_enter_is_newline_and_screenshot(browser, system, tmp_path):
    p = Page(browser, system.url, viewport={"width": 390, "height": 844}, is_mobile=True,
             has_touch=True)
    try:
        _seed(p)
        box = p.page.locator("#sidebar").bounding_box()
        assert box["x"] + box["width"] <= 1  # the sidebar is a drawer, off screen
        p.input.fill("Looks **great**")
        p.input.press("Enter")  # on touch devices Enter makes a new line...
        assert p.input.input_value() == "Looks **great**\n"
        assert p.page.locator("article.msg").count() == 2
        p.input.type("on a `phone`")
        p.button("Send").tap()  # ...and the button sends
        assert p.wait_done() == "Looks great on a phone"
        p.page.screenshot(path=str(_shot_path("phone", tmp_path)))

        p.button("Open sidebar").tap()
        p.page.locator("#conv-list .conv-open", has_text="Binary search").wait_for(state="visible")
        p.page.locator("#conv-list .conv-open", has_text="Binary search").tap()
        assert "open" not in p.page.locator("#sidebar").get_attribute("class")
        assert p.errors == []
    finally:
        p.close()

"""One tree, two models, through the gateways: two tiny real models in two folders (nodes a1 and
a2 serve model A, node b serves model B), an HTTP and a TCP gateway.

`/v1/models` lists both with how many nodes serve each (Ollama's `/api/tags` both), an unknown
model is a 404 naming both, each model answers under its own name (HTTP, `/arranca`, TCP, where a
bad model is an error line), every way a client names its conversation comes back as the session
the request ran under (the response's `X-Session-Id`), a Responses chain runs under its first
response's id, and the chat page's model picker lists both models, sends the one chosen, and
sends each conversation's own session.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import requests

from http_helpers import error_of, models_tree
from test_tcp_gateway import Line
from web_helpers import CHROMIUM, Page, chromium

pytestmark = pytest.mark.timeout(300)  # a busy 2-core machine can take a while to load models

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_model, tiny_model_b):
    with models_tree(tmp_path_factory, "many-models",
                     {"a1": tiny_model, "a2": tiny_model, "b": tiny_model_b}) as up:
        up.a, up.b = Path(tiny_model).name, Path(tiny_model_b).name
        up.first = min(up.a, up.b)  # the default model: the first by name
        yield up


def post(up, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(f"{up.http}{path}", json=body, timeout=60, **kw)


def test_models_lists_each_model_with_its_nodes(up):
    models = requests.get(f"{up.http}/v1/models", timeout=30).json()["data"]
    assert [(m["id"], m["nodes"]) for m in models] == sorted([(up.a, 2), (up.b, 1)])
    one = requests.get(f"{up.http}/v1/models/{up.b}", timeout=30).json()
    assert one["id"] == up.b and one["nodes"] == 1
    tags = requests.get(f"{up.http}/api/tags", timeout=30).json()["models"]
    assert sorted(t["name"] for t in tags) == sorted([up.a, up.b])


def test_an_unknown_model_is_404_naming_both(up):
    r = post(up, "/v1/chat/completions", {"model": "gpt-4", "messages": HI, "max_tokens": 2})
    assert r.status_code == 404, r.text
    err = error_of(r)
    assert err["code"] == "model_not_found" and up.a in err["message"] and \
        up.b in err["message"]
    r = post(up, "/api/chat", {"model": "llama3", "messages": HI, "stream": False})
    assert r.status_code == 404 and up.a in r.json()["error"] and up.b in r.json()["error"]


def test_each_model_answers_under_its_name(up):
    for model in (up.a, up.b):
        r = post(up, "/v1/chat/completions", {"model": model, "messages": HI, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == model, r.text
    r = post(up, "/v1/chat/completions", {"messages": HI, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == up.first


@pytest.mark.parametrize("path, body, headers, session", [
    ("/v1/chat/completions", {"user": "alice"}, {"X-Session-Id": "conv-1"}, "conv-1"),
    ("/v1/chat/completions", {"user": "alice", "prompt_cache_key": "conv-2"}, {}, "conv-2"),
    ("/v1/chat/completions", {"user": "alice"}, {}, "alice"),
    ("/v1/chat/completions", {}, {}, None),
    ("/v1/completions", {"user": "bob"}, {}, "bob"),
    ("/v1/messages", {"metadata": {"user_id": "carol"}}, {}, "carol"),
    ("/v1/messages", {"metadata": {"user_id": "carol"}}, {"X-Session-Id": "conv-3"}, "conv-3"),
    ("/api/chat", {"stream": False}, {"X-Session-Id": "conv-4"}, "conv-4"),
    ("/v1/responses", {"user": "dave", "store": False}, {}, "dave"),
], ids=lambda v: str(v)[:30])
def test_each_way_to_name_the_session_reaches_the_request(up, path, body, headers, session):
    ask = {"prompt": "once", "max_tokens": 2} if path == "/v1/completions" else \
        {"input": "hi", "max_output_tokens": 2} if path == "/v1/responses" else \
        {"messages": HI, "options": {"num_predict": 2}} if path == "/api/chat" else \
        {"messages": HI, "max_tokens": 2}
    r = post(up, path, {"model": up.b, **ask, **body}, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers.get("X-Session-Id") == session


def test_a_responses_chain_runs_under_its_first_response_id(up):
    def turn(**fields) -> requests.Response:
        r = post(up, "/v1/responses", {"model": up.b, "input": "and?", "max_output_tokens": 2,
                                       **fields})
        assert r.status_code == 200, r.text
        return r
    first = turn()
    assert first.headers["X-Session-Id"] == first.json()["id"]
    second = turn(previous_response_id=first.json()["id"])
    third = turn(previous_response_id=second.json()["id"])
    assert second.headers["X-Session-Id"] == third.headers["X-Session-Id"] == first.json()["id"]
    named = turn(user="erin")
    later = turn(previous_response_id=named.json()["id"])
    assert later.headers["X-Session-Id"] == "erin"  # the chain keeps the name it started with


def test_arranca_takes_a_model(up):
    s = requests.Session()
    s.get(f"{up.http}/", timeout=10)
    token = {"X-XSRFToken": s.cookies["_xsrf"]}
    r = s.post(f"{up.http}/arranca", json={"text": "hi", "model": up.b, "max_tokens": 2,
                                           "session": "old-client"}, headers=token, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == up.b and r.headers["X-Session-Id"] == "old-client"
    r = s.post(f"{up.http}/arranca", json={"text": "hi", "model": "nope"}, headers=token,
               timeout=60)
    assert r.status_code == 404 and up.b in error_of(r)["message"]


def test_tcp_requests_name_their_model(up):
    conn = Line(up.tcp_port)
    conn.send({"id": "a", "text": "hi", "model": up.a, "max_tokens": 2})
    conn.send({"id": "b", "messages": HI, "model": up.b, "max_tokens": 2, "session": "mine"})
    conn.send({"id": "c", "text": "hi", "max_tokens": 2})
    conn.send({"id": "x", "text": "hi", "model": "nope"})
    finals = conn.collect(["a", "b", "c", "x"])
    assert finals["a"]["done"] and finals["a"]["model"] == up.a
    assert finals["b"]["done"] and finals["b"]["model"] == up.b
    assert finals["c"]["done"] and "model" not in finals["c"]
    error = finals["x"]["error"]
    assert error["code"] == "unknown_model" and up.a in error["message"] and \
        up.b in error["message"]
    conn.sock.close()


# --- the chat page -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("playwright.sync_api")
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with chromium() as b:
        yield b


def test_the_page_picks_a_model_and_names_each_conversation(up, browser):
    p = Page(browser, up.http, viewport={"width": 1280, "height": 800})
    sent = []
    p.page.on("request", lambda r: sent.append(r) if r.url.endswith("/chat/completions")
              else None)
    try:
        menu = p.page.locator("#model")
        p.page.wait_for_function("document.querySelectorAll('#model option').length === 2")
        assert menu.locator("option").all_inner_texts() == sorted([up.a, up.b])
        assert menu.input_value() == up.first and menu.is_enabled()  # the first by default
        other = up.b if up.first == up.a else up.a
        p.button("Settings").click()
        p.page.get_by_label("Max tokens", exact=True).fill("2")
        p.button("Save settings").click()
        menu.select_option(other)
        p.send("hello")
        p.wait_done()
        assert other in p.last_answer().locator(".stats").inner_text()  # the model that answered
        p.send("and again")
        p.wait_done()
        p.button("New chat").click()
        p.send("another conversation")
        p.wait_done()
        assert [json.loads(r.post_data)["model"] for r in sent] == [other] * 3
        names = [r.header_value("X-Session-Id") for r in sent]
        assert names[0] and names[0] == names[1] and names[2] and names[2] != names[0]
        p.reload()
        assert p.page.locator("#model").input_value() == other  # remembered with the settings
        p.button("Show node tree").click()
        for node, model in (("a1", up.a), ("a2", up.a), ("b", up.b)):
            item = p.page.locator(f'.tnode[data-name="{node}"] .tnode-meta').first
            item.wait_for()
            assert model in item.inner_text()
        assert p.errors == []
    finally:
        p.close()

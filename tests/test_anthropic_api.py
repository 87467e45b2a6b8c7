"""Anthropic's Messages API through a real tree with the fake engine (it answers with the user's
words, one token per word, so every answer, usage number and event is known exactly): the stream's
event sequence, stop reasons, count_tokens, Anthropic's error envelope and statuses (401 with
x-api-key or Bearer, 400s naming the field, 529 when the tree is full), cancel on disconnect, and
the leniency about fields inside messages that both dialects share. The official SDKs on the real
tiny model are in test_anthropic_sdk.py.
"""

from __future__ import annotations

import anthropic
import pytest
import requests

from http_helpers import RawStream, poll, start_up
from test_http_api import metric
from test_http_limits import gateway

pytestmark = pytest.mark.timeout(120)

KEY = "sk-ant-test"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
SAY = {"max_tokens": 50, "messages": [{"role": "user", "content": "hello there world"}]}
ENDLESS = {"max_tokens": 1_000_000,  # the fake engine echoes 60,000 words: minutes
           "messages": [{"role": "user", "content": "never ending story " * 20_000}]}


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    cluster, up = start_up(tmp_path_factory, "anthropic", "--engine", "fake", "--api-key", KEY)
    yield up
    cluster.close()


def post(up, body: dict, path: str = "/v1/messages", headers: dict | None = None):
    return requests.post(f"{up.http}{path}", json=body, headers=headers or HEADERS, timeout=30)


def sse(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of each event of an Anthropic stream."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], requests.models.complexjson.loads(lines["data"])))
    return out


def tree_idle(up) -> bool:
    st = requests.get(f"{up.http}/v1/tree", headers=HEADERS, timeout=10).json()
    return st["root"]["in_flight"] == 0 and all(n["running"] == 0 for n in st["nodes"])


def anthropic_error(r: requests.Response, status: int, kind: str) -> str:
    body = r.json()
    assert r.status_code == status and body["type"] == "error", (r.status_code, body)
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    return body["error"]["message"]


# --- answers -------------------------------------------------------------------------------------

def test_a_whole_message(up):
    r = post(up, {**SAY, "system": [{"type": "text", "text": "be brief"}], "metadata":
                  {"user_id": "u1"}, "temperature": 0.5, "top_p": 0.9, "top_k": 5})
    body = r.json()
    assert r.status_code == 200 and body["id"].startswith("msg_")
    assert body["type"] == "message" and body["role"] == "assistant" and body["model"] == "fake"
    assert body["content"] == [{"type": "text", "text": "hello there world "}]
    assert body["stop_reason"] == "end_turn" and body["stop_sequence"] is None
    assert body["usage"]["input_tokens"] == 5 and body["usage"]["output_tokens"] == 3


def test_the_stream_is_anthropics_event_sequence(up):
    r = post(up, {**SAY, "stream": True})
    assert r.headers["Content-Type"].startswith("text/event-stream")
    got = sse(r.text)
    assert [name for name, _ in got] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    assert all(data["type"] == name for name, data in got)
    assert got[0][1]["message"]["content"] == [] and got[0][1]["message"]["stop_reason"] is None
    assert got[1][1] == {"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}}
    assert "".join(d["delta"]["text"] for n, d in got if n == "content_block_delta") \
        == "hello there world "
    assert got[6][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert got[6][1]["usage"]["output_tokens"] == 3 and got[6][1]["usage"]["input_tokens"] == 3


def test_stop_reasons(up):
    r = post(up, {**SAY, "stop_sequences": ["nope", "world", "there"]}).json()
    assert r["stop_reason"] == "stop_sequence" and r["stop_sequence"] == "there"
    assert r["content"][0]["text"] == "hello "
    streamed = sse(post(up, {**SAY, "stop_sequences": ["world"], "stream": True}).text)
    assert streamed[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "world"}
    r = post(up, {**SAY, "max_tokens": 2}).json()
    assert r["stop_reason"] == "max_tokens" and r["content"][0]["text"] == "hello there "
    r = post(up, {**SAY, "stop_sequences": ["absent"]}).json()
    assert r["stop_reason"] == "end_turn" and r["stop_sequence"] is None


def test_ignore_eos_is_the_chat_paths_extension(up):
    r = post(up, {**SAY, "max_tokens": 5, "ignore_eos": True}).json()
    assert r["stop_reason"] == "max_tokens"
    assert r["content"][0]["text"] == "hello there world hello there "


def test_tool_history_and_count_tokens(up):
    turns = [{"role": "user", "content": "weather in Paris"},
             {"role": "assistant", "content": [
                 {"type": "text", "text": "let me look"},
                 {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                  "input": {"city": "Paris"}}]},
             {"role": "user", "content": [
                 {"type": "tool_result", "tool_use_id": "toolu_1",
                  "content": [{"type": "text", "text": "18 C"}]},
                 {"type": "text", "text": "so warm or not"}]}]
    tools = [{"name": "get_weather", "description": "weather", "input_schema": {
        "type": "object", "properties": {"city": {"type": "string"}}}}]
    body = {"messages": turns, "tools": tools, "tool_choice": {"type": "none"}}
    r = post(up, {**body, "max_tokens": 50})
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["text"] == "so warm or not "  # the fake answers the last user
    counted = post(up, body, "/v1/messages/count_tokens")
    assert counted.json() == {"input_tokens": r.json()["usage"]["input_tokens"]}


# --- errors --------------------------------------------------------------------------------------

def test_api_keys_by_x_api_key_or_bearer(up):
    assert post(up, SAY, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    message = anthropic_error(post(up, SAY, headers={"x-api-key": "wrong"}), 401,
                              "authentication_error")
    assert "incorrect API key" in message
    anthropic_error(post(up, SAY, headers={"anthropic-version": "2023-06-01"}), 401,
                    "authentication_error")
    client = anthropic.Anthropic(base_url=up.http, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        client.messages.create(model="fake", max_tokens=5, messages=SAY["messages"])


@pytest.mark.parametrize("body, named", [
    ({"messages": SAY["messages"]}, "max_tokens"),
    ({**SAY, "frobnicate": 1}, "frobnicate"),
    ({**SAY, "thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
    ({**SAY, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA"}}]}]},
     "image input is not supported"),
    ({**SAY, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "web_search"),
    ({**SAY, "messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({**SAY, "temperature": 7}, "temperature"),
    ({**SAY, "tool_choice": {"type": "tool", "name": "absent"}, "tools": []}, "absent"),
])
def test_bad_requests_are_400s_naming_the_field(up, body, named):
    assert named in anthropic_error(post(up, body), 400, "invalid_request_error")


def test_unknown_model_is_404_and_unknown_route_too(up):
    anthropic_error(post(up, {**SAY, "model": "claude-nope"}), 404, "not_found_error")


def test_full_tree_is_529_overloaded(cluster):
    tree = cluster.tree(["node-1"], "--max-slots", "1", root_args=("--max-queue", "1"))
    _, url, port = gateway(cluster, tree.root, "--keepalive", "0.1")
    busy = RawStream(port, "/v1/messages", {**ENDLESS, "stream": True})
    assert busy.status == 200
    next(ln for ln in busy.lines() if '"text":"never ' in ln)  # the only slot is taken
    queued = RawStream(port, "/v1/messages", {**SAY, "stream": True})
    assert queued.status == 200
    waiting = queued.lines()
    assert next(ln for ln in waiting if ln.startswith("event: ")) == "event: message_start"
    assert next(ln for ln in waiting if ln.startswith("event: ")) == "event: ping"  # queued
    r = requests.post(f"{url}/v1/messages", json=SAY, timeout=30)
    anthropic_error(r, 529, "overloaded_error")
    assert int(r.headers["Retry-After"]) >= 1
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0)
    with pytest.raises(anthropic.OverloadedError):  # the SDK's own class for 529
        client.messages.create(model="fake", **SAY)
    busy.close()
    queued.close()


# --- cancel on disconnect ------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_hang_up_cancels_the_message(up, stream):
    poll(lambda: tree_idle(up))
    raw = RawStream(up.http_port, "/v1/messages", {**ENDLESS, "stream": stream},
                    headers=HEADERS)
    if stream:
        assert raw.status == 200
        next(ln for ln in raw.lines() if '"text":"never ' in ln)  # it runs
    poll(lambda: requests.get(f"{up.http}/v1/tree", headers=HEADERS,
                              timeout=10).json()["root"]["in_flight"] == 1)
    raw.close()
    poll(lambda: tree_idle(up))  # it left the engine, with minutes of tokens to go
    metrics = requests.get(f"{up.http}/metrics", timeout=10).text
    assert metric(metrics, "treechat:num_aborted_requests_total") >= 1


# --- leniency, shared with chat completions ------------------------------------------------------

def test_fields_no_dialect_defines_inside_messages_are_ignored_and_counted(up):
    before = metric(requests.get(f"{up.http}/metrics", timeout=10).text,
                    "treechat:ignored_fields_total")
    chat = {"messages": [
        {"role": "user", "id": "m1", "content": [
            {"type": "text", "text": "cached words", "cache_control": {"type": "ephemeral"}}]},
        {"role": "assistant", "content": "ok", "reasoning_content": "hm", "id": "m2"},
        {"role": "user", "content": "again please"}]}
    r = requests.post(f"{up.http}/v1/chat/completions", json=chat, headers=HEADERS, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "again please "
    r = post(up, {**SAY, "messages": [{"role": "user", "id": "m3", "content": [
        {"type": "text", "text": "cached words", "cache_control": {"type": "ephemeral"},
         "citations": None}]}]})
    assert r.status_code == 200 and r.json()["content"][0]["text"] == "cached words "
    after = metric(requests.get(f"{up.http}/metrics", timeout=10).text,
                   "treechat:ignored_fields_total")
    assert after - before == 4  # id, cache_control, id, id (reasoning_content is OpenAI's own)
    r = requests.post(f"{up.http}/v1/chat/completions", json={**chat, "frobnicate": 1},
                      headers=HEADERS, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "frobnicate"


def test_completions_logprobs_zero_names_the_sampled_token(up):
    r = requests.post(f"{up.http}/v1/completions", headers=HEADERS, timeout=30,
                      json={"prompt": "one two", "logprobs": 0})
    lp = r.json()["choices"][0]["logprobs"]
    assert [list(top) for top in lp["top_logprobs"]] == [[t] for t in lp["tokens"]]


def test_tokenize_without_a_tokenizer_says_so(up):
    r = requests.post(f"{up.http}/tokenize", json={"prompt": "hi"}, headers=HEADERS, timeout=30)
    assert r.status_code == 501 and "--tokenizer" in r.json()["error"]["message"]

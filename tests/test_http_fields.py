"""The rest of the OpenAI surface through a real tree with the fake engine (routing and shapes;
every feature that depends on a model is tested again on the tiny model in
test_http_features.py): n choices merged by index, tool calls read back from text (auto) and
assembled by the SDK, structured answers, logprobs shapes, echo and prompt lists, stop strings,
the field policy, and the conventions: /health, /v1/models/{id}, --served-model-name, a string
system_fingerprint, X-Request-Id, CORS, 415, keep-alive after a refusal.
"""

from __future__ import annotations

import socket

import openai
import orjson
import pytest
import requests

from http_helpers import chat, error_of, events, start_up

ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    cluster, up = start_up(tmp_path_factory, "http-fields", "--engine", "fake",
                           "--served-model-name", "gpt-4o-mini", "--served-model-name", "alias-2",
                           "--allowed-origin", ORIGIN)
    yield up
    cluster.close()


def client(up) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{up.http}/v1", api_key="x", max_retries=0)


def post(up, path: str, body: dict, **kw) -> requests.Response:
    return requests.post(f"{up.http}{path}", json=body, timeout=30, **kw)


# --- choices -------------------------------------------------------------------------------------

def test_n_choices_whole_and_streamed(up):
    r = chat(up.http, "a b c", n=3)
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "a b c " for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == 3 and body["usage"]["completion_tokens"] == 9
    stream = client(up).chat.completions.create(model="fake", n=2, stream=True,
                                                messages=[{"role": "user", "content": "x y"}])
    texts, finishes = {0: "", 1: ""}, {}
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert texts == {0: "x y ", 1: "x y "} and finishes == {0: "stop", 1: "stop"}


def test_prompt_lists_and_token_ids_give_one_choice_each(up):
    done = client(up).completions.create(model="fake", prompt=["one two", "three"], n=2)
    assert [c.text for c in done.choices] == ["one two ", "one two ", "three ", "three "]
    assert done.usage.prompt_tokens == 3  # each prompt once, whatever n
    ids = client(up).completions.create(model="fake", prompt=[[5, 6], [7]])
    assert [c.text for c in ids.choices] == ["5 6 ", "7 "]


def test_echo_puts_the_prompt_first(up):
    r = post(up, "/v1/completions", {"prompt": "hi there", "echo": True, "max_tokens": 1})
    assert r.json()["choices"][0]["text"] == "hi therehi "
    r = post(up, "/v1/completions", {"prompt": "hi there", "echo": True, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in events(r.text)[:-1]) == "hi therehi there "
    r = post(up, "/v1/completions", {"prompt": [3, 4], "echo": True, "logprobs": 1})
    choice = r.json()["choices"][0]
    assert choice["text"] == "343 4 "  # the token-id prompt's text came from the tree
    lp = choice["logprobs"]
    assert lp["tokens"] == ["3", "4", "3 ", "4 "] and lp["token_logprobs"][0] is None
    assert lp["text_offset"] == [0, 1, 2, 4]


# --- logprobs ------------------------------------------------------------------------------------

def test_logprobs_shapes(up):
    resp = client(up).chat.completions.create(model="fake", logprobs=True, top_logprobs=2,
                                              messages=[{"role": "user", "content": "p q"}])
    content = resp.choices[0].logprobs.content
    assert [t.token for t in content] == ["p ", "q "]
    assert [a.token for a in content[0].top_logprobs] == ["alt1", "alt2"]
    assert content[0].bytes == list(b"p ")
    r = post(up, "/v1/completions", {"prompt": "u v", "logprobs": 1, "stream": True})
    chunks = [e for e in events(r.text)[:-1] if e["choices"][0]["text"]]
    assert [c["choices"][0]["logprobs"]["text_offset"] for c in chunks] == [[0], [2]]
    assert chunks[0]["choices"][0]["logprobs"]["top_logprobs"] == [{"alt1": pytest.approx(-1.386, abs=1e-3)}]


# --- tools ---------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = '<tool_call> {"name": "get_weather", "arguments": {"city": "Paris"}} </tool_call>'


def test_auto_tool_calls_are_read_from_the_text(up):
    resp = client(up).chat.completions.create(
        model="fake", tools=[WEATHER], messages=[{"role": "user", "content": "Let me check. " + CALL}])
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content.strip() == "Let me check."
    call = choice.message.tool_calls[0]
    assert call.id.startswith("call_") and call.function.name == "get_weather"
    assert orjson.loads(call.function.arguments) == {"city": "Paris"}
    # streamed: the SDK's own assembly of the deltas gives the same call, and no tag leaks out
    with client(up).chat.completions.stream(
            model="fake", tools=[WEATHER], messages=[{"role": "user", "content": CALL}]) as s:
        texts = [e.delta for e in s if e.type == "content.delta"]
        final = s.get_final_completion()
    msg = final.choices[0].message
    assert msg.tool_calls[0].function.name == "get_weather"
    assert orjson.loads(msg.tool_calls[0].function.arguments) == {"city": "Paris"}
    assert "<tool" not in "".join(texts) and final.choices[0].finish_reason == "tool_calls"


def test_a_forced_call_and_history_with_tool_messages(up):
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "cold"},
               {"role": "user", "content": "And Paris?"}]
    resp = client(up).chat.completions.create(model="fake", tools=[WEATHER], messages=history,
                                              tool_choice={"type": "function",
                                                           "function": {"name": "get_weather"}})
    call = resp.choices[0].message.tool_calls[0]
    assert resp.choices[0].message.content is None
    assert orjson.loads(call.function.arguments) == {"city": "xxxx"}  # the fake's instance


def test_structured_answer_parses(up):
    from pydantic import BaseModel

    class Point(BaseModel):
        x: int
        label: str

    parsed = client(up).chat.completions.parse(
        model="fake", messages=[{"role": "user", "content": "a point"}], response_format=Point)
    assert parsed.choices[0].message.parsed == Point(x=1, label="xxxx")


# --- the field policy ----------------------------------------------------------------------------

@pytest.mark.parametrize("fields", [
    {"store": True}, {"metadata": {"k": "v"}}, {"user": "u"}, {"service_tier": "flex"},
    {"reasoning_effort": "low"}, {"verbosity": "low"}, {"parallel_tool_calls": True},
    {"modalities": ["text"], "audio": {"voice": "alloy", "format": "mp3"}},
    {"prediction": {"type": "content", "content": "x"}}, {"top_logprobs": 0},
])
def test_fields_that_change_nothing_are_accepted(up, fields):
    r = chat(up.http, "ok", **fields)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("body, param, code", [
    ({"modalities": ["text", "audio"]}, "modalities", "invalid_value"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
    ({"seed": 2 ** 63}, "seed", "invalid_value"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]", "invalid_value"),  # a message's unknown fields are only dropped
    ({"tool_choice": "required"}, "tool_choice", "invalid_value"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice", "invalid_value"),
    ({"response_format": {"type": "xml"}}, "response_format", "invalid_value"),
    ({"top_logprobs": 3}, "top_logprobs", "invalid_value"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
    ({"n": 17}, "n", "invalid_value"),
])
def test_fields_that_would_change_the_answer_are_refused(up, body, param, code):
    r = post(up, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], **body})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert (err["param"], err["code"]) == (param, code)


def test_seed_range_is_openais(up):
    assert chat(up.http, "x", seed=-2 ** 63).status_code == 200
    assert chat(up.http, "x", seed=2 ** 63 - 1).status_code == 200


def test_completion_fields(up):
    assert post(up, "/v1/completions", {"prompt": "x", "suffix": "y"}).status_code == 400
    assert post(up, "/v1/completions", {"prompt": "x", "best_of": 2}).status_code == 400
    assert post(up, "/v1/completions", {"prompt": "x", "best_of": 2, "n": 2}).status_code == 200
    assert post(up, "/v1/completions", {"prompt": []}).status_code == 400


def test_stop_strings_in_the_fake_engine_too(up):
    r = chat(up.http, "alpha beta gamma delta", stop=["gam"])
    assert r.json()["choices"][0]["message"]["content"] == "alpha beta "


def test_no_empty_delta_before_the_finish(up):
    r = chat(up.http, "one two", stream=True)
    chunks = events(r.text)[:-1]
    contents = [c["choices"][0]["delta"].get("content") for c in chunks[1:-1]]
    assert contents == ["one ", "two "]  # the opening role chunk, two deltas, the finish


# --- conventions ---------------------------------------------------------------------------------

def test_health_models_and_aliases(up):
    assert requests.get(f"{up.http}/health", timeout=10).status_code == 200
    c = client(up)
    assert [m.id for m in c.models.list()] == ["fake", "gpt-4o-mini", "alias-2"]
    assert c.models.retrieve("gpt-4o-mini").id == "gpt-4o-mini"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("gpt-5")
    resp = c.chat.completions.create(model="gpt-4o-mini",
                                     messages=[{"role": "user", "content": "hi"}])
    assert resp.model == "gpt-4o-mini" and resp.choices[0].message.content == "hi "
    assert isinstance(resp.system_fingerprint, str) and resp.system_fingerprint.startswith("fp_")
    assert chat(up.http, model="langchain-default").status_code == 404


def test_request_id_is_echoed_or_made(up):
    r = post(up, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
             headers={"X-Request-Id": "trace-42"})
    assert r.headers["X-Request-Id"] == "trace-42"
    made = chat(up.http).headers["X-Request-Id"]
    assert len(made) == 24 and made != chat(up.http).headers["X-Request-Id"]
    err = post(up, "/v1/chat/completions", {"bad": 1}, headers={"X-Request-Id": "e-1"})
    assert err.status_code == 400 and err.headers["X-Request-Id"] == "e-1"


def test_cors_for_allowed_origins_only(up):
    pre = requests.options(f"{up.http}/v1/chat/completions", timeout=10, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    assert pre.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    cross = {"Origin": ORIGIN, "Sec-Fetch-Site": "cross-site"}
    r = post(up, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
             headers=cross)
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
    foreign = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
    r = post(up, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]},
             headers=foreign)
    assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers


def test_a_body_that_is_not_json_is_415(up):
    r = requests.post(f"{up.http}/v1/chat/completions", data={"messages": "x"}, timeout=10)
    assert r.status_code == 415 and error_of(r)["code"] == "unsupported_media_type"


def test_a_refusal_keeps_the_connection_usable(up):
    """A 403 (foreign origin), a 401-style refusal or a 415 answered before the body was read
    used to reset the next request on the same keep-alive connection."""
    body = orjson.dumps({"messages": [{"role": "user", "content": "still here"}]})
    sock = socket.create_connection(("127.0.0.1", up.http_port), timeout=10)
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: {ct}\r\n"
            "Content-Length: {n}\r\n{extra}\r\n")
    answers = []
    reader = sock.makefile("rb")
    for ct, extra in [("application/json", "Origin: https://evil.example\r\n"
                                           "Sec-Fetch-Site: cross-site\r\n"),
                      ("text/plain", ""), ("application/json", "")]:
        sock.sendall(head.format(ct=ct, n=len(body), extra=extra).encode() + body)
        status = int(reader.readline().split()[1])
        length = 0
        while (line := reader.readline()) not in (b"\r\n", b""):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        answers.append((status, reader.read(length)))
    sock.close()
    assert [a[0] for a in answers] == [403, 415, 200]
    assert b"still here" in answers[2][1]


def test_arranca_takes_the_same_options(up):
    s = requests.Session()
    s.get(f"{up.http}/", timeout=10)
    headers = {"X-XSRFToken": s.cookies["_xsrf"]}
    r = s.post(f"{up.http}/arranca", headers=headers, timeout=30,
               json={"text": "one two three", "timestamp": 5, "stop": "thr"})
    assert r.status_code == 200 and r.json()["text"] == "one two " and r.json()["timestamp"] == 5
    r = s.post(f"{up.http}/arranca", headers=headers, timeout=30,
               json={"text": CALL, "tools": [WEATHER]})
    assert r.json()["tool_calls"][0]["function"]["name"] == "get_weather"
    r = s.post(f"{up.http}/arranca", headers=headers, timeout=30,
               json={"text": "x", "temperature": 9})
    assert r.status_code == 400 and error_of(r)["param"] == "temperature"

"""The HTTP gateway's API against a real tree (`treechat up --engine fake`, two nodes).

One tree for the module; the fake engine answers with the user's words, one token per word, so
every answer and usage number below is known exactly.
"""

from __future__ import annotations

import openai
import pytest
import requests

from http_helpers import RawStream, chat, error_of, events, poll, start_up


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    cluster, up = start_up(tmp_path_factory, "http-api", "--engine", "fake", "--nodes", "2")
    yield up
    cluster.close()


# --- answers -------------------------------------------------------------------------------------

def test_chat_answer_and_usage(up):
    r = chat(up.http, messages=[{"role": "system", "content": "be brief"},
                                {"role": "user", "content": "hello there world"}])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake"  # omitted model: the tree's
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "hello there world ",
                                 "refusal": None}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 0}}


def test_text_completion_and_max_tokens(up):
    r = requests.post(f"{up.http}/v1/completions",
                      json={"model": "fake", "prompt": "one two three four", "max_tokens": 2},
                      timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "one two "
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_max_completion_tokens_is_max_tokens(up):
    r = chat(up.http, "a b c d e", max_completion_tokens=3)
    assert r.json()["choices"][0]["message"]["content"] == "a b c "


def test_stream_framing(up):
    r = chat(up.http, "the quick brown fox", stream=True, stream_options={"include_usage": True})
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == "the quick brown fox "
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8,
                                   "prompt_tokens_details": {"cached_tokens": 0}}


def test_completion_stream_without_usage(up):
    r = requests.post(f"{up.http}/v1/completions",
                      json={"prompt": "x y z", "stream": True}, timeout=30)
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in evs[:-1]) == "x y z "
    assert not any("usage" in e for e in evs[:-1])


def test_openai_client_unchanged(up):
    client = openai.OpenAI(base_url=f"{up.http}/v1", api_key="anything", max_retries=0)
    assert [m.id for m in client.models.list()] == ["fake"]
    resp = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "red green blue"}], max_tokens=16)
    assert resp.choices[0].message.content == "red green blue "
    assert resp.usage.completion_tokens == 3
    stream = client.chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "one two three"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three "
    assert chunks[-1].usage.total_tokens == 6
    done = client.completions.create(model="fake", prompt="alpha beta", max_tokens=5)
    assert done.choices[0].text == "alpha beta "


# --- errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, param, code", [
    (b'{"messages": [', None, "invalid_json"),
    (b"", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}, "frobnicate",
     "unknown_field"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 5}, "temperature",
     "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens",
     "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 0}, "n", "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": "yes"}, "logprobs",
     "invalid_value"),
    ({"messages": [{"role": "user", "content": "hi"}], "stream": True, "stream_options": {"x": 1}},
     "stream_options.x", "unknown_field"),
    ({"messages": [{"role": "<wizard>", "content": "hi"}]}, "messages[0].role", "invalid_value"),
    ({"prompt": "not a chat"}, "prompt", "unknown_field"),
    ({"model": "fake"}, "messages", "invalid_value"),
])
def test_bad_request_names_the_field(up, body, param, code):
    kw = {"json": body} if isinstance(body, (dict, list)) else {"data": body}
    r = requests.post(f"{up.http}/v1/chat/completions", timeout=30, **kw)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    if param:
        assert param.split(".")[-1].split("[")[0] in err["message"]


def test_neutral_openai_fields_are_accepted(up):
    r = chat(up.http, "fine", n=1, logprobs=False, user="u-1", presence_penalty=0,
             frequency_penalty=0, seed=7, top_k=5, metadata={"a": "b"}, tools=None)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "fine "


def test_unknown_model_is_404(up):
    r = chat(up.http, model="gpt-4o")
    assert r.status_code == 404
    err = error_of(r)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_body_over_the_limit_is_413(up):
    r = requests.post(f"{up.http}/v1/completions", timeout=30,
                      json={"prompt": "word " * 300_000})  # 1.5 MB > 1 MiB
    assert r.status_code == 413
    assert error_of(r)["code"] == "request_too_large"
    assert chat(up.http).status_code == 200  # still serving


def test_deadline_is_504(up):
    r = chat(up.http, "on and on", ignore_eos=True, max_tokens=100_000, timeout=0.3)
    assert r.status_code == 504
    assert error_of(r)["code"] == "timeout"


def test_deadline_mid_stream_is_an_error_event(up):
    r = chat(up.http, "on and on", ignore_eos=True, max_tokens=100_000, timeout=0.3, stream=True)
    assert r.status_code == 200
    evs = events(r.text)
    assert evs[-1] == "[DONE]"
    assert evs[-2]["error"]["code"] == "timeout"


def test_engine_failure_is_500(up):
    r = chat(up.http, "please __engine_error__")
    assert r.status_code == 500
    assert error_of(r)["code"] == "engine_error"


def test_unknown_path_and_method(up):
    r = requests.get(f"{up.http}/v1/nothing", timeout=10)
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = requests.get(f"{up.http}/v1/chat/completions", timeout=10)
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"


# --- cancel on disconnect ------------------------------------------------------------------------

def tree_idle(up) -> bool:
    st = requests.get(f"{up.http}/v1/tree", timeout=10).json()
    return st["root"]["in_flight"] == 0 and all(n["running"] == 0 for n in st["nodes"])


def test_client_hang_up_cancels_the_request(up):
    poll(lambda: tree_idle(up))
    raw = RawStream(up.http_port, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "never ending story"}],
                     "ignore_eos": True, "max_tokens": 1_000_000, "stream": True})
    assert raw.status == 200
    got = next(ln for ln in raw.lines() if '"content":"never' in ln)  # it runs
    assert got
    st = requests.get(f"{up.http}/v1/tree", timeout=10).json()
    assert st["root"]["in_flight"] == 1
    raw.close()
    poll(lambda: tree_idle(up))  # it left the engine, though it had ~20000 s of tokens left
    metrics = requests.get(f"{up.http}/metrics", timeout=10).text
    assert metric(metrics, "treechat:num_aborted_requests_total") >= 1


# --- the rest of the surface ---------------------------------------------------------------------

def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


def test_metrics_names_and_counts(up):
    names = ["treechat:num_requests_running", "treechat:num_requests_waiting",
             "treechat:time_to_first_token_seconds_count",
             "treechat:inter_token_latency_seconds_count",
             "treechat:e2e_request_latency_seconds_count",
             "treechat:request_queue_time_seconds_count",
             "treechat:prompt_tokens_total", "treechat:generation_tokens_total",
             "treechat:num_aborted_requests_total", 'treechat:node_slots{node="node-1"}',
             'treechat:node_running{node="node-2"}', 'treechat:node_queued{node="node-1"}']
    before = requests.get(f"{up.http}/metrics", timeout=10).text
    for name in names:
        metric(before, name)
    assert metric(before, 'treechat:node_slots{node="node-1"}') == 4
    assert chat(up.http, "count these five words").status_code == 200
    after = requests.get(f"{up.http}/metrics", timeout=10).text
    assert metric(after, "treechat:generation_tokens_total") \
        == metric(before, "treechat:generation_tokens_total") + 4
    assert metric(after, "treechat:e2e_request_latency_seconds_count") \
        == metric(before, "treechat:e2e_request_latency_seconds_count") + 1
    stop = 'treechat:request_success_total{finished_reason="stop"}'
    assert metric(after, stop) == (metric(before, stop) if stop in before else 0) + 1


def test_health_ready_models_tree(up):
    assert requests.get(f"{up.http}/healthz", timeout=10).status_code == 200
    r = requests.get(f"{up.http}/readyz", timeout=10)
    assert r.status_code == 200 and r.json()["ready"] is True
    models = requests.get(f"{up.http}/v1/models", timeout=10).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["fake"]
    tree = requests.get(f"{up.http}/v1/tree", timeout=10).json()
    assert {n["name"] for n in tree["nodes"]} == {"node-1", "node-2"}
    assert tree["root"]["gateways"]


def test_page_and_static_files(up):
    r = requests.get(f"{up.http}/", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["Content-Type"]
    assert "_xsrf" in r.cookies
    assert requests.get(f"{up.http}/static/app.js", timeout=10).status_code == 200
    assert requests.get(f"{up.http}/static/nope.js", timeout=10).status_code == 404


def test_arranca_needs_xsrf_and_keeps_order(up):
    r = requests.post(f"{up.http}/arranca", json={"text": "hi"}, timeout=30)
    assert r.status_code == 403 and "X-XSRFToken" in error_of(r)["message"]
    s = requests.Session()
    s.get(f"{up.http}/", timeout=10)
    token = s.cookies["_xsrf"]
    ids = []
    for i, text in enumerate(["first question", "second one", "third"]):
        r = s.post(f"{up.http}/arranca", json={"text": text, "timestamp": 1000 + i},
                   headers={"X-XSRFToken": token}, timeout=30)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["text"] == text + " " and body["timestamp"] == 1000 + i
        ids.append(body["request_id"])
    assert ids == sorted(ids) and len(set(ids)) == 3  # arrival order
    r = s.post(f"{up.http}/arranca", json={"timestamp": 1}, headers={"X-XSRFToken": token},
               timeout=30)
    assert r.status_code == 400 and error_of(r)["param"] == "text"
    # a browser session's API call must carry its token too (a cross-site post would not)
    r = s.post(f"{up.http}/v1/chat/completions",
               json={"messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert r.status_code == 403
    r = s.post(f"{up.http}/v1/chat/completions", headers={"X-XSRFToken": token},
               json={"messages": [{"role": "user", "content": "x"}]}, timeout=30)
    assert r.status_code == 200
    r = requests.post(f"{up.http}/v1/chat/completions", timeout=30,
                      headers={"Origin": "https://elsewhere.example", "Sec-Fetch-Site": "cross-site"},
                      json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 403  # another site's page cannot use a visitor's browser


def test_hang_up_on_a_whole_answer_cancels_it_too(up):
    poll(lambda: tree_idle(up))
    raw = RawStream(up.http_port, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "long wait"}], "ignore_eos": True,
                     "max_tokens": 1_000_000})
    poll(lambda: requests.get(f"{up.http}/v1/tree", timeout=10).json()["root"]["in_flight"] == 1)
    raw.close()
    poll(lambda: tree_idle(up))
    poll(lambda: metric(requests.get(f"{up.http}/metrics", timeout=10).text,
                        "treechat:num_requests_running") == 0)
    metrics = requests.get(f"{up.http}/metrics", timeout=10).text
    assert metric(metrics, "treechat:num_requests_waiting") == 0

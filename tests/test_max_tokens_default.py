"""`--max-tokens-default`: a request without max_tokens ends at the server's cap, one with its own
max_tokens gets that (up to the context), and `/v1/models` says what the cap is. Through `treechat
up` and HTTP, with the fake engine and with the tiny real model (hf)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest


def post(up, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(up.http + "/v1/chat/completions", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


@pytest.mark.parametrize("engine", ["fake", "hf"])
def test_an_answer_without_max_tokens_ends_at_the_server_default(cluster, tiny_model, engine):
    flags = ["--engine", "fake"] if engine == "fake" else ["--engine", "hf", "--model", tiny_model]
    up = cluster.up(*flags, "--max-tokens-default", "7", timeout=120)
    with urllib.request.urlopen(up.http + "/v1/models", timeout=30) as resp:
        assert json.load(resp)["data"][0]["max_tokens_default"] == 7
    ask = {"messages": [{"role": "user", "content": "tick"}], "ignore_eos": True}
    status, answer = post(up, ask)
    assert status == 200, answer
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 7
    status, answer = post(up, {**ask, "max_tokens": 12})  # the request's own value wins
    assert status == 200 and answer["usage"]["completion_tokens"] == 12, answer
    if engine == "hf":  # ... up to the context (the tiny model's is 1024 tokens)
        status, answer = post(up, {**ask, "max_tokens": 5000})
        assert status == 400 and "maximum context length is 1024" in answer["error"]["message"]

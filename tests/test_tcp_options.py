"""The TCP line protocol carries the same request options as the HTTP API (fake engine):
logprobs on delta lines, tool calls on the final line, structured answers, stop strings; its
field policy is stricter than HTTP's (docs/protocol.md): an unknown field inside a message is
refused, like one at the top, where HTTP drops and counts it."""

from __future__ import annotations

import socket

import orjson
import pytest

from http_helpers import start_up

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    cluster, up = start_up(tmp_path_factory, "tcp-options", "--engine", "fake")
    yield up
    cluster.close()


def ask(up, line: dict) -> list[dict]:
    """Send one request line; every line the server sends for it, up to its final one."""
    with socket.create_connection(("127.0.0.1", up.tcp_port), timeout=20) as sock:
        reader = sock.makefile("rb")
        orjson.loads(reader.readline())  # hello
        sock.sendall(orjson.dumps({"id": "r", **line}) + b"\n")
        lines = []
        while True:
            lines.append(orjson.loads(reader.readline()))
            if lines[-1].get("done") or "error" in lines[-1]:
                return lines


def test_logprobs_ride_on_delta_lines(up):
    lines = ask(up, {"text": "a b", "logprobs": 1})
    deltas = [ln for ln in lines if "delta" in ln]
    assert [d["logprobs"][0][0] for d in deltas] == ["a ", "b "]
    assert deltas[0]["logprobs"][0][2][0][0] == "alt1"


def test_tool_calls_come_on_the_final_line(up):
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    final = ask(up, {"text": text, "tools": [WEATHER]})[-1]
    assert final["finish_reason"] == "tool_calls"
    call = final["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {"city": "Oslo"}
    forced = ask(up, {"text": "x", "tools": [WEATHER], "tool_choice": "required"})[-1]
    assert forced["tool_calls"][0]["function"]["name"] == "get_weather"


def test_structured_answers_and_stop(up):
    final = ask(up, {"text": "x", "response_format": {"type": "json_schema", "json_schema": {
        "name": "n", "schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                "required": ["n"]}}}})[-1]
    assert orjson.loads(final["text"]) == {"n": 1}
    assert ask(up, {"text": "one two three", "stop": "thr"})[-1]["text"] == "one two "


def test_the_field_policy_is_the_same_at_every_level(up):
    top = ask(up, {"text": "x", "colour": "red"})[-1]
    inner = ask(up, {"messages": [{"role": "user", "content": "x", "colour": "red"}]})[-1]
    assert top["error"]["code"] == inner["error"]["code"] == "bad_request"
    assert "colour" in top["error"]["message"] and "messages[0].colour" in inner["error"]["message"]

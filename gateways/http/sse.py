"""OpenAI response objects (chat.completion, text_completion, their chunks) and SSE framing.

A stream is a series of Server-Sent Events, each one `data: <json>` line and a blank line;
comment lines (`: keep-alive`) keep idle connections open; the stream ends with `data: [DONE]`:

    data: {"object": "chat.completion.chunk", "choices": [{"delta": {"role": "assistant", ...
    : keep-alive
    data: {... "choices": [{"delta": {"content": "Hello "}, "finish_reason": null}]}
    data: {... "choices": [{"delta": {}, "finish_reason": "stop"}]}
    data: {... "choices": [], "usage": {...}}          (with stream_options.include_usage)
    data: [DONE]

An error after the stream started goes out as `data: {"error": {...}}` before `data: [DONE]`.

A delta's event (`delta_event`) is the hot path, one per token: it is framed from bytes made once
per response around the JSON string of the text, the same bytes `event(chunk(text))` gives.
"""

from __future__ import annotations

import random
import time

import orjson

_ids = random.Random()  # seeded from os.urandom; response ids need to be unique, not secret


def new_id() -> str:
    """24 random hex digits, as `secrets.token_hex(12)` but without a system call per response."""
    return f"{_ids.getrandbits(96):024x}"


DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def event(obj: dict) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def finish_reason(reason: str | None) -> str | None:
    """The tree says stop | length | cancelled; OpenAI clients know stop and length."""
    return "stop" if reason == "cancelled" else reason


MARK = "\x00"  # stands for a delta's text in `delta_frame`


def delta_frame(shape) -> tuple[bytes, bytes]:
    """The SSE bytes of a delta chunk before and after the JSON string of its text."""
    # The text is the last string of the chunk (only nulls follow it), hence rpartition.
    head, _, tail = event(shape.chunk(MARK)).rpartition(orjson.dumps(MARK))
    return head, tail


class Shape:
    """What both response shapes share: the response's id, time and model, and delta events."""

    ID_PREFIX = ""

    def __init__(self, model: str):
        self.id = self.ID_PREFIX + new_id()
        self.created = int(time.time())
        self.model = model
        self._before, self._after = delta_frame(self)

    def delta_event(self, text: str) -> bytes:
        """`event(self.chunk(text))`, without building and serializing the whole chunk."""
        return self._before + orjson.dumps(text) + self._after


class ChatShape(Shape):
    """chat.completion and chat.completion.chunk objects of one response."""

    ID_PREFIX = "chatcmpl-"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def opening(self) -> dict | None:
        return self.chunk({"role": "assistant", "content": ""})

    def chunk(self, delta: dict | str, reason: str | None = None) -> dict:
        if isinstance(delta, str):
            delta = {"content": delta}
        return {**self._head("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": delta, "logprobs": None,
                             "finish_reason": finish_reason(reason)}]}

    def closing(self, reason: str) -> dict:
        return self.chunk({}, reason)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._head("chat.completion.chunk"), "choices": [],
                "usage": usage(prompt_tokens, completion_tokens)}

    def whole(self, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "logprobs": None, "finish_reason": finish_reason(reason),
                             "message": {"role": "assistant", "content": text, "refusal": None}}],
                "usage": usage(prompt_tokens, completion_tokens)}


class CompletionShape(Shape):
    """text_completion objects (streamed chunks share the object name, as in OpenAI's API)."""

    ID_PREFIX = "cmpl-"

    def _head(self) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": None}

    def opening(self) -> dict | None:
        return None  # completions have no role chunk

    def chunk(self, text: str, reason: str | None = None) -> dict:
        return {**self._head(), "choices": [{"index": 0, "text": text, "logprobs": None,
                                             "finish_reason": finish_reason(reason)}]}

    def closing(self, reason: str) -> dict:
        return self.chunk("", reason)

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._head(), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def whole(self, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        return {**self._head(), "choices": [{"index": 0, "text": text, "logprobs": None,
                                             "finish_reason": finish_reason(reason)}],
                "usage": usage(prompt_tokens, completion_tokens)}

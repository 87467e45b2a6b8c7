"""OpenAI response objects (chat.completion, text_completion, their chunks) and SSE framing.

A stream is a series of Server-Sent Events, each one `data: <json>` line and a blank line;
comment lines (`: keep-alive`) keep idle connections open; the stream ends with `data: [DONE]`:

    data: {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"role": ...
    : keep-alive
    data: {... "choices": [{"index": 0, "delta": {"content": "Hello "}, "finish_reason": null}]}
    data: {... "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    data: {... "choices": [], "usage": {...}}          (with stream_options.include_usage)
    data: [DONE]

With `n` > 1 every choice streams its own chunks, told apart by `index`. An error after the
stream started goes out as `data: {"error": {...}}` before `data: [DONE]`.

A plain text delta's event (`delta_event`) is the hot path, one per token: it is framed from bytes
made once per response and choice around the JSON string of the text, the same bytes
`event(chunk(text, index=i))` gives.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """OpenAI's usage; cached_tokens: prompt tokens the engine took from its prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def finish_reason(reason: str | None) -> str | None:
    """The tree says stop | length | cancelled; OpenAI clients know stop, length, tool_calls."""
    return "stop" if reason == "cancelled" else reason


try:
    VERSION = importlib.metadata.version("treechat")
except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
    VERSION = "dev"


def fingerprint(model: str) -> str:
    """OpenAI's system_fingerprint: the same string while the server's version and model are."""
    digest = hashlib.sha1(f"treechat {VERSION} {model}".encode()).hexdigest()
    return "fp_" + digest[:10]


MARK = "\x00"  # stands for a delta's text in a frame (`split`)


def split(frame: bytes) -> tuple[bytes, bytes]:
    """An event built around MARK as the last string in it (only nulls, numbers and closing
    brackets follow it; hence rpartition): its bytes before and after that JSON string, so that
    `head + orjson.dumps(text) + tail` is the event for `text`."""
    head, _, tail = frame.rpartition(orjson.dumps(MARK))
    return head, tail


def delta_frame(shape, index: int) -> tuple[bytes, bytes]:
    """The SSE bytes of a delta chunk before and after the JSON string of its text."""
    return split(event(shape.chunk(MARK, index=index)))


class Shape:
    """What both response shapes share: the response's id, time and model, and delta events."""

    ID_PREFIX = ""
    OBJECT = ""
    CHUNK = ""

    def __init__(self, model: str):
        self.id = self.ID_PREFIX + new_id()
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint(model)
        self._frames: dict[int, tuple[bytes, bytes]] = {}

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.fingerprint}

    def delta_event(self, text: str, index: int = 0) -> bytes:
        """`event(self.chunk(text, index=index))`, without building the whole chunk."""
        frame = self._frames.get(index)
        if frame is None:
            frame = self._frames[index] = delta_frame(self, index)
        return frame[0] + orjson.dumps(text) + frame[1]

    def chunk(self, delta, reason: str | None = None, index: int = 0,
              logprobs: dict | None = None) -> dict:
        return {**self.head(self.CHUNK),
                "choices": [self.choice_delta(delta, reason, index, logprobs)]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int,
                    cached_tokens: int = 0) -> dict:
        return {**self.head(self.CHUNK), "choices": [],
                "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}

    def whole(self, choices: list[dict], prompt_tokens: int, completion_tokens: int,
              cached_tokens: int = 0) -> dict:
        return {**self.head(self.OBJECT), "choices": choices,
                "usage": usage(prompt_tokens, completion_tokens, cached_tokens)}


class ChatShape(Shape):
    """chat.completion and chat.completion.chunk objects of one response."""

    ID_PREFIX = "chatcmpl-"
    OBJECT = "chat.completion"
    CHUNK = "chat.completion.chunk"

    def opening(self, index: int) -> dict | None:
        return self.chunk({"role": "assistant", "content": ""}, index=index)

    def choice_delta(self, delta, reason, index, logprobs) -> dict:
        if isinstance(delta, str):
            delta = {"content": delta}
        return {"index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": finish_reason(reason)}

    def closing(self, reason: str, index: int = 0) -> dict:
        return self.chunk({}, reason, index)

    def choice(self, index: int, content: str | None, reason: str, logprobs: dict | None = None,
               tool_calls: list | None = None) -> dict:
        message = {"role": "assistant", "content": content, "refusal": None}
        if tool_calls:
            message["tool_calls"] = tool_calls
        return {"index": index, "logprobs": logprobs, "finish_reason": finish_reason(reason),
                "message": message}


class CompletionShape(Shape):
    """text_completion objects (streamed chunks share the object name, as in OpenAI's API)."""

    ID_PREFIX = "cmpl-"
    OBJECT = CHUNK = "text_completion"

    def opening(self, index: int) -> dict | None:
        return None  # completions have no role chunk

    def choice_delta(self, text, reason, index, logprobs) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason(reason)}

    def closing(self, reason: str, index: int = 0) -> dict:
        return self.chunk("", reason, index)

    def choice(self, index: int, text: str, reason: str, logprobs: dict | None = None,
               tool_calls: list | None = None) -> dict:
        return {"index": index, "text": text, "logprobs": logprobs,
                "finish_reason": finish_reason(reason)}

"""One Anthropic message built from its request's tree events (no I/O): `answers.Choice`'s
counterpart for gateways/http/anthropic.py.

Streamed, Anthropic's named Server-Sent Events, in its order:

    event: message_start        {"message": {"id": "msg_…", "content": [], "usage": {…}, …}}
    event: content_block_start  {"index": 0, "content_block": {"type": "text", "text": ""}}
    event: ping                 (while nothing arrives: queue, prefill)
    event: content_block_delta  {"index": 0, "delta": {"type": "text_delta", "text": "Hi"}}
    event: content_block_stop   {"index": 0}
    event: content_block_start  {"index": 1, "content_block": {"type": "tool_use", "id", "name",
                                 "input": {}}}
    event: content_block_delta  {"index": 1, "delta": {"type": "input_json_delta",
                                 "partial_json": "{\"city\": "}}
    event: content_block_stop   {"index": 1}
    event: message_delta        {"delta": {"stop_reason", "stop_sequence"}, "usage": {…}}
    event: message_stop

Tool calls are read from the text by `gateways.tools.ToolCalls`, as for OpenAI's tools; a forced
call's arguments stream as generated. The prompt's token count comes with the tree's final event,
so message_start says 0 input tokens and message_delta gives the real usage (the SDKs take it).

A text delta is the hot path, one per token: its event is framed from bytes made once per
content block index (`delta_frame`, shared by every message: the event names no message) around
the JSON string of the text, as the chat path's `sse.Shape.delta_event` is.

`stop_reason`: the tree says only "stop" for an end of turn and a stop string alike, so a request
with `stop_sequences` asks for each token's text (logprobs 0): the text the engine held back after
the answer's last delivered character starts with the stop sequence that ended it.
"""

from __future__ import annotations

import functools

import orjson

from broker.client import Event
from gateways import tools
from gateways.http import sse
from gateways.http.answers import Answer
from gateways.http.sse import new_id

# A content block's type -> its delta's type and the delta's field that carries the text
DELTAS = {"text": ("text_delta", "text"), "tool_use": ("input_json_delta", "partial_json")}


def sse_event(name: str, data: dict) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


MESSAGE_STOP = sse_event("message_stop", {"type": "message_stop"})


# The events that depend on a block's index alone, made once per index and kept for the 256 used
# last (a message has one block per tool call: a bounded cache, not one entry per index ever seen).
@functools.lru_cache(maxsize=256)
def delta_frame(index: int, kind: str) -> tuple[bytes, bytes]:
    """A content_block_delta's bytes before and after the JSON string of its text."""
    delta_type, name = DELTAS[kind]
    return sse.split(sse_event("content_block_delta", {
        "type": "content_block_delta", "index": index,
        "delta": {"type": delta_type, name: sse.MARK}}))


@functools.lru_cache(maxsize=256)
def text_start(index: int) -> bytes:
    return sse_event("content_block_start", {"type": "content_block_start", "index": index,
                                             "content_block": {"type": "text", "text": ""}})


@functools.lru_cache(maxsize=256)
def block_stop(index: int) -> bytes:
    return sse_event("content_block_stop", {"type": "content_block_stop", "index": index})


def _input(arguments: str) -> dict:
    """A call's arguments as the `input` object (a call cut short by max_tokens: {})."""
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _tool_id(call_id: str) -> str:
    return "toolu_" + call_id.removeprefix("call_")


class Message(Answer):
    def __init__(self, model: str, request: dict):
        self.id = "msg_" + new_id()
        self.model = model
        mode, name = tools.mode_of(request)
        self.tools = tools.ToolCalls(mode, name) if mode else None
        self.stops: list[str] = request.get("stop", [])
        self.raw = 0  # characters the tree delivered (before tool parsing)
        self.pieces: list[str] = []  # every token's own text (with stop_sequences)
        self.parts: list[str] = []  # whole: the delivered text
        self.index = -1  # streamed: the open content block's index
        self.kind: str | None = None  # streamed: the open block's type
        self.frame = (b"", b"")  # streamed: the open block's delta_frame

    # --- streamed ------------------------------------------------------------------------------

    def opening(self) -> list[bytes]:
        return [sse_event("message_start", {"type": "message_start", "message": {
            **self._head([]), "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})]

    def delta(self, ev: Event) -> list[bytes]:
        self._note(ev)
        if self.tools is None:
            return self._text(ev.text)
        text, calls = self.tools.feed(ev.text)
        return self._text(text) + self._calls(calls)

    def done(self, ev: Event) -> list[bytes]:
        self.finish(ev)
        out = []
        if self.tools is not None:
            text, calls = self.tools.finish()
            out = self._text(text) + self._calls(calls)
        if self.index < 0:  # nothing was said: one empty text block, as the whole message has
            out += self._open("text")
        reason, sequence = self.stop_reason(bool(self.tools and self.tools.calls))
        return out + self._close() + [
            sse_event("message_delta", {"type": "message_delta",
                                        "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                        "usage": self.usage()}),
            MESSAGE_STOP]

    def _text(self, text: str) -> list[bytes]:
        if not text:
            return []
        if self.kind == "text":
            return [self._delta(text)]
        return self._open("text") + [self._delta(text)]

    def _calls(self, deltas: list[dict]) -> list[bytes]:
        out = []
        for d in deltas:
            if "id" in d:  # a new call: its own block
                out += self._open("tool_use", {"type": "tool_use", "id": _tool_id(d["id"]),
                                               "name": d["function"]["name"], "input": {}})
            if d["function"]["arguments"]:
                out.append(self._delta(d["function"]["arguments"]))
        return out

    def _open(self, kind: str, block: dict | None = None) -> list[bytes]:
        """Close the open block, open the next: a text block, or `block` (a tool_use)."""
        out = self._close()
        self.index += 1
        self.kind = kind
        self.frame = delta_frame(self.index, kind)
        if block is None:
            return out + [text_start(self.index)]
        return out + [sse_event("content_block_start", {"type": "content_block_start",
                                                        "index": self.index,
                                                        "content_block": block})]

    def _close(self) -> list[bytes]:
        if self.kind is None:
            return []
        self.kind = None
        return [block_stop(self.index)]

    def _delta(self, text: str) -> bytes:
        """The open block's content_block_delta for `text` (its text or its partial_json)."""
        return self.frame[0] + orjson.dumps(text) + self.frame[1]

    # --- whole ---------------------------------------------------------------------------------

    def add(self, ev: Event) -> None:
        self._note(ev)
        self.parts.append(ev.text)

    def whole(self) -> dict:
        text, calls = "".join(self.parts), []
        if self.tools is not None:
            text, calls = tools.parse(self.tools.mode, self.tools.name, text)
        content = [{"type": "text", "text": text}] if text or not calls else []
        content += [{"type": "tool_use", "id": _tool_id(c["id"]), "name": c["function"]["name"],
                     "input": _input(c["function"]["arguments"])} for c in calls]
        reason, sequence = self.stop_reason(bool(calls))
        return {**self._head(content), "stop_reason": reason, "stop_sequence": sequence,
                "usage": self.usage()}

    # --- both ----------------------------------------------------------------------------------

    def _head(self, content: list) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content}

    def _note(self, ev: Event) -> None:
        self.raw += len(ev.text)
        if self.stops and ev.logprobs:
            self.pieces.extend(entry[0] for entry in ev.logprobs)

    def stop_reason(self, called: bool) -> tuple[str, str | None]:
        """(stop_reason, stop_sequence) in Anthropic's words."""
        if self.reason == "length":
            return "max_tokens", None
        if called:
            return "tool_use", None
        sequence = self.stopped()
        return ("stop_sequence", sequence) if sequence else ("end_turn", None)

    def stopped(self) -> str | None:
        """The stop sequence that ended the answer: the earliest one in what was held back."""
        if not self.stops or self.reason != "stop":
            return None
        held = "".join(self.pieces)[self.raw:]
        found = [(at, s) for s in self.stops if (at := held.find(s)) >= 0]
        return min(found)[1] if found else None

    def usage(self) -> dict:
        """Anthropic counts cached prompt tokens apart from `input_tokens`."""
        return {"input_tokens": self.prompt_tokens - self.cached_tokens,
                "output_tokens": self.completion_tokens,
                "cache_read_input_tokens": self.cached_tokens,
                "cache_creation_input_tokens": 0}

"""Tool calls read back from a model's answer, whole or as it streams (every gateway uses it).

No I/O. What the answer holds depends on `tool_choice` (see nodes/engine/grammar.py, which
constrains the last two, and nodes/engine/prompt.py, which asks for the first):

    "auto"            free text, any number of  <tool_call>{"name": F, "arguments": {...}}</tool_call>
                      blocks in it (the Hermes / Qwen convention); the rest is the content
    a named function  exactly F's arguments, a JSON object
    "required"        a JSON array of {"name": F, "arguments": {...}}

`ToolCalls.feed(text)` takes each delta and returns what may go out now: content text (a tail
that could be the start of a `<tool_call>` tag is held back, as stop strings are) and tool-call
deltas in OpenAI's streaming shape, which the SDKs assemble:

    {"index": 0, "id": "call_...", "type": "function", "function": {"name": F, "arguments": ""}}
    {"index": 0, "function": {"arguments": "{\"city\": "}}          (named: arguments stream)

`finish()` returns the rest; `calls` and `content` are then the whole answer's.
"""

from __future__ import annotations

import random

import orjson

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_ids = random.Random()  # seeded from os.urandom; ids must be unique, not secret


def call_id() -> str:
    return f"call_{_ids.getrandbits(96):024x}"


def mode_of(request: dict) -> tuple[str | None, str | None]:
    """(mode, function name): mode None (no tools, or tool_choice "none"), "auto", "named" or
    "required", from a core request dict (broker.request.Request's fields)."""
    tools, choice = request.get("tools"), request.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None, None
    if isinstance(choice, dict):
        return "named", choice["function"]["name"]
    return ("required" if choice == "required" else "auto"), None


class ToolCalls:
    """One answer's tool calls, parsed as its text arrives."""

    def __init__(self, mode: str, name: str | None = None):
        self.mode = mode
        self.name = name
        self.calls: list[dict] = []  # OpenAI's message.tool_calls, filled as calls complete
        self.parts: list[str] = []  # content text let out so far
        self.buffer = ""  # text not yet let out: a tag's possible start, a call being read

    @property
    def content(self) -> str | None:
        text = "".join(self.parts)
        return text if text.strip() or not self.calls else None

    def feed(self, text: str) -> tuple[str, list[dict]]:
        """(content text, tool-call deltas) that may be sent after this delta."""
        if self.mode == "named":
            return "", self._named(text)
        self.buffer += text
        if self.mode == "required":
            return "", []  # one JSON array: read whole at the end
        return self._auto(final=False)

    def finish(self) -> tuple[str, list[dict]]:
        """What is left once the answer ended (a call cut short stays text)."""
        if self.mode == "named":
            return "", []
        if self.mode == "required":
            calls = _required(self.buffer)
            if calls is None:  # cut short (length): show what came
                text, self.buffer = self.buffer, ""
                self.parts.append(text)
                return text, []
            self.buffer = ""
            return "", [self._add(name, args) for name, args in calls]
        return self._auto(final=True)

    def _named(self, text: str) -> list[dict]:
        deltas = []
        if not self.calls:
            deltas.append(self._add(self.name, ""))
        if text:
            self.calls[0]["function"]["arguments"] += text
            deltas.append({"index": 0, "function": {"arguments": text}})
        return deltas

    def _auto(self, final: bool) -> tuple[str, list[dict]]:
        out, deltas = [], []
        while True:
            start = self.buffer.find(OPEN)
            if start < 0:
                keep = 0 if final else _partial_tag(self.buffer)
                out.append(self.buffer[:len(self.buffer) - keep])
                self.buffer = self.buffer[len(self.buffer) - keep:]
                break
            end = self.buffer.find(CLOSE, start)
            if end < 0 and not final:
                out.append(self.buffer[:start])
                self.buffer = self.buffer[start:]
                break
            body = self.buffer[start + len(OPEN):end if end >= 0 else len(self.buffer)]
            call = _call(body)
            if call is None:  # not a call after all: it is text
                cut = end + len(CLOSE) if end >= 0 else len(self.buffer)
                out.append(self.buffer[:cut])
                self.buffer = self.buffer[cut:]
                continue
            out.append(self.buffer[:start])
            deltas.append(self._add(*call))
            self.buffer = self.buffer[end + len(CLOSE):] if end >= 0 else ""
        text = "".join(out)
        if self.calls and not "".join(self.parts).strip():
            text = text.lstrip()  # no stray newlines before or between calls
        self.parts.append(text)
        return text, deltas

    def _add(self, name: str, arguments) -> dict:
        args = arguments if isinstance(arguments, str) else orjson.dumps(arguments).decode()
        call = {"id": call_id(), "type": "function", "function": {"name": name, "arguments": args}}
        self.calls.append(call)
        return {"index": len(self.calls) - 1, **call,
                "function": {"name": name, "arguments": args}}


def parse(mode: str, name: str | None, text: str) -> tuple[str | None, list[dict]]:
    """A whole answer -> (content or None, tool_calls)."""
    calls = ToolCalls(mode, name)
    calls.feed(text)
    calls.finish()
    return calls.content, calls.calls


def _partial_tag(text: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of the opening tag."""
    for n in range(min(len(OPEN) - 1, len(text)), 0, -1):
        if OPEN.startswith(text[-n:]):
            return n
    return 0


def _call(body: str) -> tuple[str, object] | None:
    try:
        obj = orjson.loads(body.strip())
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return obj["name"], args


def _required(text: str) -> list[tuple[str, object]] | None:
    try:
        items = orjson.loads(text)
    except orjson.JSONDecodeError:
        return None
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        return None
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        calls.append((item["name"], item.get("arguments", {})))
    return calls

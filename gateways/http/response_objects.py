"""OpenAI Responses objects: the `response` and its output items, whole or as streamed events.

No I/O. `ResponseShape` is one response's id, time, model and the request fields it echoes;
`ResponseOutput` is its one answer, a `gateways.http.answers.Choice` that renders OpenAI's
Responses events instead of chat chunks (the tool-call reading stays Choice's). A stream is

    event: response.created               {"response": {... "status": "in_progress"}}
    event: response.in_progress
    event: response.output_item.added     a message item (or a function_call item)
    event: response.content_part.added    an output_text part
    event: response.output_text.delta     one per delta of text
    event: response.output_text.done, response.content_part.done, response.output_item.done
    event: response.output_item.added     {"item": {"type": "function_call", ...}}
    event: response.function_call_arguments.delta / .done, response.output_item.done
    event: response.completed             {"response": {... "output": [...], "usage": {...}}}

each `data:` object carrying its `type` and a `sequence_number` counted from 0. A response cut by
`max_output_tokens` ends with `response.incomplete`, one that fails mid-way with
`response.failed`.

A delta (of text or of a call's arguments) is the hot path, one per token: its event is framed
from bytes made once per output item around its sequence number and the JSON string of its text,
as the chat path's `sse.Shape.delta_event` is. A message item's other events are bytes made once
per output index (`message_events`) with its id and text put in (`pieces`, `fill`), and
`response.created` and `response.in_progress` share one serialized response. The same bytes as
building each event's object.
"""

from __future__ import annotations

import functools
import random

import orjson

from broker.client import Event
from gateways.http import sse
from gateways.http.answers import Choice

_ids = random.Random()  # seeded from os.urandom; item ids must be unique, not secret


def sse_event(kind: str, seq, fields: dict) -> bytes:
    data = orjson.dumps({"type": kind, "sequence_number": seq, **fields})
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def pieces(kind: str, **fields) -> tuple[bytes, ...]:
    """An event's bytes split where sse.MARK stands (the sequence number first, then each MARK
    in `fields` in order): `fill(pieces, seq, *values)` puts JSON values back in those places."""
    return tuple(sse_event(kind, sse.MARK, fields).split(orjson.dumps(sse.MARK)))


def fill(pieces: tuple[bytes, ...], seq: int, *values: bytes) -> bytes:
    out = [pieces[0], b"%d" % seq]
    for piece, value in zip(pieces[1:], values):
        out += (piece, value)
    out.append(pieces[-1])
    return b"".join(out)


# A message item's events depend on its output index alone, besides the sequence number, its
# id and its text: made once per index, kept for the 256 used last (as anthropic_answer's).
@functools.lru_cache(maxsize=256)
def message_events(index: int) -> dict[str, tuple[bytes, ...]]:
    """`pieces` of each event of a message item at `index`, MARK standing for its id (and text)."""
    mark, where = sse.MARK, {"item_id": sse.MARK, "output_index": index, "content_index": 0}
    return {
        "added": pieces("response.output_item.added", output_index=index,
                        item=message_item(mark, "", "in_progress")),
        "part": pieces("response.content_part.added", **where, part=text_part("")),
        "delta": pieces("response.output_text.delta", **where, delta=mark, logprobs=[]),
        "text": pieces("response.output_text.done", **where, text=mark, logprobs=[]),
        "part_done": pieces("response.content_part.done", **where, part=text_part(mark)),
        "done": pieces("response.output_item.done", output_index=index,
                       item=message_item(mark, mark)),
    }


CREATED = pieces("response.created", response=sse.MARK)
IN_PROGRESS = pieces("response.in_progress", response=sse.MARK)


def item_id(prefix: str) -> str:
    return f"{prefix}_{_ids.getrandbits(96):024x}"


def message_item(id_: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": id_, "status": status, "role": "assistant",
            "content": [text_part(text)] if status == "completed" else []}


def text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(id_: str, call: dict, status: str = "completed") -> dict:
    """A chat tool call ({"id", "function": {"name", "arguments"}}) as a function_call item."""
    return {"type": "function_call", "id": id_, "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"],
            "status": status}


def output_of(choice: dict) -> list[dict]:
    """A whole chat choice ({"message": {"content", "tool_calls"}}) as Responses output items."""
    message = choice["message"]
    items = []
    if message["content"] is not None and (message["content"] or not message.get("tool_calls")):
        items.append(message_item(item_id("msg"), message["content"]))
    items += [call_item(item_id("fc"), call) for call in message.get("tool_calls") or []]
    return items


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached_tokens},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


class ResponseShape(sse.ChatShape):
    """One response: chat shapes for the whole answer, and the response object around it.
    `echo` holds the request fields a response repeats (instructions, tools, text, ...)."""

    ID_PREFIX = "resp_"

    def __init__(self, model: str, echo: dict, id_: str | None = None):
        super().__init__(model)
        self.echo = echo
        if id_ is not None:
            self.id = id_  # known before the request runs: a new chain's session

    def response(self, status: str, output: list[dict], usage_: dict | None = None,
                 reason: str | None = None, error: dict | None = None) -> dict:
        incomplete = {"reason": "max_output_tokens"} if reason == "length" else None
        if incomplete is not None and status == "completed":
            status = "incomplete"
        return {"id": self.id, "object": "response", "created_at": self.created,
                "status": status, "error": error, "incomplete_details": incomplete,
                "model": self.model, "output": output, "usage": usage_, **self.echo}


class ResponseOutput(Choice):
    """The one answer of a streamed response, as Responses events (see the module's docstring)."""

    def __init__(self, index: int, shape: ResponseShape, request: dict, echo=None,
                 logprobs: bool = False):
        super().__init__(index, shape, request)
        self.seq = 0
        self.items: list[dict] = []  # output items so far, the last one maybe still open
        self.open_item: dict | None = None
        self.texts: list[str] = []  # the open message's text so far
        self.frame = (b"", b"", b"")  # the open item's delta `frame`

    def event(self, kind: str, **fields) -> bytes:
        self.seq += 1
        return sse_event(kind, self.seq - 1, fields)

    def delta_event(self, text: str) -> bytes:
        """The open item's delta event for `text`, from its frame."""
        head, mid, tail = self.frame
        self.seq += 1
        return head + b"%d" % (self.seq - 1) + mid + orjson.dumps(text) + tail

    def filled(self, pieces: tuple[bytes, ...], *values: bytes) -> bytes:
        self.seq += 1
        return fill(pieces, self.seq - 1, *values)

    def opening(self) -> list[bytes]:
        response = orjson.dumps(self.shape.response("in_progress", []))
        return [self.filled(CREATED, response), self.filled(IN_PROGRESS, response)]

    def render(self, text: str, calls: list[dict], entries: list | None) -> list[bytes]:
        out = []
        if text:
            if self.open_item is None or self.open_item["type"] != "message":
                out += self.close_item()
                out += self.open_message()
            self.texts.append(text)
            out.append(self.delta_event(text))
        for call in calls:
            if "id" in call:  # a new call; its arguments may follow in later deltas
                out += self.close_item()
                out += self.open_call(call)
            arguments = call["function"].get("arguments", "") if "id" not in call \
                else self.open_item["arguments"]
            if arguments:
                if "id" not in call:
                    self.open_item["arguments"] += arguments
                out.append(self.delta_event(arguments))
        return out

    def open_message(self) -> list[bytes]:
        self.texts = []
        self.open_item = message_item(item_id("msg"), "", "in_progress")
        self.items.append(self.open_item)
        events, id_ = message_events(len(self.items) - 1), orjson.dumps(self.open_item["id"])
        head, mid, tail = events["delta"][0], events["delta"][1:3], events["delta"][3]
        self.frame = (head, mid[0] + id_ + mid[1], tail)
        return [self.filled(events["added"], id_), self.filled(events["part"], id_)]

    def open_call(self, call: dict) -> list[bytes]:
        self.open_item = call_item(item_id("fc"), call, "in_progress")
        self.items.append(self.open_item)
        added = {**self.open_item, "arguments": ""}
        head, mid, tail = pieces("response.function_call_arguments.delta",
                                 item_id=self.open_item["id"], output_index=len(self.items) - 1,
                                 delta=sse.MARK)
        self.frame = (head, mid, tail)
        return [self.event("response.output_item.added", output_index=len(self.items) - 1,
                           item=added)]

    def close_item(self) -> list[bytes]:
        item, self.open_item = self.open_item, None
        if item is None:
            return []
        index = len(self.items) - 1
        item["status"] = "completed"
        if item["type"] == "message":
            text = "".join(self.texts)
            item["content"] = [text_part(text)]
            events, id_, text_ = message_events(index), orjson.dumps(item["id"]), orjson.dumps(text)
            return [self.filled(events["text"], id_, text_),
                    self.filled(events["part_done"], id_, text_),
                    self.filled(events["done"], id_, text_)]
        return [self.event("response.function_call_arguments.done", item_id=item["id"],
                           output_index=index, name=item["name"], arguments=item["arguments"]),
                self.event("response.output_item.done", output_index=index, item=item)]

    def closing(self) -> list[bytes]:
        return self.close_item()

    def final(self) -> dict:
        """The whole response once the stream ended well."""
        return self.shape.response("completed", self.items, self.usage(), self.reason)

    def failed(self, error: dict) -> bytes:
        response = self.shape.response("failed", self.items, None, error=error)
        return self.event("response.failed", response=response)

    def usage(self) -> dict:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def done(self, ev: Event) -> list[bytes]:
        out = super().done(ev)
        self.reason = ev.finish_reason or "stop"  # Choice says tool_calls; the response knows
        return out


def assistant_message(output: list[dict]) -> dict:
    """Output items as the chat message that replays them (the next turn's history)."""
    texts = [part["text"] for item in output if item["type"] == "message"
             for part in item["content"]]
    calls = [{"id": item["call_id"], "type": "function",
              "function": {"name": item["name"], "arguments": item["arguments"]}}
             for item in output if item["type"] == "function_call"]
    message = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if calls:
        message["tool_calls"] = calls
    return message

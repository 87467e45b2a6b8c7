"""The TCP gateway's line protocol: parsing client lines and building server lines.

No sockets here: `server.py` reads lines and hands each to `parse_line`, which returns one typed
command (`Submit`, `CancelLine`, `Ping`, `Resume`, `HelloLine`) or raises `LineError` carrying the
error line to send back. Server lines are plain dicts encoded by `encode` (orjson + b"\\n").
The wire format itself is documented for client authors in docs/protocol.md.

A request's `model` picks the model (the root refuses one no node serves: `unknown_model`), and
the final line names it. Its `session` names the conversation it continues, so the tree sends it
where the conversation's earlier turns ran; without one the root recognises the conversation by
its history (broker/affinity.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from broker.nesting import MAX_DEPTH, too_deep
from broker.protocol import BadRequest, ErrorCode, Request

MAX_ID = 128  # characters in a client id


class Code(ErrorCode):
    """The stable error codes of the TCP protocol: the tree's, plus the connection's own."""

    INVALID_JSON = "invalid_json"
    INVALID_UTF8 = "invalid_utf8"
    LINE_TOO_LONG = "line_too_long"
    TOO_MANY_REQUESTS = "too_many_requests"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_ID = "unknown_id"
    RESUME_EXPIRED = "resume_expired"
    UNAUTHORIZED = "unauthorized"


class LineError(Exception):
    """A client line that cannot be served; `line` is the error line to send back."""

    def __init__(self, code: str, message: str, rid: str | None = None):
        super().__init__(message)
        self.line = error_line(rid, code, message)


@dataclass(slots=True)
class Submit:
    id: str
    request: dict  # validated by broker.protocol.Request, ready for RootClient.submit
    resumable: bool = True
    timeout: float | None = None


@dataclass(slots=True)
class CancelLine:
    id: str


@dataclass(slots=True)
class Ping:
    value: object


@dataclass(slots=True)
class Resume:
    session: str
    offsets: dict[str, int]


@dataclass(slots=True)
class HelloLine:
    info: object


# --- server lines --------------------------------------------------------------------------------


def encode(line: dict) -> bytes:
    return orjson.dumps(line) + b"\n"


def error_line(rid: str | None, code: str, message: str, retry_after: float | None = None) -> dict:
    err: dict = {"code": code, "message": message}
    if retry_after is not None:
        err["retry_after"] = retry_after
    return {"id": rid, "error": err}


def delta_line(rid: str, text: str, offset: int) -> dict:
    return {"id": rid, "delta": text, "offset": offset}


def done_line(rid: str, finish_reason: str, text: str, prompt_tokens: int,
              completion_tokens: int, model: str | None = None) -> dict:
    line = {"id": rid, "done": True, "finish_reason": finish_reason, "text": text,
            "offset": len(text),
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}
    if model is not None:
        line["model"] = model  # only when the request named one: the examples stay as they were
    return line


# --- client lines --------------------------------------------------------------------------------


def decode_json(raw: bytes) -> dict:
    """One line's bytes -> a JSON object, or LineError (invalid_utf8 / invalid_json)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LineError(Code.INVALID_UTF8,
                        f"the line is not valid UTF-8 (byte {e.start})") from None
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as e:
        # Our own words and the position, not the parser's message: that changes between versions.
        raise LineError(Code.INVALID_JSON, f"the line is not valid JSON (line {e.lineno}, "
                                           f"column {e.colno})") from None
    if not isinstance(data, dict):
        raise LineError(Code.INVALID_JSON, "each line must be one JSON object")
    if too_deep(data):
        raise LineError(Code.INVALID_JSON, f"the line is nested deeper than {MAX_DEPTH} levels")
    return data


def parse_line(raw: bytes):
    """A client line -> one command, or LineError naming what is wrong."""
    data = decode_json(raw)
    if "cancel" in data:
        return CancelLine(check_id(data["cancel"], "cancel"))
    if "ping" in data:
        return Ping(data["ping"])
    if "resume" in data:
        return parse_resume(data)
    if "hello" in data:
        return HelloLine(data["hello"])
    return parse_submit(data)


def check_id(value, field: str = "id", rid: str | None = None) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID:
        raise LineError(Code.BAD_REQUEST,
                        f"'{field}' must be a string of 1 to {MAX_ID} characters", rid)
    return value


def parse_submit(data: dict) -> Submit:
    if "id" not in data:
        raise LineError(Code.BAD_REQUEST, "a request needs an 'id' (or send cancel, ping, resume)")
    rid = check_id(data["id"])
    body = {k: v for k, v in data.items() if k not in ("id", "text", "resumable", "timeout")}
    if "text" in data:
        if "messages" in data or "prompt" in data:
            raise LineError(Code.BAD_REQUEST, "give one of 'text', 'messages' or 'prompt'", rid)
        if not isinstance(data["text"], str):
            raise LineError(Code.BAD_REQUEST, "'text' must be a string", rid)
        body["messages"] = [{"role": "user", "content": data["text"]}]
    resumable = data.get("resumable", True)
    if not isinstance(resumable, bool):
        raise LineError(Code.BAD_REQUEST, "'resumable' must be true or false", rid)
    timeout = data.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or timeout <= 0):
        raise LineError(Code.BAD_REQUEST, "'timeout' must be a positive number of seconds", rid)
    try:
        request = Request.from_dict(body).to_dict()
    except BadRequest as e:
        where = f" ({e.param})" if e.param and e.param not in e.message else ""
        raise LineError(Code.BAD_REQUEST, e.message + where, rid) from None
    return Submit(rid, request, resumable, timeout)


def parse_resume(data: dict) -> Resume:
    token = data["resume"]
    if not isinstance(token, str) or not token:
        raise LineError(Code.BAD_REQUEST, "'resume' must be the session token from the hello line")
    offsets = data.get("offsets", {})
    if not isinstance(offsets, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in offsets.values()):
        raise LineError(Code.BAD_REQUEST,
                        "'offsets' must map request ids to the number of characters you have")
    return Resume(token, offsets)

"""The one wire protocol of treechat: every ZeroMQ message of every process.

A message is a command frame (one byte naming the type) followed by one body frame (orjson),
after whatever identity frames the socket adds:

    DEALER side:  [cmd][body]
    ROUTER side:  [identity][cmd][body]

Bodies decode against the type their command names, never by guessing and never by pickle:
`decode()` raises `ProtocolError` for an unknown command, invalid JSON, a missing field or a field
of the wrong type, and every reader logs and drops such a frame instead of crashing. Unknown
fields are ignored so a newer peer can append fields; fields are only ever appended.

Who sends what (`rid` is the root's id of one dispatch; a re-dispatch gets a new one, so a late
result from a node declared dead matches nothing and is dropped; `ref` is the gateway's own id):

    gateway -> root (front):  Hello, Heartbeat, Submit (or resubmit), Cancel, StatusQuery, Keep,
                              Bye
    root -> gateway:          Heartbeat, Deltas (admissions, deltas, finishes), Done, Error,
                              StatusReply, Kept, Reregister
    parent -> child (tree):   Heartbeat, Dispatch
    child -> parent:          Heartbeat (the child's registered incarnation, its subtree Load)
    node -> root (results):   Register, Lookup, Heartbeat (with the rids it holds), Acks, Tokens,
                              Done, Error, Bye
    root -> node:             Welcome, Refused, Found, Reregister, Heartbeat, Cancel, Adopt

Fencing (docs/architecture.md): a registration is an *incarnation* (a random id the root hands
out in Welcome); a parent takes a connection as its child only for the incarnation the root
vouched for (Adopt, or the root's own registry), and the root takes a result for a rid only from
the node that holds it. rids are random 63-bit numbers, one per dispatch.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

# The request a client asks for lives in broker/request.py; re-exported for every reader.
from broker.request import MAX_LOGPROBS, SAMPLING_LIMITS, BadRequest, Request, _is_int  # noqa: F401


class ProtocolError(ValueError):
    """A frame that does not decode as the message its command names."""


class FinishReason(enum.IntEnum):
    STOP = 0
    LENGTH = 1
    CANCELLED = 2
    ERROR = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class ErrorCode:
    """Stable error codes shared by the tree and every gateway (the TCP protocol shows them)."""

    BAD_REQUEST = "bad_request"
    TOO_LONG = "too_long"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    NODE_LOST = "node_lost"
    ROOT_LOST = "root_lost"
    SHUTTING_DOWN = "shutting_down"
    HANDED_BACK = "handed_back"  # node -> root only: "I could not finish it, place it elsewhere"
    UNKNOWN_MODEL = "unknown_model"
    ENGINE = "engine_error"


# --- messages ------------------------------------------------------------------------------------

REGISTRY: dict[bytes, type["Message"]] = {}


class Message:
    """Base of every wire message: `CMD` is its command frame."""

    CMD: ClassVar[bytes] = b""
    __slots__ = ()

    def frames(self) -> list[bytes]:
        return [self.CMD, orjson.dumps(self)]  # orjson encodes dataclasses natively


def message(cmd: bytes):
    """Declare a wire message: a slotted dataclass registered under its one-byte command."""

    def wrap(cls):
        if cmd in REGISTRY:
            raise TypeError(f"command {cmd!r} used twice")
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        cls = dataclass(slots=True)(type(cls.__name__, (Message,), {**body, "CMD": cmd}))
        REGISTRY[cmd] = cls
        return cls

    return wrap


@message(b"h")
class Hello:
    """Gateway -> root: who I am (shown by `treechat status`). `lost`: I lost the root I talked to
    (a standby root takes over only when a member of the tree says so: broker/pair.py)."""
    name: str
    kind: str = "gateway"
    lost: bool = False


@message(b"b")
class Heartbeat:
    """Every edge, both ways, about once a second. A child's heartbeat carries its subtree's load
    (see `Load`) and its `incarnation` (from Welcome: a parent adopts only a registered one); the
    root's carries its `epoch` so peers notice a restarted root at once; a node's heartbeat to the
    root lists the rids it `held` (running or queued there), which the root reconciles."""
    sender: str = ""
    epoch: int = 0
    load: dict | None = None
    interval: float = 0.0  # the sender's heartbeat period: a peer beats at least this often
    incarnation: int = 0
    held: list | None = None


@message(b"s")
class Submit:
    """Gateway -> root: a new request. `timeout` (seconds) becomes its deadline at the root (else
    the root's default deadline). `resubmit`: the gateway sends again a request a lost root held,
    with the tokens and text the client already has; the root admits it past its queue limit and
    continues after them."""
    ref: int
    request: dict
    timeout: float | None = None
    resume_ids: list[int] = field(default_factory=list)
    resume_text: str = ""
    resubmit: bool = False


@message(b"x")
class Cancel:
    """Gateway -> root (`id` = ref) and root -> node (`id` = rid): stop it at the next step."""
    id: int


@message(b"d")
class Dispatch:
    """Root -> child and node -> child: run or place this request.

    `hop` counts the edges travelled (for ack ordering); `resume_ids`/`resume_text` are the tokens
    and text the client already has when a request is re-dispatched after a node was lost.
    `model`: only a node of this model may run it (null: any). `route`: the names of the nodes
    from the top-level one down to the node that holds the request's conversation (its home), so
    route[hop - 1] is the receiver; a parent prefers the next one when it has a free slot."""
    rid: int
    request: dict
    hop: int = 1
    resume_ids: list[int] = field(default_factory=list)
    resume_text: str = ""
    model: str | None = None
    route: list | None = None


@message(b"k")
class Acks:
    """Node -> root: where requests now are. items: [rid, hop, state, to] with state one of
    'running', 'queued', 'forwarded' (then `to` names the child)."""
    items: list


@message(b"t")
class Tokens:
    """Node -> root: one engine step. items: [rid, text_delta, [token ids]] or, when the request
    asked for logprobs, [rid, text_delta, [token ids], logprobs] (see `TokenLogprobs`); then the
    requests that finished in it, done: [rid, finish_reason, prompt_tokens, completion_tokens,
    cached_tokens] (the last: prompt tokens reused from the engine's prefix cache; optional)."""
    items: list
    done: list = field(default_factory=list)


@message(b"D")
class Deltas:
    """Root -> gateway: everything for this gateway from one turn of the root's loop, in the order
    a client applies it: accepted [ref, request_id], items [ref, text, n_tokens, logprobs,
    token ids] (logprobs null unless the Tokens item had them; the ids let a gateway resubmit
    after a root restart), then done [ref, finish_reason, prompt_tokens, completion_tokens,
    cached_tokens]."""
    items: list
    done: list = field(default_factory=list)
    accepted: list = field(default_factory=list)  # [ref, request_id] admitted this turn


# Logprobs ride as the 4th element of a Tokens item (optional) or a Deltas item (null when none):
#     [token_text, logprob, [[alt_text, alt_logprob], ...]]
# (the k likeliest alternatives when the request asked for logprobs=k). Token texts are the
# tokenizer's own piece for that id, decoded alone, so a gateway needs no tokenizer. A request
# with prompt_logprobs gets, before its first token, one item with no text and no ids whose
# entries are the prompt's tokens (the first one's logprob null): [rid, "", [], entries].
TokenLogprobs = list


@message(b"f")
class Done:
    """The request finished. `id` is the rid (node -> root) or the ref (root -> gateway)."""
    id: int
    finish_reason: str
    prompt_tokens: int = 0
    completion_tokens: int = 0


@message(b"e")
class Error:
    """The request failed; `id` as in Done. `retry_after` (seconds) comes with `overloaded`."""
    id: int
    code: str
    message: str
    retry_after: float | None = None


@message(b"r")
class Register:
    """Node -> root: bind `name` in the registry. `instance` tells a restart from a duplicate."""
    name: str
    instance: str
    parent: str | None
    endpoint: str
    slots: int
    model: str | None = None
    engine: str = "none"
    info: dict | None = None
    lost: bool = False  # as in Hello: this node lost the root it was registered with


@message(b"w")
class Welcome:
    """Root -> node: registered. `tree` is the endpoint of the root's tree socket; `incarnation`
    names this registration (the node shows it to its parent; a new registration is a new one)."""
    name: str
    epoch: int
    tree: str
    heartbeat: float
    incarnation: int = 0


@message(b"R")
class Refused:
    """Root -> node: not registered, and why (a live node holds the name)."""
    name: str
    reason: str


@message(b"?")
class Reregister:
    """Root -> node or gateway: I do not know you (I restarted, or declared you lost): register
    again (a gateway says Hello and resubmits what it still has open)."""
    epoch: int = 0


@message(b"a")
class Adopt:
    """Root -> parent node: `name` registered under you as `incarnation`; take as that child only
    a connection showing it. `incarnation` 0: that child is gone (lost or left): drop it."""
    name: str
    incarnation: int


@message(b"l")
class Lookup:
    """Node or CLI -> root: the registry entry for `name`, or every entry when `name` is null."""
    name: str | None = None


@message(b"L")
class Found:
    """Root -> asker: registry entries (empty when the name is not registered)."""
    entries: list


@message(b"q")
class StatusQuery:
    """Anyone -> root (front): the live tree."""
    ref: int = 0


@message(b"S")
class StatusReply:
    """Root -> asker: the live tree, as `/v1/tree` shows it."""
    ref: int
    tree: dict


@message(b"K")
class Keep:
    """Gateway -> root: the root's store of kept responses (broker/store.py). `op` "put" keeps
    `value` under `key`, "get" asks for it, "delete" drops it; the root answers with Kept."""
    ref: int
    op: str
    key: str
    value: dict | None = None


@message(b"V")
class Kept:
    """Root -> gateway: the answer to Keep `ref`: the value ("get"; null when there is none, or it
    expired) and whether the key was there ("get", "delete"; true for "put")."""
    ref: int
    found: bool
    value: dict | None = None


@message(b"y")
class Bye:
    """Node or gateway -> root: I am leaving on purpose (SIGTERM, or a CLI query done)."""
    name: str


@message(b"P")
class Peer:
    """Root <-> root, every heartbeat (broker/pair.py): my `state` (primary, backup, active or
    passive), for how long I have been active (`active_for`, seconds), my epoch and the address
    my front socket is reached at."""
    state: str
    epoch: int = 0
    active_for: float = 0.0
    address: str = ""


@message(b"N")
class Standby:
    """Root -> gateway, node or CLI: I am not the active root and may not serve you; `active` is
    the address of the one that is, when I know it."""
    reason: str
    active: str | None = None


# --- decoding ------------------------------------------------------------------------------------


def decode(frames: list[bytes]) -> Message:
    """Decode `[cmd, body]` into its message type, validating field types; raise ProtocolError."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames (command, body), got {len(frames)}")
    cmd, body = frames
    cls = REGISTRY.get(bytes(cmd))
    if cls is None:
        raise ProtocolError(f"unknown command {bytes(cmd)[:8]!r}")
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise ProtocolError(f"{cls.__name__}: body is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"{cls.__name__}: body must be a JSON object")
    kwargs = {}
    for f in _FIELDS[cls]:
        name, check, required = f
        if name in data:
            value = data[name]
            if not check(value):
                raise ProtocolError(f"{cls.__name__}.{name}: wrong type {type(value).__name__}")
            kwargs[name] = value
        elif required:
            raise ProtocolError(f"{cls.__name__}: missing field '{name}'")
    return cls(**kwargs)


def _checker(tp) -> typing.Callable[[Any], bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        checks = [_checker(a) for a in typing.get_args(tp)]
        return lambda v: any(c(v) for c in checks)
    if tp is type(None):
        return lambda v: v is None
    if tp is int:
        return _is_int
    if tp is float:
        return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    base = origin or tp
    return lambda v: isinstance(v, base)


def _fields(cls) -> list[tuple[str, Any, bool]]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        out.append((f.name, _checker(hints[f.name]), required))
    return out


_FIELDS = {cls: _fields(cls) for cls in REGISTRY.values()}

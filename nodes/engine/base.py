"""The engine interface: what a node needs from whatever produces tokens.

A node owns at most one engine. It calls `submit`/`cancel` from its event loop; the engine reports
each batched step through the `emit` callback it was started with, always on the node's event
loop (an engine that computes in a thread hands its steps over with `loop.call_soon_threadsafe`).

One step reports, for every request that advanced in it, the new text and token ids; for every
request that left the batch, its finish; for every request it refused, an error. A request leaves
exactly once: by `done` (stop, length, cancelled) or by `errors`.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable

from broker.limits import PROMPT_LOGPROBS_TOKENS
from broker.protocol import Request


@dataclass(slots=True)
class EngineRequest:
    """A request as a node hands it to its engine.

    `resume_ids` are tokens already generated (and `resume_text` the text already delivered) by a
    node that was lost: the engine continues after them, emits only text beyond `resume_text`, and
    counts them in `completion_tokens` and against `max_tokens`."""

    rid: int
    request: Request
    resume_ids: list[int] = field(default_factory=list)
    resume_text: str = ""


@dataclass(slots=True)
class Finish:
    rid: int
    reason: str  # FinishReason label: "stop", "length", "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose keys and values were reused, not computed


@dataclass(slots=True)
class StepOutput:
    """One engine step: tokens as (rid, text delta, new token ids), with a fourth element, the
    new tokens' logprobs (`broker.protocol.TokenLogprobs`), when the request asked for them;
    finishes; errors as (rid, ErrorCode, message)."""

    tokens: list[tuple[int, str, list[int]]] = field(default_factory=list)
    done: list[Finish] = field(default_factory=list)
    errors: list[tuple[int, str, str]] = field(default_factory=list)


class EngineError(Exception):
    """A request this engine can never serve (raised by `submit`, before any work is done)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def prompt_logprobs_too_long(tokens: int) -> str:
    """Why a prompt this long gets no prompt logprobs: all of them ride in one message to the
    root, which reads messages of a bounded size (broker/limits.py)."""
    return (f"prompt_logprobs are given for prompts of up to {PROMPT_LOGPROBS_TOKENS} tokens; "
            f"this prompt has {tokens}")


Emit = Callable[[StepOutput], None]


class Engine(ABC):
    """Base of every engine. `slots` is how many requests may run at once; the node never submits
    more than that (it queues the rest), so an engine needs no queue of its own for admission."""

    kind: str = "none"
    slots: int = 1
    model: str | None = None

    @abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop, emit: Emit) -> None:
        """Begin stepping; report each step with `emit`, called on `loop`."""

    @abstractmethod
    def submit(self, req: EngineRequest) -> None:
        """Admit a request to the running batch (at the next step). May raise EngineError."""

    @abstractmethod
    def cancel(self, rid: int) -> None:
        """The request leaves the batch at the next step, with a `cancelled` finish."""

    @abstractmethod
    def stop(self) -> None:
        """Stop stepping and free resources; requests still running get no further output."""

    def describe(self) -> dict:
        """Facts `treechat status` and `/v1/models` show (model name, context length, ...)."""
        return {"engine": self.kind, "model": self.model, "slots": self.slots}

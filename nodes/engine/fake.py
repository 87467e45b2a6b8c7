"""The fake engine: deterministic tokens at a configurable pace, with real batching steps.

Used by routing tests and overhead benchmarks; it imports neither torch nor transformers.

The answer is the words of the request's last user message (or prompt), echoed in order, each
followed by a space; one word is one token, and token `i` has id `i`. It then stops (`stop`), or
with `ignore_eos` starts over until `max_tokens` (`length`). Prompt tokens are the words of all
messages. Every `delay` seconds one step advances every running request by one token.
"""

from __future__ import annotations

import asyncio

from broker.protocol import ErrorCode, FinishReason, Request
from nodes.engine.base import Engine, EngineError, EngineRequest, Finish, StepOutput

FAKE_MAX_MODEL_LEN = 1 << 20


def fake_words(req: Request) -> list[str]:
    return req.last_user_text().split() or ["..."]


def fake_prompt_tokens(req: Request) -> int:
    if req.prompt is not None:
        return len(req.prompt.split())
    return sum(len(m["content"].split()) for m in req.messages)


class _Seq:
    __slots__ = ("rid", "words", "pos", "limit", "prompt_tokens", "ignore_eos", "cancelled")

    def __init__(self, er: EngineRequest, default_limit: int):
        req = er.request
        self.rid = er.rid
        self.words = fake_words(req)
        self.pos = len(er.resume_ids)
        self.limit = req.max_tokens if req.max_tokens is not None else default_limit
        self.prompt_tokens = fake_prompt_tokens(req)
        self.ignore_eos = req.ignore_eos
        self.cancelled = False


class FakeEngine(Engine):
    kind = "fake"

    def __init__(self, slots: int = 4, delay: float = 0.0, model: str = "fake",
                 max_tokens_default: int = 0):
        if slots < 1:
            raise ValueError("the fake engine needs at least one slot")
        if delay < 0:
            raise ValueError("the fake engine's delay cannot be negative")
        if max_tokens_default < 0:
            raise ValueError("--max-tokens-default cannot be negative")
        self.max_tokens_default = max_tokens_default  # 0: no cap
        self.slots = slots
        self.delay = delay
        self.model = model
        self._running: dict[int, _Seq] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self, loop, emit) -> None:
        self._emit = emit
        self._task = loop.create_task(self._loop())

    def submit(self, er: EngineRequest) -> None:
        if er.request.max_tokens is not None and len(er.resume_ids) >= er.request.max_tokens:
            raise EngineError(ErrorCode.BAD_REQUEST, "nothing left to generate")
        if "__engine_error__" in er.request.last_user_text():  # lets tests reach the error path
            raise EngineError(ErrorCode.ENGINE, "the fake engine was asked to fail")
        self._running[er.rid] = _Seq(er, self.max_tokens_default or FAKE_MAX_MODEL_LEN)
        self._wake.set()

    def cancel(self, rid: int) -> None:
        seq = self._running.get(rid)
        if seq is not None:
            seq.cancelled = True
            self._wake.set()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def describe(self) -> dict:
        return {**super().describe(), "delay": self.delay, "max_model_len": FAKE_MAX_MODEL_LEN,
                "max_tokens_default": self.max_tokens_default or None}

    async def _loop(self) -> None:
        while True:
            if not self._running:
                self._wake.clear()
                await self._wake.wait()
            if self.delay:
                await asyncio.sleep(self.delay)
            else:
                await asyncio.sleep(0)  # one step per loop turn: new arrivals join the batch
            self._emit(self.step())

    def step(self) -> StepOutput:
        out = StepOutput()
        for rid, seq in list(self._running.items()):
            if seq.cancelled:
                self._retire(out, seq, FinishReason.CANCELLED)
                continue
            i = seq.pos
            seq.pos += 1
            out.tokens.append((rid, seq.words[i % len(seq.words)] + " ", [i]))
            if seq.pos >= seq.limit:
                self._retire(out, seq, FinishReason.LENGTH)
            elif seq.pos >= len(seq.words) and not seq.ignore_eos:
                self._retire(out, seq, FinishReason.STOP)
        return out

    def _retire(self, out: StepOutput, seq: _Seq, reason: FinishReason) -> None:
        del self._running[seq.rid]
        out.done.append(Finish(seq.rid, reason.label, seq.prompt_tokens, seq.pos))

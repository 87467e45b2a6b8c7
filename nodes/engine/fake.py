"""The fake engine: deterministic tokens at a configurable pace, with real batching steps.

Used by routing tests and overhead benchmarks; it imports neither torch nor transformers.

The answer is the words of the request's last user message (or prompt), echoed in order, each
followed by a space; one word is one token, and token `i` has id `i`. It then stops (`stop`), or
with `ignore_eos` starts over until `max_tokens` (`length`). Prompt tokens are the words of all
messages. Every `delay` seconds one step advances every running request by one token.

What the hf engine does with the other options, the fake one imitates, so gateways can be tested
without a model: `stop` strings cut the answer (held back while they might still match), a
`response_format` schema or a forced tool call gets a schema-valid JSON instance (`example`),
emitted three characters per token, in the shape nodes/engine/grammar.py gives; `logprobs` and
`prompt_logprobs` give every token log(1/2), and alternatives `alt1`, `alt2`, ... at log(1/4),
log(1/8), ...
"""

from __future__ import annotations

import asyncio
import math

import orjson

from broker.limits import PROMPT_LOGPROBS_TOKENS
from broker.protocol import ErrorCode, FinishReason, Request
from nodes.engine.base import (Engine, EngineError, EngineRequest, Finish, StepOutput,
                               prompt_logprobs_too_long)

FAKE_MAX_MODEL_LEN = 1 << 20


def fake_words(req: Request) -> list[str]:
    structured = _structured(req)
    if structured is not None:
        return [structured[i:i + 3] for i in range(0, len(structured), 3)]
    return [w + " " for w in req.last_user_text().split()] or ["... "]


def fake_prompt_tokens(req: Request) -> int:
    if req.prompt is not None:
        return len(req.prompt) if isinstance(req.prompt, list) else len(req.prompt.split())
    return sum(len((m.get("content") or "").split()) for m in req.messages)


def _structured(req: Request) -> str | None:
    forced = req.forced_tools()
    if forced:
        if isinstance(req.tool_choice, dict):
            return _json(example(forced[0].get("parameters") or {}))
        return _json([{"name": f["name"], "arguments": example(f.get("parameters") or {})}
                      for f in forced[:1]])
    schema = req.json_schema()
    return None if schema is None else _json(example(schema))


def _json(value) -> str:
    return orjson.dumps(value).decode()


def example(schema: dict, root: dict | None = None, depth: int = 0):
    """A small instance of a JSON schema (types, properties, enum, const, anyOf, $ref, ...)."""
    root = root or schema
    if depth > 8 or not isinstance(schema, dict):
        return None
    if "$ref" in schema:
        target = root
        for part in schema["$ref"].lstrip("#/").split("/"):
            target = target.get(part, {}) if part else target
        return example(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return example(schema[key][0], root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {k: example(props.get(k, {}), root, depth + 1)
                for k in schema.get("required", list(props))}
    if kind == "array":
        return [example(schema.get("items", {}), root, depth + 1)
                for _ in range(schema.get("minItems", 1))]
    if kind in ("integer", "number"):
        value = max(schema.get("minimum", 1), schema.get("exclusiveMinimum", 0) + 1)
        return int(value) if kind == "integer" else float(value)
    if kind == "boolean":
        return True
    if kind == "null":
        return None
    return "x" * max(1, min(schema.get("minLength", 4), schema.get("maxLength", 4)))


def fake_logprobs(texts: list[str], k: int | None, first: bool = False) -> list:
    return [[t, None if first and i == 0 else math.log(0.5),
             [] if first and i == 0 else [[f"alt{j}", math.log(0.5 ** (j + 1))]
                                          for j in range(1, (k or 0) + 1)]]
            for i, t in enumerate(texts)]


class _Seq:
    __slots__ = ("rid", "words", "pos", "limit", "prompt_tokens", "ignore_eos", "cancelled",
                 "stop", "text", "sent", "logprobs", "request")

    def __init__(self, er: EngineRequest, default_limit: int):
        req = er.request
        self.rid = er.rid
        self.request = req
        self.words = fake_words(req)
        self.pos = len(er.resume_ids)
        self.limit = req.max_tokens if req.max_tokens is not None else default_limit
        self.prompt_tokens = fake_prompt_tokens(req)
        self.ignore_eos = req.ignore_eos
        self.cancelled = False
        self.stop = list(req.stop)
        self.text = "".join(self.words[i % len(self.words)] for i in range(self.pos))
        self.sent = len(er.resume_text)
        self.logprobs = req.logprobs

    def advance(self) -> tuple[str, bool]:
        """The next token's deliverable text, and whether a stop string ended the answer."""
        self.text += self.words[self.pos % len(self.words)]
        self.pos += 1
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            end, stopped = min(hits), True
        else:
            end, stopped = len(self.text) - _held(self.text, self.stop), False
        delta, self.sent = self.text[self.sent:max(end, self.sent)], max(end, self.sent)
        return delta, stopped


def _held(text: str, stops: list[str]) -> int:
    for n in range(min(max((len(s) for s in stops), default=1) - 1, len(text)), 0, -1):
        if any(s.startswith(text[-n:]) for s in stops):
            return n
    return 0


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
        words = len(er.request.last_user_text().split())  # the fake engine's tokens
        if er.request.prompt_logprobs is not None and words > PROMPT_LOGPROBS_TOKENS:
            raise EngineError(ErrorCode.TOO_LONG, prompt_logprobs_too_long(words))
        seq = self._running[er.rid] = _Seq(er, self.max_tokens_default or FAKE_MAX_MODEL_LEN)
        if er.request.prompt_logprobs is not None and not er.resume_ids:
            seq.pos = -1  # the first step reports the prompt's entries
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
            if seq.pos < 0:
                seq.pos = 0
                words = seq.request.last_user_text().split() or ["..."]
                out.tokens.append((rid, "", [], fake_logprobs(
                    words, seq.request.prompt_logprobs, first=True)))
                continue
            i = seq.pos
            token = seq.words[i % len(seq.words)]
            delta, stopped = seq.advance()
            reason = None
            if stopped:
                reason = FinishReason.STOP
            elif seq.pos >= seq.limit:
                reason = FinishReason.LENGTH
            elif seq.pos >= len(seq.words) and not seq.ignore_eos:
                reason = FinishReason.STOP
            if reason is not None and not stopped:  # the end: a held tail was no stop string
                delta, seq.sent = delta + seq.text[seq.sent:], len(seq.text)
            if seq.logprobs is None:
                out.tokens.append((rid, delta, [i]))
            else:
                out.tokens.append((rid, delta, [i], fake_logprobs([token], seq.logprobs)))
            if reason is not None:
                self._retire(out, seq, reason)
        return out

    def _retire(self, out: StepOutput, seq: _Seq, reason: FinishReason) -> None:
        del self._running[seq.rid]
        out.done.append(Finish(seq.rid, reason.label, seq.prompt_tokens, max(seq.pos, 0)))

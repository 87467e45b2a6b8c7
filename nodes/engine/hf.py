"""The hf engine: a Hugging Face causal LM run by our own continuous-batching loop.

Runs inside the node process. `submit`/`cancel` are called on the node's event loop: `submit`
tokenizes there (so a prompt too long fails before any work) and both hand over to the engine
thread through one FIFO inbox. The engine thread loops over plain steps (stepper.py): drain the
inbox, plan one mixed batch (every running row's next token plus chunks of new prompts), one
forward (runner.py), one batched draw (sampling.py), detokenize and stop checks, retire finished
rows, one StepOutput to the loop.

The families our runner serves (families.py) run on our own model (llama.py), on a CPU over the
file's own blocks (blocks/); any other architecture on transformers' forward (the fallback
runner).
Memory is bounded by explicit limits only: `max_slots` rows, `max_model_len` tokens per sequence
and `kv_budget` tokens of KV cache (rows x the largest reservation, see kvcache.py). A request
that does not fit the budget now waits in the engine until it does.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch

from broker.limits import PROMPT_LOGPROBS_TOKENS
from broker.protocol import ErrorCode, FinishReason
from nodes.engine import DEFAULT_MAX_TOKENS, REPEAT_LAST_N, grammar, models, prompt, templates
from nodes.engine.base import (Engine, EngineError, EngineRequest, Finish, StepOutput,
                               prompt_logprobs_too_long)
from nodes.engine.detok import Detokenizer
from nodes.engine.weights import MODES
from nodes.engine.sampling import Row, SamplingParams
from nodes.engine.stepper import Stepper

log = logging.getLogger("treechat.engine")

CPU_KV_SHARE = 0.5  # of the memory available at start, for the KV cache on a CPU by default


@dataclass(frozen=True)
class HFEngineConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_slots: int | None = None
    max_model_len: int | None = None
    kv_budget: int | None = None
    kv_memory: int | None = None  # bytes the KV cache may take on a CPU (None: CPU_KV_SHARE)
    chat_template: str | None = None
    load_format: str = "auto"
    model_config: str | None = None
    threads: int | None = None  # torch CPU threads; None: torch's default (one per core)
    quantization: str = "auto"
    step_tokens: int | None = None  # tokens one step may compute (None: per device)
    cuda_graphs: bool = True
    # The repetition guard for requests that set no penalty: a repetition penalty over the last
    # `repeat_last_n` tokens (1.0: none). The command line's default is REPEAT_PENALTY.
    repeat_penalty: float = 1.0
    repeat_last_n: int = REPEAT_LAST_N
    max_tokens_default: int = DEFAULT_MAX_TOKENS  # the cap without max_tokens; 0: the context

    def __post_init__(self):
        if self.max_tokens_default < 0:
            raise ValueError("--max-tokens-default cannot be negative")
        for name in ("max_slots", "max_model_len", "kv_budget", "threads", "step_tokens",
                     "kv_memory"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype}: use auto, float32, bfloat16 or float16")
        if not 0.5 <= self.repeat_penalty <= 2.0 or self.repeat_last_n < 1:
            raise ValueError("--repeat-penalty must be between 0.5 and 2 (1: no guard) and "
                             "--repeat-last-n at least 1")
        if self.quantization not in ("auto", *MODES):
            raise ValueError(f"--quantization {self.quantization}: use auto, "
                             + ", ".join(MODES))
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"--load-format {self.load_format}: use auto or dummy")
        if self.load_format == "dummy" and self.model_config not in models.DUMMY_CONFIGS:
            raise ValueError("--load-format dummy needs --model-config, one of "
                             + ", ".join(models.DUMMY_CONFIGS))
        if self.load_format != "dummy" and self.model_config is not None:
            raise ValueError("--model-config only goes with --load-format dummy")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"--chat-template {self.chat_template}: no such file")


def available_memory() -> int:
    """Bytes the kernel says a new allocation can take now (MemAvailable), or 8 GiB."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class Seq:
    """One request inside the engine."""

    __slots__ = ("rid", "feed", "prompt_tokens", "limit", "reserve", "tokens", "sampling",
                 "ignore_eos", "detok", "row", "length", "matcher", "cached", "prompt_logprobs")

    def __init__(self, rid, prompt_ids, resume_ids, limit, params, ignore_eos, detok,
                 matcher=None, prompt_logprobs=None):
        self.rid = rid
        self.feed = prompt_ids + resume_ids  # what the prefill writes into the cache
        self.prompt_tokens = len(prompt_ids)
        self.limit = limit                    # completion tokens allowed, resumed ones included
        self.reserve = len(prompt_ids) + limit
        self.tokens = list(resume_ids)
        self.sampling = Row(params, prompt_ids, self.tokens, matcher)
        self.ignore_eos = ignore_eos
        self.detok = detok
        self.row = -1
        self.length = 0  # tokens written in the cache
        self.matcher = matcher
        self.cached = 0  # prompt tokens copied from a cached prefix (prefix.py)
        self.prompt_logprobs = prompt_logprobs  # k: the prompt's own logprobs first (echo)


class EngineThread:
    """The one thread that runs an engine's torch work: the model's load, then every step.

    OpenMP (torch's CPU threads and blocks.c's) keeps a pool of workers for each thread that
    starts parallel work, and libgomp's workers spin at a barrier only while it manages no more
    threads than there are cores; past that they sleep and each of a step's ~150 parallel
    regions pays a wake-up. A model loaded on one thread and stepped on another is two pools: on
    2 cores a 1-row decode step took 17 ms instead of 8.3. So everything runs here, one pool.
    Jobs run in order; `submit` returns a Future, `call` waits for it."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._serve, name="hf-engine", daemon=True)
        self.thread.start()

    def submit(self, fn, *args, **kwargs) -> Future:
        done: Future = Future()
        self._jobs.put((done, fn, args, kwargs))
        return done

    def call(self, fn, *args, **kwargs):
        return self.submit(fn, *args, **kwargs).result()

    def _serve(self) -> None:
        while True:
            done, fn, args, kwargs = self._jobs.get()
            try:
                done.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # the caller of call() raises it
                done.set_exception(exc)


class HFEngine(Engine):
    kind = "hf"

    def __init__(self, config: HFEngineConfig):
        self.config = config
        self.worker = EngineThread()  # the model is loaded where it will run
        loaded = self.worker.call(self._load)
        self.tokenizer, self.model = loaded.tokenizer, loaded.name
        self.device, self.dtype, self.quantization = loaded.device, loaded.dtype, loaded.quantization
        on_gpu = self.device.type == "cuda"
        self.slots = config.max_slots or (64 if on_gpu else 8)
        own = loaded.context_length
        kv_budget, fits = config.kv_budget, None
        if not on_gpu:  # the context and the budget as far as the KV cache's memory holds them
            kv_memory = config.kv_memory or int(CPU_KV_SHARE * available_memory())
            fits = max(1, kv_memory // models.kv_token_bytes(loaded))
            kv_budget = min(kv_budget or self.slots * (config.max_model_len or own), fits)
        self.max_model_len = config.max_model_len or (own if fits is None else min(own, fits))
        if self.max_model_len > own:
            raise ValueError(f"--max-model-len {self.max_model_len} exceeds the model's {own}")
        if hasattr(loaded.model, "fit_context"):  # our runner (not transformers' forward)
            loaded.model.fit_context(loaded.config, self.max_model_len)
        self.runner, self.kv_budget = self.worker.call(
            models.make_runner, loaded, slots=self.slots, max_model_len=self.max_model_len,
            kv_budget=kv_budget, cuda_graphs=config.cuda_graphs)
        if self.runner.cache.static:  # a GPU cache holds every slot a full context, or fewer slots
            self.slots = self.runner.cache.rows - 1
        self.vocab = min(len(self.tokenizer), loaded.vocab_size)
        self.eos_ids = loaded.eos_ids
        self.chat_template = self._chat_template(loaded.config)  # may add end-of-turn ids
        self.sampling_defaults = loaded.sampling_defaults
        self._tok_lock = threading.Lock()
        self._pieces: dict[int, str] = {}  # token id -> its text alone (piece())
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Seq] = deque()
        self._running: list[Seq] = []
        self._loop_done: Future | None = None  # the engine loop's job on the worker
        self._stopping = False
        self.stats = dict.fromkeys(("steps", "step_s", "decode_tokens", "prefill_tokens",
                                    "mixed_steps", "mixed_s"), 0)
        self.stepper: Stepper | None = None
        log.info("hf engine: %s on %s (%s, %s, %s runner), %d slots, context %d, KV budget %d "
                 "tokens (%.2f GiB at most)", self.model, self.device,
                 str(self.dtype).removeprefix("torch."), self.quantization,
                 type(self.runner).__name__.removesuffix("Runner").lower(), self.slots,
                 self.max_model_len, self.kv_budget,
                 self.kv_budget * models.kv_token_bytes(loaded) / (1 << 30))

    def _chat_template(self, config) -> str | None:
        """--chat-template's file; else None (the tokenizer's own template) or, when the
        tokenizer has none, its family's built-in one (templates.py), said once in the log. The
        end-of-turn tokens of the template in use (Gemma's <end_of_turn>, ChatML's <|im_end|>,
        ...) stop generation like EOS: a file's EOS is often another token."""
        chosen, picked = templates.choose(self.config.chat_template, config, self.tokenizer)
        if picked is not None:
            family, why = picked
            log.info("chat template: %s has none; using the built-in %s template (%s); %s "
                     "ends a turn", self.model, family.name, why, family.end)
        elif chosen is None and not self.tokenizer.chat_template:
            log.warning("%s has no chat template and no built-in one fits it: chat requests "
                        "need --chat-template FILE (plain prompts work)", self.model)
        self.eos_ids = self.eos_ids | templates.end_ids(chosen or self.tokenizer.chat_template,
                                                        self.tokenizer)
        return chosen

    @classmethod
    def from_args(cls, args) -> "HFEngine":
        """The engine of `add_engine_args`' flags."""
        cap = args.max_tokens_default
        return cls(HFEngineConfig(
            model=args.model, dtype=args.dtype, device=args.device, max_slots=args.max_slots,
            max_model_len=args.max_model_len, kv_budget=args.kv_budget,
            kv_memory=args.kv_cache_memory, chat_template=args.chat_template,
            load_format=args.load_format, model_config=args.model_config, threads=args.threads,
            quantization=args.quantization, step_tokens=args.max_num_batched_tokens,
            cuda_graphs=not args.enforce_eager, repeat_penalty=args.repeat_penalty,
            repeat_last_n=args.repeat_last_n,
            max_tokens_default=DEFAULT_MAX_TOKENS if cap is None else cap))

    # --- the event loop's side ---------------------------------------------------------------------

    def warm(self) -> None:
        """Work a node does once before it serves: what loading freed (the tokenizer's JSON, for a
        large vocabulary hundreds of MB that glibc keeps unless told) goes back to the system.
        llguidance's view of the tokenizer waits for the first constrained request
        (grammar._compiler)."""
        models.release_free_memory()
        # What exists now (the libraries, the model, the tokenizer) lives as long as the node:
        # the garbage collector's full passes need not walk it again (they took 2% of a prefill,
        # in bursts), only what serving allocates.
        gc.freeze()

    def start(self, loop, emit) -> None:
        self._loop, self._emit = loop, emit
        self._stopping = False
        self._inbox = queue.SimpleQueue()  # a restart must not see the last run's "stop"
        self._loop_done = self.worker.submit(self._run)

    def submit(self, er: EngineRequest) -> None:
        req = er.request
        prompt_ids = self.tokenize(req)
        p, n = len(prompt_ids), self.max_model_len
        # c: the completion asked for; with no max_tokens, at least one token must fit.
        c = req.max_tokens if req.max_tokens is not None else 1
        if p + c > n:
            raise EngineError(ErrorCode.TOO_LONG, (
                f"This model's maximum context length is {n} tokens. However, you requested "
                f"{p + c} tokens ({p} in the messages, {c} in the completion). Please reduce the "
                "length of the messages or completion."))
        if req.prompt_logprobs is not None and p > PROMPT_LOGPROBS_TOKENS:
            raise EngineError(ErrorCode.TOO_LONG, prompt_logprobs_too_long(p))
        # With no max_tokens: the server's default cap, but never past the context or what the
        # KV budget can hold.
        room = min(n, self.kv_budget) - p
        limit = req.max_tokens if req.max_tokens is not None else \
            min(room, self.config.max_tokens_default or room)
        if limit < 1 or p + limit > self.kv_budget:
            raise EngineError(ErrorCode.TOO_LONG, (
                f"This request needs {p + c} tokens of KV cache ({p} in the messages, {c} in the "
                f"completion) but this node's KV budget is {self.kv_budget} tokens. Please "
                "reduce the length of the messages or completion."))
        if len(er.resume_ids) >= limit:
            raise EngineError(ErrorCode.BAD_REQUEST, "nothing left to generate")
        detok = Detokenizer(self.tokenizer, prompt_ids, list(req.stop), self._tok_lock)
        for t in er.resume_ids:  # rebuild the text the lost node had, without sending it again
            detok.add(t)
        detok.find_stop()
        detok.sent = min(len(er.resume_text), len(detok.text))
        matcher = self.matcher(er)
        self._inbox.put(("submit", Seq(er.rid, prompt_ids, list(er.resume_ids), limit,
                                       self.sampling_params(req), req.ignore_eos, detok,
                                       matcher, req.prompt_logprobs)))

    def matcher(self, er: EngineRequest) -> grammar.Matcher | None:
        """The request's grammar (JSON answers, forced tool calls), with the resumed tokens
        replayed through it, so a resumed answer goes on exactly where the lost node left it."""
        matcher = grammar.compile_for(er.request, self.tokenizer, self.vocab)
        if matcher is not None and not all(matcher.accept(t) for t in er.resume_ids):
            raise EngineError(ErrorCode.BAD_REQUEST, "the resumed answer does not match its "
                                                     "grammar")
        return matcher

    def sampling_params(self, req) -> SamplingParams:
        temperature, top_p = self.sampling_defaults
        bias = {int(t): float(b) for t, b in (req.logit_bias or {}).items()}
        if bias and max(bias) >= self.vocab:
            raise EngineError(ErrorCode.BAD_REQUEST, (
                f"logit_bias names token id {max(bias)}, but this model's vocabulary has "
                f"{self.vocab} tokens"))
        penalties = (req.presence_penalty, req.frequency_penalty, req.repetition_penalty)
        guard = all(p is None for p in penalties)  # none set: the server's repetition guard
        return SamplingParams(
            temperature if req.temperature is None else req.temperature,
            top_p if req.top_p is None else req.top_p, req.top_k, req.seed,
            min_p=req.min_p or 0.0, presence=req.presence_penalty or 0.0,
            frequency=req.frequency_penalty or 0.0,
            repetition=self.config.repeat_penalty if guard else (req.repetition_penalty or 1.0),
            window=self.config.repeat_last_n if guard else None,
            bias=bias, logprobs=req.logprobs)

    def cancel(self, rid: int) -> None:
        self._inbox.put(("cancel", rid))

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        if self._loop_done is not None and threading.current_thread() is not self.worker.thread:
            try:
                self._loop_done.result(timeout=10)
            except TimeoutError:
                log.warning("the engine thread did not stop within 10 s")

    def describe(self) -> dict:
        return {**super().describe(), "max_model_len": self.max_model_len,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "quantization": self.quantization, "kv_budget": self.kv_budget,
                "max_tokens_default": self.config.max_tokens_default or None}

    def tokenize(self, req) -> list[int]:
        """Prompt token ids: the chat template applied to `messages` (tools included, see
        prompt.py), the plain `prompt`, or the prompt's own token ids. An empty prompt is the
        start-of-text token alone (there must be something to continue)."""
        if isinstance(req.prompt, list):
            if max(req.prompt) >= self.vocab:
                raise EngineError(ErrorCode.BAD_REQUEST, (
                    f"the prompt holds token id {max(req.prompt)}, but this model's vocabulary "
                    f"has {self.vocab} tokens (ids 0 to {self.vocab - 1})"))
            return list(req.prompt)
        with self._tok_lock:
            if req.prompt is not None:
                ids = self.tokenizer.encode(req.prompt)
            else:
                template = self.chat_template or self.tokenizer.chat_template
                if not template:
                    raise EngineError(ErrorCode.BAD_REQUEST, (
                        f"the model {self.model} has no chat template: send a plain 'prompt', or "
                        "start the node with --chat-template FILE"))
                try:
                    text = prompt.render(self.tokenizer, template, req.messages,
                                         req.tools_offered())
                except prompt.TemplateError as e:
                    raise EngineError(ErrorCode.BAD_REQUEST, str(e)) from None
                ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            start = self.tokenizer.bos_token_id
            ids = [start if start is not None else min(self.eos_ids, default=0)]
        return ids

    def token_logprobs(self, tok: int, lp) -> list:
        """[text, logprob, [[alt text, alt logprob], ...]] for the wire (see broker.protocol)."""
        chosen, alts = lp
        return [self.piece(tok), chosen, [[self.piece(t), v] for t, v in alts]]

    def piece(self, tok: int) -> str:
        """One token's text, decoded once per engine (logprobs name up to 21 tokens a step)."""
        text = self._pieces.get(tok)
        if text is None:
            with self._tok_lock:
                text = self._pieces[tok] = self.tokenizer.decode([tok])
        return text

    # --- the engine thread ---------------------------------------------------------------------------

    def _load(self) -> models.Loaded:
        c = self.config
        if c.threads:
            torch.set_num_threads(c.threads)  # OpenMP settings are per thread: set them here
        return models.load(c.model, device=c.device, dtype=c.dtype, load_format=c.load_format,
                           model_config=c.model_config, quantization=c.quantization)

    def _run(self) -> None:
        self.stepper = stepper = Stepper(self, self._send, self.config.step_tokens)
        with torch.inference_mode():
            while not self._stopping:
                out = StepOutput()
                idle = not (self._running or self._waiting)
                if idle:  # what the last requests' steps freed goes back to the system
                    models.release_free_memory()
                if not self._drain(out, block=idle):
                    break
                try:
                    stepper.step(out)
                except Exception as exc:  # a bug must fail requests loudly, never hang them
                    log.exception("engine step failed")
                    stepper.fail_all(out, exc)
                    self._send(out)
        self._running.clear()  # stopped: what ran gets no further output (see Engine.stop)
        self._waiting.clear()
        stepper.decoding = 0
        self.runner.cache.reshape(0, 0, 0, 0)

    def _send(self, out: StepOutput) -> None:
        try:
            self._loop.call_soon_threadsafe(self._emit, out)
        except RuntimeError:  # the node's loop is closed: nobody to report to
            self._stopping = True

    def _drain(self, out: StepOutput, block: bool) -> bool:
        """Apply every message in the inbox; False when asked to stop."""
        while True:
            try:
                kind, value = self._inbox.get() if block else self._inbox.get_nowait()
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "submit":
                self._waiting.append(value)
            elif kind == "cancel":
                self._cancel(value, out)

    def _cancel(self, rid: int, out: StepOutput) -> None:
        for seq in self._waiting:
            if seq.rid == rid:
                self._waiting.remove(seq)
                out.done.append(Finish(rid, FinishReason.CANCELLED.label, seq.prompt_tokens,
                                       len(seq.tokens)))
                return
        for seq in self._running:
            if seq.rid == rid:
                self.stepper.retire(seq, FinishReason.CANCELLED, out)
                return

"""The hf engine: a Hugging Face causal LM run by our own continuous-batching loop.

Runs inside the node process. `submit`/`cancel` are called on the node's event loop: `submit`
tokenizes there (so a prompt too long fails before any work) and both hand over to the engine
thread through one FIFO inbox. The engine thread loops over plain steps:

    drain the inbox (new requests wait, cancels leave) -> one batched decode forward for every
    running request -> sample each row by its own settings -> detokenize, stop checks -> retire
    finished ones at once -> a StepOutput to the loop -> admit waiting requests that fit the KV
    budget and the step's prefill allowance, prefilled together in one packed forward -> their
    first tokens in a second StepOutput

Memory is bounded by explicit limits only: `max_slots` rows, `max_model_len` tokens per
sequence and `kv_budget` tokens of KV cache (rows x the largest reservation, see kvcache.py).
A request that does not fit the budget now waits in the engine until it does.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import torch

from broker.protocol import ErrorCode, FinishReason
from nodes.engine import DEFAULT_MAX_TOKENS, models
from nodes.engine.base import Engine, EngineError, EngineRequest, Finish, StepOutput
from nodes.engine.detok import Detokenizer
from nodes.engine.kvcache import SlotCache, per_token_bytes
from nodes.engine.sampling import SamplingParams
from nodes.engine.stepper import Stepper

log = logging.getLogger("treechat.engine")

CPU_MAX_MODEL_LEN = 4096


@dataclass(frozen=True)
class HFEngineConfig:
    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_slots: int | None = None
    max_model_len: int | None = None
    kv_budget: int | None = None
    chat_template: str | None = None
    load_format: str = "auto"
    model_config: str | None = None
    threads: int | None = None  # torch CPU threads; None: torch's default (one per core)
    max_tokens_default: int = DEFAULT_MAX_TOKENS  # the cap without max_tokens; 0: the context

    def __post_init__(self):
        if self.max_tokens_default < 0:
            raise ValueError("--max-tokens-default cannot be negative")
        for name in ("max_slots", "max_model_len", "kv_budget", "threads"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype}: use auto, float32, bfloat16 or float16")
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"--load-format {self.load_format}: use auto or dummy")
        if self.load_format == "dummy" and self.model_config not in models.DUMMY_CONFIGS:
            raise ValueError("--load-format dummy needs --model-config, one of "
                             + ", ".join(models.DUMMY_CONFIGS))
        if self.load_format != "dummy" and self.model_config is not None:
            raise ValueError("--model-config only goes with --load-format dummy")
        if self.chat_template is not None and not Path(self.chat_template).is_file():
            raise ValueError(f"--chat-template {self.chat_template}: no such file")


class Seq:
    """One request inside the engine."""

    __slots__ = ("rid", "feed", "prompt_tokens", "limit", "reserve", "tokens", "params",
                 "ignore_eos", "detok", "row", "length")

    def __init__(self, rid, prompt_ids, resume_ids, limit, params, ignore_eos, detok):
        self.rid = rid
        self.feed = prompt_ids + resume_ids  # what the prefill writes into the cache
        self.prompt_tokens = len(prompt_ids)
        self.limit = limit                    # completion tokens allowed, resumed ones included
        self.reserve = len(prompt_ids) + limit
        self.tokens = list(resume_ids)
        self.params = params
        self.ignore_eos = ignore_eos
        self.detok = detok
        self.row = -1
        self.length = 0  # tokens written in the cache


class HFEngine(Engine):
    kind = "hf"

    def __init__(self, config: HFEngineConfig):
        self.config = config
        if config.threads:
            torch.set_num_threads(config.threads)
        self.net, self.tokenizer, self.model, self.device, self.dtype = models.load(
            config.model, device=config.device, dtype=config.dtype,
            load_format=config.load_format, model_config=config.model_config)
        on_gpu = self.device.type == "cuda"
        self.slots = config.max_slots or (64 if on_gpu else 8)
        own = _context_length(self.net.config)
        self.max_model_len = config.max_model_len or (own if on_gpu else min(own, CPU_MAX_MODEL_LEN))
        if self.max_model_len > own:
            raise ValueError(f"--max-model-len {self.max_model_len} exceeds the model's {own}")
        self.kv_budget = config.kv_budget or self.default_kv_budget()
        self.chat_template = Path(config.chat_template).read_text() if config.chat_template else None
        self.vocab = min(len(self.tokenizer), _vocab_size(self.net.config))
        self.eos_ids = _eos_ids(self.net, self.tokenizer)
        self.sampling_defaults = (models.DEFAULT_SAMPLING if config.model is None
                                  else _sampling_defaults(self.net))
        layers = self.net.config.get_text_config().num_hidden_layers
        self.cache = SlotCache(layers, self.kv_budget, self.max_model_len, self.slots)
        self._tok_lock = threading.Lock()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._waiting: deque[Seq] = deque()
        self._running: list[Seq] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.stats = dict.fromkeys(("decode_s", "decode_steps", "decode_tokens", "prefill_s",
                                    "prefill_tokens"), 0)
        log.info("hf engine: %s on %s (%s), %d slots, context %d, KV budget %d tokens (%.0f MiB)",
                 self.model, self.device, str(self.dtype).removeprefix("torch."), self.slots,
                 self.max_model_len, self.kv_budget,
                 self.kv_budget * per_token_bytes(self.net.config, self.dtype) / 2**20)

    def default_kv_budget(self) -> int:
        """Every slot a full context; on a GPU, at most what 85% of its *total* memory holds
        beside the weights (a fixed rule, never "whatever is free right now")."""
        want = self.slots * self.max_model_len
        if self.device.type != "cuda":
            return want
        total = torch.cuda.get_device_properties(self.device).total_memory
        weights = sum(p.numel() * p.element_size() for p in self.net.parameters())
        room = int(0.85 * total) - weights  # the rest: activations, logits, the allocator
        fits = room // per_token_bytes(self.net.config, self.dtype)
        return max(self.max_model_len, min(want, fits))

    @classmethod
    def from_args(cls, args) -> "HFEngine":
        cap = getattr(args, "max_tokens_default", None)
        return cls(HFEngineConfig(
            model=args.model, dtype=args.dtype, device=args.device, max_slots=args.max_slots,
            max_model_len=args.max_model_len, kv_budget=args.kv_budget,
            chat_template=args.chat_template, load_format=args.load_format,
            model_config=args.model_config, threads=getattr(args, "threads", None),
            max_tokens_default=DEFAULT_MAX_TOKENS if cap is None else cap))

    # --- the event loop's side ---------------------------------------------------------------------

    def start(self, loop, emit) -> None:
        self._loop, self._emit = loop, emit
        self._stopping = False
        self._inbox = queue.SimpleQueue()  # a restart must not see the last run's "stop"
        self._thread = threading.Thread(target=self._run, name="hf-engine", daemon=True)
        self._thread.start()

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
        temperature, top_p = self.sampling_defaults
        params = SamplingParams(temperature if req.temperature is None else req.temperature,
                                top_p if req.top_p is None else req.top_p,
                                req.top_k, req.seed, self.device)
        detok = Detokenizer(self.tokenizer, prompt_ids, list(req.stop), self._tok_lock)
        for t in er.resume_ids:  # rebuild the text the lost node had, without sending it again
            detok.add(t)
        detok.find_stop()
        detok.sent = min(len(er.resume_text), len(detok.text))
        self._inbox.put(("submit", Seq(er.rid, prompt_ids, list(er.resume_ids), limit, params,
                                       req.ignore_eos, detok)))

    def cancel(self, rid: int) -> None:
        self._inbox.put(("cancel", rid))

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(("stop", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def describe(self) -> dict:
        return {**super().describe(), "max_model_len": self.max_model_len,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "kv_budget": self.kv_budget,
                "max_tokens_default": self.config.max_tokens_default or None}

    def tokenize(self, req) -> list[int]:
        """Prompt token ids: the chat template applied to `messages`, or the plain `prompt`."""
        with self._tok_lock:
            if req.prompt is not None:
                return self.tokenizer.encode(req.prompt)
            template = self.chat_template or self.tokenizer.chat_template
            if not template:
                raise EngineError(ErrorCode.BAD_REQUEST, (
                    f"the model {self.model} has no chat template: send a plain 'prompt', or start "
                    "the node with --chat-template FILE"))
            text = self.tokenizer.apply_chat_template(
                req.messages, chat_template=template, add_generation_prompt=True, tokenize=False)
            return self.tokenizer.encode(text, add_special_tokens=False)

    # --- the engine thread ---------------------------------------------------------------------------

    def _run(self) -> None:
        stepper = Stepper(self, self._send)
        if self.config.threads:
            torch.set_num_threads(self.config.threads)  # OpenMP settings can be per thread
        with torch.inference_mode():
            while not self._stopping:
                out = StepOutput()
                if not self._drain(out, block=not (self._running or self._waiting)):
                    break
                try:
                    stepper.step(out)
                except Exception as exc:  # a bug must fail requests loudly, never hang them
                    log.exception("engine step failed")
                    stepper.fail_all(stepper.out, exc)
                    stepper.flush()
        self._running.clear()  # stopped: what ran gets no further output (see Engine.stop)
        self._waiting.clear()
        self.cache.reshape(0, 0, 0, 0)

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
                self.retire(seq, FinishReason.CANCELLED, out)
                return

    def retire(self, seq: Seq, reason: FinishReason, out: StepOutput | None) -> None:
        """Take `seq` out of the batch now; its row is filled by the last running sequence."""
        last = self._running.pop()
        if last is not seq:
            self.cache.move_row(last.row, seq.row, last.length)
            last.row = seq.row
            self._running[seq.row] = last
        if not self._running:
            self.cache.reshape(0, 0, 0, 0)  # idle: give the whole buffer back
        if out is not None:
            out.done.append(Finish(seq.rid, reason.label, seq.prompt_tokens, len(seq.tokens)))


def _context_length(config) -> int:
    cfg = config.get_text_config()
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return CPU_MAX_MODEL_LEN


def _vocab_size(config) -> int:
    return config.get_text_config().vocab_size


def _eos_ids(net, tokenizer) -> frozenset[int]:
    ids = set()
    gen = getattr(net, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


# For requests that set no temperature or top_p: what the model's generation_config says (for the
# default model, its card's recommendation), else Ollama-like defaults. A small model sampled at temperature 1 with no top-p filter rambles (the
# default SmolLM2 answered "What is the capital of France?" with half-French noise that way).
DEFAULT_TEMPERATURE, DEFAULT_TOP_P = 0.7, 0.9


def _sampling_defaults(net) -> tuple[float, float]:
    gc = getattr(net, "generation_config", None)
    chosen = gc.to_diff_dict() if gc is not None else {}  # only what the model's authors set
    return (float(chosen.get("temperature", DEFAULT_TEMPERATURE)),
            float(chosen.get("top_p", DEFAULT_TOP_P)))

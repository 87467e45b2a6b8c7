"""Engines a node can own: `fake` (no model, for routing tests and overhead), `hf` (a real Hugging
Face causal LM), or none (a pure router). `add_engine_args` declares their flags once for every
command that starts a node; `make_engine` builds the one asked for."""

from __future__ import annotations

import argparse

from nodes.engine.base import Engine

ENGINES = ("fake", "hf", "none")
REPEAT_PENALTY, REPEAT_LAST_N = 1.1, 64  # Ollama's defaults, until measured (bench.quality)
# hf: the answer cap of a request without max_tokens (docs/http-api.md says why this number).
DEFAULT_MAX_TOKENS = 1024


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--engine", choices=ENGINES, default="hf",
                   help="what answers requests on this node (default: hf, a real model)")
    g.add_argument("--max-slots", type=int, default=None,
                   help="requests running at once on one engine (fake: 4; hf: 8 on CPU, 64 on GPU)")
    g.add_argument("--max-tokens-default", type=int, default=None, metavar="N",
                   help="longest answer of a request that sets no max_tokens (hf: "
                        f"{DEFAULT_MAX_TOKENS}; fake: none, its answers may be endless; 0: until "
                        "the context is full); a request's own max_tokens wins, up to the context")
    g.add_argument("--fake-delay", type=float, default=0.02,
                   help="fake engine: seconds per step (one token for every running request)")
    g.add_argument("--model", default=None,
                   help="hf: a Hub name, a local folder or a .gguf file (default: SmolLM2-135M-Instruct, "
                        "offline); fake: the name it serves under (default: fake)")
    g.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="hf: activations and dense weights (auto: float32 on CPU, bfloat16 on GPU)")
    g.add_argument("--quantization", choices=("auto", "none", "int8", "int4"), default="auto",
                   help="hf on CPU, Llama-family models: weights in 4- or 8-bit blocks (auto: the "
                        "file's own precision, e.g. the default model's Q4_1; none: float)")
    g.add_argument("--repeat-penalty", type=float, default=REPEAT_PENALTY,
                   help="hf: the repetition guard for requests that set no penalty of their own: "
                        f"a repetition penalty over the last --repeat-last-n tokens (default "
                        f"{REPEAT_PENALTY}; 1 turns it off; docs/benchmarks.md, 'Answer quality')")
    g.add_argument("--repeat-last-n", type=int, default=REPEAT_LAST_N,
                   help=f"hf: the guard's window in tokens, prompt included (default {REPEAT_LAST_N})")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="hf: tokens one engine step may compute, decode rows and prompt chunks "
                        "together (default: 256 on CPU, 2048 on GPU)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="hf on GPU: no CUDA graphs for the decode step")
    g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    g.add_argument("--max-model-len", type=int, default=None,
                   help="hf: context length in tokens (default: the model's own, as far as the KV "
                        "cache's memory holds it)")
    g.add_argument("--kv-budget", type=int, default=None,
                   help="hf: tokens of KV cache for all running requests together (default: "
                        "max-slots x max-model-len; on a GPU at most what 85%% of its total memory "
                        "holds beside the weights)")
    g.add_argument("--kv-cache-memory", type=memory_size, default=None, metavar="SIZE",
                   help="hf on CPU: memory the KV cache may take, e.g. 4GiB or 512MiB (default: "
                        "half of the memory available at start); it bounds --kv-budget and the "
                        "context")
    g.add_argument("--threads", type=int, default=None,
                   help="hf on CPU: torch threads for this node (default: one per core; give each "
                        "node its share when several share a machine, or they slow each other down)")
    g.add_argument("--chat-template", default=None,
                   help="hf: a Jinja chat template file (default: the model's own; a model without "
                        "one gets its family's: Gemma, ChatML, Llama 3, Phi-3, Mistral, Llama 2)")
    g.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="hf: dummy = random weights of --model-config's shape (benchmarks)")
    g.add_argument("--model-config", default=None,
                   help="hf with --load-format dummy: gpt2, qwen2.5-0.5b or llama-3-8b")


UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20,
         "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def memory_size(text: str) -> int:
    """'4GiB', '512M', '2.5g', '1000000' -> bytes (binary units; an argparse type)."""
    import re
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in UNITS or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size (e.g. 4GiB, 512MiB)")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def make_engine(args: argparse.Namespace) -> Engine | None:
    if args.engine == "none":
        return None
    if args.engine == "fake":
        from nodes.engine.fake import FakeEngine
        return FakeEngine(slots=args.max_slots or 4, delay=args.fake_delay,
                          model=args.model or "fake",
                          max_tokens_default=args.max_tokens_default or 0)
    from nodes.engine.hf import HFEngine  # imports torch: only for nodes that run a model
    engine = HFEngine.from_args(args)
    engine.warm()
    return engine

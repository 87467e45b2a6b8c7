"""Offline engine benchmark, in the shape of nano-vllm's bench.py: one process, one model, one run.

Seeded workload: N requests with random prompt lengths (random token ids, decoded to text so every
mode feeds the very same ids) and a fixed output length with ignore_eos (every mode generates
exactly N x output tokens). Each mode gets a short warm-up, then the clock runs:

    generate   the original design's way: one `model.generate` per query on a thread pool
               (the original llm.py), `--generate-workers` threads
    batch      transformers' own continuous batching, `model.generate_batch`
    engine     treechat's hf engine (HFEngine), all requests submitted at once

Prints output tokens/s for each and the ratios, and writes JSON with `--json`.

    python -m bench.engine                       # the default model on this machine
    python -m bench.engine --num-requests 64 --output-len 128 --modes batch,engine
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from broker.protocol import Request  # noqa: E402
from nodes.engine.base import EngineRequest  # noqa: E402
from nodes.engine.hf import HFEngine, HFEngineConfig  # noqa: E402

MODES = ("generate", "batch", "engine")


def make_workload(tokenizer, n: int, min_in: int, max_in: int, seed: int) -> list[tuple[str, list[int]]]:
    """(prompt text, its token ids) for n requests; the text re-encodes to exactly those ids."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        ids = [rng.randint(100, min(10000, len(tokenizer) - 1))
               for _ in range(rng.randint(min_in, max_in))]
        text = tokenizer.decode(ids)
        out.append((text, tokenizer.encode(text)))
    return out


def run_generate(net, work, out_len: int, workers: int) -> int:
    def one(ids):
        x = torch.tensor([ids], device=net.device)
        y = net.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=out_len,
                         min_new_tokens=0, do_sample=False, eos_token_id=None, pad_token_id=0)
        return y.shape[1] - x.shape[1]

    with torch.inference_mode(), ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(one, [ids for _, ids in work]))


def run_batch(net, work, out_len: int) -> int:
    from transformers import GenerationConfig
    gc = GenerationConfig(max_new_tokens=out_len, do_sample=False, eos_token_id=None,
                          pad_token_id=0)
    # The library's own defaults: it sizes its paged cache and batch itself.
    with torch.inference_mode():
        out = net.generate_batch(inputs=[ids for _, ids in work], generation_config=gc)
    return sum(len(r.generated_tokens) for r in out.values())


def run_engine(engine: HFEngine, work, out_len: int) -> int:
    async def main():
        done: dict[int, int] = {}
        finished = asyncio.Event()

        def emit(step):
            for f in step.done:
                done[f.rid] = f.completion_tokens
            for rid, code, msg in step.errors:
                raise RuntimeError(f"request {rid}: {code} {msg}")
            if len(done) == len(work):
                finished.set()

        engine.start(asyncio.get_running_loop(), emit)
        for i, (text, _) in enumerate(work):
            engine.submit(EngineRequest(i, Request(prompt=text, max_tokens=out_len,
                                                   temperature=0.0, ignore_eos=True)))
        await finished.wait()
        engine.stop()
        return sum(done.values())

    return asyncio.run(main())


# Torch work of this one process runs on the engine's thread (see hf.EngineThread: a second
# OpenMP pool would slow every mode), except `generate`'s pool of threads, the original design.
RUNNERS = {
    "generate": lambda e, work, n, a: run_generate(e.worker.call(transformers_model, e), work,
                                                   n, a.generate_workers),
    "batch": lambda e, work, n, a: e.worker.call(lambda: run_batch(transformers_model(e), work, n)),
    "engine": lambda e, work, n, a: run_engine(e, work, n),
}


def transformers_model(engine: HFEngine):
    """The same model as transformers' own (the generate and batch modes run it): the engine's
    fallback model, or the float32 weights of the engine's file (the default GGUF converted)."""
    runner_net = getattr(engine.runner, "net", None)
    if runner_net is not None:
        return runner_net
    if not hasattr(engine, "_reference"):
        from transformers import AutoConfig, AutoModelForCausalLM
        from nodes.engine import models
        c = engine.config
        if c.load_format == "dummy":
            kind, values = models.DUMMY_CONFIGS[c.model_config]
            with engine.device:
                net = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **values),
                                                       dtype=engine.dtype)
        else:
            net = AutoModelForCausalLM.from_pretrained(models.resolve(c.model),
                                                       dtype=engine.dtype).to(engine.device)
        engine._reference = net.eval()
    return engine._reference


def phases(stats: dict) -> dict:
    """Where the engine's time went: steps with prompt chunks in them vs decode-only steps."""
    steps, mixed = max(stats["steps"], 1), stats["mixed_steps"]
    decode_only = max(steps - mixed, 1)
    return {"steps": stats["steps"], "mixed_steps": mixed,
            "prefill_tokens": stats["prefill_tokens"],
            "mean_decode_rows": round(stats["decode_tokens"] / steps, 2),
            "s_in_mixed_steps": round(stats["mixed_s"], 2),
            "s_in_decode_steps": round(stats["step_s"] - stats["mixed_s"], 2),
            "ms_per_decode_step": round(1000 * (stats["step_s"] - stats["mixed_s"])
                                        / decode_only, 1)}


def weight_bytes(engine: HFEngine) -> int:
    """Bytes of weights one forward reads (every linear layer, the LM head; not the embedding
    table, of which a step reads a few rows)."""
    runner_net = getattr(engine.runner, "net", None)
    if runner_net is not None:
        return sum(p.numel() * p.element_size() for p in runner_net.parameters())
    model = engine.runner.model
    tensors = [t for layer in model.layers for lin in (layer.qkv, layer.o, layer.gate_up,
                                                       layer.down) for t in lin_tensors(lin)]
    return sum(t.numel() * t.element_size() for t in tensors + lin_tensors(model.lm_head))


def lin_tensors(lin) -> list:
    names = ("weight", "bias", "qs", "q", "d", "m")
    return [t for n in names if isinstance(t := getattr(lin, n, None), torch.Tensor)]


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large copy on `device` (read + write counted), the roofline's
    memory ceiling, measured rather than taken from a datasheet."""
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    y.copy_(x)
    sync()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        y.copy_(x)
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * x.numel() / best


def decode_steps(engine: HFEngine, batches: list[int], context: int) -> list[dict]:
    """Time one decode step at each batch size, every row `context` tokens deep, through the
    runner the engine uses (graphs included on a GPU), against the time to read the weights and
    the KV cache once at the measured copy bandwidth."""
    import types
    runner, dev = engine.runner, engine.device
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    bandwidth = copy_bandwidth(dev)
    weights = weight_bytes(engine)
    layers, kv_heads, head_dim = runner.cache.shape
    per_token = 2 * layers * kv_heads * head_dim * torch.empty(
        0, dtype=runner.cache.dtype).element_size()  # bytes of K and V per cached token
    out = []
    with torch.inference_mode():
        for b in batches:
            if b > engine.slots:
                continue
            runner.cache.reshape(b, context + 1, context + 1, 0)
            seqs = [types.SimpleNamespace(tokens=[100 + i], length=context, row=i, feed=[])
                    for i in range(b)]
            for _ in range(3):
                runner.forward(seqs, [])
            sync()
            times = []
            for _ in range(10):
                t = time.perf_counter()
                runner.forward(seqs, [])
                sync()
                times.append(time.perf_counter() - t)
            step = sorted(times)[len(times) // 2]
            floor = (weights + b * context * per_token) / bandwidth
            out.append({"batch": b, "context": context, "step_ms": round(1000 * step, 2),
                        "floor_ms": round(1000 * floor, 2), "x_floor": round(step / floor, 2),
                        "tok_per_s": round(b / step, 1)})
            print(f"decode step, batch {b:4d}, context {context}: {1000 * step:8.2f} ms "
                  f"({b / step:9.1f} tok/s), {step / floor:5.2f}x the time to read weights "
                  f"({weights / 2**20:.0f} MiB) and KV once at {bandwidth / 1e9:.0f} GB/s",
                  flush=True)
    runner.cache.reshape(0, 0, 0, 0)
    return out


def timed(fn, *args) -> tuple[int, float]:
    t = time.perf_counter()
    tokens = fn(*args)
    return tokens, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (offline)")
    ap.add_argument("--load-format", default="auto", choices=("auto", "dummy"))
    ap.add_argument("--model-config", default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--min-input-len", type=int, default=32)
    ap.add_argument("--max-input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-slots", type=int, default=None)
    ap.add_argument("--quantization", default="auto", help="auto, none, int8 or int4")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="tokens one engine step may compute (default: per device)")
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    ap.add_argument("--generate-workers", type=int, default=4,
                    help="threads of the one-generate-per-query baseline")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's own, one per core)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the modes this many times, alternating; keep each mode's best")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--decode-steps", default=None, metavar="B1,B2,...",
                    help="also time one decode step at these batch sizes against the roofline "
                         "(weights + KV read once at the measured copy bandwidth)")
    ap.add_argument("--decode-context", type=int, default=256,
                    help="tokens already in each row for --decode-steps")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    modes = list(dict.fromkeys(m for m in a.modes.split(",") if m))
    if any(m not in MODES for m in modes):
        ap.error(f"--modes: choose from {', '.join(MODES)}")

    if a.threads:
        torch.set_num_threads(a.threads)
    # The engine's model is also the one the other modes run: one model for all.
    engine = HFEngine(HFEngineConfig(model=a.model, dtype=a.dtype, device=a.device,
                                     max_slots=a.max_slots, load_format=a.load_format,
                                     model_config=a.model_config, threads=a.threads,
                                     quantization=a.quantization,
                                     step_tokens=a.max_num_batched_tokens,
                                     cuda_graphs=not a.enforce_eager))
    tok = engine.tokenizer
    work = make_workload(tok, a.num_requests, a.min_input_len, a.max_input_len, a.seed)
    warm = make_workload(tok, 2, 16, 32, a.seed + 1)
    info = {"model": engine.model, "device": str(engine.device), "dtype": str(engine.dtype),
            "quantization": engine.quantization, "runner": type(engine.runner).__name__,
            "slots": engine.slots, "requests": a.num_requests, "output_len": a.output_len,
            "input_len": [a.min_input_len, a.max_input_len],
            "prompt_tokens": sum(len(ids) for _, ids in work), "torch_threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs"
                       + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "load_before": os.getloadavg()[0]}
    print(json.dumps(info))
    results: dict[str, dict] = {}
    for mode in modes:  # warm-up: first calls pay for lazy init, allocator growth, caches
        RUNNERS[mode](engine, warm, 4, a)
    for _ in range(a.rounds):
        for mode in modes:
            engine.stats.update(dict.fromkeys(engine.stats, 0))
            tokens, secs = timed(RUNNERS[mode], engine, work, a.output_len, a)
            rate = tokens / secs
            print(f"{mode:9s} {tokens:7d} tokens {secs:8.2f} s {rate:9.1f} tok/s", flush=True)
            if mode not in results or rate > results[mode]["tok_per_s"]:
                results[mode] = {"tokens": tokens, "seconds": round(secs, 2),
                                 "tok_per_s": round(rate, 1)}
                if mode == "engine":
                    results[mode]["phases"] = phases(engine.stats)
                    print("  engine phases:", results[mode]["phases"])
    if a.decode_steps:
        results["decode_steps"] = engine.worker.call(
            decode_steps, engine, [int(b) for b in a.decode_steps.split(",")], a.decode_context)
    for x, y in (("engine", "batch"), ("engine", "generate"), ("batch", "generate")):
        if x in results and y in results:
            print(f"{x}/{y}: {results[x]['tok_per_s'] / results[y]['tok_per_s']:.2f}x")
    info["load_after"] = os.getloadavg()[0]  # other work on the machine skews every number
    print(f"load average before/after: {info['load_before']:.1f} / {info['load_after']:.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"info": info, "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The CPU matrix products our runner could use, per block type, on a real model's shapes.

Process: `python -m bench.kernels [--rows 1,8,64] [--layers 4] [--shape llama-3.2-1b]`. One
process, no server. For each kernel, the seven products of a layer (q, k, v, o, gate, up, down
of the shape) over `--layers` layers of distinct random weights (so, as in a real step, the
weights do not sit in the cache), for 1, 8 and 64 rows of activations; best of 5 passes; the
weights' bytes read per second at 1 row; and each kernel's error against the float32 product
with the same (dequantized) weights:

    float32 (MKL)        F.linear on float32 weights
    torch int4 (bf16)    aten._weight_int4pack_mm_for_cpu: groups of 32 with a scale and a
                         zero (Q4_1's information), bfloat16 activations
    torch int8 (bf16)    aten._weight_int8pack_mm: one scale per row
    ours TYPE            blocks/kernels.c over GGUF blocks of TYPE (random, valid blocks), the
                         vector path this CPU has (TREECHAT_KERNELS=avx2 forces the narrower)
    ours Q4_K in panels  the same Q4_K (Q6_K) blocks repacked as the AVX-512 builds load them
                         (Blocks.for_cpu: eight rows interleaved)

Prints a markdown table (milliseconds for all layers' products; GB/s; relative error).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from nodes.engine.blocks import Blocks, kernels

# (hidden, intermediate, q rows, kv rows) of published configs
SHAPES = {"smollm2-135m": (576, 1536, 576, 192), "llama-3.2-1b": (2048, 8192, 2048, 512),
          "qwen3-0.6b": (1024, 3072, 2048, 1024), "llama-3.2-3b": (3072, 8192, 3072, 1024)}
OURS = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.F16)


def matrices(shape: str) -> list[tuple[int, int]]:
    h, inter, q, kv = SHAPES[shape]
    return [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter)]


def random_blocks(kind: T, n: int, k: int, rng) -> torch.Tensor:
    """Valid blocks: random bits, every float16 scale a small positive number."""
    if kind == T.F16:
        return torch.from_numpy((rng.standard_normal((n, k)) * 0.05).astype(np.float16)
                                .view(np.uint8))
    block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    scales = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.Q4_1: (0, 2)}.get(kind, (0,))
    for at in scales:
        raw[..., at:at + 2] = rng.uniform(1e-4, 1e-3, (n, k // block, 1)).astype(
            np.float16).view(np.uint8)
    return torch.from_numpy(raw.reshape(n, -1))


def ours(kind: T, panels: bool = False):
    def make(n: int, k: int, rng):
        w = Blocks(kind, random_blocks(kind, n, k, rng), k)
        w = w.for_cpu() if panels else w
        return w, w.dequantize(), w.raw.numel()
    return make


def dense(n: int, k: int, rng):
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * 0.05)
    return (lambda x: F.linear(x, w)), w, w.numel() * 4


def torch_int4(n: int, k: int, rng):
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * 0.05)
    g = w.reshape(n, k // 32, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((g - lo[..., None]) / d[..., None]).clamp(0, 15).to(torch.int32)
    ref = (q * d[..., None] + lo[..., None]).reshape(n, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 1)
    sz = torch.stack([d, lo + 8 * d], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return (lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), packed, 32, sz).float()), ref, n * k // 2 + sz.numel() * 2


def torch_int8(n: int, k: int, rng):
    w = torch.from_numpy(rng.standard_normal((n, k), dtype=np.float32) * 0.05)
    scales = (w.abs().amax(1) / 127).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    sb = scales.to(torch.bfloat16)
    return (lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, sb).float()), \
        q.float() * scales[:, None], n * k


def measure(make, shape: str, rows: list[int], layers: int):
    rng = np.random.default_rng(0)
    built = [[make(n, k, rng) for n, k in matrices(shape)] for _ in range(layers)]
    nbytes = sum(b for layer in built for _, _, b in layer)
    times, errors = {}, []
    for m in rows:
        xs = {k: torch.randn(m, k) for _, k in matrices(shape)}

        def one_pass():
            for layer in built:
                for (fn, _, _), (n, k) in zip(layer, matrices(shape)):
                    fn(xs[k])
        one_pass()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            one_pass()
            best = min(best, time.perf_counter() - t)
        times[m] = best
        fn, ref_w, _ = built[0][4]
        k = matrices(shape)[4][1]
        ref = xs[k] @ ref_w.t()
        errors.append(((fn(xs[k]) - ref).norm() / ref.norm()).item())
    return times, nbytes, max(errors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8,64")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--shape", default="llama-3.2-1b", choices=sorted(SHAPES))
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [int(r) for r in a.rows.split(",")]
    candidates = {"float32 (MKL)": dense, "torch int4 (bf16)": torch_int4,
                  "torch int8 (bf16)": torch_int8}
    if kernels.library() is not None:  # the K types need rows of a multiple of 256
        widths = {k for _, k in matrices(a.shape)}
        candidates.update({f"ours {t.name} ({kernels.vector_path()})": ours(t) for t in OURS
                           if all(k % GGML_QUANT_SIZES[t][0] == 0 for k in widths)})
        if kernels.vector_path().startswith("avx512") and all(k % 256 == 0 for k in widths):
            for t in (T.Q4_K, T.Q6_K):
                candidates[f"ours {t.name} in panels ({kernels.vector_path()})"] = ours(t, True)
    print(f"{a.layers} layers of {a.shape}'s products")
    print("| kernel | " + " | ".join(f"{m} rows (ms)" for m in rows) + " | GB/s at 1 row | error |")
    print("|---|" + "---:|" * (len(rows) + 2))
    with torch.inference_mode():
        for name, make in candidates.items():
            times, nbytes, err = measure(make, a.shape, rows, a.layers)
            rate = f"{nbytes / times[rows[0]] / 1e9:.1f}" if rows[0] == 1 else ""
            print(f"| {name} | " + " | ".join(f"{1000 * times[m]:.1f}" for m in rows)
                  + f" | {rate} | {err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

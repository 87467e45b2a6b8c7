"""The CPU matrix-product kernels the llama runner could use, on the default model's shapes.

Process: `python -m bench.kernels [--rows 1,8,64] [--layers 30]`. One process, no server. For
each kernel, the four products of a layer (fused q|k|v, o, fused gate|up, down of
SmolLM2-135M: 960x576, 576x576, 3072x576, 576x1536) over `--layers` layers of distinct random
weights (so, as in a real step, the weights do not sit in the cache), for 1, 8 and 64 rows of
activations; best of 5 passes; and each kernel's error against the float32 product with the same
(dequantized) weights:

    float32 (MKL)      F.linear on float32 weights                       (--quantization none)
    torch int4         aten._weight_int4pack_mm_for_cpu, bfloat16 activations
    torch int8         aten._weight_int8pack_mm, bfloat16 activations
    fbgemm int8        quantized.linear_dynamic: int8 weights, activations quantized per call
    ours Q4_1          kernels/blocks.c, 16-bit activations              (--quantization int4)
    ours Q8_0          kernels/blocks.c                                  (--quantization int8)
    ours -> float32    the blocks dequantized, then MKL (what ours does from DENSE_FROM rows)

Prints a markdown table (milliseconds for all layers' products; relative error).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from nodes.engine import kernels, quant

SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))


def torch_int4(w):
    qs, d, m = quant.quantize_q4_1(w)
    d, m = d.float(), m.float()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(quant.unpack(qs), 1)
    sz = torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16), packed, quant.GROUP, sz).float(), quant.dequantize_q4_1(qs, d, m)


def torch_int8(w):
    q, s = quant.int8_rows(w)
    sb = s.to(torch.bfloat16)
    return (lambda x: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q, sb).float(),
            q.float() * s[:, None])


def fbgemm_int8(w):
    q, s = quant.int8_rows(w)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(q, s.double(),
                                                      torch.zeros(q.shape[0], dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qt, None)
    return lambda x: torch.ops.quantized.linear_dynamic(x, packed, True), q.float() * s[:, None]


def ours_q4(w):
    layer = quant.Q4_1(*quant.quantize_q4_1(w))
    return (lambda x: kernels.q4_1_matmul(x, layer.qs, layer.d, layer.m),
            quant.dequantize_q4_1(layer.qs, layer.d, layer.m))


def ours_q8(w):
    layer = quant.Q8_0(*quant.quantize_q8_0(w))
    return (lambda x: kernels.q8_0_matmul(x, layer.q, layer.d),
            quant.dequantize_q8_0(layer.q, layer.d))


def ours_dense(w):
    layer = quant.Q4_1(*quant.quantize_q4_1(w))
    k = 2 * layer.qs.shape[1]
    return (lambda x: F.linear(x, kernels.dequantize(layer.qs, layer.d, layer.m, True, k)),
            quant.dequantize_q4_1(layer.qs, layer.d, layer.m))


KERNELS = {
    "float32 (MKL)": lambda w: ((lambda x, w=w: F.linear(x, w)), w),
    "torch int4 (bf16)": torch_int4,
    "torch int8 (bf16)": torch_int8,
    "fbgemm int8 (dynamic)": fbgemm_int8,
    "ours Q4_1": ours_q4,
    "ours Q8_0": ours_q8,
    "ours Q4_1 -> float32 + MKL": ours_dense,
}


def available(name: str) -> bool:
    if name.startswith("ours"):
        return kernels.library() is not None
    if name.startswith("fbgemm"):
        return "fbgemm" in torch.backends.quantized.supported_engines
    return True


def measure(make, rows: list[int], layers: int) -> tuple[dict[int, float], float]:
    torch.manual_seed(0)
    built = [[make(torch.randn(n, k) * 0.05) for n, k in SHAPES] for _ in range(layers)]
    times, errors = {}, []
    for m in rows:
        xs = {k: torch.randn(m, k) for k in (576, 1536)}

        def one_pass():
            for layer in built:
                for (fn, _), (n, k) in zip(layer, SHAPES):
                    fn(xs[k])
        one_pass()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            one_pass()
            best = min(best, time.perf_counter() - t)
        times[m] = best
        fn, ref_w = built[0][2]
        ref = xs[576] @ ref_w.t()
        errors.append(((fn(xs[576]) - ref).norm() / ref.norm()).item())
    return times, max(errors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="1,8,64")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = [int(r) for r in a.rows.split(",")]
    print("| kernel | " + " | ".join(f"{m} rows (ms)" for m in rows) + " | error |")
    print("|---|" + "---:|" * (len(rows) + 1))
    with torch.inference_mode():
        for name, make in KERNELS.items():
            if not available(name):
                continue
            times, err = measure(make, rows, a.layers)
            print(f"| {name} | " + " | ".join(f"{1000 * times[m]:.1f}" for m in rows)
                  + f" | {err:.1e} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

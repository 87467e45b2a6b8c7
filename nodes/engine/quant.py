"""Linear layers of the llama runner: dense, or with weights in llama.cpp's 4- and 8-bit blocks.

Every kind is a callable `y = linear(x)` over a 2-D input [tokens, in_features], so the model code
never asks which one it holds:

    Dense   F.linear in the model's dtype (float32 on CPU, bfloat16 on a GPU)
    Q4_1    blocks of 32 weights, value = d * q + m with q in 0..15 (GGUF's Q4_1, kept as the
            file has it: nothing re-quantized; d and m float16)
    Q8_0    blocks of 32 weights, value = d * q with q in -127..127 (GGUF's Q8_0; d float16)

The blocked kinds run on our AVX2 kernels (kernels/blocks.c: the activations are quantized per
row and block of 32 to 16 bits and the dot products are integer); a product of DENSE_FROM rows
or more (a long prompt chunk) dequantizes the weights into a reused float32 buffer and runs
torch's GEMM instead. Where those cannot run, on
torch's own: `_weight_int4pack_mm_for_cpu` for Q4_1 (the same blocks; bfloat16 activations) and
`_weight_int8pack_mm` for Q8_0 (re-quantized to one scale per row). docs/benchmarks.md
("Kernels") has what each costs and why the default is ours: torch's int4 kernel dequantizes
every weight to floating point and is compute-bound on such a CPU, and fbgemm's int8 GEMM, fast,
quantizes a whole batch's activations to 7 bits at once, which doubled the default model's
perplexity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nodes.engine import kernels

GROUP = 32  # weights per block
MODES = ("none", "int8", "int4")
# Rows of x from which a product dequantizes the weights to float32 and calls torch's GEMM:
# above ~20 rows the integer kernels are compute-bound and MKL's float32 GEMM is faster (2x at
# 256 rows on a 2-core AVX2 CPU, docs/benchmarks.md); below, reading 4-bit weights wins.
DENSE_FROM = 32


class Dense:
    __slots__ = ("weight", "bias")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """y += x @ W^T (+ bias): a residual, without a temporary."""
        y += self(x)


class Q4_1:
    """qs uint8 [N, K/2] (byte j of a block: weight j low nibble, j + 16 high), d, m [N, K/32]."""

    __slots__ = ("qs", "d", "m", "bias", "fallback")

    def __init__(self, qs: torch.Tensor, d: torch.Tensor, m: torch.Tensor,
                 bias: torch.Tensor | None = None):
        self.qs, self.d, self.m, self.bias = qs.contiguous(), d.half().contiguous(), \
            m.half().contiguous(), bias
        self.fallback = None
        if kernels.library() is None:  # torch's int4 kernel: the same blocks, repacked
            d, m = self.d.float(), self.m.float()
            self.fallback = (torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                unpack(self.qs), 1),
                torch.stack([d, m + 8 * d], -1).transpose(0, 1).contiguous().to(torch.bfloat16))
            self.qs = None

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.fallback is None and self.bias is None and x.shape[0] < DENSE_FROM:
            kernels.q4_1_matmul(x, self.qs, self.d, self.m, out=y)
        else:
            y += self(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback is None and x.shape[0] >= DENSE_FROM:
            y = F.linear(x.float(), kernels.dequantize(self.qs, self.d, self.m, True,
                                                       2 * self.qs.shape[1])).to(x.dtype)
        elif self.fallback is None:
            y = kernels.q4_1_matmul(x.float().contiguous(), self.qs, self.d, self.m).to(x.dtype)
        else:
            packed, scales_zeros = self.fallback
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                x.to(torch.bfloat16), packed, GROUP, scales_zeros).to(x.dtype)
        return y if self.bias is None else y + self.bias


class Q8_0:
    """q int8 [N, K], d [N, K/32]."""

    __slots__ = ("q", "d", "bias", "fallback")

    def __init__(self, q: torch.Tensor, d: torch.Tensor, bias: torch.Tensor | None = None):
        self.q, self.d, self.bias = q.contiguous(), d.half().contiguous(), bias
        self.fallback = None
        if kernels.library() is None:  # torch's int8 kernel wants one scale per row
            q8, scales = int8_rows(dequantize_q8_0(self.q, self.d))
            self.fallback = (q8, scales.to(torch.bfloat16))

    def add_to(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.fallback is None and self.bias is None and x.shape[0] < DENSE_FROM:
            kernels.q8_0_matmul(x, self.q, self.d, out=y)
        else:
            y += self(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.fallback is None and x.shape[0] >= DENSE_FROM:
            y = F.linear(x.float(), kernels.dequantize(self.q, self.d, None, False,
                                                       self.q.shape[1])).to(x.dtype)
        elif self.fallback is None:
            y = kernels.q8_0_matmul(x.float().contiguous(), self.q, self.d).to(x.dtype)
        else:
            q8, scales = self.fallback
            y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), q8, scales).to(x.dtype)
        return y if self.bias is None else y + self.bias


# --- block formats ------------------------------------------------------------------------------


def unpack(qs: torch.Tensor) -> torch.Tensor:
    """Q4_1 nibbles [N, K/2] -> q int32 [N, K], in weight order."""
    n = qs.shape[0]
    b = qs.reshape(n, -1, GROUP // 2)
    return torch.cat([b & 0x0F, b >> 4], dim=-1).reshape(n, -1).to(torch.int32)


def pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 -> Q4_1 nibbles [N, K/2]."""
    n = q.shape[0]
    b = q.reshape(n, -1, GROUP).to(torch.uint8)
    return (b[..., :GROUP // 2] | (b[..., GROUP // 2:] << 4)).reshape(n, -1)


def dequantize_q4_1(qs, d, m) -> torch.Tensor:
    q = unpack(qs).float()
    n, k = q.shape
    d, m = d.float(), m.float()
    return (q.reshape(n, k // GROUP, GROUP) * d[..., None] + m[..., None]).reshape(n, k)


def dequantize_q8_0(q, d) -> torch.Tensor:
    n, k = q.shape
    return (q.reshape(n, k // GROUP, GROUP).float() * d.float()[..., None]).reshape(n, k)


def quantize_q4_1(w: torch.Tensor):
    """Float [N, K] -> (qs, d, m): per block min/max, 16 levels; d and m in float16, as GGUF."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1).half(), g.amax(-1)
    d = ((hi - lo.float()) / 15).half()
    q = torch.round((g - lo.float()[..., None]) / d.float().clamp(min=1e-30)[..., None])
    return pack(q.clamp_(0, 15).reshape(n, k)), d, lo


def quantize_q8_0(w: torch.Tensor):
    """Float [N, K] -> (q int8, d): per block max |w| / 127, d in float16 (as GGUF)."""
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    d = (g.abs().amax(-1) / 127).half()
    q = torch.round(g / d.float().clamp(min=1e-30)[..., None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(n, k), d


def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (q int8 [N, K], scales float32 [N])."""
    w = w.float()
    scales = (w.abs().amax(1) / 127).clamp(min=1e-12)
    return torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8), scales

"""Weight matrices in GGUF's own blocks, and the products our runner takes of them.

A `Blocks` is a matrix W [n, k] exactly as a GGUF file stores it: `raw`, uint8 [n, row_bytes],
one row of blocks per output (for a file, a view of its mapped bytes: never converted), and its
type. One exception, for speed: where the AVX-512 kernels run, Q4_K and Q6_K are repacked at
load in panels of eight rows (`for_cpu`, kernels.c's Q4_K8 and Q6_K8: the same blocks, eight
rows interleaved); and every matrix of a CPU model is copied into an `Arena` of 2 MB pages
(arena.py: a decode step streams them faster). The file's pages they came from are given back.
The types read (gguf.GGMLQuantizationType):

    Q4_0 Q4_1 Q5_0 Q5_1 Q8_0   runs of 32 weights with a float16 scale (and minimum)
    Q4_K Q5_K Q6_K             super-blocks of 256 (what the _S/_M/_L mixes are made of)
    IQ4_NL IQ4_XS              4-bit indices into sixteen non-linear levels
    F16 BF16 F32               plain rows

On a CPU, products run on our kernels (kernels.c, read it for the arithmetic): `y = W(x)` and
`W.add_to(x, y)` (y += x W^T, a residual without a temporary). Elsewhere (a GPU, or no
compiler) the runner takes `dequantize()` once at load. A tensor of any other type is refused
at load by `check_type`, naming it and the file, never converted behind the user's back.

Adding a block type: its layout in kernels.c (`block_bytes`, `unpack`, `scales8`), its id in
READ, and a case in the kernel test (tests/test_blocks.py).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

from nodes.engine.blocks import kernels
from nodes.engine.blocks.arena import Arena

READ = (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K,
        T.IQ4_NL, T.IQ4_XS)
FLOATS = (T.F32, T.F16, T.BF16)
# kernels.c's panel layouts: the kernels' id, and the bytes of eight rows' super-blocks
PANELS = {T.Q4_K: (112, 1184), T.Q6_K: (114, 1680)}
PIECE = 16 << 20  # bytes of rows copied at a time by for_cpu


class UnreadableType(ValueError):
    pass


def check_type(kind: T, tensor: str, source) -> None:
    if kind not in READ:
        raise UnreadableType(
            f"{source}: tensor {tensor} is stored as {kind.name}, a type treechat does not read "
            f"(it reads {', '.join(t.name for t in READ)}); requantize the file to one of them, "
            "e.g. with llama.cpp's llama-quantize")


class Blocks:
    """W [n, k] in GGUF blocks of type `kind`: raw uint8 [n, row_bytes]; `bias` float32 [n]."""

    __slots__ = ("kind", "raw", "n", "k", "bias", "panels", "_c")

    def __init__(self, kind: T, raw: torch.Tensor, k: int, bias: torch.Tensor | None = None,
                 panels: bool = False):
        block, size = GGML_QUANT_SIZES[kind]
        if k % block:
            raise ValueError(f"{kind.name} holds rows of a multiple of {block} weights, not {k}")
        if panels:  # repacked (for_cpu): eight rows' super-blocks a tile
            size = PANELS[kind][1] // 8
        if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != k // block * size:
            raise ValueError(f"{kind.name} rows of {k} weights are {k // block * size} bytes, "
                             f"not {tuple(raw.shape)} {raw.dtype}")
        self.kind, self.raw, self.n, self.k = kind, raw, raw.shape[0], k
        self.bias = None if bias is None else bias.float().contiguous()
        self.panels = panels
        self._c = None

    @classmethod
    def of(cls, w: torch.Tensor, kind: T = T.F32, bias: torch.Tensor | None = None) -> "Blocks":
        """A float matrix in `kind` (quantized by gguf's reference code where it is a block
        type: Q8_0, Q4_1, ... for --quantization int8/int4 of a float model)."""
        n, k = w.shape
        if kind == T.F32:
            raw = w.float().contiguous().view(torch.uint8).reshape(n, -1)
        else:
            raw = torch.from_numpy(np.ascontiguousarray(
                quants.quantize(w.float().cpu().numpy(), kind)).view(np.uint8).reshape(n, -1))
        return cls(kind, raw, k, bias)

    def for_cpu(self, arena: Arena | None = None, release=None) -> "Blocks":
        """This matrix as our kernels read it fastest: Q4_K and Q6_K with rows in panels of
        eight (kernels.c's Q4_K8, Q6_K8: a decode step's product at about 1.7x the speed on one
        core) where the AVX-512 builds have those kernels and the rows come in eights, and, given
        an arena, in its 2 MB pages (arena.py); else itself. A new copy is the repacked bytes
        (Q4_K 1184 for 1152, Q6_K the same 1680) or the same ones, made PIECE bytes of rows at a
        time: `release(lo, hi)` after each piece may give rows lo..hi's old bytes back, so a
        large matrix (an embedding of 262k rows: 178 MB) is never held twice at once."""
        lib = kernels.library()
        rows = max(8, PIECE // self.raw.shape[1] // 8 * 8)
        pieces = [(lo, min(self.n, lo + rows)) for lo in range(0, self.n, rows)]
        if self.kind in PANELS and not self.panels and self.n % 8 == 0 and lib is not None:
            shape = (self.n, self.k // 256 * PANELS[self.kind][1] // 8)
            out = torch.empty(shape, dtype=torch.uint8) if arena is None else arena.take(shape)
            for lo, hi in pieces:
                if lib.repack_panels(int(self.kind), self.raw[lo].data_ptr(), hi - lo, self.k,
                                     out[lo].data_ptr()):
                    break  # this build has no panel kernels (AVX2): the rows as they are
                if release is not None:
                    release(lo, hi)
            else:
                return Blocks(self.kind, out, self.k, self.bias, panels=True)
        if arena is None:
            return self
        out = arena.take(tuple(self.raw.shape))
        for lo, hi in pieces:
            out[lo:hi].copy_(self.raw[lo:hi])
            if release is not None:
                release(lo, hi)
        return Blocks(self.kind, out, self.k, self.bias, self.panels)

    @property
    def type_id(self) -> int:
        """The kernels' id of this matrix's layout: GGUF's type, or its panels'."""
        return PANELS[self.kind][0] if self.panels else int(self.kind)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    @property
    def c(self) -> kernels.Linear:
        """The kernels' view of this matrix (the tensors stay owned here)."""
        if self._c is None:
            self._c = kernels.Linear(self.type_id, self.raw.data_ptr(), self.n, self.k,
                                     self.raw.shape[1],
                                     None if self.bias is None else self.bias.data_ptr())
        return self._c

    def __call__(self, x: torch.Tensor, prompt: bool = False) -> torch.Tensor:
        """x W^T; `prompt`: x's rows are prompt tokens (the kernels' path for them, kernels.c)."""
        y = torch.empty((x.shape[0], self.n), dtype=torch.float32)
        self._matmul(x, y, False, prompt)
        return y

    def add_to(self, x: torch.Tensor, y: torch.Tensor, prompt: bool = False) -> None:
        self._matmul(x, y, True, prompt)

    def _matmul(self, x: torch.Tensor, y: torch.Tensor, acc: bool, prompt: bool) -> None:
        x = x.float().contiguous()
        kernels.check(kernels.library().matmul(self.c, x.data_ptr(), x.shape[0], y.data_ptr(),
                                               int(acc), int(prompt)), f"{self.kind.name} product")

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` as float32 [len(ids), k] (an embedding lookup)."""
        lib = kernels.library()
        if lib is None:
            return self.dequantize()[ids]
        ids = ids.to(torch.int64).contiguous()
        out = torch.empty((ids.numel(), self.k), dtype=torch.float32)
        kernels.check(lib.dequantize_rows(self.type_id, self.raw.data_ptr(), self.raw.shape[1],
                                          self.k, ids.data_ptr(), 0, ids.numel(),
                                          out.data_ptr()), "embedding lookup")
        return out

    def dequantize(self) -> torch.Tensor:
        """The whole matrix as float32 [n, k]: our kernels, or gguf's reference code."""
        lib = kernels.library()
        if lib is None:  # (never repacked: that takes the kernels)
            return torch.from_numpy(np.ascontiguousarray(
                quants.dequantize(self.raw.numpy(), self.kind), dtype=np.float32)
            ).reshape(self.n, self.k)
        out = torch.empty((self.n, self.k), dtype=torch.float32)
        kernels.check(lib.dequantize_rows(self.type_id, self.raw.data_ptr(), self.raw.shape[1],
                                          self.k, None, 0, self.n, out.data_ptr()),
                      "dequantize")
        return out

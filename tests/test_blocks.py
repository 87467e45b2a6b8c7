"""The block kernels (nodes/engine/blocks) against gguf's own reference dequantization.

For every block type treechat reads: random blocks, valid by construction (random bits, scales
set to sane float16 values), multiplied by random activations on our kernels equal gguf's
`dequantize` times the same activations (rounded as the kernels round them: 8-bit runs), on each
vector path this CPU has (AVX2, AVX-512, AVX-512 with VNNI, forced by TREECHAT_KERNELS), for one
row (a decode step), a few (a batch: every tile shape), and many (a prompt chunk, through
sgemm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import quants

import gguf_files
from gguf_files import random_blocks
from nodes.engine import blocks
from nodes.engine.blocks import kernels

pytestmark = pytest.mark.skipif(kernels.vector_path() is None or kernels.library() is None,
                                reason="no AVX2 CPU or no C compiler here")

def reference(kind: T, raw: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    w = torch.from_numpy(np.asarray(quants.dequantize(raw, kind), dtype=np.float64))
    return (x.double() @ w.reshape(raw.shape[0], -1).T).float()


def as_the_kernels_see(kind: T, x: torch.Tensor) -> torch.Tensor:
    """x as the blocked products read it: rounded to 8 bits below 128 rows (float rows, and
    sgemm from 128 rows, read x as it is)."""
    if x.shape[0] >= 128 or kind in blocks.FLOATS:
        return x
    return gguf_files.rounded_like_the_kernels(x)


@pytest.fixture(params=kernels.paths_here())
def vector_path(request, monkeypatch):
    monkeypatch.setenv("TREECHAT_KERNELS", request.param)
    kernels.library.cache_clear()
    assert kernels.library() is not None
    yield request.param
    kernels.library.cache_clear()


@pytest.mark.parametrize("kind", blocks.READ, ids=lambda t: t.name)
def test_products_equal_gguf_dequantize_times_x(kind, vector_path):
    k = 512 if GGML_QUANT_SIZES[kind][0] == 256 else 576  # 576: a last group of 2 runs, not 8
    n = 37  # odd: the kernels' last weight row alone
    raw = random_blocks(kind, n, k)
    w = blocks.Blocks(kind, torch.from_numpy(raw), k)
    torch.manual_seed(0)
    for rows in (1, 2, 3, 4, 7, 130):  # every tile shape, and a chunk through sgemm
        x = torch.randn(rows, k)
        want = reference(kind, raw, as_the_kernels_see(kind, x))
        got = w(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        y = torch.randn(rows, n)
        w.add_to(x, y_acc := y.clone())
        torch.testing.assert_close(y_acc, y + want, rtol=1e-4,
                                   atol=1e-4 * want.abs().max().item())
        # and 8-bit activations stay close to the float product: about 1/127 of a step each
        exact = reference(kind, raw, x)
        assert (got - exact).norm() <= 0.02 * exact.norm()


@pytest.mark.parametrize("kind", blocks.READ, ids=lambda t: t.name)
def test_dequantize_and_row_lookup_equal_gguf(kind, vector_path):
    k = 256 if GGML_QUANT_SIZES[kind][0] == 256 else 96
    raw = random_blocks(kind, 9, k, seed=3)
    w = blocks.Blocks(kind, torch.from_numpy(raw), k)
    want = torch.from_numpy(np.asarray(quants.dequantize(raw, kind), dtype=np.float32))
    torch.testing.assert_close(w.dequantize(), want.reshape(9, k), rtol=1e-6, atol=1e-6)
    ids = torch.tensor([4, 0, 8, 4])
    torch.testing.assert_close(w.rows(ids), want.reshape(9, k)[ids], rtol=1e-6, atol=1e-6)


def test_an_unread_type_is_refused_by_name():
    with pytest.raises(blocks.UnreadableType, match="model.gguf.*IQ2_XXS"):
        blocks.check_type(T.IQ2_XXS, "blk.0.attn_q.weight", "model.gguf")

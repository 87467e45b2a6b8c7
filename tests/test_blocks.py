"""The block kernels (nodes/engine/blocks) against gguf's own reference dequantization.

For every block type treechat reads: random blocks, valid by construction (random bits, scales
set to sane float16 values), multiplied by random activations on our kernels equal gguf's
`dequantize` times the same activations (rounded as the kernels round them: 8-bit runs), on each
vector path this CPU has (AVX2, AVX-512, AVX-512 with VNNI, forced by TREECHAT_KERNELS), for one
row (a decode step), a few (a batch: every tile shape), and many (a prompt chunk, through
float32 sgemm or torch's bfloat16 GEMM)."""

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

pytestmark = pytest.mark.skipif(not kernels.buildable(),
                                reason="no AVX2 CPU or no C compiler here")


def reference(kind: T, raw: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    w = torch.from_numpy(np.asarray(quants.dequantize(raw, kind), dtype=np.float64))
    return (x.double() @ w.reshape(raw.shape[0], -1).T).float()


def as_the_kernels_see(kind: T, x: torch.Tensor, bf16: bool) -> torch.Tensor:
    """x as the products read it, but for prompt rows through the bfloat16 GEMM: rounded to 8
    bits (float rows read x as it is, and so does sgemm, from 128 rows, only without that GEMM:
    with it, every other row of a block type stays on the 8-bit kernels whatever the count)."""
    if kind in blocks.FLOATS or (not bf16 and x.shape[0] >= 128):
        return x
    return gguf_files.rounded_like_the_kernels(x)


def bf16_product(kind: T, raw: np.ndarray, x: torch.Tensor) -> torch.Tensor:
    """What the bfloat16 GEMM computes: x and the dequantized weights rounded to bfloat16."""
    w = torch.from_numpy(np.asarray(quants.dequantize(raw, kind), dtype=np.float32))
    w = w.reshape(raw.shape[0], -1).bfloat16().double()
    return (x.bfloat16().double() @ w.T).float()


@pytest.fixture(params=kernels.paths_here())
def vector_path(request, monkeypatch):
    monkeypatch.setenv("TREECHAT_KERNELS", request.param)
    kernels.library.cache_clear()
    assert kernels.library() is not None
    yield request.param
    kernels.library.cache_clear()


@pytest.fixture(params=[False, True], ids=["sgemm", "bf16"])
def bf16(request):
    """Without torch's bfloat16 GEMM (many rows through float32 sgemm), or with it (forced on
    whatever the CPU has: without bfloat16 in hardware it is slow, not wrong)."""
    kernels.use_bf16(kernels.library(), request.param)
    yield request.param
    kernels.use_bf16(kernels.library(), kernels.bf16_in_hardware())


# every type as the file lays it out, and Q4_K and Q6_K as the AVX-512 builds repack them
# (Blocks.for_cpu)
CASES = [(kind, False) for kind in blocks.READ] + [(T.Q4_K, True), (T.Q6_K, True)]
CASE_IDS = [kind.name for kind in blocks.READ] + ["Q4_K-in-panels", "Q6_K-in-panels"]


def as_loaded(kind: T, raw: np.ndarray, k: int, panels: bool, path: str) -> blocks.Blocks:
    w = blocks.Blocks(kind, torch.from_numpy(raw), k)
    if panels:
        w = w.for_cpu()
        assert w.panels == path.startswith("avx512")  # AVX2 keeps the rows
    return w


@pytest.mark.parametrize("kind,panels", CASES, ids=CASE_IDS)
def test_products_equal_gguf_dequantize_times_x(kind, panels, vector_path, bf16):
    k = 512 if GGML_QUANT_SIZES[kind][0] == 256 else 576  # 576: a last group of 2 runs, not 8
    n = 40 if panels else 37  # odd: the kernels' last weight row alone; panels: whole eights
    raw = random_blocks(kind, n, k)
    w = as_loaded(kind, raw, k, panels, vector_path)
    torch.manual_seed(0)
    for rows in (1, 2, 3, 4, 7, 40, 130):  # every tile shape, and prompt chunks
        x = torch.randn(rows, k)
        for prompt in (False, True):  # generated tokens' rows, or a prompt's
            got = w(x, prompt=prompt)
            y = torch.randn(rows, n)
            w.add_to(x, y_acc := y.clone(), prompt=prompt)
            if bf16 and prompt and kind not in blocks.FLOATS:
                # the GEMM's output is bfloat16 too: 2^-9 relative
                want = bf16_product(kind, raw, x)
                tol = dict(rtol=8e-3, atol=8e-3 * want.abs().max().item())
                assert torch.equal(got.bfloat16().float(), got)  # it went through that GEMM
            else:
                want = reference(kind, raw, as_the_kernels_see(kind, x, bf16))
                tol = dict(rtol=1e-4, atol=1e-4 * want.abs().max().item())
            torch.testing.assert_close(got, want, **tol)
            torch.testing.assert_close(y_acc, y + want, **tol)
            # and 8-bit activations stay close to the float product: about 1/127 of a step each
            exact = reference(kind, raw, x)
            assert (got - exact).norm() <= 0.02 * exact.norm()


@pytest.mark.parametrize("kind,panels", [(T.Q4_K, False), (T.Q4_K, True), (T.Q6_K, True)],
                         ids=["Q4_K", "Q4_K-in-panels", "Q6_K-in-panels"])
def test_a_rows_numbers_do_not_depend_on_what_shares_the_product(kind, panels):
    """With the bfloat16 GEMM on, a row gets the same numbers alone and among others, for
    generated rows and prompt rows alike: a seed's answer does not depend on the batch."""
    kernels.use_bf16(kernels.library(), True)
    try:
        raw = random_blocks(kind, 64, 512)
        w = blocks.Blocks(kind, torch.from_numpy(raw), 512)
        w = w.for_cpu() if panels else w
        torch.manual_seed(0)
        for _ in range(4):  # a row's last bit differs only now and then (oneDNN on AMX: 1 in 3)
            x = torch.randn(200, 512)
            for prompt in (False, True):
                every = w(x, prompt=prompt)
                for lo, hi in ((0, 1), (3, 7), (10, 50), (16, 64), (0, 130), (199, 200)):
                    assert torch.equal(w(x[lo:hi], prompt=prompt), every[lo:hi]), (prompt, lo, hi)
    finally:
        kernels.use_bf16(kernels.library(), kernels.bf16_in_hardware())


@pytest.mark.parametrize("kind,panels", CASES, ids=CASE_IDS)
def test_dequantize_and_row_lookup_equal_gguf(kind, panels, vector_path):
    k = 256 if GGML_QUANT_SIZES[kind][0] == 256 else 96
    n = 16 if panels else 9
    raw = random_blocks(kind, n, k, seed=3)
    w = as_loaded(kind, raw, k, panels, vector_path)
    want = torch.from_numpy(np.asarray(quants.dequantize(raw, kind), dtype=np.float32))
    torch.testing.assert_close(w.dequantize(), want.reshape(n, k), rtol=1e-6, atol=1e-6)
    ids = torch.tensor([4, 0, 8, 4, n - 1])
    torch.testing.assert_close(w.rows(ids), want.reshape(n, k)[ids], rtol=1e-6, atol=1e-6)
    # as the bfloat16 GEMM's panels: each weight rounded to nearest even, as torch rounds
    half = torch.empty((n, k), dtype=torch.bfloat16)
    kernels.check(kernels.library().dequantize_rows_bf16(
        w.type_id, w.raw.data_ptr(), w.raw.shape[1], k, None, 0, n, half.data_ptr()), "bf16")
    assert torch.equal(half, w.dequantize().bfloat16())


def test_an_unread_type_is_refused_by_name():
    with pytest.raises(blocks.UnreadableType, match="model.gguf.*IQ2_XXS"):
        blocks.check_type(T.IQ2_XXS, "blk.0.attn_q.weight", "model.gguf")

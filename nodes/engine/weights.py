"""Weights for the llama runner: read once, fused, quantized, laid out for `nodes.engine.llama`.

Three sources, one result (a `LlamaModel`):

    safetensors  a Hugging Face folder (any shard layout): float weights, quantized here if asked
    gguf         a llama.cpp file: Q4_1 blocks are kept as they are for int4 (a scale and a
                 minimum per 32 weights is exactly our int4 group) or dequantized exactly for
                 int8/none; Q8_0 and float tensors likewise; memory-mapped by gguffile.py
    dummy        random weights of a published shape, made directly on the device (benchmarks)

Per layer q/k/v become one matrix and gate/up another (`fuse`). Queries and keys are permuted
into the interleaved rotary layout unless the file already has it (llama.cpp stores Llama-arch
q/k that way). A tensor is never stored below its file's precision: a Q8_0 embedding stays
8-bit in int4 mode.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from nodes.engine import quant
from nodes.engine.llama import Layer, LlamaModel, Shape, inv_freq

log = logging.getLogger("treechat.engine")

HF_NAMES = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
            "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj"}
GGUF_NAMES = {"attn_norm": "attn_norm.weight", "mlp_norm": "ffn_norm.weight", "q": "attn_q",
              "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate",
              "up": "ffn_up", "down": "ffn_down"}


# --- tensors, whatever the file -----------------------------------------------------------------


class Q4Blocks:
    """GGUF Q4_1 blocks of a [N, K] matrix: qs uint8 [N, K/2], d and m float16 [N, K/32]."""

    fields = ("qs", "d", "m")

    def __init__(self, *parts):
        for name, value in zip(self.fields, parts):
            setattr(self, name, value)

    @classmethod
    def cat(cls, parts: list) -> "Q4Blocks":
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in cls.fields))

    def permute(self, heads: int):
        return type(self)(*(interleave(getattr(self, f), heads) for f in self.fields))

    def dequantize(self) -> torch.Tensor:
        return quant.dequantize_q4_1(self.qs, self.d, self.m)


class Q8Blocks(Q4Blocks):
    """GGUF Q8_0 blocks of a [N, K] matrix: q int8 [N, K], d float16 [N, K/32]."""

    fields = ("q", "d")

    def dequantize(self) -> torch.Tensor:
        return quant.dequantize_q8_0(self.q, self.d)


def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head from the half-split rotary layout to the interleaved one (row 2i is old
    row i, row 2i+1 old row i + head_dim/2), as llama.cpp's converter does for Llama."""
    n = w.shape[0]
    return w.reshape(heads, 2, n // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class SafetensorsSource:
    prefix = "model.layers."
    names = HF_NAMES
    interleaved = False

    def __init__(self, folder: Path):
        from safetensors import safe_open
        self.files = {}
        for f in sorted(folder.glob("*.safetensors")):
            handle = safe_open(str(f), framework="pt")
            for name in handle.keys():
                self.files[name] = handle

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str):
        return self.files[name].get_tensor(name)

    def layer(self, i: int, part: str, what: str = "weight") -> str:
        return f"{self.prefix}{i}.{self.names[part]}" + ("" if part.endswith("norm") else f".{what}")

    embed, norm, head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


class GGUFSource(SafetensorsSource):
    prefix = "blk."
    names = GGUF_NAMES
    embed, norm, head = "token_embd.weight", "output_norm.weight", "output.weight"

    def __init__(self, tensors: dict, arch: str):
        from gguf import GGMLQuantizationType as T
        self.T = T
        self.tensors = tensors
        self.interleaved = arch == "llama"  # llama.cpp permutes Llama q/k, not Qwen2's

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str):
        """A float tensor, or the blocks as the file has them (Q4Blocks, Q8Blocks)."""
        t = self.tensors[name]
        data = np.asarray(t.data)
        if t.tensor_type == self.T.BF16:
            return torch.from_numpy(data.copy()).view(torch.bfloat16).float()
        if t.tensor_type in (self.T.F32, self.T.F16):
            return torch.from_numpy(data.astype(np.float32, copy=True))
        q4 = t.tensor_type == self.T.Q4_1
        blocks = data.reshape(data.shape[0], -1, 20 if q4 else 34)
        d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0])
        if not q4:
            return Q8Blocks(torch.from_numpy(blocks[..., 2:].copy().view(np.int8))
                            .reshape(data.shape[0], -1), d)
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0])
        return Q4Blocks(torch.from_numpy(blocks[..., 4:].copy()).reshape(data.shape[0], -1), d, m)


# --- building the model -------------------------------------------------------------------------


def fuse(parts: list, heads_of: list[int | None], interleaved: bool):
    """Concatenate q|k|v (or gate|up) along output rows, permuting q and k rows to the
    interleaved rotary layout when the file has the half-split one. Parts of different kinds
    are made float first."""
    if len({type(w) for w in parts}) > 1:
        parts = [floats(w) for w in parts]
    out = []
    for w, heads in zip(parts, heads_of):
        if heads is not None and not interleaved:
            w = w.permute(heads) if isinstance(w, Q4Blocks) else interleave(w, heads)
        out.append(w)
    return type(out[0]).cat(out) if isinstance(out[0], Q4Blocks) else torch.cat(out)


def floats(w) -> torch.Tensor:
    return w.dequantize() if isinstance(w, Q4Blocks) else w.float()


def linear(w, bias, mode: str, dtype: torch.dtype, device: torch.device):
    """A linear layer in `mode`: none (dense), int4 (Q4_1; 8-bit blocks stay 8-bit) or int8
    (Q8_0). Blocks the file has in that precision are used as they are."""
    if mode == "none":
        return quant.Dense(floats(w).to(device=device, dtype=dtype),
                           None if bias is None else bias.to(device=device, dtype=dtype))
    if isinstance(w, Q8Blocks):
        return quant.Q8_0(w.q, w.d, bias)
    if mode == "int4":
        return quant.Q4_1(w.qs, w.d, w.m, bias) if isinstance(w, Q4Blocks) else \
            quant.Q4_1(*quant.quantize_q4_1(w), bias)
    return quant.Q8_0(*quant.quantize_q8_0(floats(w)), bias)


def build(config, source, *, mode: str, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    """A LlamaModel from a SafetensorsSource, a GGUFSource or None (random weights)."""
    s = Shape.of(config)
    get = (lambda name, shape: _random(shape, name, device, dtype)) if source is None else (
        lambda name, shape: source.get(name))
    has = (lambda name: not name.endswith("bias") or s.qkv_bias) if source is None else source.has
    interleaved = source is None or source.interleaved
    norm_t = lambda name: get(name, (s.hidden,)).to(device=device, dtype=dtype)  # noqa: E731
    layers = []
    for i in range(s.layers):
        name = (lambda part, what="weight": f"{i}.{part}.{what}") if source is None else (
            lambda part, what="weight": source.layer(i, part, what))
        qkv_shapes = [(s.heads * s.head_dim, s.hidden), (s.kv_heads * s.head_dim, s.hidden),
                      (s.kv_heads * s.head_dim, s.hidden)]
        qkv = fuse([get(name(p), shp) for p, shp in zip("qkv", qkv_shapes)],
                   [s.heads, s.kv_heads, None], interleaved)
        qkv_bias = None
        if s.qkv_bias and has(name("q", "bias")):
            qkv_bias = fuse([get(name(p, "bias"), (shp[0],)) for p, shp in zip("qkv", qkv_shapes)],
                            [s.heads, s.kv_heads, None], interleaved)
        o_bias = get(name("o", "bias"), (s.hidden,)) if s.o_bias else None
        gate_up = fuse([get(name("gate"), (s.intermediate, s.hidden)),
                        get(name("up"), (s.intermediate, s.hidden))], [None, None], True)
        layers.append(Layer(
            attn_norm=norm_t(name("attn_norm")),
            qkv=linear(qkv, qkv_bias, mode, dtype, device),
            o=linear(get(name("o"), (s.hidden, s.heads * s.head_dim)), o_bias, mode, dtype, device),
            mlp_norm=norm_t(name("mlp_norm")),
            gate_up=linear(gate_up, None, mode, dtype, device),
            down=linear(get(name("down"), (s.hidden, s.intermediate)), None, mode, dtype, device)))
    embed = get("embed" if source is None else source.embed, (s.vocab, s.hidden))
    if s.tied or source is None or not source.has(source.head):
        head_w = embed
    else:
        head_w = get(source.head, (s.vocab, s.hidden))
    if mode == "none":
        table = floats(embed).to(device=device, dtype=dtype)
        lm_head = quant.Dense(table) if head_w is embed else linear(head_w, None, mode, dtype,
                                                                     device)
    else:  # the lookup table in 8-bit blocks; the head never below 8 bits unless the file is
        blocks = embed if isinstance(embed, Q8Blocks) else Q8Blocks(*quant.quantize_q8_0(
            floats(embed)))
        table = (blocks.q, blocks.d)
        head_w = blocks if head_w is embed else head_w
        lm_head = linear(head_w, None, "int8" if not isinstance(head_w, Q4Blocks) else mode,
                         dtype, device)
    final_norm = norm_t("norm" if source is None else source.norm)
    return LlamaModel(s, table, layers, final_norm, lm_head, inv_freq(config), device, dtype)


def _random(shape, name: str, device, dtype) -> torch.Tensor:
    if name.endswith("norm") or "norm." in name:
        return torch.ones(shape, device=device, dtype=dtype)
    if name.endswith("bias"):
        return torch.zeros(shape, device=device, dtype=dtype)
    return torch.randn(shape, device=device, dtype=dtype) * 0.02


def open_gguf(path: Path) -> "GGUFSource | None":
    """The file's tensors, or None when one comes in a type GGUFSource does not read."""
    from gguf import GGMLQuantizationType as T
    from nodes.engine import gguffile
    meta, tensors = gguffile.read(path)
    known = {T.F32, T.F16, T.BF16, T.Q4_1, T.Q8_0}
    if any(t.tensor_type not in known for t in tensors.values()):
        return None
    return GGUFSource(tensors, meta["general.architecture"])

"""Tiny GGUF files for tests: a transformers model's weights written as llama.cpp writes them.

`write(net, path, kind)` stores every matrix of a (tiny, random) Hugging Face model in the block
type `kind` under llama.cpp's tensor names, with llama.cpp's conventions: Llama's q/k rows
permuted to the interleaved rotary layout, Gemma's norms with their 1 added. For the types gguf's
reference code can quantize (Q4_0 ... Q8_0, F16, BF16) the weights are quantized; for the K types
it cannot, the blocks are random (valid by construction, tests/test_blocks.py). Either way the
model's own weights are then replaced by exactly what the file holds, dequantized, so
transformers' forward of `net` is the reference for our runner on the file.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf import GGUFWriter, quants

from nodes.engine import blocks, families
from nodes.engine.weights import GGUF_NAMES, HF_NAMES, HF_POST_NORM_NAMES

K_TYPES = (T.Q4_K, T.Q5_K, T.Q6_K)
RANDOM_ONLY = K_TYPES + (T.IQ4_NL, T.IQ4_XS)  # types gguf's reference code cannot quantize


# where each type keeps its float16 scale (and minimum) inside a block
SCALES = {T.Q4_0: (0,), T.Q4_1: (0, 2), T.Q5_0: (0,), T.Q5_1: (0, 2), T.Q8_0: (0,),
          T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,), T.IQ4_NL: (0,), T.IQ4_XS: (0,)}


def random_blocks(kind: T, n: int, k: int, seed: int = 0,
                  scales: tuple[float, float] = (0.001, 0.05)) -> np.ndarray:
    """uint8 [n, row_bytes]: random bits with every float16 scale drawn from `scales`."""
    rng = np.random.default_rng(seed)
    if kind in blocks.FLOATS:
        w = rng.standard_normal((n, k)).astype(np.float32) * 0.1
        if kind == T.F32:
            return w.view(np.uint8)
        if kind == T.F16:
            return w.astype(np.float16).view(np.uint8)
        return (w.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (n, k // block, size), dtype=np.uint8)
    for at in SCALES[kind]:
        raw[..., at:at + 2] = (rng.uniform(*scales, (n, k // block)).astype(np.float16)
                               .view(np.uint8).reshape(n, k // block, 2))
    return raw.reshape(n, -1)


def rounded_like_the_kernels(x: torch.Tensor) -> torch.Tensor:
    """x (rows of its last dimension) as our blocked products read it: each run of 32 rounded
    to 8-bit integers on its own step, f / 128 of its 256 values' max|x| / 127, f in 1..128 the
    smallest its own max fits (nodes/engine/blocks/kernels.c, quantize8)."""
    out = []
    for group in x.float().split(256, dim=-1):
        top = group.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30)
        for run in group.split(32, dim=-1):
            f = torch.ceil(128 * run.abs().amax(dim=-1, keepdim=True) / top).clamp(1, 128)
            step = top / 127 * f / 128
            out.append(torch.round(run * (1 / step)).double() * step.double())
    return torch.cat(out, dim=-1).to(x.dtype)


def interleave(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's permute of Llama q/k rows: half-split rotary pairs -> interleaved."""
    n = w.shape[0]
    return w.reshape(heads, 2, n // heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def split(w: torch.Tensor, heads: int) -> torch.Tensor:
    n = w.shape[0]
    return w.reshape(heads, n // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def quantize_q4_k(w: np.ndarray) -> np.ndarray:
    """Float [n, k] -> Q4_K blocks [n, k/256 * 144] (a plain min/max quantizer: per run of 32 a
    scale and a minimum, each 6 bits under the super-block's float16 d and dmin)."""
    n, k = w.shape
    x = w.reshape(n, k // 256, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(-1), 0.0)
    step = (x.max(-1) - lo) / 15
    d = (step.max(-1) / 63).astype(np.float16)
    dmin = ((-lo).max(-1) / 63).astype(np.float16)
    safe = lambda v: np.where(v == 0, 1, v)  # noqa: E731
    sc = np.clip(np.round(step / safe(d.astype(np.float32))[..., None]), 0, 63).astype(np.uint8)
    mn = np.clip(np.round(-lo / safe(dmin.astype(np.float32))[..., None]), 0, 63).astype(np.uint8)
    scale = d.astype(np.float32)[..., None] * sc
    q = np.clip(np.round((x + (dmin.astype(np.float32)[..., None] * mn)[..., None])
                         / safe(scale)[..., None]), 0, 15).astype(np.uint8)
    packed = np.empty((n, k // 256, 12), np.uint8)  # ggml's get_scale_min_k4, inverted
    packed[..., 0:4] = sc[..., :4] | ((sc[..., 4:] >> 4) << 6)
    packed[..., 4:8] = mn[..., :4] | ((mn[..., 4:] >> 4) << 6)
    packed[..., 8:12] = (sc[..., 4:] & 0xF) | ((mn[..., 4:] & 0xF) << 4)
    qs = (q[..., 0::2, :] | (q[..., 1::2, :] << 4)).reshape(n, k // 256, 128)
    return np.concatenate([d.view(np.uint8).reshape(n, -1, 2), dmin.view(np.uint8).reshape(
        n, -1, 2), packed, qs], axis=-1).reshape(n, -1)


def encode(w: torch.Tensor, kind: T, seed: int,
           scales: tuple[float, float] | None = (1e-4, 4e-4)) -> tuple[np.ndarray, torch.Tensor]:
    """(the file's bytes [n, row_bytes], what they hold as float32 [n, k]). K types are random
    blocks with float16 scales drawn from `scales`; Q4_K with scales=None quantizes w."""
    n, k = w.shape
    if kind == T.Q4_K and scales is None:
        raw = quantize_q4_k(w.float().numpy())
    elif kind in RANDOM_ONLY:  # by default weights within about +-1 (Q6_K's sub-scales reach
        # 128 and IQ4's levels 127: a tenth of the scale keeps their weights as small)
        wide = kind in (T.Q6_K, T.IQ4_NL, T.IQ4_XS)
        raw = random_blocks(kind, n, k, seed, tuple(v / 10 for v in scales) if wide else scales)
    elif kind == T.F32:
        raw = w.float().numpy().view(np.uint8).reshape(n, -1)
    else:
        raw = np.asarray(quants.quantize(w.float().numpy(), kind)).view(np.uint8).reshape(n, -1)
    back = torch.from_numpy(np.asarray(quants.dequantize(raw, kind), dtype=np.float32))
    return np.ascontiguousarray(raw), back.reshape(n, k)


def write(net, path, kind: T = T.F16, tokenizer: bool = False,
          scales: tuple[float, float] | None = (1e-4, 4e-4)) -> None:
    """net's weights into a GGUF file at `path` (matrices in `kind`, vectors float32), then
    net's weights replaced by what the file holds. With `tokenizer` the file also gets the
    architecture's metadata and the default model's tokenizer: a whole model that
    `treechat --model FILE` (and transformers) can load. `scales`: the range of the K types'
    random float16 scales (None: Q4_K quantizes the model's own weights)."""
    config = net.config.get_text_config()
    family = families.of(config)
    arch = families.GGUF_ARCH[config.model_type]
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    hf = HF_POST_NORM_NAMES if family.post_norms else HF_NAMES
    state = net.state_dict()
    writer = GGUFWriter(str(path), arch)
    if tokenizer:
        metadata(writer, arch, config)
    seed = 0

    def matrix(hf_name: str, gguf_name: str, heads_of: int | None = None) -> None:
        nonlocal seed
        w = state[hf_name].float()
        permute = arch == "llama" and heads_of is not None
        raw, held = encode(interleave(w, heads_of) if permute else w, kind, seed, scales)
        seed += 1
        writer.add_tensor(gguf_name, raw, raw_shape=raw.shape, raw_dtype=kind)
        with torch.no_grad():
            state[hf_name].copy_(split(held, heads_of) if permute else held)

    def vector(hf_name: str, gguf_name: str, shift: float = 0.0) -> None:
        v = state[hf_name].float().numpy() + shift
        writer.add_tensor(gguf_name, np.ascontiguousarray(v, dtype=np.float32))

    prefix = "model.language_model." if "model.language_model.embed_tokens.weight" in state \
        else "model."
    matrix(prefix + "embed_tokens.weight", "token_embd.weight")
    vector(prefix + "norm.weight", "output_norm.weight", family.norm_shift)
    if not config.tie_word_embeddings:
        matrix("lm_head.weight", "output.weight")
    for i in range(config.num_hidden_layers):
        layer = f"{prefix}layers.{i}."
        for part, hf_part in hf.items():
            name = f"{layer}{hf_part}.weight"
            gguf_name = f"blk.{i}.{GGUF_NAMES[part]}.weight"
            if name not in state:
                continue
            if part.endswith("norm"):
                vector(name, gguf_name, family.norm_shift)
            else:
                matrix(name, gguf_name, {"q": heads, "k": kv_heads}.get(part))
            bias = f"{layer}{hf_part}.bias"
            if bias in state:
                b = state[bias].float()
                if arch == "llama" and part in ("q", "k"):
                    b = interleave(b, {"q": heads, "k": kv_heads}[part])
                writer.add_tensor(f"blk.{i}.{GGUF_NAMES[part]}.bias",
                                  np.ascontiguousarray(b.numpy(), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def metadata(writer: GGUFWriter, arch: str, config) -> None:
    """The keys llama.cpp's converter writes for `config`, and the default model's tokenizer (the
    config's vocabulary must be its size or more)."""
    from bench.shapes import add_tokenizer
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for key, value in (("context_length", config.max_position_embeddings),
                       ("embedding_length", config.hidden_size),
                       ("block_count", config.num_hidden_layers),
                       ("feed_forward_length", config.intermediate_size),
                       ("attention.head_count", config.num_attention_heads),
                       ("attention.head_count_kv", config.num_key_value_heads),
                       ("attention.key_length", head_dim), ("attention.value_length", head_dim),
                       ("rope.dimension_count", head_dim), ("vocab_size", config.vocab_size)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_float32(f"{arch}.rope.freq_base", families.rope_parameters(config).get(
        None, {}).get("rope_theta", 10000.0))
    add_tokenizer(writer, config.vocab_size)

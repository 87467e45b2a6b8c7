"""Weights for our runner: read once, laid out for `nodes.engine.llama`.

Three sources, one result (a CpuModel or a TorchModel):

    GGUFSource         a llama.cpp file, memory-mapped (formats/gguf.py): every matrix stays in
                       the file's own blocks (`Blocks`: no float32 anywhere), whatever mix of
                       types the file has
    SafetensorsSource  a Hugging Face folder: float weights, quantized here if asked (--quantization
                       int8: Q8_0, int4: Q4_1, by gguf's reference quantizer)
    RandomSource       random weights of a published shape (benchmarks, --load-format dummy)

On a CPU with our kernels the model keeps Blocks, each matrix it multiplies by copied once into
an Arena of 2 MB pages (blocks/arena.py; the file's pages given back, so memory holds it once);
a GPU (or a CPU without them) gets each matrix dequantized once to its dtype, q|k|v and gate|up
concatenated. Tensor names per source and per family differ only in the norms around the MLP
(Gemma's `pre_feedforward_layernorm` is Llama's `post_attention_layernorm`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from nodes.engine import blocks
from nodes.engine.blocks import Blocks
from nodes.engine.blocks.arena import Arena
from nodes.engine.llama import CpuModel, Layer, Shape, TorchModel, rotary

log = logging.getLogger("treechat.engine")

MODES = ("none", "int8", "int4")
MODE_TYPES = {"none": T.F32, "int8": T.Q8_0, "int4": T.Q4_1}

GGUF_NAMES = {"attn_norm": "attn_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v",
              "qkv": "attn_qkv", "o": "attn_output", "q_norm": "attn_q_norm",
              "k_norm": "attn_k_norm", "post_attn_norm": "post_attention_norm",
              "mlp_norm": "ffn_norm", "post_mlp_norm": "post_ffw_norm", "gate": "ffn_gate",
              "up": "ffn_up", "gate_up": "ffn_up", "down": "ffn_down"}
HF_NAMES = {"attn_norm": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
            "v": "self_attn.v_proj", "qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj",
            "q_norm": "self_attn.q_norm",
            "k_norm": "self_attn.k_norm", "mlp_norm": "post_attention_layernorm",
            "gate": "mlp.gate_proj", "up": "mlp.up_proj", "gate_up": "mlp.gate_up_proj",
            "down": "mlp.down_proj"}
HF_POST_NORM_NAMES = {**HF_NAMES, "post_attn_norm": "post_attention_layernorm",
                      "mlp_norm": "pre_feedforward_layernorm",
                      "post_mlp_norm": "post_feedforward_layernorm"}


class GGUFSource:
    """A GGUF file's tensors: matrices as Blocks over the mapped file, vectors as float32."""

    embed, norm, head = "token_embd.weight", "output_norm.weight", "output.weight"
    names = GGUF_NAMES
    norm_shift = 0.0  # llama.cpp's converter already added Gemma's 1 to its norms

    def __init__(self, path: Path):
        from nodes.engine.formats import gguf
        self.path = path
        self.meta, self.tensors = gguf.read(path)
        for name, t in self.tensors.items():
            blocks.check_type(t.tensor_type, name, path)
        # llama.cpp permutes Llama q/k rows to rotate (2i, 2i+1); every other family is as HF's
        self.neox = self.meta.get("general.architecture") != "llama"

    def layer(self, i: int, part: str, what: str = "weight") -> str:
        return f"blk.{i}.{self.names[part]}.{what}"

    def has(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str):
        t = self.tensors[name]
        if t.data.ndim == 1:  # a copy: a vector read from the mapped file at every step would
            # map the pages around it too (each fault maps a folio of the page cache)
            if t.tensor_type == T.BF16:
                return torch.from_numpy(t.data.copy()).view(torch.bfloat16).float()
            return torch.from_numpy(np.array(t.data, dtype=np.float32))
        raw = t.data.view(np.uint8).reshape(t.data.shape[0], -1)
        return Blocks(t.tensor_type, torch.from_numpy(raw), t.columns)

    def release(self, name: str, lo: int, hi: int) -> None:
        """Tensor `name`'s rows lo..hi are not read from the file again (copied or repacked:
        Blocks.for_cpu; the pages they share with the next rows go in release_all)."""
        from nodes.engine.formats import gguf
        gguf.give_back(self.tensors[name].data[lo:hi])

    def release_all(self) -> None:
        """The model is built: no page of the file stays in RSS but those read again later."""
        from nodes.engine.formats import gguf
        gguf.give_back_file(self.tensors)


class SafetensorsSource:
    embed, norm, head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
    neox = True

    def __init__(self, folder: Path, family):
        from safetensors import safe_open
        self.files = {}
        for f in sorted(folder.glob("*.safetensors")):
            handle = safe_open(str(f), framework="pt")
            for name in handle.keys():
                self.files[name.removeprefix("language_model.")] = (handle, name)
        self.names = HF_POST_NORM_NAMES if family.post_norms else HF_NAMES
        self.norm_shift = family.norm_shift

    def layer(self, i: int, part: str, what: str = "weight") -> str:
        return f"model.layers.{i}.{self.names.get(part, part)}.{what}"

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str) -> torch.Tensor:
        handle, key = self.files[name]
        return handle.get_tensor(key).float()


class RandomSource:
    """Random weights of a shape: matrices N(0, 0.02), norms ones, biases zeros; names are
    `LAYER.PART.weight` (or `.bias`), and embed, head, norm."""

    neox, norm_shift = True, 0.0
    embed, norm, head = "embed", "norm", "head"

    def __init__(self, shape: Shape, device: torch.device):
        s, self.family, self.device = shape, shape.family, device
        q, kv = s.heads * s.head_dim, s.kv_heads * s.head_dim
        self.shapes = {"q": (q, s.hidden), "k": (kv, s.hidden), "v": (kv, s.hidden),
                       "o": (s.hidden, q), "gate": (s.intermediate, s.hidden),
                       "up": (s.intermediate, s.hidden), "down": (s.hidden, s.intermediate),
                       "embed": (s.vocab, s.hidden), "q_norm": (s.head_dim,),
                       "k_norm": (s.head_dim,)}
        self.hidden = s.hidden

    def layer(self, i: int, part: str, what: str = "weight") -> str:
        return f"{i}.{part}.{what}"

    @staticmethod
    def parse(name: str) -> tuple[str, str]:
        parts = name.split(".")
        return (parts[1], parts[2]) if len(parts) == 3 else (name, "weight")

    def has(self, name: str) -> bool:
        part, what = self.parse(name)
        if what == "bias":
            return self.family.qkv_bias and part in ("q", "k", "v")
        return {"q_norm": self.family.qk_norm, "k_norm": self.family.qk_norm,
                "post_attn_norm": self.family.post_norms,
                "post_mlp_norm": self.family.post_norms}.get(
            part, part in self.shapes or part in ("attn_norm", "mlp_norm", "norm"))

    def get(self, name: str) -> torch.Tensor:
        part, what = self.parse(name)
        shape = self.shapes.get(part, (self.hidden,))  # a norm, unless named
        if what == "bias":
            return torch.zeros(shape[0], device=self.device)
        if len(shape) == 1:
            return torch.ones(shape, device=self.device)
        return torch.randn(shape, device=self.device) * 0.02


def open_gguf(path: Path) -> GGUFSource:
    return GGUFSource(path)


def build(config, source, *, mode: str, device: torch.device, dtype: torch.dtype):
    """Our model from a source: a CpuModel where our kernels run (a CPU, float32 activations),
    else a TorchModel (dense weights in `dtype` on `device`)."""
    from nodes.engine.blocks import kernels
    shape = Shape.of(config, neox=source.neox)
    on_kernels = device.type == "cpu" and dtype == torch.float32 and kernels.library() is not None
    kind = MODE_TYPES[mode]

    def vector(name: str) -> torch.Tensor:
        v = source.get(name).float()
        if source.norm_shift and not name.endswith("bias"):
            v = v + source.norm_shift
        return v.to(device).contiguous() if not on_kernels else v.contiguous()

    arena = Arena() if on_kernels else None  # the products' weights, in 2 MB pages

    def matrix(name: str, bias: str | None = None, floor: T | None = None,
               product: bool = True) -> Blocks | Float:
        """`product`: the runner multiplies by it (else only looks rows up: an untied embedding,
        which stays where it lies, the file's pages read as tokens need them)."""
        w = source.get(name)
        b = source.get(bias).float() if bias and source.has(bias) else None
        if isinstance(w, Blocks):  # (a file's: GGUFSource)
            w = w if b is None else Blocks(w.kind, w.raw, w.k, b)
            if on_kernels and product:  # the file's pages out of RSS as the copy replaces them
                w = w.for_cpu(arena, lambda lo, hi: source.release(name, lo, hi))
            return w
        # float weights: in the mode's blocks for our kernels, else as they are
        want = floor if floor is not None and kind != T.F32 else kind
        if not on_kernels:
            return Float(w, b)
        w = Blocks.of(w.cpu(), want, b)
        return w.for_cpu(arena) if product else w

    def optional(i, part):
        name = source.layer(i, part)
        return vector(name) if source.has(name) else None

    layers = []
    for i in range(shape.layers):
        def name(part, what="weight", i=i):
            return source.layer(i, part, what)
        if source.has(name("qkv")):  # one fused matrix (Phi-3's files)
            qkv = [matrix(name("qkv"), name("qkv", "bias"))]
        else:
            qkv = [matrix(name(p), name(p, "bias")) for p in "qkv"]
        if source.has(name("gate")):
            gate_up = [matrix(name("gate")), matrix(name("up"))]
        else:  # gate and up fused in one matrix (Phi-3's gate_up_proj, its files' ffn_up)
            gate_up = [matrix(name("gate_up"))]
        layers.append(Layer(attn_norm=vector(name("attn_norm")), qkv=qkv,
                            o=matrix(name("o"), name("o", "bias")),
                            mlp_norm=vector(name("mlp_norm")), gate_up=gate_up,
                            down=matrix(name("down")), q_norm=optional(i, "q_norm"),
                            k_norm=optional(i, "k_norm"),
                            post_attn_norm=optional(i, "post_attn_norm"),
                            post_mlp_norm=optional(i, "post_mlp_norm")))
    # a float model's embeddings and head stay 8-bit when its layers are quantized (llama.cpp's
    # choice too: the head is where 4 bits cost the most)
    tied = shape.tied or not source.has(source.head)
    embed = matrix(source.embed, floor=T.Q8_0, product=tied)
    head = embed if tied else matrix(source.head, floor=T.Q8_0)
    norm = vector(source.norm)
    rope = rotary(config)
    if source.has("rope_freqs.weight"):  # Llama 3's long-context scaling, as llama.cpp's files
        factors = source.get("rope_freqs.weight").double()  # carry it: frequencies divided
        rope = {t: (freq / factors, scale) for t, (freq, scale) in rope.items()}
    model = CpuModel(shape, embed, layers, norm, head, rope) if on_kernels else \
        torch_model(shape, embed, layers, norm, head, rope, device, dtype)
    if isinstance(source, GGUFSource):
        source.release_all()
    return model


@dataclass
class Float:
    """A float matrix (and bias) for the TorchModel, on its way to the device."""

    w: torch.Tensor
    bias: torch.Tensor | None = None


def dense(w: Blocks | Float, device, dtype) -> torch.Tensor:
    return (w.dequantize() if isinstance(w, Blocks) else w.w).to(device=device, dtype=dtype)


def torch_model(shape, embed, layers, norm, head, rope, device, dtype) -> TorchModel:
    """Every matrix dequantized once into `dtype` on `device`, q|k|v and gate|up fused."""
    for layer in layers:
        biases = [p.bias for p in layer.qkv]
        layer.qkv_bias = None if any(b is None for b in biases) else \
            torch.cat(biases).to(device=device, dtype=dtype)
        layer.qkv = torch.cat([dense(p, device, dtype) for p in layer.qkv])
        layer.o_bias = None if layer.o.bias is None else layer.o.bias.to(device=device, dtype=dtype)
        layer.gate_up = torch.cat([dense(p, device, dtype) for p in layer.gate_up])
        layer.o, layer.down = dense(layer.o, device, dtype), dense(layer.down, device, dtype)
        for f in ("attn_norm", "mlp_norm", "q_norm", "k_norm", "post_attn_norm",
                  "post_mlp_norm"):
            v = getattr(layer, f)
            setattr(layer, f, None if v is None else v.to(device=device, dtype=dtype))
    table = dense(embed, device, dtype)
    lm_head = table if head is embed else dense(head, device, dtype)
    return TorchModel(shape, table, layers, norm.to(device=device, dtype=dtype), lm_head, rope,
                      device, dtype)

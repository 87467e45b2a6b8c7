"""treechat's own model: the Llama layer and its families (families.py), one forward per step.

Plain torch and plain objects (no nn.Module, no hooks). A layer is

    x += post_attn_norm( o( attention( rope( qk_norm( qkv( attn_norm(x) ) ) ), kv cache ) ) )
    x += post_mlp_norm( down( act(gate) * up ) ),   gate|up = gate_up( mlp_norm(x) )

(a family leaves out the norms it lacks). Two implementations of the same forward:

    CpuModel     weights as the file holds them (`Blocks`: GGUF's blocks, or float rows), every
                 layer in one call to our C kernels (blocks/kernels.c: layers_forward), so a
                 decode step never returns to Python between operations
    TorchModel   torch operators over dense weights (bfloat16 on a GPU, with CUDA graphs; float
                 on a CPU without our kernels): the file's blocks dequantized once at load

One forward takes a flat batch of tokens (`Batch`), in two parts:

    decode   tokens 0..D-1: the next token of cache rows 0..D-1, at positions pos[0..D-1]
    chunks   then one slice of a prompt per chunk: `length` tokens of cache row `row` from
             position `start` (a long prompt is prefilled over several steps)

Rotary embedding turns pairs of a head's dimensions: (i, i + half) in Hugging Face's layout and
in llama.cpp's files of every family but Llama, whose q/k rows llama.cpp's converter permuted
to (2i, 2i + 1); `Shape.neox` says which, and nothing is permuted at load. Only the tokens that
need a next token (`Batch.logits_at`) go through the final norm and the LM head.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nodes.engine import families
from nodes.engine.families import Family


@dataclass(frozen=True)
class Shape:
    """What the forward needs to know of a model's config and family."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    eps: float
    max_positions: int
    tied: bool
    family: Family = Family()
    scale: float = 0.0  # of attention scores (head_dim ** -0.5 unless the config says)
    layer_types: tuple = ()  # per layer: a key of `rope` (None: every layer the same)
    windows: tuple = ()  # per layer: sliding window in tokens, 0 for none
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    neox: bool = True  # rope pairs (i, i + half); False: (2i, 2i + 1)
    rot: int = 0  # rotary dimensions of a head, 0: all (Phi-4's partial rotary turns fewer)

    @classmethod
    def of(cls, config, neox: bool = True) -> "Shape":
        c = families.text_config(config)
        family = families.of(c) or Family()
        heads = c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        n = c.num_hidden_layers
        types = tuple(getattr(c, "layer_types", None) or ["full_attention"] * n)
        window = getattr(c, "sliding_window", None) or 0
        if c.model_type == "qwen2" and not getattr(c, "use_sliding_window", False):
            window = 0
        if getattr(c, "layer_types", None) is not None:  # windows only where the config says
            windows = tuple(window if t == "sliding_attention" else 0 for t in types)
        else:
            windows = (window,) * n
        rope = families.rope_parameters(c)
        scalar = getattr(c, "query_pre_attn_scalar", None) or head_dim
        return cls(layers=n, hidden=c.hidden_size, heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=head_dim, intermediate=c.intermediate_size, vocab=c.vocab_size,
                   eps=c.rms_norm_eps, max_positions=c.max_position_embeddings,
                   tied=bool(getattr(c, "tie_word_embeddings", False)), family=family,
                   scale=scalar ** -0.5,
                   layer_types=tuple(t if t in rope else None for t in types),
                   windows=windows,
                   attn_softcap=(getattr(c, "attn_logit_softcapping", None) or 0.0)
                   if family.softcaps else 0.0,
                   final_softcap=(getattr(c, "final_logit_softcapping", None) or 0.0)
                   if family.softcaps else 0.0, neox=neox, rot=rotary_dims(c, head_dim))


def rotary_dims(c, head_dim: int) -> int:
    """The dimensions of a head that rope turns: all, or the config's partial_rotary_factor of
    them (transformers keeps it on the config or in its rope parameters)."""
    factor = getattr(c, "partial_rotary_factor", None)
    for params in families.rope_parameters(c).values():
        factor = factor or params.get("partial_rotary_factor")
    return int(head_dim * (factor or 1.0))


def rotary(config, context: int | None = None) -> dict:
    """Each layer type's (inverse frequencies [rot/2] float64, attention factor), through
    transformers' own rope code for the scaled kinds (llama3, linear, yarn, longrope). LongRoPE
    (Phi-3, Phi-4) has two sets of factors: the long ones where `context` passes the original
    context, as llama.cpp chooses by its context (the short ones up to it)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    c = families.text_config(config)
    dim = rotary_dims(c, getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    out = {}
    for layer_type, params in families.rope_parameters(c).items():
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            theta = params.get("rope_theta", 10000.0)
            freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            out[layer_type] = (freq, 1.0)
        else:
            extra = {"seq_len": context} if kind == "longrope" and context else {}
            freq, factor = ROPE_INIT_FUNCTIONS[kind](c, "cpu", layer_type=layer_type, **extra) \
                if layer_type else ROPE_INIT_FUNCTIONS[kind](c, "cpu", **extra)
            out[layer_type] = (freq.double(), float(factor))
    return out


@dataclass(slots=True)
class Layer:
    """One layer's weights: norms as float tensors, projections as Blocks (CpuModel) or dense
    tensors (TorchModel); what a family lacks is None. qkv and gate_up are lists of parts
    whose outputs sit side by side (q|k|v, or one fused part, as Phi's files have)."""

    attn_norm: torch.Tensor
    qkv: list
    o: object
    mlp_norm: torch.Tensor
    gate_up: list
    down: object
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    post_attn_norm: torch.Tensor | None = None
    post_mlp_norm: torch.Tensor | None = None
    qkv_bias: torch.Tensor | None = None  # TorchModel: the fused bias
    o_bias: torch.Tensor | None = None


@dataclass(slots=True)
class Chunk:
    """A slice of one prompt in this forward: `length` tokens of cache row `row` from `start`."""

    row: int
    start: int
    length: int
    mask: torch.Tensor | None = None  # TorchModel: set by prepare when start > 0 or windowed


@dataclass(slots=True)
class Batch:
    ids: torch.Tensor  # [T] token ids: decode tokens first, then each chunk's tokens
    pos: torch.Tensor  # [T] their positions
    decode: int  # D: tokens 0..D-1 are rows 0..D-1's next tokens
    chunks: list[Chunk] = field(default_factory=list)
    logits_at: torch.Tensor | None = None  # [R] token indices that need logits
    span: int = 0  # decode attention spans cache columns 0..span-1
    decode_masks: dict | None = None  # TorchModel: window -> [D, 1, 1, span] visible
    rows: torch.Tensor | None = None  # cache row of every token (CpuModel), of decode rows
    freqs: dict | None = None  # TorchModel: layer type -> (cos, sin) [T, head_dim/2]
    # CpuModel: [T] bool, the tokens whose products take the prompt path (kernels.c: bfloat16
    # where the CPU has it); None: every chunk token, and no decode row
    prompt_rows: torch.Tensor | None = None


class Model:
    """What both implementations share: the shape, embeddings, the head, the rotary tables."""

    cache_zeroed = True  # its attention reads past a row's length (see RowCache)

    def __init__(self, shape: Shape, embed, norm: torch.Tensor, lm_head, rope: dict,
                 device: torch.device, dtype: torch.dtype):
        self.shape = shape
        self.embed = embed
        self.norm = norm
        self.lm_head = lm_head
        self.rope = rope  # layer type -> (inverse frequencies, attention factor)
        self.device = device
        self.dtype = dtype
        self.q_dim = shape.heads * shape.head_dim
        self.kv_dim = shape.kv_heads * shape.head_dim
        self.group = shape.heads // shape.kv_heads
        self.embed_scale = shape.hidden ** 0.5 if shape.family.embed_scale else 1.0

    def fit_context(self, config, context: int) -> None:
        """The rotary frequencies for a node's context (LongRoPE's long factors past the
        original context; nothing changes for other kinds)."""
        kinds = {p.get("rope_type") for p in
                 families.rope_parameters(families.text_config(config)).values()}
        if "longrope" in kinds:
            self.set_rope(rotary(config, context))

    def set_rope(self, rope: dict) -> None:
        self.rope = rope

    def softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.shape.final_softcap
        return logits if not cap else torch.tanh(logits / cap) * cap


class CpuModel(Model):
    """The forward on our C kernels: weights are `Blocks`, the KV cache float16."""

    cache_dtype = torch.float16
    cache_zeroed = False  # attention() reads positions 0..pos of a row, nothing past them

    def __init__(self, shape: Shape, embed, layers: list[Layer], norm, lm_head, rope: dict):
        super().__init__(shape, embed, norm, lm_head, rope, torch.device("cpu"), torch.float32)
        from nodes.engine.blocks import kernels
        self.k = kernels
        self.layers = layers
        self.tables: dict = {}  # layer type -> (cos, sin) [positions, rot/2] float32
        self.stack = self._stack()

    def set_rope(self, rope: dict) -> None:
        self.rope, self.tables = rope, {}

    def _stack(self):
        k, s = self.k, self.shape
        array = (k.Layer * s.layers)()

        def parts(linears, n):
            out = (k.Linear * n)()
            for i, lin in enumerate(linears):
                out[i] = lin.c
            return out

        ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
        for i, layer in enumerate(self.layers):
            array[i] = k.Layer(
                ptr(layer.attn_norm), ptr(layer.mlp_norm), ptr(layer.q_norm), ptr(layer.k_norm),
                ptr(layer.post_attn_norm), ptr(layer.post_mlp_norm), parts(layer.qkv, 3),
                layer.o.c, parts(layer.gate_up, 2), layer.down.c, len(layer.qkv),
                len(layer.gate_up), None, None, s.windows[i])
        act = {"silu": 0, "gelu_tanh": 1}[s.family.act]
        view = k.Stack(s.layers, s.hidden, s.heads, s.kv_heads, s.head_dim, s.intermediate,
                       s.eps, s.scale, s.attn_softcap, act, int(s.neox), s.rot or s.head_dim,
                       array)
        view.keep = array  # the array lives as long as the view
        return view

    def rope_tables(self, positions: int) -> None:
        """cos and sin tables covering `positions`, grown by doubling; each layer points at its
        type's."""
        have = next(iter(self.tables.values()))[0].shape[0] if self.tables else 0
        if have >= positions:
            return
        n = max(positions, 2 * have, 512)
        for layer_type, (freq, factor) in self.rope.items():
            angles = torch.arange(n, dtype=torch.float64)[:, None] * freq[None, :]
            self.tables[layer_type] = ((angles.cos() * factor).float().contiguous(),
                                       (angles.sin() * factor).float().contiguous())
        for i, layer_type in enumerate(self.shape.layer_types):
            cos, sin = self.tables[layer_type]
            self.stack.layer[i].cos, self.stack.layer[i].sin = cos.data_ptr(), sin.data_ptr()

    def prepare(self, batch: Batch) -> Batch:
        """Each token's cache row: decode rows 0..D-1, then each chunk's row."""
        rows = list(range(batch.decode))
        for c in batch.chunks:
            rows += [c.row] * c.length
        batch.rows = torch.tensor(rows, dtype=torch.long)
        return batch

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed.rows(ids)
        return x.mul_(self.embed_scale) if self.embed_scale != 1.0 else x

    def forward(self, batch: Batch, cache) -> torch.Tensor:
        """Logits [R, vocab] (float32) for the tokens at `batch.logits_at`."""
        x = self.embed_tokens(batch.ids)
        rows, pos, order = batch.rows, batch.pos, None
        split = batch.decode  # the kernels take generated tokens first, then prompt tokens
        if batch.prompt_rows is not None:
            prompt = batch.prompt_rows
            order = torch.cat([(~prompt).nonzero()[:, 0], prompt.nonzero()[:, 0]])
            split = int((~prompt).sum())
            x, rows, pos = x[order], rows[order], pos[order]
        x, rows, pos = x.contiguous(), rows.contiguous(), pos.contiguous()
        self.rope_tables(int(pos.max()) + 1)
        lib = self.k.library()
        self.k.check(lib.layers_forward(ctypes.byref(self.stack), x.data_ptr(), x.shape[0],
                                        split, rows.data_ptr(), pos.data_ptr(),
                                        cache.k.data_ptr(), cache.v.data_ptr(), cache.k.shape[1],
                                        cache.k.shape[3]), "layers_forward")
        if order is not None:  # back in the batch's order
            x = torch.empty_like(x).index_copy_(0, order, x)
        if batch.logits_at is not None:
            x = x[batch.logits_at].contiguous()
        lib.rms_norm(x.data_ptr(), self.norm.data_ptr(), x.shape[0], x.shape[1], self.shape.eps,
                     x.data_ptr())
        return self.softcap(self.lm_head(x))


class TorchModel(Model):
    """The forward in torch operators over dense weights (a GPU; a CPU without our kernels)."""

    def __init__(self, shape: Shape, embed: torch.Tensor, layers: list[Layer], norm, lm_head,
                 rope: dict, device: torch.device, dtype: torch.dtype):
        super().__init__(shape, embed, norm, lm_head, rope, device, dtype)
        self.layers = layers
        self.set_rope(rope)

    def set_rope(self, rope: dict) -> None:
        self.rope = {t: (f.to(self.device), a) for t, (f, a) in rope.items()}

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.dtype

    def prepare(self, batch: Batch) -> Batch:
        """Everything the layers share: each layer type's rotations, the decode masks (one per
        window size), each chunk's mask."""
        pos, d, dev = batch.pos, batch.decode, self.device
        batch.freqs = {}
        for layer_type, (freq, factor) in self.rope.items():
            angles = pos[:, None].double() * freq[None, :]
            batch.freqs[layer_type] = ((angles.cos() * factor).to(self.dtype),
                                       (angles.sin() * factor).to(self.dtype))
        windows = set(self.shape.windows)
        if d:
            lengths = pos[:d]
            batch.span = int(lengths.max()) + 1 if batch.span == 0 else batch.span
            cols = torch.arange(batch.span, device=dev)
            visible = cols[None, :] <= lengths[:, None]
            batch.decode_masks = {
                w: (visible & (cols[None, :] > lengths[:, None] - w) if w else visible)
                [:, None, None, :] for w in windows}
            if batch.rows is None:
                batch.rows = torch.arange(d, device=dev)
        for c in batch.chunks:
            q = torch.arange(c.length, device=dev)[:, None] + c.start
            cols = torch.arange(c.start + c.length, device=dev)[None, :]
            c.mask = {w: (cols <= q) & (cols > q - w) if w else cols <= q for w in windows}
        return batch

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed[ids]
        return x * self.embed_scale if self.embed_scale != 1.0 else x

    def forward(self, batch: Batch, cache) -> torch.Tensor:
        s, eps = self.shape, self.shape.eps
        x = self.embed_tokens(batch.ids)
        act = F.silu if s.family.act == "silu" else partial_gelu
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn_norm, eps)
            qkv = F.linear(h, layer.qkv, layer.qkv_bias)
            attn = F.linear(self.attention(i, layer, qkv, batch, cache), layer.o, layer.o_bias)
            x = x + (attn if layer.post_attn_norm is None
                     else rms_norm(attn, layer.post_attn_norm, eps))
            gate, up = F.linear(rms_norm(x, layer.mlp_norm, eps), layer.gate_up).chunk(2, -1)
            mlp = F.linear(act(gate) * up, layer.down)
            x = x + (mlp if layer.post_mlp_norm is None
                     else rms_norm(mlp, layer.post_mlp_norm, eps))
        if batch.logits_at is not None:
            x = x[batch.logits_at]
        return self.softcap(F.linear(rms_norm(x, self.norm, eps), self.lm_head).float())

    def attention(self, i: int, layer: Layer, qkv: torch.Tensor, batch: Batch,
                  cache) -> torch.Tensor:
        s, t = self.shape, qkv.shape[0]
        q = qkv[:, :self.q_dim].view(t, s.heads, s.head_dim)
        k = qkv[:, self.q_dim:self.q_dim + self.kv_dim].view(t, s.kv_heads, s.head_dim)
        v = qkv[:, self.q_dim + self.kv_dim:].view(t, s.kv_heads, s.head_dim)
        if layer.q_norm is not None:
            q = rms_norm(q, layer.q_norm, s.eps)
            k = rms_norm(k, layer.k_norm, s.eps)
        cos, sin = batch.freqs[s.layer_types[i]]
        q, k = rotate(q, cos, sin, s.neox), rotate(k, cos, sin, s.neox)
        window = s.windows[i]
        keys, values = cache.k[i], cache.v[i]  # [rows, kv_heads, cap, head_dim]
        out = torch.empty((t, s.heads, s.head_dim), dtype=qkv.dtype, device=qkv.device)
        d = batch.decode
        if d:
            dpos = batch.pos[:d]
            keys[batch.rows, :, dpos] = k[:d]
            values[batch.rows, :, dpos] = v[:d]
            out[:d] = self.decode_attention(q[:d], keys[:d, :, :batch.span],
                                            values[:d, :, :batch.span],
                                            batch.decode_masks[window])
        at = d
        for c in batch.chunks:
            end = c.start + c.length
            keys[c.row, :, c.start:end] = k[at:at + c.length].transpose(0, 1)
            values[c.row, :, c.start:end] = v[at:at + c.length].transpose(0, 1)
            qc = q[at:at + c.length].transpose(0, 1)[None]  # [1, heads, length, head_dim]
            kc, vc = keys[c.row:c.row + 1, :, :end], values[c.row:c.row + 1, :, :end]
            if s.attn_softcap:
                oc = self.capped_attention(qc, kc, vc, c.mask[window])
            else:
                oc = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=c.mask[window],
                                                    scale=s.scale, enable_gqa=self.group > 1)
            out[at:at + c.length] = oc[0].transpose(0, 1)
            at += c.length
        return out.view(t, self.q_dim)

    def scores(self, q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        s = torch.matmul(q, keys.transpose(-1, -2)).mul_(self.shape.scale)
        cap = self.shape.attn_softcap
        return torch.tanh(s / cap) * cap if cap else s

    def decode_attention(self, q, keys, values, visible) -> torch.Tensor:
        """One query per row against its cached keys: [D, heads, head_dim]. Each kv head's group
        of query heads is folded into the query axis, so keys and values are never copied."""
        s, d = self.shape, q.shape[0]
        qd = q.reshape(d, s.kv_heads, self.group, s.head_dim)
        scores = self.scores(qd, keys).masked_fill_(~visible, float("-inf"))
        return torch.matmul(torch.softmax(scores.float(), dim=-1).to(values.dtype),
                            values).view(d, s.heads, s.head_dim)

    def capped_attention(self, q, keys, values, mask) -> torch.Tensor:
        """A chunk's attention with soft-capped scores (Gemma 2), query heads grouped."""
        s = self.shape
        h, n = q.shape[1], q.shape[2]
        qg = q.reshape(1, s.kv_heads, self.group * n, s.head_dim)
        scores = self.scores(qg, keys).view(1, s.kv_heads, self.group, n, -1)
        scores = scores.masked_fill_(~mask, float("-inf")).reshape(1, s.kv_heads, self.group * n,
                                                                     -1)
        out = torch.matmul(torch.softmax(scores.float(), -1).to(values.dtype), values)
        return out.reshape(1, h, n, s.head_dim)


def partial_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last axis, computed in float32."""
    xf = x.float()
    return (xf * xf.square().mean(-1, keepdim=True).add_(eps).rsqrt_()).to(x.dtype) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, neox: bool) -> torch.Tensor:
    """Rotary embedding of x [T, heads, head_dim] by cos, sin [T, rot/2]: pairs (i, i+half)
    (neox) or (2i, 2i+1) of the first rot dimensions; the rest pass."""
    rot = 2 * cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat([rotate(x[..., :rot], cos, sin, neox), x[..., rot:]], dim=-1)
    cos, sin = cos[:, None], sin[:, None]
    if neox:
        a, b = x.chunk(2, dim=-1)
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2)

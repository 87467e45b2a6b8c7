"""treechat's own model for the Llama family: Llama 2/3, SmolLM2, Qwen2/2.5, Mistral.

Plain torch and plain objects (no nn.Module, no hooks), one forward per engine step. A layer is

    x += o( attention( rope( qkv( rms_norm(x) ) ), kv cache ) )
    x += down( silu(gate) * up ),  gate|up = gate_up( rms_norm(x) )

with the q/k/v projections fused into one matrix and gate/up into another, so a layer is four
matrix products whatever the batch. Each linear is a `nodes.engine.quant` layer (dense, int8,
int4). Queries and keys use the interleaved rotary layout (the pairs rotated together are
adjacent: llama.cpp's and Meta's layout), so rotary embedding is one complex multiply in place;
weights stored in Hugging Face's half-split layout are permuted once at load (`weights.py`),
which changes no attention score.

One forward takes a flat batch of tokens (`Batch`), in two parts:

    decode   tokens 0..D-1: the next token of cache rows 0..D-1, at positions pos[0..D-1]
    chunks   then one slice of a prompt per chunk: `length` tokens of cache row `row` from
             position `start` (a long prompt is prefilled over several steps)

The linear layers see all T tokens at once; only attention splits: one SDPA call for the decode
rows (grouped-query heads folded into the query axis, so keys and values are never copied) and
one per chunk (over its cache row, earlier chunks included). Only the tokens that need a next
token (`Batch.logits_at`) go through the final norm and the LM head.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from nodes.engine.quant import DENSE_FROM

ARCHITECTURES = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class Shape:
    """What the forward needs to know of a model's config."""

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
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None

    @classmethod
    def of(cls, config) -> "Shape":
        c = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = c.num_attention_heads
        window = getattr(c, "sliding_window", None)
        if c.model_type == "qwen2" and not getattr(c, "use_sliding_window", False):
            window = None
        return cls(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   intermediate=c.intermediate_size, vocab=c.vocab_size, eps=c.rms_norm_eps,
                   max_positions=c.max_position_embeddings,
                   tied=bool(getattr(c, "tie_word_embeddings", False)),
                   qkv_bias=c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
                   o_bias=bool(getattr(c, "attention_bias", False)),
                   mlp_bias=bool(getattr(c, "mlp_bias", False)), sliding_window=window)


def supports(config) -> str | None:
    """None if our runner can run this config, else why not (the engine then falls back to
    transformers' own forward)."""
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    if c.model_type not in ARCHITECTURES:
        return f"architecture '{c.model_type}'"
    if getattr(c, "hidden_act", "silu") != "silu":
        return f"activation '{c.hidden_act}'"
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "llama3", "linear"):
        return f"rope type '{rope.get('rope_type')}'"
    return None


def inv_freq(config) -> torch.Tensor:
    """The rotary frequencies, through transformers' own rope code (llama3, linear scaling)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    c = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default":
        theta = rope.get("rope_theta", getattr(c, "rope_theta", 10000.0))
        dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    freq, _scaling = ROPE_INIT_FUNCTIONS[kind](c, "cpu")
    return freq.double()


@dataclass(slots=True)
class Layer:
    attn_norm: torch.Tensor
    qkv: object  # nodes.engine.quant linear
    o: object
    mlp_norm: torch.Tensor
    gate_up: object
    down: object


@dataclass(slots=True)
class Chunk:
    """A slice of one prompt in this forward: `length` tokens of cache row `row` from `start`."""

    row: int
    start: int
    length: int
    mask: torch.Tensor | None = None  # set by Batch.prepare when start > 0


@dataclass(slots=True)
class Batch:
    ids: torch.Tensor  # [T] token ids: decode tokens first, then each chunk's tokens
    pos: torch.Tensor  # [T] their positions
    decode: int  # D: tokens 0..D-1 are rows 0..D-1's next tokens
    chunks: list[Chunk] = field(default_factory=list)
    logits_at: torch.Tensor | None = None  # [R] token indices that need logits
    span: int = 0  # decode attention spans cache columns 0..span-1
    decode_mask: torch.Tensor | None = None
    rows: torch.Tensor | None = None  # [D] 0..D-1
    freqs: torch.Tensor | None = None  # [T, 1, head_dim/2] complex rotations


class LlamaModel:
    def __init__(self, shape: Shape, embed, layers: list[Layer], norm: torch.Tensor, lm_head,
                 freq: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.shape = shape
        self.embed = embed  # [V, H] in dtype, or Q8_0 blocks (q int8 [V, H], d [V, H/32])
        self.layers = layers
        self.norm = norm
        self.lm_head = lm_head
        self.device = device
        self.dtype = dtype
        self.inv_freq = freq.to(device)
        self.q_dim = shape.heads * shape.head_dim
        self.kv_dim = shape.kv_heads * shape.head_dim
        self.group = shape.heads // shape.kv_heads
        self.scale = shape.head_dim ** -0.5
        self.kernels = cpu_kernels(device, dtype)
        self.stack = self.kernels.stack(self) if self.kernels is not None else None
        self._rope = None

    @property
    def cache_dtype(self) -> torch.dtype:
        """The KV cache's: float16 on the C path (half the bytes every step reads), else ours."""
        return torch.float16 if self.kernels is not None else self.dtype

    # --- the step's plan ---------------------------------------------------------------------

    def prepare(self, batch: Batch) -> Batch:
        """Everything the layers share: rotations, the decode mask, each chunk's mask; for the
        C path only each token's cache row."""
        pos, d = batch.pos, batch.decode
        if self.kernels is not None:
            rows = list(range(d))
            for c in batch.chunks:
                rows += [c.row] * c.length
            batch.rows = torch.tensor(rows, dtype=torch.long)
            return batch
        angles = pos[:, None].double() * self.inv_freq[None, :]
        batch.freqs = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, None]
        if d:
            lengths = pos[:d]
            batch.span = int(lengths.max()) + 1 if batch.span == 0 else batch.span
            cols = torch.arange(batch.span, device=self.device)
            batch.decode_mask = (cols[None, :] <= lengths[:, None])[:, None, None, :]
            batch.rows = torch.arange(d, device=self.device)
        for c in batch.chunks:
            if c.start > 0:  # query i (position start+i) sees keys 0..start+i
                q = torch.arange(c.length, device=self.device)[:, None] + c.start
                c.mask = torch.arange(c.start + c.length, device=self.device)[None, :] <= q
        return batch

    # --- the forward -------------------------------------------------------------------------

    def forward(self, batch: Batch, cache) -> torch.Tensor:
        """Logits [R, vocab] (float32) for the tokens at `batch.logits_at`."""
        if self.kernels is not None:
            return self.forward_cpu(batch, cache)
        x = self.embed_tokens(batch.ids)
        for i, layer in enumerate(self.layers):
            h = rms_norm(x, layer.attn_norm, self.shape.eps)
            x = x + layer.o(self.attention(i, layer.qkv(h), batch, cache))
            h = rms_norm(x, layer.mlp_norm, self.shape.eps)
            gate, up = layer.gate_up(h).chunk(2, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
        if batch.logits_at is not None:
            x = x[batch.logits_at]
        x = rms_norm(x, self.norm, self.shape.eps)
        return self.lm_head(x).float()

    def forward_cpu(self, batch: Batch, cache) -> torch.Tensor:
        """The same forward through the C kernels (kernels/blocks.c): one call per operation,
        the residual added inside the products, a float16 KV cache, no masks (each token attends
        over its own row up to its own position)."""
        k, s, eps = self.kernels, self.shape, self.shape.eps
        x = self.embed_tokens(batch.ids).contiguous()
        t = x.shape[0]
        h = torch.empty_like(x)
        cos, sin = self.rope_tables(int(batch.pos.max()) + 1)
        if self.stack is not None and t < DENSE_FROM:  # every layer in one call: no trip back
            # to Python between ops (a longer step runs torch's float32 GEMM in its products)
            self.stack.cos, self.stack.sin = cos.data_ptr(), sin.data_ptr()
            k.layers_forward(self.stack, x, batch.rows, batch.pos, cache.k, cache.v)
            layers = ()
        else:
            layers = self.layers
        for i, layer in enumerate(layers):
            qkv = layer.qkv(k.rms_norm(x, layer.attn_norm, eps, h))
            k.rope(qkv, s.heads + s.kv_heads, s.head_dim, batch.pos, cos, sin)
            attn = torch.empty((t, self.q_dim), dtype=x.dtype)
            k.attention(qkv, s.heads, s.kv_heads, s.head_dim, cache.k[i], cache.v[i],
                        batch.rows, batch.pos, self.scale, attn)
            layer.o.add_to(attn, x)
            layer.down.add_to(k.silu_mul(layer.gate_up(k.rms_norm(x, layer.mlp_norm, eps, h))), x)
        if batch.logits_at is not None:
            x = x[batch.logits_at]
        return self.lm_head(k.rms_norm(x, self.norm, eps, torch.empty_like(x))).float()

    def rope_tables(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [positions, head_dim/2] for the C rope, grown by doubling."""
        if self._rope is None or self._rope[0].shape[0] < positions:
            n = max(positions, 2 * (0 if self._rope is None else self._rope[0].shape[0]), 512)
            angles = torch.arange(n, dtype=torch.float64)[:, None] * self.inv_freq.cpu()[None, :]
            self._rope = (angles.cos().float().contiguous(), angles.sin().float().contiguous())
        return self._rope

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, torch.Tensor):
            return self.embed[ids]
        q, d = self.embed
        rows = q[ids].to(self.dtype).unflatten(-1, (d.shape[1], -1))
        return (rows * d[ids][..., None].to(self.dtype)).flatten(-2).contiguous()

    def decode_attention(self, q, keys, values, visible) -> torch.Tensor:
        """One query per row against its cached keys: [D, heads, head_dim]. Each kv head's group
        of query heads is folded into the query axis, so keys and values are never copied; plain
        matmul-softmax-matmul, which at one query per row is several times faster on a CPU than
        SDPA's kernels (built for long queries)."""
        s, d = self.shape, q.shape[0]
        qd = q.view(d, s.kv_heads, self.group, s.head_dim)
        scores = torch.matmul(qd, keys.transpose(-1, -2)).mul_(self.scale)
        scores.masked_fill_(~visible, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), values).view(d, s.heads, s.head_dim)

    def attention(self, layer: int, qkv: torch.Tensor, batch: Batch, cache) -> torch.Tensor:
        s, t = self.shape, qkv.shape[0]
        qk = qkv[:, :self.q_dim + self.kv_dim]
        rotate(qk.view(t, s.heads + s.kv_heads, s.head_dim), batch.freqs)
        q = qkv[:, :self.q_dim].view(t, s.heads, s.head_dim)
        k = qkv[:, self.q_dim:self.q_dim + self.kv_dim].view(t, s.kv_heads, s.head_dim)
        v = qkv[:, self.q_dim + self.kv_dim:].view(t, s.kv_heads, s.head_dim)
        keys, values = cache.k[layer], cache.v[layer]  # [rows, kv_heads, cap, head_dim]
        out = torch.empty((t, s.heads, s.head_dim), dtype=qkv.dtype, device=qkv.device)
        d = batch.decode
        if d:
            dpos = batch.pos[:d]
            keys[batch.rows, :, dpos] = k[:d]
            values[batch.rows, :, dpos] = v[:d]
            out[:d] = self.decode_attention(q[:d], keys[:d, :, :batch.span],
                                            values[:d, :, :batch.span], batch.decode_mask)
        self.chunk_attention(layer, qkv, batch, cache, out)
        return out.view(t, self.q_dim)

    def chunk_attention(self, layer: int, qkv: torch.Tensor, batch: Batch, cache, out) -> None:
        """Each prompt chunk: its keys and values into its cache row, then its queries over
        that row up to the chunk's end (earlier chunks included). out: [T, heads, head_dim]."""
        s, t = self.shape, qkv.shape[0]
        q = qkv[:, :self.q_dim].view(t, s.heads, s.head_dim)
        k = qkv[:, self.q_dim:self.q_dim + self.kv_dim].view(t, s.kv_heads, s.head_dim)
        v = qkv[:, self.q_dim + self.kv_dim:].view(t, s.kv_heads, s.head_dim)
        keys, values = cache.k[layer], cache.v[layer]
        at = batch.decode
        for c in batch.chunks:
            end = c.start + c.length
            keys[c.row, :, c.start:end] = k[at:at + c.length].transpose(0, 1)
            values[c.row, :, c.start:end] = v[at:at + c.length].transpose(0, 1)
            qc = q[at:at + c.length].transpose(0, 1)[None]  # [1, heads, length, head_dim]
            oc = F.scaled_dot_product_attention(
                qc, keys[c.row:c.row + 1, :, :end], values[c.row:c.row + 1, :, :end],
                attn_mask=c.mask, is_causal=c.mask is None, enable_gqa=self.group > 1)
            out[at:at + c.length] = oc[0].transpose(0, 1)
            at += c.length


def cpu_kernels(device: torch.device, dtype: torch.dtype):
    """The C kernels' module when this model can use them (float32 on a CPU that runs them)."""
    if device.type != "cpu" or dtype != torch.float32:
        return None
    from nodes.engine import kernels
    return kernels if kernels.library() is not None else None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in a few plain ops (torch's rms_norm is a slower composite on CPU)."""
    if x.dtype != torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    return x * x.square().mean(-1, keepdim=True).add_(eps).rsqrt_() * weight


def rotate(x: torch.Tensor, freqs: torch.Tensor) -> None:
    """Rotary embedding in place over interleaved pairs: x [T, heads, head_dim], freqs [T, 1,
    head_dim/2] complex. float32 as one complex multiply; other dtypes through float32."""
    if x.dtype == torch.float32:
        xc = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
        xc.mul_(freqs)
        return
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous()) * freqs
    x.copy_(torch.view_as_real(xc).flatten(-2))

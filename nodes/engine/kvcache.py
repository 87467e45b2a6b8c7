"""The hf engine's KV cache: one dense buffer, one row per running sequence.

Layout: keys and values of shape [layers, rows, kv_heads, cap, head_dim]. Running sequences
occupy rows 0..n-1 (kept compact: a leaving sequence's row is filled by the last one), and each
sequence stores its tokens from position 0 of its row, so a decode step writes token `pos[b]` of
row `b` and attends over `buffer[layer, :n, :, :max(pos)+1]` with a per-row mask. No copy of the
cache is made per step.

On a CPU the buffer grows and shrinks with the running set (rows and `cap` change only when
membership changes or a sequence outgrows `cap`, in chunks, never beyond `kv_budget` tokens of
rows x the largest reservation). On a GPU it is allocated once (`static`): every slot a full
context, so CUDA graphs can capture views of it that never move.

`RowCache` is what our own llama runner reads and writes directly. `SlotCache` adapts the same
buffer to transformers' `Cache` API for the fallback runner (other architectures): the model's
attention writes its new keys/values through `update()` and gets back the view it must attend
over. The fallback always passes position ids and a ready 4D mask, so the library never asks us
for lengths.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

CAP_CHUNK = 256  # cap grows in chunks so a growing sequence does not realloc every token
ROW_CHUNK = 4    # rows grow in chunks for the same reason


class RowCache:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, kv_budget: int, max_len: int, max_rows: int,
                 static: bool = False, zeroed: bool = True):
        """`zeroed`: new buffers start as zeros. torch's attention computes scores past a row's
        length and masks them after, so a NaN left there would spread; our kernels read only a
        row's own positions, and their cache is not filled: zeroing a 4k-token row of a 0.6B
        model took 100 ms on a 2-vCPU EPYC, on every new turn after the node went idle."""
        self.shape = (layers, kv_heads, head_dim)
        self.dtype, self.device, self.zeroed = dtype, device, zeroed
        self.kv_budget, self.max_len, self.max_rows = kv_budget, max_len, max_rows
        self.static = static
        self.k = self.v = None
        self.rows = self.cap = 0
        if static:
            self._allocate(max_rows, max_len, 0, 0)

    # --- shape: only ever within the budget --------------------------------------------------

    def fits(self, n: int, longest: int) -> bool:
        """Would `n` rows of `longest` tokens (the largest reservation) stay within the budget?"""
        if self.static:
            return n <= self.rows and longest <= self.cap
        return n * longest <= self.kv_budget

    def reshape(self, n: int, need_len: int, longest: int, used_len: int) -> None:
        """Make room for rows 0..n-1 holding up to `need_len` tokens now and `longest` at most,
        keeping the first `used_len` tokens of every kept row.

        Rounds rows and cap up to chunks when that still fits the budget (fewer reallocations),
        never beyond `longest` (the largest reservation among the running sequences)."""
        if self.static:
            return
        if n == 0:
            self.k = self.v = None
            self.rows = self.cap = 0
            return
        rows = self.rows if self.rows >= n and self.fits(self.rows, longest) else n
        rounded = min(self.max_rows, -(-n // ROW_CHUNK) * ROW_CHUNK)
        if rows == n and self.rows != n and self.fits(rounded, longest):
            rows = rounded
        cap = self.cap
        if cap < need_len or rows * cap > self.kv_budget:
            cap = min(self.max_len, longest, -(-max(need_len, 1) // CAP_CHUNK) * CAP_CHUNK)
            cap = max(cap, need_len)
            if rows * cap > self.kv_budget:
                cap = need_len
        if (rows, cap) != (self.rows, self.cap):
            self._allocate(rows, cap, min(n, self.rows), min(used_len, cap, self.cap))

    def _allocate(self, rows: int, cap: int, keep_rows: int, keep_len: int) -> None:
        layers, kv_heads, head_dim = self.shape
        shape = (layers, rows, kv_heads, cap, head_dim)
        new = torch.zeros if self.zeroed else torch.empty
        k = new(shape, dtype=self.dtype, device=self.device)
        v = new(shape, dtype=self.dtype, device=self.device)
        if keep_rows and keep_len:
            k[:, :keep_rows, :, :keep_len] = self.k[:, :keep_rows, :, :keep_len]
            v[:, :keep_rows, :, :keep_len] = self.v[:, :keep_rows, :, :keep_len]
        self.k, self.v = k, v
        self.rows, self.cap = rows, cap

    def move_row(self, src: int, dst: int, length: int) -> None:
        if self.k is not None and length:
            self.k[:, dst, :, :length] = self.k[:, src, :, :length]
            self.v[:, dst, :, :length] = self.v[:, src, :, :length]

    def bytes_used(self) -> int:
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()


# --- the transformers adapter (fallback runner) -----------------------------------------------


class SlotLayer(CacheLayerMixin):
    """One layer's view of the RowCache. The owning SlotCache says where the forward writes."""

    is_sliding = False

    def __init__(self, owner: "SlotCache", index: int):
        super().__init__()
        self.owner = owner
        self.index = index
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        o = self.owner
        keys, values = o.rows.k[self.index], o.rows.v[self.index]
        if o.mode == "prefill":  # packed prompts, each written from position 0 of its own row
            off = 0
            for r, q in zip(o.prefill_rows, o.prefill_lens):
                keys[r, :, :q] = key_states[0, :, off:off + q]
                values[r, :, :q] = value_states[0, :, off:off + q]
                off += q
            # A prefill from position 0 attends over nothing but its own new keys (the packed
            # mask keeps each prompt to itself), so they are the whole context.
            return key_states, value_states
        n = o.n  # decode: rows 0..n-1, one token each at its own position
        keys[o.row_index, :, o.positions] = key_states[:, :, 0]
        values[o.row_index, :, o.positions] = value_states[:, :, 0]
        return keys[:n, :, :o.span], values[:n, :, :o.span]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.span, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always given explicitly

    def get_max_length(self) -> int:
        return self.owner.rows.cap


class SlotCache(Cache):
    """transformers' view of a RowCache, plus the plan of the current forward."""

    def __init__(self, rows: RowCache):
        self.rows = rows
        self.mode = "decode"
        self.n = self.span = 0
        self.prefill_rows: list[int] = []
        self.prefill_lens: list[int] = []
        self.row_index = self.positions = None
        super().__init__(layers=[SlotLayer(self, i) for i in range(rows.shape[0])])

    def plan_prefill(self, rows: list[int], lengths: list[int]) -> None:
        """The next forward is prompts packed into one row of input: `lengths[i]` tokens of
        sequence row `rows[i]`, in that order."""
        self.mode, self.prefill_rows, self.prefill_lens = "prefill", rows, lengths

    def plan_decode(self, positions: torch.Tensor, span: int) -> None:
        self.mode, self.n, self.span = "decode", positions.shape[0], span
        self.positions = positions
        self.row_index = torch.arange(self.n, device=positions.device)


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of any causal LM config."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return cfg.num_hidden_layers, kv_heads, head_dim


def per_token_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of K and V one token takes over all layers (for logs and the budget's meaning)."""
    layers, kv_heads, head_dim = kv_shape(config)
    size = torch.tensor([], dtype=dtype).element_size()
    return 2 * layers * kv_heads * head_dim * size

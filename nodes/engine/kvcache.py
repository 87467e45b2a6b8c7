"""The hf engine's KV cache: one dense buffer per layer, one row per running sequence.

Layout per layer: keys and values of shape [rows, kv_heads, cap, head_dim]. Running sequences
occupy rows 0..n-1 (kept compact: a leaving sequence's row is filled by the last one), and each
sequence stores its tokens from position 0 of its row, so a decode step writes token `pos[b]` of
row `b` and attends over `buffer[:n, :, :max(pos)+1]` with a per-row mask. No copy of the cache is
made per step; rows and `cap` change only when membership changes or a sequence outgrows `cap`.
A prefill packs several new prompts into one input row and scatters each prompt's keys and values
into its own cache row.

It plugs into transformers as a `Cache` whose layers answer `update()`: the model's attention
writes its new keys/values through us and gets back the view it must attend over. We always pass
position ids and a ready 4D mask, so the library never asks us for lengths.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

CAP_CHUNK = 256  # cap grows in chunks so a growing sequence does not realloc every token
ROW_CHUNK = 4    # rows grow in chunks for the same reason


class SlotLayer(CacheLayerMixin):
    """One layer's buffer. The owning SlotCache says where the current forward writes."""

    is_sliding = False

    def __init__(self, owner: "SlotCache"):
        super().__init__()
        self.owner = owner

    def lazy_initialization(self, key_states, value_states) -> None:
        rows, cap = self.owner.rows, self.owner.cap
        shape = (rows, key_states.shape[1], cap, key_states.shape[3])
        self.keys = torch.zeros(shape, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros_like(self.keys)
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        o = self.owner
        if o.mode == "prefill":  # packed prompts, each written from position 0 of its own row
            off = 0
            for r, q in zip(o.prefill_rows, o.prefill_lens):
                self.keys[r, :, :q] = key_states[0, :, off:off + q]
                self.values[r, :, :q] = value_states[0, :, off:off + q]
                off += q
            # A prefill from position 0 attends over nothing but its own new keys (the packed
            # mask keeps each prompt to itself), so they are the whole context.
            return key_states, value_states
        n = o.n  # decode: rows 0..n-1, one token each at its own position
        self.keys[o.row_index, :, o.positions] = key_states[:, :, 0]
        self.values[o.row_index, :, o.positions] = value_states[:, :, 0]
        return self.keys[:n, :, :o.span], self.values[:n, :, :o.span]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.owner.span, 0

    def get_seq_length(self) -> int:
        return 0  # positions are always given explicitly

    def get_max_length(self) -> int:
        return self.owner.cap

    def resize(self, rows: int, cap: int, keep_rows: int, keep_len: int) -> None:
        if not self.is_initialized:
            return
        k = self.keys.new_zeros((rows, self.keys.shape[1], cap, self.keys.shape[3]))
        v = torch.zeros_like(k)
        k[:keep_rows, :, :keep_len] = self.keys[:keep_rows, :, :keep_len]
        v[:keep_rows, :, :keep_len] = self.values[:keep_rows, :, :keep_len]
        self.keys, self.values = k, v

    def move_row(self, src: int, dst: int, length: int) -> None:
        if self.is_initialized:
            self.keys[dst, :, :length] = self.keys[src, :, :length]
            self.values[dst, :, :length] = self.values[src, :, :length]

    def release(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False


class SlotCache(Cache):
    """The whole model's cache, plus the plan of the current forward (prefill or decode)."""

    def __init__(self, num_layers: int, kv_budget: int, max_len: int, max_rows: int):
        self.rows = 0
        self.cap = 0
        self.kv_budget = kv_budget
        self.max_len = max_len
        self.max_rows = max_rows
        self.mode = "decode"
        self.n = self.span = 0
        self.prefill_rows: list[int] = []
        self.prefill_lens: list[int] = []
        self.row_index = self.positions = None
        super().__init__(layers=[SlotLayer(self) for _ in range(num_layers)])

    # --- shape: only ever within the budget --------------------------------------------------------

    def fits(self, n: int, longest: int) -> bool:
        """Would `n` rows of `longest` tokens (the largest reservation) stay within the budget?"""
        return n * longest <= self.kv_budget

    def reshape(self, n: int, need_len: int, longest: int, used_len: int) -> None:
        """Make room for rows 0..n-1 holding up to `need_len` tokens now and `longest` at most.

        Rounds rows and cap up to chunks when that still fits the budget (fewer reallocations),
        never beyond `longest` (the largest reservation among the running sequences)."""
        if n == 0:
            for layer in self.layers:
                layer.release()
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
            keep_rows = min(n, self.rows)
            for layer in self.layers:
                layer.resize(rows, cap, keep_rows, min(used_len, cap, self.cap))
            self.rows, self.cap = rows, cap

    def move_row(self, src: int, dst: int, length: int) -> None:
        for layer in self.layers:
            layer.move_row(src, dst, length)

    def bytes_used(self) -> int:
        return sum(2 * layer.keys.numel() * layer.keys.element_size()
                   for layer in self.layers if layer.is_initialized)

    # --- the plan of one forward -------------------------------------------------------------------

    def plan_prefill(self, rows: list[int], lengths: list[int]) -> None:
        """The next forward is prompts packed into one row of input: `lengths[i]` tokens of
        sequence row `rows[i]`, in that order."""
        self.mode, self.prefill_rows, self.prefill_lens = "prefill", rows, lengths

    def plan_decode(self, positions: torch.Tensor, span: int) -> None:
        self.mode, self.n, self.span = "decode", positions.shape[0], span
        self.positions = positions
        self.row_index = torch.arange(self.n, device=positions.device)


def per_token_bytes(config, dtype: torch.dtype) -> int:
    """Bytes of K and V one token takes over all layers (for logs and the budget's meaning)."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(cfg, "num_attention_heads", None) or cfg.n_head
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    size = torch.tensor([], dtype=dtype).element_size()
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * size

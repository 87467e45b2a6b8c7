"""Prefix reuse for the hf engine: a prompt that starts like a sequence already in the KV cache
copies those keys and values instead of computing them again.

Every chat request starts with the chat template's system prompt, a chat's next turn starts with
the whole previous turn (question and answer), and `n` choices share one prompt; computing them
again is most of a short request's time to first token on a CPU. Sources, longest match first:

    a running row     its first `length` positions (prompt, then answer so far)
    the store         keys and values copied out of rows that finished recently, LRU, bounded
                      in bytes (`PrefixStore`)

The copy is exact: a position's key and value depend only on the tokens up to it, and every
kernel computes a token's row alone (activations quantized per row), so the answer is the same
with or without the copy. Only runners that can prefill from any position (`chunked`) use it.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

MIN_REUSE = 8  # tokens: a shorter match is cheaper to compute than to look up and copy


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share: slices compared in C, halving the window that
    holds the first difference (the store compares every prompt with every entry)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo]; the first difference is before hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def cached_tokens(seq) -> list[int]:
    """The tokens whose keys and values row `seq.row` holds: prompt, then answer, `length` of
    them (the last drawn token is not in the cache until the next step feeds it)."""
    return (seq.sampling.prompt + seq.tokens)[:seq.length]  # tokens begin with any resumed ones


@dataclass(eq=False)
class Entry:
    tokens: list[int]
    k: torch.Tensor  # [layers, kv_heads, len(tokens), head_dim]
    v: torch.Tensor

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class PrefixStore:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # by id, oldest first
        self.used = 0

    def save(self, cache, row: int, tokens: list[int]) -> None:
        """Copy row `row`'s first len(tokens) positions out of the cache."""
        n = len(tokens)
        if n < MIN_REUSE or cache.k is None:
            return
        for key, e in list(self.entries.items()):  # a longer copy of the same start replaces it
            if len(e.tokens) <= n and e.tokens == tokens[:len(e.tokens)]:
                self.drop(key)
        entry = Entry(tokens, cache.k[:, row, :, :n].clone(), cache.v[:, row, :, :n].clone())
        if entry.nbytes > self.budget:
            return
        while self.used + entry.nbytes > self.budget:
            self.drop(next(iter(self.entries)))
        self.entries[id(entry)] = entry
        self.used += entry.nbytes

    def drop(self, key: int) -> None:
        self.used -= self.entries.pop(key).nbytes

    def best(self, feed: list[int]) -> tuple[Entry | None, int]:
        found, length = None, 0
        for entry in self.entries.values():
            n = common_prefix(feed, entry.tokens)
            if n > length:
                found, length = entry, n
        if found is not None:
            self.entries.move_to_end(id(found))  # recently used
        return found, length

    def load(self, cache, entry: Entry, row: int, n: int) -> None:
        cache.k[:, row, :, :n] = entry.k[:, :, :n]
        cache.v[:, row, :, :n] = entry.v[:, :, :n]

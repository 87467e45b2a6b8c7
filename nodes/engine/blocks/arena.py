"""Where a CPU model's matrices live: anonymous memory advised into 2 MB pages.

A decode step streams every weight once. From 4 KB pages (the GGUF file's mapping, or memory
torch allocates) each new page costs a TLB miss and restarts the hardware prefetchers, which
stop at page edges; from 2 MB pages the stream runs on. On a 2-vCPU Sapphire Rapids the
Llama-3.2-1B shape's decode step took 36.6-38.5 ms from 2 MB pages against 43.3-43.9 from the
file's mapping and torch's memory (docs/benchmarks.md). The price: fresh pages, zeroed at load.

The arena takes chunks of virtual memory (CHUNK, or one matrix's size where that is larger),
each aligned to 2 MB and advised MADV_HUGEPAGE, and hands out 64-byte aligned slices one after
another. Only the pages written take memory. Where the kernel gives no transparent huge pages
(`never`), the same slices lie in ordinary pages: still anonymous, still one copy.
"""

from __future__ import annotations

import math
import mmap

import torch

HUGE = 2 << 20  # a transparent huge page on x86-64
CHUNK = 256 << 20  # virtual memory taken at a time (untouched pages cost nothing)
ALIGN = 64  # a cache line: every slice starts on one


class Arena:
    def __init__(self, chunk: int = CHUNK):
        self.chunk = chunk
        self.maps: list[mmap.mmap] = []  # kept: the slices' tensors point into them
        self.buf: torch.Tensor | None = None  # the current chunk, its 2 MB aligned part
        self.used = 0

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A new uint8 tensor of `shape` in the arena (its contents undefined until written)."""
        n = math.prod(shape)
        at = -(-self.used // ALIGN) * ALIGN
        if self.buf is None or at + n > self.buf.numel():
            self._grow(n)
            at = 0
        self.used = at + n
        return self.buf[at:at + n].view(shape)

    def _grow(self, need: int) -> None:
        size = max(self.chunk, -(-need // HUGE) * HUGE)
        m = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            m.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(m, dtype=torch.uint8)
        skip = -whole.data_ptr() % HUGE  # the head before the first 2 MB boundary stays untouched
        self.maps.append(m)
        self.buf, self.used = whole[skip:skip + size], 0

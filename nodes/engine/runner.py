"""Runners: one forward per engine step, over the rows the stepper hands them.

The stepper (stepper.py) decides what a step computes: the next token of every decoding row
(cache rows 0..D-1, in order) and slices ("chunks") of prompts being prefilled; a runner turns
that into logits, one row per decode row, then one per chunk that completes its prompt:

    LlamaRunner   our own model (llama.py): everything in one mixed forward; prompts may be cut
                  into chunks anywhere (`chunked`). On a GPU, decode-only steps replay CUDA
                  graphs captured per (batch bucket, attention-span bucket) over a static cache,
                  so a step is a handful of launches instead of hundreds.
    HFRunner      any other transformers causal LM: a decode forward for the decode rows and one
                  packed forward for the new prompts (whole prompts only, each from position 0).

Both keep their KV cache in a `RowCache` (kvcache.py), one row per running sequence.
"""

from __future__ import annotations

import logging

import torch

from nodes.engine.kvcache import RowCache, SlotCache
from nodes.engine.llama import Batch, Chunk, Model

log = logging.getLogger("treechat.engine")

GRAPH_BATCHES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
GRAPH_SPAN_MIN = 256  # attention-span buckets: 256, 512, ... up to the cache's length


class LlamaRunner:
    chunked = True

    def __init__(self, model: Model, cache: RowCache, graphs: bool):
        self.model = model
        self.cache = cache
        self.device = model.device
        self.graphs = DecodeGraphs(model, cache) if graphs else None

    def forward(self, decode_seqs: list, chunks: list[tuple]) -> torch.Tensor:
        """decode_seqs: rows 0..D-1 in order, each feeding `tokens[-1]` at position `length`;
        chunks: (seq, start, length) slices of `seq.feed`. Logits [D + completing chunks, V]."""
        d = len(decode_seqs)
        if not chunks and self.graphs is not None:
            out = self.graphs.run(decode_seqs)
            if out is not None:
                return out
        ids = [s.tokens[-1] for s in decode_seqs]
        pos = [s.length for s in decode_seqs]
        plan, logits_at, at = [], list(range(d)), d
        for seq, start, length in chunks:
            ids += seq.feed[start:start + length]
            pos += range(start, start + length)
            plan.append(Chunk(seq.row, start, length))
            at += length
            if start + length == len(seq.feed):
                logits_at.append(at - 1)
        dev = self.device
        batch = Batch(ids=torch.tensor(ids, dtype=torch.long, device=dev),
                      pos=torch.tensor(pos, dtype=torch.long, device=dev), decode=d, chunks=plan,
                      span=max(pos[:d], default=-1) + 1,
                      logits_at=None if len(logits_at) == len(ids) else
                      torch.tensor(logits_at, dtype=torch.long, device=dev),
                      prompt_rows=self.prompt_rows(d, chunks))
        return self.model.forward(self.model.prepare(batch), self.cache)

    @staticmethod
    def prompt_rows(d: int, chunks: list[tuple]) -> torch.Tensor | None:
        """Which tokens take the kernels' prompt path (bfloat16, where the CPU has it): None for
        the batch's own rule (chunk tokens do, decode rows do not), or, when a chunk holds a
        resumed request's delivered tokens, the mask that recomputes them as they were made,
        as generated tokens. A token's kind alone decides, never what shares the step or how
        much of a prompt a cached prefix held (a short prompt would run faster on the 8-bit
        kernels, but then the same tokens' keys and values would differ by rounding between a
        short prompt and a long one that shares its start): a seed's answer does not depend on
        the batch, and a resumed request goes on exactly as it would have."""
        if all(start + length <= seq.prompt_tokens for seq, start, length in chunks):
            return None
        return torch.tensor([False] * d + [p < seq.prompt_tokens for seq, start, length in chunks
                                           for p in range(start, start + length)])


class DecodeGraphs:
    """CUDA graphs of the decode-only forward, captured lazily per (batch bucket, span bucket).

    A graph replays fixed addresses, so everything it touches is static: the cache (allocated
    once), and input buffers `ids`, `pos`, `rows` per batch bucket. Rows past the real batch are
    padding: they write their keys into a scratch row (the cache has one more row than slots)
    and their logits are ignored. The attention span is the bucket's, masked per row by `pos`.
    With `capture=False` the same static step runs eagerly (what the CPU tests check)."""

    def __init__(self, model: Model, cache: RowCache, capture: bool = True):
        self.model, self.cache, self.capture_graphs = model, cache, capture
        self.scratch = cache.rows - 1  # the static cache's spare row
        self.graphs: dict[tuple[int, int], tuple] = {}
        self.pool = None
        self.failed = False

    def bucket(self, n: int) -> int | None:
        return next((b for b in GRAPH_BATCHES if n <= b <= self.scratch), None)

    def span_bucket(self, span: int) -> int:
        b = GRAPH_SPAN_MIN
        while b < span:
            b *= 2
        return min(b, self.cache.cap)

    def run(self, seqs: list) -> torch.Tensor | None:
        """Logits [len(seqs), V] from a graph, or None (no bucket fits, or capture failed)."""
        n = len(seqs)
        b = self.bucket(n)
        if b is None or self.failed:
            return None
        span = self.span_bucket(max(s.length for s in seqs) + 1)
        entry = self.graphs.get((b, span)) or self.capture(b, span)
        if entry is None:
            return None
        replay, inputs, out = entry
        host = torch.tensor([[s.tokens[-1], s.length, i] for i, s in enumerate(seqs)]
                            + [[0, 0, self.scratch]] * (b - n), dtype=torch.long)
        if inputs.is_cuda:
            host = host.pin_memory()
        inputs.copy_(host.t(), non_blocking=True)
        if out is None:  # not captured: the step itself
            return replay()[:n]
        replay()
        return out[:n]

    def capture(self, b: int, span: int):
        dev = self.model.device
        inputs = torch.zeros((3, b), dtype=torch.long, device=dev)  # ids, positions, cache rows
        batch = Batch(ids=inputs[0], pos=inputs[1], decode=b, span=span)

        def step():
            self.model.prepare(batch)
            batch.rows = inputs[2]  # padding rows write to the scratch row
            return self.model.forward(batch, self.cache)

        if not self.capture_graphs:
            entry = self.graphs[(b, span)] = (step, inputs, None)
            return entry
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up outside the graph (allocator, kernels' autotuning)
                    step()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                out = step()
        except Exception:  # a model or driver that cannot be captured still runs, eagerly
            log.exception("CUDA graph capture failed; decoding without graphs")
            self.failed = True
            return None
        entry = self.graphs[(b, span)] = (graph.replay, inputs, out)
        log.info("captured a decode graph for %d rows, span %d (%d graphs)", b, span,
                 len(self.graphs))
        return entry


class HFRunner:
    """transformers' own forward for architectures our model does not cover."""

    chunked = False

    def __init__(self, net, cache: RowCache, dtype: torch.dtype):
        self.net = net
        self.cache = cache
        self.slots = SlotCache(cache)
        self.device = next(net.parameters()).device
        self.neg = torch.finfo(dtype).min
        self.dtype = dtype

    def forward(self, decode_seqs: list, chunks: list[tuple]) -> torch.Tensor:
        parts = []
        if decode_seqs:
            parts.append(self.decode(decode_seqs))
        if chunks:
            parts.append(self.prefill([seq for seq, _, _ in chunks]))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def decode(self, seqs: list) -> torch.Tensor:
        """input [n, 1] (each row's last token), positions [n, 1], mask [n, 1, 1, span]: row b
        sees cache columns 0..pos[b]."""
        dev = self.device
        lengths = [s.length for s in seqs]
        span = max(lengths) + 1
        pos = torch.tensor(lengths, device=dev)
        ids = torch.tensor([[s.tokens[-1]] for s in seqs], device=dev)
        cols = torch.arange(span, device=dev)
        mask = torch.zeros((len(seqs), 1, 1, span), dtype=self.dtype, device=dev)
        mask.masked_fill_((cols[None, :] > pos[:, None])[:, None, None, :], self.neg)
        self.slots.plan_decode(pos, span)
        return self.net(input_ids=ids, position_ids=pos[:, None], attention_mask=mask,
                        cache=self.slots, use_cache=True).logits[:, -1].float()

    def prefill(self, seqs: list) -> torch.Tensor:
        """The whole prompts packed into one input [1, T], positions restarting at 0 for each, a
        block-diagonal causal mask (a prompt sees only itself); only each prompt's last
        position gets logits."""
        dev = self.device
        lens = [len(s.feed) for s in seqs]
        ids = torch.tensor([[t for s in seqs for t in s.feed]], device=dev)
        pos = torch.cat([torch.arange(q, device=dev) for q in lens])
        seg = torch.repeat_interleave(torch.arange(len(lens), device=dev),
                                      torch.tensor(lens, device=dev))
        cols = torch.arange(len(seg), device=dev)
        hidden = (seg[None, :] != seg[:, None]) | (cols[None, :] > cols[:, None])
        mask = torch.zeros((1, 1, len(seg), len(seg)), dtype=self.dtype, device=dev)
        mask.masked_fill_(hidden[None, None], self.neg)
        last = torch.tensor(lens, device=dev).cumsum(0) - 1
        self.slots.plan_prefill([s.row for s in seqs], lens)
        return self.net(input_ids=ids, position_ids=pos[None], attention_mask=mask,
                        cache=self.slots, use_cache=True,
                        logits_to_keep=last).logits[0].float()

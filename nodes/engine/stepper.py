"""One step of the hf engine's loop: batched decode, retire, admit and prefill.

Runs only on the engine thread (see hf.py). The forward passes are plain transformers forwards
with our SlotCache, explicit position ids and a ready 4D additive mask:

    decode:  input [n, 1] (each running sequence's last token), positions [n, 1] (its length),
             mask [n, 1, 1, span]: row b sees cache columns 0..pos[b]
    prefill: input [1, q] (prompt, plus resumed tokens), positions 0..q-1, causal mask [1,1,q,q],
             written into the sequence's own row; only the last position's logits are computed
"""

from __future__ import annotations

import logging
import time

import torch

from broker.protocol import ErrorCode, FinishReason
from nodes.engine.base import StepOutput
from nodes.engine.sampling import sample

log = logging.getLogger("treechat.engine")

PREFILL_TOKENS_PER_STEP = 2048  # bounds how long one step's admissions stall running decodes


class Stepper:
    def __init__(self, engine):
        self.e = engine
        self.cache = engine.cache
        self.device = engine.device
        self.neg = torch.finfo(engine.dtype).min
        # Where the time goes (bench/engine.py prints it): seconds and tokens per phase.
        self.stats = engine.stats

    def step(self, out: StepOutput) -> None:
        t0 = time.perf_counter()
        if self.e._running:
            n = len(self.e._running)
            try:
                self.decode(out)
            except Exception as exc:  # a failed forward fails the batch, never the node
                log.exception("decode step failed")
                self.fail_all(out, exc)
            self.stats["decode_steps"] += 1
            self.stats["decode_tokens"] += n
        t1 = time.perf_counter()
        self.admit(out)
        t2 = time.perf_counter()
        self.stats["decode_s"] += t1 - t0
        self.stats["prefill_s"] += t2 - t1

    # --- decode --------------------------------------------------------------------------------------

    def decode(self, out: StepOutput) -> None:
        running = list(self.e._running)
        lengths = [s.length for s in running]
        span = max(lengths) + 1
        self.cache.reshape(len(running), span, max(s.reserve for s in running), max(lengths))
        pos = torch.tensor(lengths, device=self.device)
        ids = torch.tensor([[s.tokens[-1]] for s in running], device=self.device)
        cols = torch.arange(span, device=self.device)
        mask = torch.zeros((len(running), 1, 1, span), dtype=self.e.dtype, device=self.device)
        mask.masked_fill_((cols[None, :] > pos[:, None])[:, None, None, :], self.neg)
        self.cache.plan_decode(pos, span)
        logits = self.e.net(input_ids=ids, position_ids=pos[:, None], attention_mask=mask,
                            cache=self.cache, use_cache=True).logits[:, -1, :self.e.vocab]
        tokens = sample(logits.float(), [s.params for s in running])
        finished = []
        for seq, tok in zip(running, tokens):
            seq.length += 1
            reason = self.accept(seq, tok, out)
            if reason is not None:
                finished.append((seq, reason))
        for seq, reason in finished:
            self.e.retire(seq, reason, out)

    # --- admit and prefill ---------------------------------------------------------------------------

    def admit(self, out: StepOutput) -> None:
        """Admit waiting requests in arrival order while a slot, the budget and this step's
        prefill allowance last (the first one always goes, so a long prompt cannot starve)."""
        budget = PREFILL_TOKENS_PER_STEP
        waiting, running = self.e._waiting, self.e._running
        while waiting and len(running) < self.e.slots:
            seq = waiting[0]
            longest = max([s.reserve for s in running] + [seq.reserve])
            if not self.cache.fits(len(running) + 1, longest):
                break  # FIFO: it waits for room rather than being overtaken forever
            if budget < len(seq.feed) and budget < PREFILL_TOKENS_PER_STEP:
                break
            budget -= len(seq.feed)
            self.stats["prefill_tokens"] += len(seq.feed)
            waiting.popleft()
            try:
                self.prefill(seq, longest, out)
            except Exception as exc:
                log.exception("prefill failed")
                if seq in running:
                    self.e.retire(seq, FinishReason.ERROR, None)
                out.errors.append((seq.rid, ErrorCode.ENGINE, f"prefill failed: {exc}"))

    def prefill(self, seq, longest: int, out: StepOutput) -> None:
        running = self.e._running
        q = len(seq.feed)
        used = max([s.length for s in running], default=0)
        self.cache.reshape(len(running) + 1, max(q, used + 1), longest, used)
        seq.row = len(running)
        running.append(seq)
        ids = torch.tensor([seq.feed], device=self.device)
        pos = torch.arange(q, device=self.device)
        mask = torch.zeros((1, 1, q, q), dtype=self.e.dtype, device=self.device)
        mask.masked_fill_((pos[None, :] > pos[:, None])[None, None], self.neg)
        self.cache.plan_prefill(seq.row, 0)
        logits = self.e.net(input_ids=ids, position_ids=pos[None], attention_mask=mask,
                            cache=self.cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1, :self.e.vocab]
        seq.length = q
        tok = sample(logits.float(), [seq.params])[0]
        reason = self.accept(seq, tok, out)
        if reason is not None:
            self.e.retire(seq, reason, out)

    # --- one new token -------------------------------------------------------------------------------

    def accept(self, seq, tok: int, out: StepOutput) -> FinishReason | None:
        """Record `tok` for `seq`, report its text, and say whether `seq` is finished."""
        seq.tokens.append(tok)
        d = seq.detok
        reason = None
        if tok in self.e.eos_ids and not seq.ignore_eos:
            reason = FinishReason.STOP
        else:
            d.add(tok)
            if d.find_stop():
                reason = FinishReason.STOP
        if reason is None and len(seq.tokens) >= seq.limit:
            reason = FinishReason.LENGTH
        out.tokens.append((seq.rid, d.take(final=reason is not None), [tok]))
        return reason

    def fail_all(self, out: StepOutput, exc: Exception) -> None:
        """Every running request leaves with an error (waiting ones stay: they may still run)."""
        for seq in list(self.e._running):
            out.errors.append((seq.rid, ErrorCode.ENGINE, f"the model step failed: {exc}"))
        self.e._running.clear()
        self.cache.reshape(0, 0, 0, 0)

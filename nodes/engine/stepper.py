"""One step of the hf engine's loop: batched decode, retire, admit and prefill.

Runs only on the engine thread (see hf.py). The forward passes are plain transformers forwards
with our SlotCache, explicit position ids and a ready 4D additive mask:

    decode:  input [n, 1] (each running sequence's last token), positions [n, 1] (its length),
             mask [n, 1, 1, span]: row b sees cache columns 0..pos[b]
    prefill: the admitted prompts (plus resumed tokens) packed into one input [1, T], positions
             restarting at 0 for each, a block-diagonal causal mask [1, 1, T, T] (a prompt sees
             only itself); each prompt lands in its own cache row, and only each prompt's last
             position gets logits

A step sends its decode tokens as soon as the decode is done, then prefills and sends the new
requests' first tokens (two StepOutputs), so neither waits for the other. One step prefills at
most `prefill_tokens` prompt tokens (always at least one request), so a burst of arrivals is
admitted over several steps while the running sequences keep decoding in between.
"""

from __future__ import annotations

import logging
import time

import torch

from broker.protocol import ErrorCode, FinishReason
from nodes.engine.base import StepOutput
from nodes.engine.sampling import sample

log = logging.getLogger("treechat.engine")

# Prompt tokens one step may prefill: bounds how long admissions stall running decodes. On a CPU
# one forward costs ~40 ms plus ~1.5 ms per token (SmolLM2-135M, 2 cores), so 512 tokens is
# under a second and packs a burst of 8 chat prompts into a single forward.
PREFILL_TOKENS = {"cpu": 512}
PREFILL_TOKENS_DEFAULT = 4096


class Stepper:
    def __init__(self, engine, send):
        self.e = engine
        self.send = send  # hands one StepOutput to the node's loop
        self.out = StepOutput()  # what the current step has not sent yet
        self.cache = engine.cache
        self.device = engine.device
        self.neg = torch.finfo(engine.dtype).min
        self.prefill_tokens = PREFILL_TOKENS.get(engine.device.type, PREFILL_TOKENS_DEFAULT)
        # Where the time goes (bench/engine.py prints it): seconds and tokens per phase.
        self.stats = engine.stats

    def step(self, out: StepOutput) -> None:
        """`out` holds what the inbox brought (cancels); it leaves with the decode's tokens."""
        self.out = out
        t0 = time.perf_counter()
        if self.e._running:
            n = len(self.e._running)
            try:
                self.decode(self.out)
            except Exception as exc:  # a failed forward fails the batch, never the node
                log.exception("decode step failed")
                self.fail_all(self.out, exc)
            self.stats["decode_steps"] += 1
            self.stats["decode_tokens"] += n
        self.flush()
        t1 = time.perf_counter()
        self.admit(self.out)
        self.flush()
        self.stats["decode_s"] += t1 - t0
        self.stats["prefill_s"] += time.perf_counter() - t1

    def flush(self) -> None:
        """Send what the step has so far (if anything) and start a fresh StepOutput."""
        out, self.out = self.out, StepOutput()
        if out.tokens or out.done or out.errors:
            self.send(out)

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
        """Admit waiting requests in arrival order while a slot, the KV budget and this step's
        prefill allowance last (the first one always goes, so a long prompt cannot starve),
        and prefill them together in one forward."""
        waiting, running = self.e._waiting, self.e._running
        batch: list = []
        tokens, longest = 0, max((s.reserve for s in running), default=0)
        while waiting and len(running) + len(batch) < self.e.slots:
            seq = waiting[0]
            need = max(longest, seq.reserve)
            if not self.cache.fits(len(running) + len(batch) + 1, need):
                break  # FIFO: it waits for room rather than being overtaken forever
            if batch and tokens + len(seq.feed) > self.prefill_tokens:
                break
            batch.append(waiting.popleft())
            tokens, longest = tokens + len(seq.feed), need
        if not batch:
            return
        self.stats["prefill_tokens"] += tokens
        try:
            logits = self.prefill(batch, longest)
        except Exception as exc:
            log.exception("prefill failed")
            for seq in batch:
                if seq in running:
                    self.e.retire(seq, FinishReason.ERROR, None)
                out.errors.append((seq.rid, ErrorCode.ENGINE, f"prefill failed: {exc}"))
            return
        tokens = sample(logits.float(), [seq.params for seq in batch])
        finished = [(seq, reason) for seq, tok in zip(batch, tokens)
                    if (reason := self.accept(seq, tok, out)) is not None]
        for seq, reason in finished:
            self.e.retire(seq, reason, out)

    def prefill(self, batch: list, longest: int) -> torch.Tensor:
        """One forward over the packed prompts of `batch`, which join the running rows; the
        logits of each prompt's last position, [len(batch), vocab]."""
        running = self.e._running
        lens = [len(seq.feed) for seq in batch]
        used = max([s.length for s in running], default=0)
        self.cache.reshape(len(running) + len(batch), max(max(lens), used + 1), longest, used)
        for seq in batch:
            seq.row = len(running)
            running.append(seq)
        ids = torch.tensor([[t for seq in batch for t in seq.feed]], device=self.device)
        pos = torch.cat([torch.arange(q, device=self.device) for q in lens])
        seg = torch.repeat_interleave(torch.arange(len(lens), device=self.device),
                                      torch.tensor(lens, device=self.device))
        cols = torch.arange(len(seg), device=self.device)
        hidden = (seg[None, :] != seg[:, None]) | (cols[None, :] > cols[:, None])
        mask = torch.zeros((1, 1, len(seg), len(seg)), dtype=self.e.dtype, device=self.device)
        mask.masked_fill_(hidden[None, None], self.neg)
        last = torch.tensor(lens, device=self.device).cumsum(0) - 1
        self.cache.plan_prefill([seq.row for seq in batch], lens)
        logits = self.e.net(input_ids=ids, position_ids=pos[None], attention_mask=mask,
                            cache=self.cache, use_cache=True,
                            logits_to_keep=last).logits[0, :, :self.e.vocab]
        for seq, q in zip(batch, lens):
            seq.length = q
        return logits

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

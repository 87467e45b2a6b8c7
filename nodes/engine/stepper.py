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
        self.pieces: dict[int, str] = {}  # token id -> its text alone, for logprobs

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
        tokens, logprobs = sample(logits.float(), [s.params for s in running])
        finished = []
        for seq, tok, lp in zip(running, tokens, logprobs):
            seq.length += 1
            reason = self.accept(seq, tok, out, lp)
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
        for seq in batch:
            if seq.params.prompt_logprobs is not None and len(seq.tokens) == 0:
                out.tokens.append((seq.rid, "", [], self.prompt_logprobs(seq)))
        tokens, logprobs = sample(logits.float(), [seq.params for seq in batch])
        finished = [(seq, reason) for seq, tok, lp in zip(batch, tokens, logprobs)
                    if (reason := self.accept(seq, tok, out, lp)) is not None]
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

    def accept(self, seq, tok: int, out: StepOutput, lp=None) -> FinishReason | None:
        """Record `tok` for `seq`, report its text (and logprobs `lp`, see sampling.sample), and
        say whether `seq` is finished."""
        seq.tokens.append(tok)
        seq.params.observe(tok)
        d = seq.detok
        reason = None
        if tok in self.e.eos_ids and not seq.ignore_eos:
            reason = FinishReason.STOP
            lp = None  # the end of the answer is no part of it
        else:
            d.add(tok)
            if d.find_stop():
                reason = FinishReason.STOP
            matcher = seq.params.matcher
            if matcher is not None and reason is None:
                if not matcher.accept(tok):  # the mask allowed it: a grammar bug, never hang
                    log.error("request %d: token %d broke its grammar: %s", seq.rid, tok,
                              matcher.error())
                    reason = FinishReason.STOP
                elif matcher.is_terminated():  # the JSON is complete
                    reason = FinishReason.STOP
        if reason is None and len(seq.tokens) >= seq.limit:
            reason = FinishReason.LENGTH
        text = d.take(final=reason is not None)
        if lp is None:
            out.tokens.append((seq.rid, text, [tok]))
        else:
            out.tokens.append((seq.rid, text, [tok], [self.logprob_entry(tok, *lp)]))
        return reason

    # --- logprobs ------------------------------------------------------------------------------------

    def piece(self, tok: int) -> str:
        """A token's text decoded alone (what logprobs show; the gateway has no tokenizer)."""
        text = self.pieces.get(tok)
        if text is None:
            with self.e._tok_lock:
                text = self.pieces[tok] = self.e.tokenizer.decode([tok])
        return text

    def logprob_entry(self, tok: int, logprob: float | None, top: list) -> list:
        """[text, logprob, [[alt text, alt logprob], ...]]: broker.protocol.TokenLogprobs."""
        return [self.piece(tok), logprob, [[self.piece(t), v] for t, v in top]]

    def prompt_logprobs(self, seq) -> list:
        """Every prompt token's entry (the first has no logprob: nothing comes before it), from
        one extra forward over the prompt alone: only completions' echo with logprobs asks."""
        ids = seq.feed[:seq.prompt_tokens]
        logits = self.e.net(input_ids=torch.tensor([ids], device=self.device),
                            use_cache=False).logits[0, :-1, :self.e.vocab].float()
        lp = torch.log_softmax(logits, dim=-1)
        k = seq.params.prompt_logprobs
        chosen = lp.gather(1, torch.tensor(ids[1:], device=self.device)[:, None])[:, 0].tolist()
        if k:
            top_v, top_i = (t.tolist() for t in torch.topk(lp, k, dim=-1))
        else:
            top_v = top_i = [[] for _ in chosen]
        entries = [self.logprob_entry(ids[0], None, [])]
        for j, tok in enumerate(ids[1:]):
            entries.append(self.logprob_entry(tok, chosen[j], list(zip(top_i[j], top_v[j]))))
        return entries

    def fail_all(self, out: StepOutput, exc: Exception) -> None:
        """Every running request leaves with an error (waiting ones stay: they may still run)."""
        for seq in list(self.e._running):
            out.errors.append((seq.rid, ErrorCode.ENGINE, f"the model step failed: {exc}"))
        self.e._running.clear()
        self.cache.reshape(0, 0, 0, 0)

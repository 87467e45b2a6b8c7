"""One step of the hf engine's loop: plan the batch, one forward, sample, accept, retire.

Runs only on the engine thread (see hf.py). The running sequences sit in cache rows kept in two
runs: rows 0..D-1 decode (each feeds its last token), rows D.. are still prefilling their
prompts, in arrival order. A step:

    plan     every decoding row's next token, then prompt chunks while the step's token budget
             (`step_tokens`) lasts: first the prompts being prefilled, then new requests admitted
             in arrival order while a slot and the KV budget allow. A chunked runner cuts a
             prompt anywhere, and starts it after whatever prefix a running row or the prefix
             store already holds (prefix.py); the fallback runner takes whole prompts only.
    forward  one mixed forward (runner.py): logits for the decode rows and for each chunk that
             completes its prompt
    sample   one batched draw for all of them (sampling.py), grammar-constrained where asked
    accept   detokenize, stop strings and EOS, the length limit; logprobs
    retire   finished sequences leave at once; their rows are filled by moving later rows

A new prompt therefore never waits for a whole step of others' work: its first chunk rides in the
very next forward, next to the running rows' tokens, and the budget bounds how much one step may
add to everyone's time per token. Chunks complete in row order (only the last chunk of a step
can stop short), so a row that finishes prefilling is always row D and simply joins the decode
run.
"""

from __future__ import annotations

import logging
import time

import torch

from broker.protocol import ErrorCode, FinishReason
from nodes.engine.base import Finish, StepOutput
from nodes.engine.prefix import MIN_REUSE, PrefixStore, cached_tokens, common_prefix
from nodes.engine.sampling import sample

log = logging.getLogger("treechat.engine")

# Tokens one step may compute (decode rows + prompt chunks). On a 2-core CPU a prompt token
# costs ~1.5 ms in int8 and a decode row far less, so 256 bounds a step near 0.4 s while a
# burst of chat prompts still goes in one or two steps. A GPU takes far more per step at once.
STEP_TOKENS = {"cpu": 256}
STEP_TOKENS_DEFAULT = 2048
MIN_CHUNK = 16  # prompt tokens a step always takes, so many decode rows cannot starve a prompt
# Bytes of finished rows' keys and values kept for reuse: on a CPU 256 MiB holds about 11k tokens
# of the default model's float16 cache, some twenty conversations of 500 tokens per node.
PREFIX_STORE = {"cpu": 256 << 20}
PREFIX_STORE_DEFAULT = 1 << 30


class Stepper:
    def __init__(self, engine, send, step_tokens: int | None = None):
        self.e = engine
        self.send = send  # hands one StepOutput to the node's loop
        self.runner = engine.runner
        self.cache = engine.runner.cache
        self.decoding = 0  # D: rows 0..D-1 decode
        self.step_tokens = step_tokens or STEP_TOKENS.get(engine.device.type, STEP_TOKENS_DEFAULT)
        self.store = PrefixStore(PREFIX_STORE.get(engine.device.type, PREFIX_STORE_DEFAULT)) \
            if self.runner.chunked else None
        self.copies: list[tuple] = []  # (source row or store entry, row, tokens) for compute()
        self.source = None
        self.stats = engine.stats  # where the time goes (bench/engine.py prints it)

    def step(self, out: StepOutput) -> None:
        """`out` holds what the inbox brought (cancels); it leaves with this step's tokens."""
        t0 = time.perf_counter()
        running = self.e._running
        chunks = self.plan()
        decode = running[:self.decoding]
        if decode or chunks:
            try:
                self.compute(decode, chunks, out)
            except Exception as exc:  # a failed forward fails the batch, never the node
                log.exception("engine step failed")
                self.fail_all(out, exc)
            dt = time.perf_counter() - t0
            self.stats["steps"] += 1
            self.stats["step_s"] += dt
            self.stats["decode_tokens"] += len(decode)
            if chunks:
                self.stats["prefill_tokens"] += sum(n for _, _, n in chunks)
                self.stats["mixed_steps"] += 1
                self.stats["mixed_s"] += dt
        if out.tokens or out.done or out.errors:
            self.send(out)

    # --- plan ------------------------------------------------------------------------------------

    def plan(self) -> list[tuple]:
        """The step's prompt chunks, (seq, start, length); admits waiting requests into rows."""
        e, running, waiting = self.e, self.e._running, self.e._waiting
        budget = max(self.step_tokens - self.decoding, MIN_CHUNK)
        chunks = []
        for seq in running[self.decoding:]:  # prompts already being prefilled, in row order
            if budget <= 0:
                return chunks
            n = self.take(seq, seq.length, budget)
            chunks.append((seq, seq.length, n))
            budget -= n
        longest = max((s.reserve for s in running), default=0)
        admitted: list = []
        while waiting and budget > 0 and len(running) < e.slots:
            seq = waiting[0]
            need = max(longest, seq.reserve)
            if not self.cache.fits(len(running) + 1, need):
                break  # FIFO: it waits for room rather than being overtaken forever
            if not self.runner.chunked and chunks and len(seq.feed) > budget:
                break  # whole prompts only: the next step takes it
            start = self.reuse(seq, admitted)
            if start is None:
                break  # its prompt is being computed right now: copy it next step instead
            waiting.popleft()
            seq.row = len(running)
            running.append(seq)
            admitted.append(seq)
            if start:
                self.copies.append((self.source, seq.row, start))
            seq.length = seq.cached = start
            n = self.take(seq, start, budget)
            chunks.append((seq, start, n))
            budget -= n
            longest = need
        return chunks

    def reuse(self, seq, admitted: list) -> int | None:
        """How much of `seq`'s prompt comes from a running row or the store (`self.source`), at
        most all but its last token (whose logits the first answer token needs); None when a
        request admitted in this same step shares most of it (wait a step and copy it)."""
        self.source, found = None, 0
        if self.store is None:
            return 0
        for other in admitted:
            if common_prefix(seq.feed, other.feed) >= max(MIN_REUSE, len(seq.feed) // 2):
                return None
        for other in self.e._running[:len(self.e._running) - len(admitted)]:
            n = common_prefix(seq.feed, cached_tokens(other))
            if n > found:
                self.source, found = other.row, n
        entry, n = self.store.best(seq.feed)
        if n > found:
            self.source, found = entry, n
        found = min(found, len(seq.feed) - 1)
        return found if found >= MIN_REUSE else 0

    def take(self, seq, start: int, budget: int) -> int:
        left = len(seq.feed) - start
        return min(left, budget) if self.runner.chunked else left

    # --- forward, sample, accept -------------------------------------------------------------------

    def compute(self, decode: list, chunks: list[tuple], out: StepOutput) -> None:
        running = self.e._running
        need = max([s.length + 1 for s in decode] + [st + n for _, st, n in chunks])
        self.cache.reshape(len(running), need, max(s.reserve for s in running),
                           max(s.length for s in running))
        for source, row, n in self.copies:  # reused prompt prefixes, now that the rows exist
            if isinstance(source, int):
                self.cache.move_row(source, row, n)
            else:
                self.store.load(self.cache, source, row, n)
        self.copies.clear()
        # the config's vocabulary may be padded past the tokenizer's: never sample those ids
        logits = self.runner.forward(decode, chunks)[:, :self.e.vocab]
        done = [seq for seq, st, n in chunks if st + n == len(seq.feed)]
        for seq in decode:
            seq.length += 1
        for seq, st, n in chunks:
            seq.length = st + n
        self.decoding += len(done)  # they are rows D.. in order: they join the decode run
        for seq in done:
            if seq.prompt_logprobs is not None and not seq.tokens:  # echo: the prompt's own
                out.tokens.append((seq.rid, "", [], self.prompt_logprobs(seq)))
        drawn = decode + done
        if not drawn:
            return
        ids, lps = sample(logits, [seq.sampling for seq in drawn])
        finished = []
        for i, (seq, tok) in enumerate(zip(drawn, ids)):
            reason = self.accept(seq, tok, out, lps[i] if lps else None)
            if reason is not None:
                finished.append((seq, reason))
        for seq, reason in finished:
            self.retire(seq, reason, out)

    def accept(self, seq, tok: int, out: StepOutput, lp) -> FinishReason | None:
        """Record `tok` for `seq`, report its text, and say whether `seq` is finished."""
        seq.tokens.append(tok)
        d = seq.detok
        reason = None
        if seq.matcher is not None and (not seq.matcher.accept(tok) or seq.matcher.is_terminated()):
            reason = FinishReason.STOP  # the structure is complete (or could not continue)
        if tok in self.e.eos_ids and not seq.ignore_eos:
            reason = FinishReason.STOP
            lp = None  # the end of the answer is no part of it: no logprob, no empty delta
        else:
            d.add(tok)
            if d.find_stop():
                reason = FinishReason.STOP
        if reason is None and len(seq.tokens) >= seq.limit:
            reason = FinishReason.LENGTH
        item = (seq.rid, d.take(final=reason is not None), [tok])
        if lp is not None:
            item += ([self.e.token_logprobs(tok, lp)],)
        out.tokens.append(item)
        return reason

    def prompt_logprobs(self, seq) -> list:
        """Every prompt token's logprobs entry (the first has none: nothing comes before it),
        from one more forward over the whole prompt, which rewrites the row's keys and values
        with the same numbers. Only completions' echo with logprobs asks for it."""
        ids = seq.feed[:seq.prompt_tokens]
        dev, runner = self.e.device, self.runner
        if hasattr(runner, "net"):  # the transformers fallback: a plain forward, no cache
            logits = runner.net(input_ids=torch.tensor([ids], device=dev), use_cache=False).logits[0]
        else:
            from nodes.engine.llama import Batch, Chunk
            batch = Batch(ids=torch.tensor(ids, dtype=torch.long, device=dev),
                          pos=torch.arange(len(ids), device=dev), decode=0,
                          chunks=[Chunk(seq.row, 0, len(ids))])  # the prompt's own tokens
            logits = runner.model.forward(runner.model.prepare(batch), self.cache)
        lp = torch.log_softmax(logits[:-1, :self.e.vocab].float(), dim=-1)
        k = seq.prompt_logprobs
        chosen = lp.gather(1, torch.tensor(ids[1:], device=dev)[:, None])[:, 0].tolist()
        top_v, top_i = (t.tolist() for t in lp.topk(k, dim=-1)) if k else ([], [])
        entries = [self.e.token_logprobs(ids[0], (None, []))]
        for j, tok in enumerate(ids[1:]):
            alts = list(zip(top_i[j], top_v[j])) if k else []
            entries.append(self.e.token_logprobs(tok, (chosen[j], alts)))
        return entries

    # --- leaving ---------------------------------------------------------------------------------

    def retire(self, seq, reason: FinishReason | None, out: StepOutput | None) -> None:
        """Take `seq` out of the batch now. A decode row is filled by the last decode row, and
        the prefilling rows after the run move down one, keeping both runs compact."""
        running, r = self.e._running, seq.row
        if self.store is not None and reason in (FinishReason.STOP, FinishReason.LENGTH):
            self.store.save(self.cache, r, cached_tokens(seq))  # for a next turn, or a twin
        if r < self.decoding:
            last = running[self.decoding - 1]
            if last is not seq:
                self.cache.move_row(last.row, r, last.length)
                last.row = r
                running[r] = last
            gap = self.decoding - 1
            self.decoding -= 1
        else:
            gap = r
        del running[gap]
        for s in running[gap:]:  # prefilling rows, in order
            self.cache.move_row(s.row, s.row - 1, s.length)
            s.row -= 1
        if not running:
            self.cache.reshape(0, 0, 0, 0)  # idle: give the whole buffer back
        if out is not None and reason is not None:
            out.done.append(Finish(seq.rid, reason.label, seq.prompt_tokens, len(seq.tokens),
                                   seq.cached))

    def fail_all(self, out: StepOutput, exc: Exception) -> None:
        """Every running request leaves with an error (waiting ones stay: they may still run)."""
        for seq in self.e._running:
            out.errors.append((seq.rid, ErrorCode.ENGINE, f"the model step failed: {exc}"))
        self.e._running.clear()
        self.decoding = 0
        self.cache.reshape(0, 0, 0, 0)

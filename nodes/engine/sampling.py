"""Per-request sampling over one batch of logits, for the hf engine.

Every row keeps its own settings in a mixed batch, in this order:

1. logprobs (when asked) are read from the model's own logits, before anything below changes
   them: the chosen token's log-probability and the k likeliest alternatives;
2. `logit_bias` is added; repetition (HF/vLLM: seen tokens' logits divided by the penalty when
   positive, multiplied when negative; prompt and answer), then presence and frequency penalties
   (OpenAI: minus `presence` once per token in the answer, minus `frequency` per occurrence);
3. the grammar's bitmask (nodes/engine/grammar.py) sets forbidden tokens to -inf;
4. temperature 0 is greedy (argmax); otherwise logits / temperature, then top-k, top-p and min-p
   filters, then one draw from the request's own `torch.Generator` (seeded from `seed`).

A row that sets none of 2-3 costs nothing extra; an all-greedy batch without them is one argmax.
Counts of generated tokens live on the device, one vector per request that has a penalty.
"""

from __future__ import annotations

import torch

from nodes.engine import grammar


class SamplingParams:
    __slots__ = ("temperature", "top_p", "top_k", "generator", "min_p", "presence", "frequency",
                 "repetition", "bias", "logprobs", "prompt_logprobs", "matcher", "counts", "seen")

    def __init__(self, temperature: float, top_p: float, top_k: int, seed: int | None,
                 device: torch.device, *, min_p: float | None = None,
                 presence: float | None = None, frequency: float | None = None,
                 repetition: float | None = None, bias: dict[int, float] | None = None,
                 logprobs: int | None = None, prompt_logprobs: int | None = None,
                 matcher=None, prompt_ids: list[int] = (),
                 vocab: int = 0):
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.min_p = float(min_p or 0.0)
        self.presence = float(presence or 0.0)
        self.frequency = float(frequency or 0.0)
        self.repetition = float(repetition or 1.0)
        self.logprobs = logprobs  # None: off; k: the chosen token's and the k likeliest
        self.prompt_logprobs = prompt_logprobs  # the same for the prompt's tokens (echo)
        self.matcher = matcher  # grammar.Matcher or None
        self.generator = None
        if self.temperature > 0:
            self.generator = torch.Generator(device=device)
            if seed is not None:
                self.generator.manual_seed(int(seed) % 2**64)  # torch takes 0..2**64-1
            else:
                self.generator.seed()
        self.bias = None  # (token ids, values) on the device
        if bias:
            ids = list(bias)
            self.bias = (torch.tensor(ids, device=device),
                         torch.tensor([bias[i] for i in ids], dtype=torch.float32, device=device))
        self.counts = self.seen = None
        if self.presence or self.frequency or self.repetition != 1.0:
            self.counts = torch.zeros(vocab, dtype=torch.float32, device=device)
            self.seen = torch.zeros(vocab, dtype=torch.bool, device=device)  # prompt + answer
            if prompt_ids:
                self.seen[torch.tensor(list(prompt_ids), device=device)] = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts(self) -> bool:
        """Whether this row's logits change before the choice (bias, penalties, grammar)."""
        return self.bias is not None or self.counts is not None or self.matcher is not None

    def observe(self, token: int) -> None:
        """Count a generated token (for the penalties)."""
        if self.counts is not None:
            self.counts[token] += 1
            self.seen[token] = True


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> tuple[list[int], list]:
    """One token per row of `logits` [B, V] (float32), each row by its own params; and per row,
    None or the logprobs it asked for: (chosen logprob, [(token id, logprob), ...])."""
    raw = logits
    adjust = [i for i, p in enumerate(params) if p.adjusts]
    if adjust:
        logits = logits.clone()
        _adjust(logits, adjust, params)
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if rows:
        out = out.clone()
        for i in rows:
            out[i] = _draw(logits[i], params[i])
    tokens = out.tolist()
    return tokens, _logprobs(raw, tokens, params)


def _adjust(logits: torch.Tensor, rows: list[int], params: list[SamplingParams]) -> None:
    for i in rows:
        p, row = params[i], logits[i]
        if p.bias is not None:
            row.index_add_(0, p.bias[0], p.bias[1])
        if p.counts is not None:
            if p.repetition != 1.0:
                seen = row[p.seen]
                row[p.seen] = torch.where(seen > 0, seen / p.repetition, seen * p.repetition)
            if p.presence or p.frequency:
                row -= p.frequency * p.counts + p.presence * (p.counts > 0).float()
    masked = [i for i in rows if params[i].matcher is not None]
    if masked:
        bitmask = grammar.new_bitmask(logits.shape[0], logits.shape[-1])
        for i in masked:
            params[i].matcher.fill_bitmask(bitmask, i)
        grammar.apply_bitmask(logits, bitmask, masked)


def _logprobs(raw: torch.Tensor, tokens: list[int], params: list[SamplingParams]) -> list:
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    result: list = [None] * len(params)
    if not rows:
        return result
    lp = torch.log_softmax(raw[rows], dim=-1)
    chosen = lp.gather(1, torch.tensor([[tokens[i]] for i in rows], device=lp.device))[:, 0]
    k = max(params[i].logprobs for i in rows)
    top_v, top_i = torch.topk(lp, k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    chosen, top_v, top_i = chosen.tolist(), top_v.tolist(), top_i.tolist()  # one copy to the host
    for j, i in enumerate(rows):
        n = params[i].logprobs
        result[i] = (chosen[j], list(zip(top_i[j][:n], top_v[j][:n])))
    return result


def _draw(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    scaled = row / p.temperature
    if p.top_k > 0 or p.top_p < 1.0 or p.min_p > 0:
        k = min(p.top_k, scaled.shape[-1]) if p.top_k > 0 else scaled.shape[-1]
        # Only the k best can survive either filter: sort just those (cheap for small k).
        vals, idx = torch.topk(scaled, k) if k < scaled.shape[-1] else torch.sort(scaled, descending=True)
        probs = torch.softmax(vals, dim=-1)
        drop = torch.zeros_like(probs, dtype=torch.bool)
        if p.top_p < 1.0:
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop |= (torch.cumsum(probs, dim=-1) - probs) >= p.top_p
        if p.min_p > 0:
            drop |= probs < p.min_p * probs[0]  # vals are sorted: probs[0] is the top one
        drop[0] = False
        vals = vals.masked_fill(drop, float("-inf"))
        choice = torch.multinomial(torch.softmax(vals, dim=-1), 1, generator=p.generator)
        return idx[choice[0]]
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=p.generator)[0]

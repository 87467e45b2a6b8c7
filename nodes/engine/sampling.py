"""Per-request sampling over one batch of logits, batched and on the device.

Every row keeps its own settings in a mixed batch. For the rows of one step, in this order:

    penalties     repetition (divides positive / multiplies negative logits of tokens seen in the
                  prompt and answer, or in the last `window` tokens), presence and frequency
                  (OpenAI's: subtracted once per token seen in the answer / per occurrence)
    logit_bias    added to the named tokens
    grammar       tokens the request's structure forbids (nodes/engine/grammar.py) go to -inf
    choose        temperature 0: argmax. Otherwise logits / temperature, then top-k, top-p and
                  min-p over the 256 likeliest tokens (a full sort only for a row whose filters
                  reach past them), and one draw by the exponential race: the token with the
                  largest logit + Gumbel noise, where the noise comes from a counter-based hash
                  of (seed, step, token id). A seed therefore gives the same text whatever else
                  shares the batch, no generator object lives per request, and nothing waits on
                  the host until the chosen ids are read.

Logprobs (`logprobs=k`) are the model's own: log_softmax of the raw logits, before penalties and
temperature (vLLM's default), for the chosen token and the k likeliest.
"""

from __future__ import annotations

import secrets

import torch

CANDIDATES = 256  # tokens sorted per row for top-k/top-p/min-p before falling back to all
MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


GOLDEN = _signed(0x9E3779B97F4A7C15)
MIX1 = _signed(0xBF58476D1CE4E5B9)
MIX2 = _signed(0x94D049BB133111EB)
STEP = _signed(0xD1B54A32D192ED03)


class SamplingParams:
    __slots__ = ("temperature", "top_p", "top_k", "min_p", "seed", "presence", "frequency",
                 "repetition", "window", "bias", "logprobs")

    def __init__(self, temperature: float, top_p: float, top_k: int = 0, seed: int | None = None,
                 *, min_p: float = 0.0, presence: float = 0.0, frequency: float = 0.0,
                 repetition: float = 1.0, window: int | None = None,
                 bias: dict[int, float] | None = None, logprobs: int | None = None):
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.min_p = float(min_p)
        # A request without a seed still gets one: its draws are then reproducible in logs.
        self.seed = _signed(int(seed) & MASK64) if seed is not None else secrets.randbits(63)
        self.presence, self.frequency, self.repetition = presence, frequency, repetition
        self.window = window  # repetition penalty over the last `window` tokens (None: all)
        self.bias = bias or None
        self.logprobs = logprobs

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def penalized(self) -> bool:
        return self.presence != 0 or self.frequency != 0 or self.repetition != 1.0


class Row:
    """What the sampler needs of one sequence: its settings, its tokens so far, the prompt."""

    __slots__ = ("params", "prompt", "output", "matcher")

    def __init__(self, params: SamplingParams, prompt: list[int], output: list[int], matcher=None):
        self.params, self.prompt, self.output, self.matcher = params, prompt, output, matcher


def sample(logits: torch.Tensor, rows: list[Row]) -> tuple[list[int], list | None]:
    """One token per row of `logits` [R, V] (float32): (token ids, per-row logprobs or None).

    A row's logprobs are (chosen logprob, [(alt id, alt logprob), ...]) when it asked for them."""
    raw = logits
    if any(r.params.penalized or r.params.bias or r.matcher is not None for r in rows):
        logits = logits.clone()  # the raw logits stay as they are, for logprobs
        penalize(logits, rows)
        bias(logits, rows)
        constrain(logits, rows)
    tokens = logits.argmax(dim=-1)
    drawn = [i for i, r in enumerate(rows) if not r.params.greedy]
    wider = []
    if drawn:
        picked, short = draw(logits[drawn], [rows[i] for i in drawn])
        tokens[drawn] = picked
        # One read of the device for the ids and for rows whose filters reach past their
        # candidates (rare); those are drawn again over their whole row.
        both = to_host(torch.cat([tokens, short.long()]))
        ids, wider = both[:len(rows)], [drawn[j] for j, s in enumerate(both[len(rows):]) if s]
    else:
        ids = to_host(tokens)
    if wider:
        again = draw_sorted(logits[wider], [rows[i] for i in wider])
        tokens[wider] = again
        for i, t in zip(wider, again.tolist()):
            ids[i] = t
    return ids, logprobs(raw, rows, tokens)


_pinned: dict[torch.device, torch.Tensor] = {}


def to_host(t: torch.Tensor) -> list[int]:
    """A small int64 tensor's values on the host: on a GPU through a reused pinned buffer (one
    asynchronous copy, then one wait), elsewhere directly."""
    if t.device.type != "cuda":
        return t.tolist()
    buf = _pinned.get(t.device)
    if buf is None or buf.numel() < t.numel():
        buf = _pinned[t.device] = torch.empty(max(1024, t.numel()), dtype=torch.long,
                                              pin_memory=True)
    host = buf[:t.numel()]
    host.copy_(t, non_blocking=True)
    torch.cuda.current_stream(t.device).synchronize()
    return host.tolist()


def penalize(logits: torch.Tensor, rows: list[Row]) -> None:
    v, dev = logits.shape[1], logits.device
    for i, r in enumerate(rows):  # per row: histories differ in length, and a row is a few ops
        p = r.params
        if not p.penalized:
            continue
        row = logits[i]
        if p.repetition != 1.0:
            w = p.window
            seen = r.prompt + r.output if w is None else (r.prompt[-w:] + r.output[-w:])[-w:]
            if seen:  # a token seen twice is written twice with the same value
                idx = torch.tensor(seen, dtype=torch.long, device=dev)
                vals = row[idx]
                row[idx] = torch.where(vals > 0, vals / p.repetition, vals * p.repetition)
        if (p.presence or p.frequency) and r.output:
            counts = torch.zeros(v, dtype=logits.dtype, device=dev)
            counts.index_add_(0, torch.tensor(r.output, dtype=torch.long, device=dev),
                              torch.ones(len(r.output), dtype=logits.dtype, device=dev))
            row -= p.frequency * counts + p.presence * (counts > 0).to(logits.dtype)


def bias(logits: torch.Tensor, rows: list[Row]) -> None:
    v, dev = logits.shape[1], logits.device
    for i, r in enumerate(rows):
        items = [(t, b) for t, b in (r.params.bias or {}).items() if 0 <= t < v]
        if items:
            logits[i, torch.tensor([t for t, _ in items], device=dev)] += torch.tensor(
                [b for _, b in items], device=dev, dtype=logits.dtype)


def constrain(logits: torch.Tensor, rows: list[Row]) -> None:
    which = [i for i, r in enumerate(rows) if r.matcher is not None]
    if not which:
        return
    from nodes.engine import grammar  # only requests with a structure need the grammar library
    bitmask = grammar.allocate_bitmask(len(rows), logits.shape[1])
    for i in which:
        rows[i].matcher.fill_bitmask(bitmask, i)
    grammar.apply_bitmask(logits, bitmask.to(logits.device), which)


def draw(logits: torch.Tensor, rows: list[Row]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row (none greedy) by the exponential race over its candidates:
    (tokens, rows whose filters kept their last candidate, so the whole row must be drawn)."""
    dev = logits.device
    scaled, seeds, steps = scale(logits, rows)
    params = [r.params for r in rows]
    v = scaled.shape[1]
    k = min(v, max(CANDIDATES, max(p.top_k for p in params)))
    if not any(p.filtered for p in params):  # no filter at all: race over every token
        idx = torch.arange(v, device=dev).expand(len(rows), -1)
        return race(scaled, idx, seeds, steps), torch.zeros(len(rows), dtype=torch.bool,
                                                            device=dev)
    vals, idx = scaled.topk(k, dim=-1)  # sorted, largest first
    keep = filter_mask(vals, scaled.logsumexp(dim=-1, keepdim=True), params)
    unfiltered = torch.tensor([not p.filtered for p in params], device=dev)
    short = (keep[:, -1] | unfiltered) if k < v else torch.zeros_like(unfiltered)
    return race(vals.masked_fill(~keep, float("-inf")), idx, seeds, steps), short


def draw_sorted(logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
    """The same draw with every token a candidate (a full sort of each row)."""
    scaled, seeds, steps = scale(logits, rows)
    vals, idx = scaled.sort(dim=-1, descending=True)
    keep = filter_mask(vals, scaled.logsumexp(dim=-1, keepdim=True), [r.params for r in rows])
    return race(vals.masked_fill(~keep, float("-inf")), idx, seeds, steps)


def scale(logits: torch.Tensor, rows: list[Row]):
    dev = logits.device
    temps = torch.tensor([r.params.temperature for r in rows], device=dev)[:, None]
    seeds = torch.tensor([r.params.seed for r in rows], dtype=torch.long, device=dev)
    steps = torch.tensor([len(r.output) for r in rows], dtype=torch.long, device=dev)
    return logits / temps, seeds, steps


def filter_mask(vals: torch.Tensor, lse: torch.Tensor, params: list[SamplingParams]):
    """Which sorted candidates survive top-k, top-p and min-p (the first always does)."""
    dev = vals.device
    n, k = vals.shape
    rank = torch.arange(k, device=dev)[None, :]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else k for p in params], device=dev)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=dev)[:, None]
    min_p = torch.tensor([p.min_p for p in params], device=dev)[:, None]
    probs = (vals - lse).exp()
    before = probs.cumsum(dim=-1) - probs  # mass of the better candidates
    keep = (rank < top_k) & (before < top_p) & (probs >= min_p * probs[:, :1])
    keep[:, 0] = True
    return keep


def race(vals: torch.Tensor, idx: torch.Tensor, seeds, steps) -> torch.Tensor:
    """argmax(vals + Gumbel noise) per row, the noise a hash of (seed, step, token id)."""
    u = uniform(seeds[:, None], steps[:, None], idx)
    gumbel = -torch.log(-torch.log(u))
    choice = (vals.float() + gumbel).argmax(dim=-1)
    return idx.gather(1, choice[:, None])[:, 0]


def uniform(seed: torch.Tensor, step: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
    """splitmix64 of (seed, step, token): float64 uniforms in (0, 1), on any device."""
    x = seed * GOLDEN + step * STEP + token * MIX2
    x = (x ^ _shr(x, 30)) * MIX1
    x = (x ^ _shr(x, 27)) * MIX2
    x = x ^ _shr(x, 31)
    return (_shr(x, 11).double() + 0.5) * (1.0 / (1 << 53))


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def logprobs(raw: torch.Tensor, rows: list[Row], tokens: torch.Tensor):
    which = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not which:
        return None
    lp = torch.log_softmax(raw[which].float(), dim=-1)
    chosen = lp.gather(1, tokens[which][:, None])[:, 0].tolist()
    k = max(rows[i].params.logprobs for i in which)
    top_v, top_i = lp.topk(k, dim=-1) if k else (None, None)
    out: list = [None] * len(rows)
    for j, i in enumerate(which):
        n = rows[i].params.logprobs
        alts = list(zip(top_i[j, :n].tolist(), top_v[j, :n].tolist())) if n else []
        out[i] = (chosen[j], alts)
    return out

"""Per-request sampling over one batch of logits, for the hf engine.

Every row keeps its own settings in a mixed batch: temperature 0 is greedy (argmax), otherwise
logits / temperature, then top-k and top-p filters, then one draw from the request's own
`torch.Generator` (seeded from `seed`, so the same seed and request give the same text).
Rows that share nothing with sampling (all greedy) cost one argmax for the whole batch.
"""

from __future__ import annotations

import torch


class SamplingParams:
    __slots__ = ("temperature", "top_p", "top_k", "generator")

    def __init__(self, temperature: float, top_p: float, top_k: int, seed: int | None,
                 device: torch.device):
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.generator = None
        if self.temperature > 0:
            self.generator = torch.Generator(device=device)
            if seed is not None:
                self.generator.manual_seed(int(seed))
            else:
                self.generator.seed()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def sample(logits: torch.Tensor, params: list[SamplingParams]) -> list[int]:
    """One token per row of `logits` [B, V] (float32), each row by its own params."""
    out = logits.argmax(dim=-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out.tolist()
    out = out.clone()
    for i in rows:
        out[i] = _draw(logits[i], params[i])
    return out.tolist()


def _draw(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    scaled = row / p.temperature
    if p.top_k > 0 or p.top_p < 1.0:
        k = min(p.top_k, scaled.shape[-1]) if p.top_k > 0 else scaled.shape[-1]
        # Only the k best can survive either filter: sort just those (cheap for small k).
        vals, idx = torch.topk(scaled, k) if k < scaled.shape[-1] else torch.sort(scaled, descending=True)
        if p.top_p < 1.0:
            probs = torch.softmax(vals, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            before = torch.cumsum(probs, dim=-1) - probs
            drop = before >= p.top_p
            drop[0] = False
            vals = vals.masked_fill(drop, float("-inf"))
        choice = torch.multinomial(torch.softmax(vals, dim=-1), 1, generator=p.generator)
        return idx[choice[0]]
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=p.generator)[0]

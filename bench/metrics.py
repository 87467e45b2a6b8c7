"""Per-request records and the summary metrics, with the definitions of `vllm bench serve`.

Runs inside the `treechat bench` process; no sockets. A client fills one `Record` per request; the
summary is computed from the finished records and the benchmark's wall-clock duration:

    TTFT   time from sending the request to the first chunk that carries text
    TPOT   (latency - TTFT) / (output_tokens - 1), only over requests with more than one token
           (for goodput a one-token request counts as TPOT 0, as vLLM does)
    ITL    every gap between consecutive text chunks, pooled over all requests
    E2EL   time from sending the request to the end of its stream
    request / output-token / total-token throughput: completed work divided by the duration
    goodput: completed requests meeting every SLO given (`ttft:MS tpot:MS e2el:MS`), per second

A failed request counts in `failed` and `errors` (by error type) and adds nothing to the latency
or token statistics: it is never silently dropped, and never makes the numbers look better.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

PERCENTILES = (50, 90, 99)
GOODPUT_KEYS = ("ttft", "tpot", "e2el")


@dataclass(slots=True)
class Record:
    """One request as the client saw it. Times are seconds on the benchmark's monotonic clock."""

    index: int
    start: float = 0.0
    ttft: float | None = None  # seconds from start to the first text chunk
    itl: list[float] = field(default_factory=list)  # gaps between text chunks after the first
    end: float | None = None
    prompt_tokens: int = 0  # from usage when the server sends it, else the workload's estimate
    output_tokens: int = 0  # from usage when the server sends it, else the text chunks counted
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None  # error type (e.g. "http_500", "connect", "overloaded"), None = ok
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def latency(self) -> float:
        return (self.end or self.start) - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens <= 1:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def chunk_times(self) -> list[float]:
        """Arrival times (absolute) of every text chunk: first token, then each ITL gap."""
        if self.ttft is None:
            return []
        times = [self.start + self.ttft]
        for gap in self.itl:
            times.append(times[-1] + gap)
        return times

    def to_dict(self) -> dict:
        d = asdict(self)
        d["latency"] = self.latency
        d["tpot"] = self.tpot
        return d


def percentile(values: list[float], p: float) -> float:
    """numpy.percentile's default (linear interpolation between closest ranks); 0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def stats_ms(values: list[float]) -> dict:
    """mean, median and p50/p90/p99 in milliseconds."""
    out = {"mean": mean(values) * 1000, "median": percentile(values, 50) * 1000}
    for p in PERCENTILES:
        out[f"p{p}"] = percentile(values, p) * 1000
    return out


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """`["ttft:200", "tpot:50"]` -> {"ttft": 200.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in GOODPUT_KEYS:
            raise ValueError(f"--goodput takes KEY:MS with KEY one of {', '.join(GOODPUT_KEYS)}, "
                             f"not '{item}'")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {key}: '{value}' is not a number of milliseconds") from None
        if slos[key] < 0:
            raise ValueError(f"--goodput {key}: the SLO cannot be negative")
    return slos


def is_good(r: Record, slos: dict[str, float]) -> bool:
    measured = {"ttft": r.ttft or 0.0, "tpot": r.tpot or 0.0, "e2el": r.latency}
    return all(measured[k] * 1000 <= slo for k, slo in slos.items())


def summarize(records: list[Record], duration: float, slos: dict[str, float] | None = None) -> dict:
    """The summary of a run: counts, throughputs, and TTFT/TPOT/ITL/E2EL statistics (ms)."""
    done = [r for r in records if r.ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r.ok:
            errors[r.error] = errors.get(r.error, 0) + 1
    dur = duration if duration > 0 else float("nan")
    total_in = sum(r.prompt_tokens for r in done)
    total_out = sum(r.output_tokens for r in done)
    summary = {
        "num_requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": errors,
        "duration_s": duration,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": len(done) / dur,
        "output_throughput": total_out / dur,
        "total_token_throughput": (total_in + total_out) / dur,
        "ttft_ms": stats_ms([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": stats_ms([t for r in done if (t := r.tpot) is not None]),
        "itl_ms": stats_ms([gap for r in done for gap in r.itl]),
        "e2el_ms": stats_ms([r.latency for r in done]),
    }
    if slos:
        good = sum(1 for r in done if is_good(r, slos))
        summary["goodput_slos_ms"] = dict(slos)
        summary["good_requests"] = good
        summary["request_goodput"] = good / dur
    return summary


def throughput_series(records: list[Record], t0: float, bucket: float = 1.0) -> list[tuple[float, float]]:
    """Output tokens/s over time: [(seconds since t0, tokens/s in that bucket)]. A request's tokens
    are spread evenly over its text chunks (an SSE chunk does not say how many tokens it holds)."""
    counts: dict[int, float] = {}
    for r in records:
        times = r.chunk_times() if r.ok else []
        per_chunk = r.output_tokens / len(times) if times else 0.0
        for t in times:
            b = int((t - t0) // bucket)
            counts[b] = counts.get(b, 0.0) + per_chunk
    if not counts:
        return []
    return [(b * bucket, counts.get(b, 0.0) / bucket) for b in range(0, max(counts) + 1)]

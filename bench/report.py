"""What `treechat bench` shows and writes: the summary table, the side-by-side table of a
comparison, the JSON result file and the PNG plot. No sockets.

JSON (`--save-result`): {"version", "date", "config", "summary", "records"} for one run, or
{"version", "date", "config", "runs": [{"label", "up_args", "summary", "records"}]} for --compare.
Record times are seconds since the run's first request: start, ttft, itl (gaps), end, latency.

Plot (`--plot`): one PNG with CDFs of TTFT, TPOT, ITL and E2E latency, and output tokens/s over
time, one line per run (matplotlib with the Agg backend: no display needed).
"""

from __future__ import annotations

import datetime
import math

import orjson

from bench.metrics import Record, throughput_series

def summary_rows() -> list[tuple[str, str, str | None, str]]:
    """(label, summary key, statistic, format) of every line of the summary table, vLLM's order."""
    rows = [
        ("Successful requests", "completed", None, "{:.0f}"),
        ("Failed requests", "failed", None, "{:.0f}"),
        ("Benchmark duration (s)", "duration_s", None, "{:.2f}"),
        ("Total input tokens", "total_input_tokens", None, "{:.0f}"),
        ("Total generated tokens", "total_output_tokens", None, "{:.0f}"),
        ("Request throughput (req/s)", "request_throughput", None, "{:.2f}"),
        ("Request goodput (req/s)", "request_goodput", None, "{:.2f}"),
        ("Output token throughput (tok/s)", "output_throughput", None, "{:.2f}"),
        ("Total token throughput (tok/s)", "total_token_throughput", None, "{:.2f}"),
    ]
    for name, key in (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"),
                      ("E2E latency", "e2el_ms")):
        for stat, shown in (("mean", "Mean"), ("median", "Median"), ("p90", "P90"), ("p99", "P99")):
            rows.append((f"{shown} {name} (ms)", key, stat, "{:.2f}"))
    return rows


ROWS = summary_rows()


def value(summary: dict, key: str, stat: str | None):
    v = summary.get(key)
    if stat is not None and isinstance(v, dict):
        v = v.get(stat)
    return v


def fmt(v, pattern: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isnan(v):
        return "nan"
    return pattern.format(v)


def format_summary(summary: dict, title: str = "Serving Benchmark Result") -> str:
    width = 52
    lines = [f"{' ' + title + ' ':=^{width}}"]
    for label, key, stat, pattern in ROWS:
        v = value(summary, key, stat)
        if v is None and key == "request_goodput":
            continue
        lines.append(f"{label + ':':<40}{fmt(v, pattern):>12}")
    for kind, n in sorted(summary.get("errors", {}).items()):
        lines.append(f"{'  errors ' + kind + ':':<40}{n:>12}")
    lines.append("=" * width)
    return "\n".join(lines)


def format_compare(runs: list[tuple[str, dict]]) -> str:
    """One column per configuration, one row per metric."""
    labels = [label for label, _ in runs]
    col = max(12, *(len(label) + 2 for label in labels))
    lines = [f"{'':<34}" + "".join(f"{label:>{col}}" for label in labels)]
    for label, key, stat, pattern in ROWS:
        cells = [value(s, key, stat) for _, s in runs]
        if all(c is None for c in cells):
            continue
        lines.append(f"{label:<34}" + "".join(f"{fmt(c, pattern):>{col}}" for c in cells))
    kinds = sorted({k for _, s in runs for k in s.get("errors", {})})
    for kind in kinds:
        lines.append(f"{'errors ' + kind:<34}"
                     + "".join(f"{s.get('errors', {}).get(kind, 0):>{col}}" for _, s in runs))
    return "\n".join(lines)


def markdown_table(headers: list[str], aligns: str, rows: list[list[str]]) -> str:
    """A Markdown table for docs/benchmarks.md; `aligns` has one letter per column, l or r."""
    rule = "|" + "|".join("---" if a == "l" else "---:" for a in aligns) + "|"
    return "\n".join(["| " + " | ".join(headers) + " |", rule,
                      *("| " + " | ".join(cells) + " |" for cells in rows)])


def record_dicts(records: list[Record], t0: float) -> list[dict]:
    out = []
    for r in records:
        d = r.to_dict()
        d["start"] = r.start - t0
        d["end"] = (r.end - t0) if r.end is not None else None
        out.append(d)
    return out


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def save_result(path: str, config: dict, runs: list[dict]) -> None:
    """runs: [{"label", "summary", "records": [Record], "t0", ...}]; one run is written flat."""
    data: dict = {"version": 1, "date": now(), "config": config}
    packed = pack_runs(runs)
    if len(packed) == 1:
        data.update(summary=packed[0]["summary"], records=packed[0]["records"])
    else:
        data["runs"] = packed
    write_json(path, data)


def pack_runs(runs: list[dict]) -> list[dict]:
    """Each run as JSON has it: its fields, its records as dicts (times from its t0)."""
    return [{**{k: v for k, v in run.items() if k not in ("records", "t0")},
             "records": record_dicts(run["records"], run["t0"])} for run in runs]


def write_json(path: str, data: dict) -> None:
    with open(path, "wb") as f:
        f.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY))


def cdf(ax, values: list[float], label: str) -> None:
    xs = sorted(values)
    if xs:
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label, drawstyle="steps-post")


def require_matplotlib() -> None:
    """--plot draws with matplotlib, which a plain install lacks: say so before any work."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError("--plot needs matplotlib, which is not installed here: "
                         "pip install matplotlib (or install treechat with its [bench] extra)"
                         ) from None


def check_plot(parser, path: str | None) -> None:
    """A study's --plot: without matplotlib, a usage error before any work."""
    if path:
        try:
            require_matplotlib()
        except ValueError as e:
            parser.error(str(e))


def plot(path: str, runs: list[dict], title: str = "treechat bench") -> None:
    """runs: [{"label", "summary", "records", "t0"}]. Writes a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    panels = [("TTFT (ms)", lambda rs: [r.ttft * 1000 for r in rs if r.ttft is not None]),
              ("TPOT (ms)", lambda rs: [r.tpot * 1000 for r in rs if r.tpot is not None]),
              ("ITL (ms)", lambda rs: [g * 1000 for r in rs for g in r.itl]),
              ("E2E latency (ms)", lambda rs: [r.latency * 1000 for r in rs])]
    for ax, (name, pick) in zip(axes.flat, panels):
        for run in runs:
            cdf(ax, pick([r for r in run["records"] if r.ok]), run["label"])
        ax.set_xlabel(name)
        ax.set_ylabel("fraction of requests" if "ITL" not in name else "fraction of gaps")
        ax.grid(alpha=0.3)
    ax = axes.flat[4]
    span = max((max((r.end or 0) - run["t0"] for r in run["records"]) for run in runs
                if run["records"]), default=1.0)
    bucket = min(1.0, max(0.01, span / 50))  # about 50 points whatever the run's length
    for run in runs:
        series = throughput_series(run["records"], run["t0"], bucket)
        if series:
            ax.plot([t for t, _ in series], [v for _, v in series], label=run["label"],
                    marker="." if len(series) < 3 else None)
    ax.set_xlabel(f"seconds since the first request ({bucket:.2g} s buckets)")
    ax.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    ax = axes.flat[5]
    labels = [run["label"] for run in runs]
    rates = [run["summary"]["output_throughput"] if "summary" in run else 0.0 for run in runs]
    ax.barh(range(len(runs)), rates, color=[f"C{i}" for i in range(len(runs))])
    ax.set_yticks(range(len(runs)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("output tokens/s (whole run)")
    ax.grid(alpha=0.3, axis="x")
    for a in axes.flat[:5]:
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

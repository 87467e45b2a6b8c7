"""load-test a server: TTFT, TPOT, ITL, latency and throughput, as `vllm bench serve` defines them

Process: `treechat bench`, a client only. It sends a seeded workload to one target and reports:

    treechat bench --base-url http://127.0.0.1:8000          any OpenAI-compatible server (SSE)
    treechat bench --base-url https://HOST:8443 --tls-ca ca.pem      the same over TLS
    treechat bench --tcp 127.0.0.1:8001 [--tls]              treechat's TCP line protocol
    treechat bench --root 127.0.0.1:5550                     the root itself (no gateway)
    treechat bench --compare policy=seed,least-loaded nodes=1,3 --up-args "--engine fake"
                                                             start each configuration, bench it

Arrivals: --request-rate R (gamma gaps, --burstiness) and/or --max-concurrency C; warm-up
requests first (--warmup N, not counted). Output: a progress bar, a summary table,
--save-result FILE.json (config, summary, per-request records), --plot FILE.png (latency CDFs,
throughput over time). Failed requests are counted by error type, never dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from bench import report
from bench.metrics import parse_goodput, summarize
from bench.run import run
from bench.targets import make_target
from bench.workload import DATASETS, WorkloadConfig, build
from treechat.tls import add_client_args


def add_args(p: argparse.ArgumentParser) -> None:
    t = p.add_argument_group("target (give one)")
    t.add_argument("--base-url", default=None,
                   help="an OpenAI-compatible server, http://HOST:PORT or https://HOST:PORT")
    t.add_argument("--endpoint", default="/v1/chat/completions",
                   choices=("/v1/chat/completions", "/v1/completions"))
    t.add_argument("--model", default=None, help="model name to send (default: the first of /v1/models)")
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"),
                   help="the server's API key: a Bearer key over HTTP, a hello line over TCP "
                        "(default: $OPENAI_API_KEY)")
    t.add_argument("--tcp", default=None, metavar="HOST:PORT", help="treechat's TCP gateway")
    t.add_argument("--root", default=None, metavar="HOST:PORT", help="a treechat root, directly")
    t.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds before one request counts as failed (timeout)")
    add_client_args(p)

    w = p.add_argument_group("workload")
    w.add_argument("--dataset", choices=tuple(DATASETS), default="random")
    w.add_argument("--num-requests", type=int, default=100)
    w.add_argument("--warmup", type=int, default=2, help="requests sent first and not counted")
    w.add_argument("--random-input-len", type=int, default=32, help="prompt words (random, prefix, mixed)")
    w.add_argument("--random-output-len", "--output-len", dest="output_len", type=int, default=32,
                   help="max_tokens of each request (mixed: of the short ones)")
    w.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in [L*(1-r), L*(1+r)]")
    w.add_argument("--prefix-len", type=int, default=256, help="prefix: shared system-message words")
    w.add_argument("--long-fraction", type=float, default=0.1, help="mixed: share of long answers")
    w.add_argument("--long-output-len", type=int, default=512, help="mixed: max_tokens of long answers")
    w.add_argument("--ignore-eos", action="store_true", help="ask for exactly max_tokens tokens")
    w.add_argument("--extra-body", default=None, help="JSON object merged into every request")
    w.add_argument("--seed", type=int, default=0)

    a = p.add_argument_group("arrivals")
    a.add_argument("--request-rate", type=float, default=float("inf"),
                   help="requests per second (default inf: all at once, paced by --max-concurrency)")
    a.add_argument("--burstiness", type=float, default=1.0,
                   help="gamma shape of the arrival gaps: 1 = Poisson, <1 burstier, >1 steadier")
    a.add_argument("--max-concurrency", type=int, default=None, help="requests open at once at most")

    o = p.add_argument_group("results")
    o.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:50 e2el:5000")
    o.add_argument("--save-result", default=None, metavar="FILE.json")
    o.add_argument("--plot", default=None, metavar="FILE.png")
    o.add_argument("--label", default=None, help="name of this run in the table and plot")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = p.add_argument_group("compare (starts `treechat up` itself; see docs/benchmarks.md)")
    c.add_argument("--compare", nargs="+", default=None, metavar="FLAG=V1,V2",
                   help="axes of `treechat up` flags; every combination is one configuration")
    c.add_argument("--up-args", default="--engine fake",
                   help="flags every compared `treechat up` gets (default: --engine fake)")
    c.add_argument("--via", choices=("http", "tcp", "root"), default="http",
                   help="how to reach each compared configuration (default: http)")


def workload_config(args) -> WorkloadConfig:
    return WorkloadConfig(dataset=args.dataset, num_requests=args.num_requests,
                          input_len=args.random_input_len, output_len=args.output_len,
                          range_ratio=args.random_range_ratio, prefix_len=args.prefix_len,
                          long_fraction=args.long_fraction, long_output_len=args.long_output_len,
                          seed=args.seed)


def run_config(args) -> dict:
    """The settings saved with the results (what makes a run reproducible)."""
    skip = {"func", "module", "log_level", "api_key", "command"}
    return {k: (str(v) if isinstance(v, float) and v == float("inf") else v)
            for k, v in vars(args).items() if k not in skip}


async def bench_target(args, target, label: str) -> dict:
    """Run the workload once against `target`; return {"label", "summary", "records", "t0"}."""
    cfg = workload_config(args)
    if args.warmup < 0:
        raise ValueError("--warmup cannot be negative")
    items = build(cfg)
    warmup = build(cfg, args.warmup, offset=1) if args.warmup else []
    await target.start()
    try:
        result = await run(target, items, warmup, rate=args.request_rate,
                           burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                           seed=args.seed, progress=not args.no_progress, desc=label)
    finally:
        await target.close()
    summary = summarize(result.records, result.duration, parse_goodput(args.goodput))
    return {"label": label, "summary": summary, "records": result.records, "t0": result.t0,
            "warmup_failed": result.warmup_failed}


def write_outputs(args, runs: list[dict]) -> None:
    if args.save_result:
        report.save_result(args.save_result, run_config(args), runs)
        print(f"results: {args.save_result}")
    if args.plot:
        report.plot(args.plot, runs)
        print(f"plot: {args.plot}")


def main(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parse_goodput(args.goodput)  # bad SLOs fail before anything starts
    if args.plot:
        report.require_matplotlib()
    workload_config(args)
    if args.compare:
        from bench.compare import compare
        runs = asyncio.run(compare(args, bench_target))
        print(report.format_compare([(r["label"], r["summary"]) for r in runs]))
    else:
        target = make_target(args)
        label = args.label or target.name
        runs = [asyncio.run(bench_target(args, target, label))]
        print(report.format_summary(runs[0]["summary"]))
    write_outputs(args, runs)
    failed = sum(r["summary"]["failed"] for r in runs)
    if failed:
        print(f"{failed} request(s) failed; see the error counts above", file=sys.stderr)
    # exit 1 when nothing at all succeeded, so a script notices a dead target
    return 0 if any(r["summary"]["completed"] for r in runs) else 1

"""Which routing policy? `seed` against `least-loaded` on a mixed workload, through the HTTP API.

Process: `python -m bench.routing [--nodes N] [--rate R] [--requests M] [...]`, a preset of
`treechat bench --compare policy=seed,least-loaded`: it starts `treechat up --engine fake` once
per policy on free ports (N nodes of S slots in a tree of fan-out K, D seconds per token) and
sends both the same seeded workload through the HTTP gateway: Poisson arrivals at R requests/s,
most answers short (--short tokens) and a --long-fraction of them long (--long tokens), with
ignore_eos so the fake engine produces exactly max_tokens. Prints a markdown table (p50/p99
TTFT, p99 E2E latency, throughput, failures) and writes --plot and --save-result.

The seed policy sends a request to the next child in the ring when the current one is busy,
whatever that child's load; a short request can land behind a long one at a busy leaf while
another leaf is idle. least-loaded sends it to the subtree with the most free slots, or keeps it
at the parent until one frees.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from bench import report
from bench.compare import compare
from bench.serve import add_args, bench_target


def table(runs: list[dict]) -> str:
    return report.markdown_table(
        ["policy", "p50 TTFT (ms)", "p99 TTFT (ms)", "p99 E2E (ms)", "requests/s",
         "output tokens/s", "failed"], "lrrrrrr",
        [[r["label"].removeprefix("policy="), f"{s['ttft_ms']['p50']:.0f}",
          f"{s['ttft_ms']['p99']:.0f}", f"{s['e2el_ms']['p99']:.0f}",
          f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}", str(s["failed"])]
         for r in runs for s in [r["summary"]]])


def bench_args(a: argparse.Namespace) -> argparse.Namespace:
    """The `treechat bench` command line this preset stands for."""
    up = (f"--engine fake --fake-delay {a.delay} --max-slots {a.slots} --nodes {a.nodes} "
          f"--fanout {a.fanout} --grace 2")
    argv = ["--compare", "policy=seed,least-loaded", "--up-args", up, "--via", a.via,
            "--dataset", "mixed", "--random-input-len", "8", "--random-output-len", str(a.short),
            "--long-output-len", str(a.long), "--long-fraction", str(a.long_fraction),
            "--ignore-eos", "--num-requests", str(a.requests), "--request-rate", str(a.rate),
            "--seed", str(a.seed), "--warmup", "0"]
    p = argparse.ArgumentParser()
    add_args(p)
    args = p.parse_args(argv)
    args.no_progress = not sys.stderr.isatty()
    print("same as: treechat bench " + " ".join(f'"{x}"' if " " in x else x for x in argv),
          file=sys.stderr)
    return args


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.routing", description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--fanout", type=int, default=2)
    p.add_argument("--slots", type=int, default=2, help="fake engine slots per node")
    p.add_argument("--delay", type=float, default=0.02, help="fake engine seconds per token")
    p.add_argument("--short", type=int, default=16, help="tokens of a short answer")
    p.add_argument("--long", type=int, default=400, help="tokens of a long answer")
    p.add_argument("--long-fraction", type=float, default=0.1)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (Poisson)")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--via", choices=("http", "tcp", "root"), default="http")
    p.add_argument("--save-result", default=None, metavar="FILE.json")
    p.add_argument("--plot", default=None, metavar="FILE.png")
    a = p.parse_args(argv)
    report.check_plot(p, a.plot)
    args = bench_args(a)
    runs = asyncio.run(compare(args, bench_target))
    print(f"{a.nodes} nodes (fan-out {a.fanout}) x {a.slots} slots, {a.delay * 1000:g} ms/token; "
          f"{a.requests} requests at {a.rate:g}/s (Poisson), {100 * a.long_fraction:g}% of "
          f"{a.long} tokens, the rest {a.short}; via {a.via}")
    print(table(runs))
    if a.save_result:
        report.save_result(a.save_result, vars(a), runs)
    if a.plot:
        report.plot(a.plot, runs, title="routing: seed vs least-loaded (mixed workload)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Does the tree scale? Aggregate throughput of 1..16 leaves in trees of depth 1..3 against ideal.

Process: `python -m bench.scaling [--delay D] [--slots S] [--output-len T] [--waves W]`, a client
that starts each layout with `treechat up --engine fake --nodes N --fanout K` on free ports (every
node has an engine, so every node is a leaf that computes; depth comes from the fan-out: the
layout is breadth-first, node-1..node-K under the root, K more under each), and keeps exactly
L x N x S requests open (closed loop, through `RootClient`, no gateway; --load L), W times
that many in all, each asking for T tokens with ignore_eos.

The fake engine simulates GPU time: S slots, one token per slot every D seconds, so one leaf
delivers at most S / D tokens/s. Ideal for N leaves is N times what one leaf measured. Two rates:
the whole run (vLLM's output throughput: all tokens / duration, drain tail included) and the
sustained rate (while requests were still being sent, see `sustained`). "CPU" is the share of all
cores that the tree (root, nodes) and this bench used during the run (from /proc): well under
100% means the simulated GPU time, not the CPU, bounds the throughput. Writes a
markdown table on stdout, --save-result JSON, and --plot PNG (throughput vs leaves, per depth).

With --netns (root, Linux): every node on a host of its own, a network namespace on one bridge
(`bench.netns`), with --link-delay seconds on every link each way (host to host: twice that), the
root on another and this bench's client on a third, the tree's links keyed (`--curve`); started
with the commands for several machines (`bench.hosts`) instead of `treechat up`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile

from bench import report
from bench.clients import RootTarget
from bench.compare import Up
from bench.hosts import HostedTree
from bench.metrics import summarize
from bench.run import run
from bench.workload import WorkloadConfig, build


def depth(nodes: int, fanout: int) -> int:
    """Levels of `treechat up`'s breadth-first layout."""
    levels, room, width = 0, 0, 1
    while room < nodes:
        width *= fanout
        room += width
        levels += 1
        if fanout == 1:
            return nodes
    return levels


def layouts(sizes: list[int], max_depth: int) -> list[tuple[int, int, int]]:
    """[(nodes, fanout, depth)]: for each size and depth <= max_depth, the narrowest fan-out with
    that depth (the most nodes deep down)."""
    out = []
    for n in sizes:
        seen = {}
        for k in range(1, n + 1):
            d = depth(n, k)
            if d <= max_depth and d not in seen:
                seen[d] = k
        out += [(n, k, d) for d, k in sorted(seen.items())]
    return out


def cpu_seconds(pids_of: int) -> float | None:
    """CPU seconds used so far by this bench and every descendant of `pids_of` (from /proc;
    None off Linux). Other people's processes on the machine do not count."""
    try:
        stats = {}
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # exited meanwhile
                stats[int(d)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    except OSError:
        return None
    mine, frontier = {os.getpid()}, [pids_of]
    while frontier:
        parent = frontier.pop()
        mine.add(parent)
        frontier += [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in mine]
    return sum(stats[pid][1] for pid in mine if pid in stats) / os.sysconf("SC_CLK_TCK")


async def measure(n: int, k: int, args, bed=None) -> dict:
    open_requests = round(n * args.slots * args.load)
    cfg = WorkloadConfig(num_requests=open_requests * args.waves, input_len=4, output_len=args.output_len,
                         seed=n)
    engine = ["--engine", "fake", "--fake-delay", str(args.delay), "--max-slots", str(args.slots)]
    tree = Up(engine + ["--nodes", str(n), "--fanout", str(k), "--grace", "2"], via="root") \
        if bed is None else HostedTree(bed, n, k, engine, args.keys)
    async with tree:
        target = RootTarget(tree.root, ignore_eos=True, timeout=120,
                            curve=args.keys if bed else None)
        await target.start()
        try:
            warmup = build(cfg, open_requests, offset=1)
            await run(target, [], warmup, max_concurrency=open_requests, progress=False)
            before = cpu_seconds(os.getpid())  # this bench and everything it started
            result = await run(target, build(cfg), [], max_concurrency=open_requests, progress=False)
            after = cpu_seconds(os.getpid())
            busy = None if before is None or after is None else \
                (after - before) / (result.duration * (os.cpu_count() or 1))
        finally:
            await target.close()
    return {"label": f"{n} leaves, depth {depth(n, k)}", "nodes": n, "fanout": k,
            "depth": depth(n, k), "summary": summarize(result.records, result.duration),
            "sustained": sustained(result.records, result.t0), "cpu_busy": busy,
            "records": result.records, "t0": result.t0}


def sustained(records, t0: float) -> float:
    """Output tokens/s while requests were still being sent (t0 .. the last request's start):
    the closed loop keeps every slot asked for, so this is the rate without the run's drain tail."""
    until = max(r.start for r in records)
    tokens = 0.0
    for r in records:
        times = r.chunk_times() if r.ok else []
        tokens += sum(1 for t in times if t <= until) * (r.output_tokens / len(times) if times else 0)
    return tokens / (until - t0) if until > t0 else 0.0


def cpu(busy: float | None) -> str:
    return "-" if busy is None else f"{100 * busy:.0f}%"


def table(runs: list[dict], args) -> str:
    base = next(r for r in runs if r["nodes"] == 1)
    one, one_sus = base["summary"]["output_throughput"], base["sustained"]
    rows = []
    for r in runs:
        s, n = r["summary"], r["nodes"]
        r["ideal"], r["ideal_sustained"] = one * n, one_sus * n
        rows.append([str(n), str(r["fanout"]), str(r["depth"]), f"{s['output_throughput']:.0f}",
                     f"{100 * s['output_throughput'] / (one * n):.0f}%", f"{r['sustained']:.0f}",
                     f"{100 * r['sustained'] / (one_sus * n):.0f}%" if one_sus else "-",
                     f"{s['ttft_ms']['p50']:.0f} / {s['ttft_ms']['p99']:.0f}",
                     cpu(r["cpu_busy"]), str(s["failed"])])
    return report.markdown_table(
        ["leaves", "fan-out", "depth", "tokens/s (whole run)", "of ideal", "tokens/s (sustained)",
         "of ideal", "p50 / p99 TTFT (ms)", "CPU", "failed"], "r" * 10, rows)


def plot(path: str, runs: list[dict], args) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    sizes = sorted({r["nodes"] for r in runs})
    one = next(r for r in runs if r["nodes"] == 1)["summary"]["output_throughput"]
    ax.plot(sizes, [one * n for n in sizes], "k--", label="ideal (N x one leaf)")
    for i, d in enumerate(sorted({r["depth"] for r in runs})):
        pts = [(r["nodes"], r["summary"]["output_throughput"], r["sustained"])
               for r in runs if r["depth"] == d]
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", color=f"C{i}",
                label=f"depth {d}, whole run")
        ax.plot([x for x, _, _ in pts], [z for _, _, z in pts], "s:", color=f"C{i}",
                label=f"depth {d}, sustained")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(n) for n in sizes])
    ax.set_xlabel("leaves (nodes, each with a fake engine)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"treechat scaling: {args.slots} slots x {args.delay * 1000:g} ms/token per leaf")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def hosts_for(leaves: int, args):
    """The bed: a root host, one host per leaf, this bench's own host (entered for good, before
    any socket exists), and the tree's keys."""
    from bench.netns import Bed, unavailable
    why = unavailable()
    if why:
        raise SystemExit(f"--netns: {why}")
    bed = Bed(["root", *[f"leaf-{i}" for i in range(1, leaves + 1)], "bench"],
              delay=args.link_delay).up()
    args.keys = tempfile.mkdtemp(prefix="treechat-keys-")
    subprocess.run([sys.executable, "-m", "treechat.cli", "keys", args.keys], check=True,
                   capture_output=True, timeout=60)
    bed.enter("bench")
    return bed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,2,4,8,16", help="leaf counts, comma-separated")
    p.add_argument("--max-depth", type=int, default=3)
    p.add_argument("--delay", type=float, default=0.1, help="fake engine seconds per token")
    p.add_argument("--slots", type=int, default=4, help="fake engine slots per leaf")
    p.add_argument("--output-len", type=int, default=20, help="tokens per request")
    p.add_argument("--waves", type=int, default=3, help="requests per open request")
    p.add_argument("--load", type=float, default=1.0,
                   help="open requests per slot (1: exactly fill every slot; 2: a queue behind each)")
    p.add_argument("--netns", action="store_true",
                   help="each node on its own network-namespace host (Linux, root)")
    p.add_argument("--link-delay", type=float, default=0.01,
                   help="--netns: seconds of delay on every link, each way (default 0.01)")
    p.add_argument("--save-result", default=None, metavar="FILE.json")
    p.add_argument("--plot", default=None, metavar="FILE.png")
    args = p.parse_args(argv)
    report.check_plot(p, args.plot)
    sizes = sorted({int(x) for x in args.sizes.split(",")})
    if 1 not in sizes:
        sizes.insert(0, 1)  # the ideal is measured on one leaf
    bed = hosts_for(max(sizes), args) if args.netns else None
    runs = []
    try:
        for n, k, d in layouts(sizes, args.max_depth):
            print(f"--- {n} leaves, fan-out {k}, depth {d}", file=sys.stderr, flush=True)
            runs.append(asyncio.run(measure(n, k, args, bed)))
    finally:
        if bed is not None:
            bed.close()
            shutil.rmtree(args.keys, ignore_errors=True)
    where = f"each on its own host, {args.link_delay * 1000:g} ms per link each way ({bed.shaping})" \
        if bed else "on 127.0.0.1"
    print(f"fake engine: {args.slots} slots, {args.delay * 1000:g} ms per token, {args.output_len} "
          f"tokens per request; {args.load:g} x N x {args.slots} requests open at once, "
          f"{args.waves} times that many in all, via RootClient; nodes {where}")
    print(table(runs, args))
    if args.save_result:
        report.save_result(args.save_result, vars(args), runs)
    if args.plot:
        plot(args.plot, runs, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

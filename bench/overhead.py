"""What treechat itself costs: the fake engine at zero delay, next to bare baselines, in one run.

Process: `python -m bench.overhead [--requests N] [--concurrency 1,16] [--output-len M]`, a client
that starts, one after another, on free 127.0.0.1 ports:

    bare tornado     `python -m bench.bare tornado`: a minimal Tornado SSE handler, no tree
    http+root+node   `treechat up --engine fake --fake-delay 0 --nodes 1`, through the HTTP gateway
                     (chat completions, then the same tree through /v1/messages, /v1/responses
                     and Ollama's /api/chat, the same workload with `ignore_eos`: what each
                     dialect's translation costs; `bench.http_client`, `bench.dialects`)
    root+node        the same tree through `broker.client.RootClient` (no gateway)
    root+3 levels    root -> node-1 (no engine) -> node-2 (no engine) -> node-3 (fake): every
                     request crosses three tree levels before it runs
    bare zmq echo    `python -m bench.bare zmq`: a ROUTER that sends each message straight back

and sends the same closed-loop workload to each (C requests open at once, N requests of M
tokens, ignore_eos; C = 1 shows the bare per-request latency, C = 16 the throughput), then prints one table: requests/s and p50/p99 end-to-end latency. The echo
answers one message per request where a streamed answer is 1 + M + 1 messages (accepted, one per
token, done), so the echo is the floor of the per-request cost, not of the per-token cost.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import orjson
import zmq
import zmq.asyncio

from bench import report
from bench.clients import RootTarget
from bench.http_client import HTTPTarget, MessagesTarget
from bench.compare import Up, tree_alive
from bench.dialects import OllamaTarget, ResponsesTarget
from bench.metrics import Record, summarize
from bench.procs import Child
from bench.run import run
from bench.workload import WorkloadConfig, build


async def zmq_echo(url: str, n: int, concurrency: int) -> tuple[list[Record], float]:
    """N round trips over one DEALER, C in flight; each body is the size of a small Submit."""
    ctx = zmq.asyncio.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(url)
    body = orjson.dumps({"ref": 0, "request": {"messages": [{"role": "user", "content": "x " * 32}],
                                               "max_tokens": 8}})
    waiting: dict[int, asyncio.Future] = {}

    async def read() -> None:
        while True:
            cmd, _ = await sock.recv_multipart()
            waiting.pop(int.from_bytes(cmd, "big")).set_result(time.perf_counter())

    async def worker(refs: list[int], out: list[Record]) -> None:
        for ref in refs:
            rec = Record(ref, start=time.perf_counter(), output_tokens=1, prompt_tokens=1)
            waiting[ref] = asyncio.get_running_loop().create_future()
            await sock.send_multipart([ref.to_bytes(4, "big"), body])
            rec.end = await waiting[ref]
            rec.ttft = rec.end - rec.start
            out.append(rec)

    reader = asyncio.create_task(read())
    records: list[Record] = []
    await asyncio.gather(*(worker(list(range(100_000 + i, 100_000 + 50 + i, concurrency)), [])
                           for i in range(min(concurrency, 50))))  # warm-up
    t0 = time.perf_counter()
    await asyncio.gather(*(worker(list(range(i, n, concurrency)), records) for i in range(concurrency)))
    duration = time.perf_counter() - t0
    reader.cancel()
    sock.close()
    return records, duration


async def measure(name: str, target, items, warmup, concurrency: int) -> dict:
    await target.start()
    try:
        result = await run(target, items, warmup, max_concurrency=concurrency, progress=False)
    finally:
        await target.close()
    return {"label": name, "summary": summarize(result.records, result.duration),
            "records": result.records, "t0": result.t0}


async def chain(argv_node: list[str]):
    """Root and three nodes in a chain; only the deepest has an engine."""
    from broker.sockets import free_port
    port = free_port(3)
    root = Child.treechat("root", "root", "--port", str(port), "--log-level", "WARNING")
    await root.start()
    root_addr = f"127.0.0.1:{port}"
    nodes = []
    for i, (engine, parent) in enumerate([("none", None), ("none", "node-1"), ("fake", "node-2")], 1):
        args = ["node", "--name", f"node-{i}", "--root", root_addr, "--engine", engine,
                "--log-level", "WARNING", *argv_node] + (["--parent", parent] if parent else [])
        node = Child.treechat(f"node-{i}", *args)
        await node.start()
        nodes.append(node)
    return root_addr, [root, *nodes]


async def study(args, c: int) -> list[dict]:
    cfg = WorkloadConfig(num_requests=args.requests, input_len=8, output_len=args.output_len)
    items, warmup = build(cfg), build(cfg, 20, offset=1)
    fake = ["--fake-delay", "0", "--max-slots", str(max(64, 2 * c))]
    runs = []
    async with Child("bare tornado", [sys.executable, "-m", "bench.bare", "tornado"]) as bare:
        runs.append(await measure("bare tornado SSE", HTTPTarget(bare.info["url"], ignore_eos=True),
                                  items, warmup, c))
    insecure = ["--insecure"] if args.insecure else []
    async with Up(["--engine", "fake", "--nodes", "1", "--grace", "2", *fake, *insecure],
                  via="http") as up:
        runs.append(await measure("http gateway+root+node", HTTPTarget(up.base_url, ignore_eos=True),
                                  items, warmup, c))
        runs.append(await measure("http /v1/messages+root+node",
                                  MessagesTarget(up.base_url, ignore_eos=True), items, warmup, c))
        for label, dialect in (("http /v1/responses", ResponsesTarget),
                               ("http /api/chat (Ollama)", OllamaTarget)):
            runs.append(await measure(label, dialect(up.base_url, ignore_eos=True), items,
                                      warmup, c))
        runs.append(await measure("root+node (RootClient)", RootTarget(up.root, ignore_eos=True),
                                  items, warmup, c))
    root, procs = await chain(fake + ["--grace", "2"])
    try:
        deadline = time.monotonic() + 30
        while not await tree_alive(root, 3) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        runs.append(await measure("root+3 levels (RootClient)", RootTarget(root, ignore_eos=True),
                                  items, warmup, c))
    finally:
        for p in reversed(procs):
            await p.stop()
    async with Child("bare zmq", [sys.executable, "-m", "bench.bare", "zmq"]) as echo:
        records, duration = await zmq_echo(echo.info["url"], args.requests, c)
        runs.append({"label": "bare pyzmq echo", "summary": summarize(records, duration),
                     "records": records, "t0": 0.0})
    for r in runs:
        r["concurrency"] = c
    return runs


def table(runs: list[dict]) -> str:
    return report.markdown_table(
        ["path", "open", "requests/s", "p50 latency (ms)", "p99 latency (ms)", "failed"], "lrrrrr",
        [[r["label"], str(r["concurrency"]), f"{s['request_throughput']:.0f}",
          f"{s['e2el_ms']['p50']:.2f}", f"{s['e2el_ms']['p99']:.2f}", str(s["failed"])]
         for r in runs for s in [r["summary"]]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", default="1,16",
                   help="requests open at once; a comma list runs the whole study for each")
    p.add_argument("--output-len", type=int, default=8, help="tokens per answer (ignore_eos)")
    p.add_argument("--insecure", action="store_true",
                   help="`treechat up --insecure`: no CurveZMQ on the tree's links (up's default "
                        "encrypts them), to measure the tree's own cost without the encryption's")
    p.add_argument("--save-result", default=None, metavar="FILE.json")
    args = p.parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        p.error("--concurrency takes integers separated by commas")
    if any(c < 1 for c in levels) or args.requests < 1 or args.output_len < 1:
        p.error("--concurrency, --requests and --output-len must be at least 1")
    runs = []
    for c in levels:
        runs += asyncio.run(study(args, c))
    print(f"{args.requests} requests per row, {args.output_len} tokens each (ignore_eos), "
          "closed loop with `open` requests at once")
    print(table(runs))
    if args.save_result:
        report.save_result(args.save_result, vars(args), runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One model's flood must not starve another's: two models on a 3-node tree, admitted per model.

Process: `python -m bench.two_models [...]`, a client. It starts, each as its own process on free
ports, `treechat root`, `--nodes-a` nodes of model A and `--nodes-b` of model B under it
(`treechat node --model`), and `treechat gateway http`, then runs two phases through POST
/v1/chat/completions (streamed, ignore_eos, so every answer is --max-tokens tokens):

    steady   A and B each get the light load: --requests chat prompts at --rate per second
             (Poisson arrivals)
    flood    B the same light load; A --flood clients at once, each sending its next request as
             soon as its last one ends, until B's light load is done (at most --flood-cap
             requests): far more than A's slots, so most of A's requests wait at the root

and reports each model's throughput and TTFT p50/p99 in each phase. Per-model admission at the
root (broker/root.py) keeps a queue per model, so B's requests never wait behind A's: B's p99
TTFT should not balloon in the flood.

Models: with --engine hf, A is the default model (SmolLM2-135M, a GGUF file) and B the same file
under another name (a link, SmolLM2-135M-Instruct-twin.gguf), so the tree sees two models, unless
--model-a / --model-b name others; with --engine fake, `alpha` and `beta` (the fake engine
computes nothing, so the numbers show admission alone). On a small CPU the hf nodes share the
cores: B's TTFT then grows in the flood from compute contention too, which no router removes.
Output: a table on stdout, --out FILE.json (config, and per phase and model the summary and
records).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import orjson

from bench import report
from bench.compare import tree_alive
from bench.http_client import HTTPTarget
from bench.metrics import Record, summarize
from bench.procs import Child
from bench.run import run
from bench.workload import Item, WorkloadConfig, build
from broker.sockets import free_port

TWIN = "SmolLM2-135M-Instruct-twin.gguf"
READY_TIMEOUT = 900.0  # seconds: a first start may write the model's config into the cache


def models(args, folder: str) -> tuple[str, str]:
    """The --model values of A's and B's nodes."""
    if args.engine == "fake":
        return args.model_a or "alpha", args.model_b or "beta"
    if args.model_b:
        return args.model_a or "", args.model_b
    from nodes.engine.models import default_gguf
    source = Path(args.model_a) if args.model_a else default_gguf()
    twin = Path(folder) / TWIN
    twin.symlink_to(source.resolve())
    return args.model_a or "", str(twin)


def node_argv(args, name: str, root: str, model: str) -> list[str]:
    argv = ["node", "--name", name, "--root", root, "--engine", args.engine,
            "--max-slots", str(args.slots), "--grace", "2", "--log-level", "WARNING"]
    if model:
        argv += ["--model", model]
    if args.engine == "hf":  # the nodes share the cores: one thread pool each, not one per core
        argv += ["--threads", str(max(1, (os.cpu_count() or 1) // (args.nodes_a + args.nodes_b)))]
    else:
        argv += ["--fake-delay", str(args.fake_delay)]
    return argv


@contextlib.asynccontextmanager
async def tree(args):
    """Root, nodes and HTTP gateway on free ports; yields (base_url, served name of A, of B)."""
    port = free_port(4)  # the root's three, then the gateway's: distinct, all free
    http = port + 3
    root = f"127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="two-models-") as folder:
        model_a, model_b = models(args, folder)
        children = [Child.treechat("root", "root", "--port", str(port), "--grace", "2",
                                   "--log-level", "WARNING")]
        nodes = [Child.treechat(f"{m}-{i}", *node_argv(args, f"{m}-{i}", root, model),
                                timeout=READY_TIMEOUT)
                 for m, n, model in (("a", args.nodes_a, model_a), ("b", args.nodes_b, model_b))
                 for i in range(1, n + 1)]
        gateway = Child.treechat("http-gateway", "gateway", "http", "--root", root, "--port",
                                 str(http), "--log-level", "WARNING")
        try:
            await children[0].start()
            children += nodes
            await asyncio.gather(*(c.start() for c in nodes))
            children.append(gateway)
            await gateway.start()
            deadline = time.monotonic() + 60
            while not await tree_alive(root, len(nodes)):
                if time.monotonic() > deadline:
                    raise RuntimeError("the root does not see every node alive after 60 s")
                await asyncio.sleep(0.2)
            b = model_b if args.engine == "fake" else Path(model_b).stem
            yield f"http://127.0.0.1:{http}", *await served_names(http, b)
        finally:
            for child in reversed(children):
                await child.stop(grace=10)


async def served_names(http: int, b: str) -> tuple[str, str]:
    """A's and B's names in /v1/models (the default model's name is not its --model)."""
    t = HTTPTarget(f"http://127.0.0.1:{http}")
    try:
        status, body = await t.get("/v1/models")
    finally:
        await t.close()
    listed = [m["id"] for m in orjson.loads(body)["data"]] if status == 200 else []
    others = [m for m in listed if m != b]
    if b not in listed or len(others) != 1:
        raise RuntimeError(f"the tree serves {listed}, not two models, one of them {b}")
    return others[0], b


async def flood(target: HTTPTarget, items: list[Item], clients: int,
                until: asyncio.Future) -> tuple[list[Record], bool]:
    """`clients` closed loops over `items` until `until` is done; (records, whether the items
    ran out first)."""
    todo = iter(items)
    records: list[Record] = []
    ran_out = False

    async def client() -> None:
        nonlocal ran_out
        while not until.done():
            item = next(todo, None)
            if item is None:
                ran_out = True
                return
            records.append(await target.send(item, Record(index=item.index)))

    await asyncio.gather(*(client() for _ in range(clients)))
    return records, ran_out


def span(records: list[Record], t0: float) -> float:
    return max((r.end for r in records if r.end is not None), default=t0) - t0


async def phase(name: str, base_url: str, model_a: str, model_b: str, args) -> list[dict]:
    """One phase; each model's row: its summary and records, times from the phase's start."""
    a = HTTPTarget(base_url, model=model_a, ignore_eos=True, timeout=args.request_timeout)
    b = HTTPTarget(base_url, model=model_b, ignore_eos=True, timeout=args.request_timeout)
    light = WorkloadConfig(dataset="chat", num_requests=args.requests, output_len=args.max_tokens,
                           seed=args.seed)
    t0 = time.perf_counter()
    cut = False
    try:
        light_b = asyncio.ensure_future(run(b, build(light, offset=2), [], rate=args.rate,
                                            seed=args.seed + 2, progress=False))
        if name == "flood":
            heavy = WorkloadConfig(dataset="chat", num_requests=args.flood_cap,
                                   output_len=args.max_tokens, seed=args.seed)
            records_a, cut = await flood(a, build(heavy, offset=1), args.flood, light_b)
        else:
            records_a = (await run(a, build(light, offset=1), [], rate=args.rate,
                                   seed=args.seed + 1, progress=False)).records
        records_b = (await light_b).records
    finally:
        await a.close()
        await b.close()
    if cut:
        print(f"warning: A's flood ran out of requests (--flood-cap {args.flood_cap}) before B's "
              "light load ended: raise --flood-cap", file=sys.stderr)
    return [{"phase": name, "model": model, "role": role, "nodes": nodes,
             "summary": summarize(records, span(records, t0)), "flood_cut": cut,
             "records": records, "t0": t0}
            for model, role, nodes, records in (
                (model_a, "flooded" if name == "flood" else "light", args.nodes_a, records_a),
                (model_b, "light", args.nodes_b, records_b))]


async def study(args) -> list[dict]:
    async with tree(args) as (base_url, model_a, model_b):
        print(f"--- A: {model_a} ({args.nodes_a} nodes), B: {model_b} ({args.nodes_b})",
              file=sys.stderr, flush=True)
        for model, n in ((model_a, args.nodes_a), (model_b, args.nodes_b)):  # one per node
            warm = HTTPTarget(base_url, model=model, ignore_eos=True, timeout=args.request_timeout)
            await asyncio.gather(*(warm.send(Item(-1, None, f"Hello {i}", 4, 2), Record(-1))
                                   for i in range(n)))
            await warm.close()
        runs = []
        for name in ("steady", "flood"):
            print(f"--- {name}", file=sys.stderr, flush=True)
            runs += await phase(name, base_url, model_a, model_b, args)
        return runs


def table(runs: list[dict]) -> str:
    return report.markdown_table(
        ["phase", "model", "load", "nodes", "ok / failed", "requests/s", "output tok/s",
         "TTFT p50 ms", "TTFT p99 ms"], "lllrrrrrr",
        [[r["phase"], r["model"], r["role"], str(r["nodes"]), f"{s['completed']} / {s['failed']}",
          f"{s['request_throughput']:.2f}", f"{s['output_throughput']:.1f}",
          f"{s['ttft_ms']['p50']:.0f}", f"{s['ttft_ms']['p99']:.0f}"]
         for r in runs for s in [r["summary"]]])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.two_models",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("hf", "fake"), default="hf")
    p.add_argument("--model-a", default=None, help="A's --model (hf default: the default model)")
    p.add_argument("--model-b", default=None, help="B's --model (hf default: A's file, linked "
                   "under another name)")
    p.add_argument("--nodes-a", type=int, default=2)
    p.add_argument("--nodes-b", type=int, default=1)
    p.add_argument("--slots", type=int, default=4, help="engine slots per node")
    p.add_argument("--fake-delay", type=float, default=0.02, help="fake: seconds per token")
    p.add_argument("--max-tokens", type=int, default=32, help="every answer's length")
    p.add_argument("--rate", type=float, default=0.5, help="light load: requests/s per model")
    p.add_argument("--requests", type=int, default=20, help="light load: requests per phase")
    p.add_argument("--flood", type=int, default=None,
                   help="A's clients at once in the flood (default: 4 x A's slots)")
    p.add_argument("--flood-cap", type=int, default=1000, help="A's requests in the flood at most")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="FILE.json")
    args = p.parse_args(argv)
    if min(args.nodes_a, args.nodes_b, args.slots, args.max_tokens, args.requests) < 1 \
            or args.rate <= 0:
        p.error("node counts, --slots, --max-tokens, --requests and --rate must be positive")
    args.flood = args.flood or 4 * args.nodes_a * args.slots
    runs = asyncio.run(study(args))
    print(f"A: {args.nodes_a} nodes, B: {args.nodes_b}, {args.slots} slots each, engine "
          f"{args.engine}; light load {args.requests} requests at {args.rate:g}/s; flood "
          f"{args.flood} clients on A; {args.max_tokens} tokens per answer")
    print(table(runs))
    b = {r["phase"]: r["summary"]["ttft_ms"]["p99"] for r in runs if r["model"] == runs[1]["model"]}
    if b["steady"]:
        print(f"\nB's p99 TTFT in A's flood: {b['flood'] / b['steady']:.2f}x its steady p99")
    if args.out:
        report.save_result(args.out, vars(args), runs)
        print(f"results: {args.out}")
    return 0 if all(r["summary"]["completed"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

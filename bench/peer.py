"""treechat next to real peers: the same model and workload, side by side, in one run.

Process: `python -m bench.peer [--peer llama-server] [--peer transformers-serve] [--concurrency
1,8] ...`, a client that starts every server at once on free 127.0.0.1 ports:

    treechat             `treechat up` with its defaults (the default model straight from its
                         GGUF file), through the HTTP gateway
    llama-server         llama.cpp's server on the very same GGUF file (`-t THREADS --parallel
                         SLOTS`); the binary is ../shared/peers/llama-server/run, or --llama-server
    transformers-serve   `transformers serve --continuous-batching` on the float32 folder converted
                         from that GGUF (pip install 'transformers[serving]')

and sends each the same seeded chat workload over the OpenAI streaming API (/v1/chat/completions,
temperature 0, `--max-tokens` tokens with ignore_eos, C requests open at once), after the same
warm-up, for each concurrency level, in rounds that alternate which server goes first (only one
is measured at a time; the others idle). Prints one markdown table per level, with each peer's
output tokens/s relative to treechat's, and writes --save-result / --plot.

Notes: `transformers serve` ignores ignore_eos and stream_options, and without --cb-num-blocks
its CPU cache grew to 13.7 GB (OOM on a 23 GB machine), so a fixed cache is passed
(--cb-block-size 32 --cb-num-blocks N); it sends no `data: [DONE]` (the bench accepts a stream
that ended cleanly after a finish_reason).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from pathlib import Path

from bench import report
from bench.compare import Up
from bench.http_client import HTTPTarget
from bench.metrics import summarize
from bench.procs import Child
from bench.run import run
from bench.workload import WorkloadConfig, build
from broker.sockets import free_port

REPO = Path(__file__).resolve().parent.parent
LLAMA_SERVER = REPO.parent / "shared" / "peers" / "llama-server" / "run"
PEERS = ("llama-server", "transformers-serve")


async def wait_http(url: str, path: str, timeout: float, child: Child) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        if child.proc.returncode is not None:
            raise RuntimeError(f"{child.name} exited with code {child.proc.returncode}:\n{child.tail()}")
        t = HTTPTarget(url)
        try:
            status, _ = await asyncio.wait_for(t.get(path), 5)
            if status == 200:
                return
        except Exception:  # not up yet: any failure means "try again"
            pass
        finally:
            await t.close()
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"{url}{path} did not answer 200 in {timeout:.0f}s")
        await asyncio.sleep(0.5)


def peer_command(peer: str, port: int, a) -> tuple[list[str], str | None]:
    """(argv, model name to send) of a peer server on `port`."""
    from nodes.engine import models
    if peer == "llama-server":
        exe = str(a.llama_server)
        if not Path(exe).exists():
            raise RuntimeError(f"no llama-server at {exe} (give --llama-server PATH)")
        gguf = a.gguf or str(models.default_gguf())
        return [exe, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t",
                str(a.threads), "--parallel", str(a.slots), "-c", str(a.context)], None
    exe = shutil.which("transformers")
    if exe is None:
        raise RuntimeError("`transformers serve` is not installed: pip install 'transformers[serving]'")
    folder = models.resolve(a.gguf)  # the float32 folder converted from the GGUF, once
    return [exe, "serve", "--continuous-batching", "--cb-block-size", "32", "--cb-num-blocks",
            str(a.cb_num_blocks), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", folder], folder


async def measure(url: str, model: str | None, items, warmup, concurrency: int,
                  a) -> tuple[list, float]:
    target = HTTPTarget(url, model=model, timeout=a.request_timeout, ignore_eos=True,
                        extra={"temperature": 0})
    await target.start()
    try:
        result = await run(target, items, warmup, max_concurrency=concurrency, progress=False)
    finally:
        await target.close()
    return result.records, result.duration


async def study(a) -> dict[int, list[dict]]:
    """Every server up at once (each idles at ~0% CPU while another is measured), then, per
    concurrency level, rounds that alternate the order, so a change in the machine's background
    load hits every server."""
    up_args = ["--nodes", "1", "--grace", "2", *a.up_args.split()]
    if a.gguf:
        up_args += ["--model", a.gguf]
    async with Up(up_args, via="http") as up:
        servers = [("treechat", up.base_url, None)]
        children = []
        try:
            for peer in a.peer:
                port = free_port()
                argv, model = peer_command(peer, port, a)
                print(f"--- {' '.join(argv)}", file=sys.stderr, flush=True)
                child = Child(peer, argv, marker=None)
                await child.start()
                children.append(child)
                url = f"http://127.0.0.1:{port}"
                await wait_http(url, "/health", 600, child)
                servers.append((peer, url, model))
            return {c: await level(servers, c, a) for c in a.concurrency}
        finally:
            for child in children:
                await child.stop()


async def level(servers, concurrency: int, a) -> list[dict]:
    n = max(a.requests_per_slot * concurrency, a.rounds)
    cfg = WorkloadConfig(dataset="chat", num_requests=n, output_len=a.max_tokens, seed=a.seed)
    items, warmup = build(cfg), build(cfg, a.warmup, offset=1)
    per_round = -(-n // a.rounds)
    runs = {label: {"label": label, "records": [], "t0": 0.0, "duration": 0.0, "rounds": []}
            for label, _, _ in servers}
    for r in range(a.rounds):
        chunk = items[r * per_round:(r + 1) * per_round]
        order = servers if r % 2 == 0 else servers[::-1]
        for label, base, model in order:
            print(f"    {concurrency} open, round {r + 1}/{a.rounds}: {label}", file=sys.stderr,
                  flush=True)
            records, duration = await measure(base, model, chunk, warmup if r == 0 else [],
                                              concurrency, a)
            run_ = runs[label]
            offset = run_["duration"] - min(x.start for x in records)  # lay rounds end to end
            for x in records:
                x.start, x.end = x.start + offset, x.end + offset
            run_["records"] += records
            run_["duration"] += duration
            run_["rounds"].append(summarize(records, duration)["output_throughput"])
    out = list(runs.values())
    for run_ in out:
        run_["summary"] = summarize(run_["records"], run_["duration"])
    return out


def table(runs: list[dict]) -> str:
    ours = runs[0]["summary"]["output_throughput"] or 1.0
    return report.markdown_table(
        ["server", "output tokens/s", "vs treechat", "per round", "p50 TTFT (ms)",
         "p99 TTFT (ms)", "p50 TPOT (ms)", "p99 E2E (ms)", "failed"], "lrrlrrrrr",
        [[r["label"], f"{s['output_throughput']:.1f}", f"{s['output_throughput'] / ours:.2f}",
          ", ".join(f"{x:.0f}" for x in r["rounds"]), f"{s['ttft_ms']['p50']:.0f}",
          f"{s['ttft_ms']['p99']:.0f}", f"{s['tpot_ms']['p50']:.1f}", f"{s['e2el_ms']['p99']:.0f}",
          str(s["failed"])]
         for r in runs for s in [r["summary"]]])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--peer", action="append", choices=PEERS, default=None,
                   help="a server to run beside treechat (repeatable; default llama-server)")
    p.add_argument("--gguf", default=None, help="the model file (default: the default model's)")
    p.add_argument("--concurrency", default="1,8", help="requests open at once, per level")
    p.add_argument("--requests-per-slot", type=int, default=4,
                   help="requests per level = this x the level's concurrency")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (A B, B A, ...)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--up-args", default="", help="more `treechat up` flags, quoted")
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="llama-server -t (default: every core, as treechat uses)")
    p.add_argument("--slots", type=int, default=8, help="llama-server --parallel")
    p.add_argument("--context", type=int, default=8192, help="llama-server -c")
    p.add_argument("--cb-num-blocks", type=int, default=256, help="transformers serve: 32-token KV blocks")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", default=None, metavar="FILE.json")
    p.add_argument("--plot", default=None, metavar="FILE.png")
    a = p.parse_args(argv)
    a.peer = a.peer or ["llama-server"]
    try:
        a.concurrency = [int(c) for c in a.concurrency.split(",")]
    except ValueError:
        p.error("--concurrency takes numbers separated by commas, e.g. 1,8")
    if a.rounds < 1 or min(a.concurrency) < 1 or a.requests_per_slot < 1:
        p.error("need --rounds >= 1, --concurrency >= 1 and --requests-per-slot >= 1")
    report.check_plot(p, a.plot)
    levels = asyncio.run(study(a))
    for c, runs in levels.items():
        print(f"\n{c} open: chat prompts, max_tokens {a.max_tokens} with ignore_eos, temperature "
              f"0, {len(runs[0]['records'])} requests per server in {a.rounds} alternating rounds "
              f"after {a.warmup} warm-up; 'per round' is output tokens/s")
        print(table(runs))
    everything = [{**r, "label": f"{r['label']} ({c} open)"} for c, runs in levels.items()
                  for r in runs]
    if a.save_result:
        report.save_result(a.save_result, {k: (str(v) if isinstance(v, Path) else v)
                                           for k, v in vars(a).items()}, everything)
    if a.plot:
        report.plot(a.plot, everything, title="treechat vs its peers (same model file, CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

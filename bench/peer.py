"""treechat next to a real peer: the same model and workload through `transformers serve`.

Process: `python -m bench.peer [--model PATH] [--requests N] [--rounds R] [--concurrency C]`,
a client that starts, side by side on free 127.0.0.1 ports, in one run:

    treechat             `treechat up --model PATH` (the default hf engine, one node), HTTP gateway
    transformers serve   `transformers serve --continuous-batching PATH` (FastAPI + uvicorn)

and sends each the same seeded chat workload over the OpenAI streaming API (/v1/chat/completions,
greedy: temperature 0, max_tokens T, C requests open at once), after the same warm-up, in R
rounds that alternate which server goes first (only one is measured at a time; the other idles).
Prints a markdown table and writes --save-result / --plot.

`transformers serve` needs the serving extra, which is not a treechat dependency:

    pip install 'transformers[serving]'      # fastapi, uvicorn (and what they need)

On CPU its continuous batching sizes the KV cache from memory unless told: without
--cb-num-blocks it took 13.7 GB and was OOM-killed on a 23 GB machine, so this script passes a
fixed cache (--cb-block-size 32 --cb-num-blocks 256: 8192 tokens). It sends no `data: [DONE]` at
the end of a stream (the bench accepts a stream that ended cleanly after a finish_reason).
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
from broker.sockets import free_port
from bench.run import run
from bench.workload import WorkloadConfig, build

DEFAULT_MODEL = Path.home() / ".cache" / "treechat" / "models" / "SmolLM2-135M-Instruct"


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


async def measure(url: str, model: str | None, items, warmup, a) -> tuple[list, float]:
    target = HTTPTarget(url, model=model, timeout=a.request_timeout, extra={"temperature": 0})
    await target.start()
    try:
        result = await run(target, items, warmup, max_concurrency=a.concurrency, progress=False)
    finally:
        await target.close()
    return result.records, result.duration


async def study(a) -> list[dict]:
    """Both servers up at once (each idles at ~0% CPU while the other is measured), then rounds
    that alternate which goes first, so a change in the machine's background load hits both."""
    exe = shutil.which("transformers")
    if exe is None:
        raise RuntimeError("`transformers serve` is not installed: pip install 'transformers[serving]'")
    up_args = ["--model", str(a.model), "--nodes", "1", "--grace", "2"]
    if a.max_slots:
        up_args += ["--max-slots", str(a.max_slots)]
    port = free_port()
    argv = [exe, "serve", "--continuous-batching", "--cb-block-size", "32", "--cb-num-blocks",
            str(a.cb_num_blocks), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", str(a.model)]
    cfg = WorkloadConfig(dataset="chat", num_requests=a.requests, output_len=a.max_tokens, seed=a.seed)
    items, warmup = build(cfg), build(cfg, a.warmup, offset=1)
    per_round = -(-a.requests // a.rounds)
    print(f"--- treechat up {' '.join(up_args)}\n--- {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    async with Up(up_args, via="http") as up, Child("transformers serve", argv, marker=None) as server:
        url = f"http://127.0.0.1:{port}"
        await wait_http(url, "/health", 600, server)
        servers = [("treechat", up.base_url, None),
                   ("transformers serve --continuous-batching", url, str(a.model))]
        runs = {label: {"label": label, "records": [], "t0": 0.0, "duration": 0.0, "rounds": []}
                for label, _, _ in servers}
        for r in range(a.rounds):
            chunk = items[r * per_round:(r + 1) * per_round]
            for label, base, model in (servers if r % 2 == 0 else servers[::-1]):
                print(f"    round {r + 1}/{a.rounds}: {label}", file=sys.stderr, flush=True)
                records, duration = await measure(base, model, chunk, warmup if r == 0 else [], a)
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
    return report.markdown_table(
        ["server", "requests/s", "output tokens/s", "per round", "p50 TTFT (ms)", "p99 TTFT (ms)",
         "p50 TPOT (ms)", "p99 E2E (ms)", "failed"], "lrrlrrrrr",
        [[r["label"], f"{s['request_throughput']:.3f}", f"{s['output_throughput']:.1f}",
          ", ".join(f"{x:.0f}" for x in r["rounds"]), f"{s['ttft_ms']['p50']:.0f}",
          f"{s['ttft_ms']['p99']:.0f}", f"{s['tpot_ms']['p50']:.0f}", f"{s['e2el_ms']['p99']:.0f}",
          str(s["failed"])]
         for r in runs for s in [r["summary"]]])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="a local model folder")
    p.add_argument("--requests", type=int, default=32, help="requests per server, over all rounds")
    p.add_argument("--rounds", type=int, default=4, help="alternating rounds (A B, B A, ...)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--max-slots", type=int, default=None, help="treechat: engine slots (default its own)")
    p.add_argument("--cb-num-blocks", type=int, default=256, help="transformers serve: 32-token KV blocks")
    p.add_argument("--request-timeout", type=float, default=300.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-result", default=None, metavar="FILE.json")
    p.add_argument("--plot", default=None, metavar="FILE.png")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.requests < a.rounds or a.concurrency < 1:
        p.error("need --rounds >= 1, --requests >= --rounds and --concurrency >= 1")
    if not a.model.is_dir():
        p.error(f"--model {a.model} is not a folder (convert the model first: `treechat up` does it)")
    runs = asyncio.run(study(a))
    print(f"{a.model.name}, CPU; {a.requests} chat requests per server in {a.rounds} alternating "
          f"rounds, {a.concurrency} open at once, max_tokens {a.max_tokens}, temperature 0, "
          f"{a.warmup} warm-up requests each; 'per round' is output tokens/s")
    print(table(runs))
    if a.save_result:
        report.save_result(a.save_result, vars(a) | {"model": str(a.model)}, runs)
    if a.plot:
        report.plot(a.plot, runs, title="treechat vs transformers serve (same model, CPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

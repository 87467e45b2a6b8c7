"""treechat next to real peers: the same model files and workload, side by side, in one run.

Process: `python -m bench.peer [--model FILE ...] [--peer llama-server] [--peer
transformers-serve] [--workload chat|completions] [--concurrency 1,8] ...`, a client that, for
each model file in turn (default: the default model's), starts every server at once on free
127.0.0.1 ports:

    treechat             `treechat up --model FILE` with its defaults, through the HTTP gateway
                         (--no-treechat leaves it out: the peers alone)
    llama-server         llama.cpp's server on the very same GGUF file (`-t THREADS --parallel
                         SLOTS`); the binary is ../shared/peers/llama-server/run, or --llama-server
    transformers-serve   `transformers serve --continuous-batching` on the float32 folder converted
                         from that GGUF (pip install 'transformers[serving]')

and sends each the same seeded workload over the OpenAI streaming API, temperature 0, with
ignore_eos, C requests open at once, after the same warm-up, for each concurrency level, in rounds
that alternate which server goes first (only one is measured at a time; the others idle), each
level with prompts drawn anew (completions: none repeats another level's, warm-up included):

    chat          /v1/chat/completions, the built-in chat prompts, --max-tokens (128) each,
                  --requests-per-slot x C requests per level
    completions   /v1/completions, prompts of --prompt-tokens (64) random token ids, --max-tokens
                  (64) each, max(3, C) requests per level (issue 19's workload)

(--requests N,N,... sets the count per level for either.) Prints one markdown table per file and
level, each peer's output tokens/s relative to treechat's, then one table of every file: tokens/s,
TTFT p50, the resident memory of the treechat node process (not the gateway or root) and of each
peer at rest after the run (read once no RSS moved for 0.5 s) and its peak (VmHWM), and for
files of 1B parameters or more the weight bytes one decode step reads (every tensor of the file;
the embedding table only where the output head is a separate tensor) times the decode tokens/s
at 1 open (1 / p50 TPOT), against the machine's copy bandwidth (numpy, one thread per core, 1 GiB,
read + write counted, as bench.engine counts). Writes --save-result / --plot.

Notes: `transformers serve` ignores ignore_eos and stream_options, and without --cb-num-blocks
its CPU cache grew to 13.7 GB (OOM on a 23 GB machine), so a fixed cache is passed
(--cb-block-size 32 --cb-num-blocks N); it sends no `data: [DONE]` (the bench accepts a stream
that ended cleanly after a finish_reason).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import report
from bench.compare import Up
from bench.http_client import HTTPTarget
from bench.metrics import summarize
from bench.procs import Child
from bench.run import run
from bench.shapes import Header
from bench.workload import Item, WorkloadConfig, build
from broker.sockets import free_port

REPO = Path(__file__).resolve().parent.parent
LLAMA_SERVER = REPO.parent / "shared" / "peers" / "llama-server" / "run"
PEERS = ("llama-server", "transformers-serve")
ENDPOINTS = {"chat": "/v1/chat/completions", "completions": "/v1/completions"}
MAX_TOKENS = {"chat": 128, "completions": 64}
BILLION = 1e9
ROOFLINE_FROM = 0.95e9  # parameters: "1B and up" (Gemma 3 1B has 999.9 million)


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


def peer_command(peer: str, port: int, gguf: str, a) -> tuple[list[str], str | None]:
    """(argv, model name to send) of a peer server on `port`."""
    if peer == "llama-server":
        exe = str(a.llama_server)
        if not Path(exe).exists():
            raise RuntimeError(f"no llama-server at {exe} (give --llama-server PATH)")
        return [exe, "-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-t",
                str(a.threads), "--parallel", str(a.slots), "-c", str(a.context)], None
    exe = shutil.which("transformers")
    if exe is None:
        raise RuntimeError("`transformers serve` is not installed: pip install 'transformers[serving]'")
    from nodes.engine import models
    folder = models.resolve(gguf)  # the float32 folder converted from the GGUF, once
    return [exe, "serve", "--continuous-batching", "--cb-block-size", "32", "--cb-num-blocks",
            str(a.cb_num_blocks), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", folder], folder


def default_model() -> str:
    from nodes.engine.models import default_gguf
    return str(default_gguf())


# --- what a file is, what a process holds, what the machine copies

def file_facts(path: str) -> dict:
    """Size, parameters, and the weight bytes one decode step reads: every tensor, less the
    embedding table when the output head is a tensor of its own (a step reads one row of it)."""
    h = Header(path)
    read = h.tensor_bytes()
    if any(name == "output.weight" for name, _, _ in h.tensors):
        read -= h.tensor_bytes("token_embd.weight")
    return {"path": path, "name": Path(path).stem, "bytes": Path(path).stat().st_size,
            "parameters": h.parameters(), "decode_bytes": read}


def memory_mb(pid: int | None) -> dict:
    """The resident set of a process now (VmRSS) and at its peak (VmHWM), in MB; {} if gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines() if pid else []
    except OSError:
        lines = []
    kib = {k: int(v.split()[0]) for k, _, v in (ln.partition(":") for ln in lines)
           if k in ("VmRSS", "VmHWM")}
    if not kib:
        return {}
    return {"rss_mb": kib["VmRSS"] * 1024 / 1e6, "peak_mb": kib["VmHWM"] * 1024 / 1e6}


async def at_rest(pids: dict, every: float = 0.5, limit: float = 10.0) -> dict:
    """Each server's memory_mb once all rest: read again every `every` s until no RSS moved by
    1 MB (a node hands what its steps freed back when its engine idles, a moment after the last
    answer; read at once, the last server measured would carry that), at most `limit` s."""
    last, deadline = None, time.monotonic() + limit
    while True:
        now = {label: memory_mb(pid()) for label, pid in pids.items()}
        if last is not None and (time.monotonic() > deadline or all(
                abs(now[x].get("rss_mb", 0) - last[x].get("rss_mb", 0)) < 1 for x in now)):
            return now
        last = now
        await asyncio.sleep(every)


def node_pid(up_pid: int) -> int | None:
    """The `treechat node` process among a `treechat up`'s children (root, node, gateways)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            argv = (d / "cmdline").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if ppid == up_pid and b"treechat.cli" in argv[:-1] \
                and argv[argv.index(b"treechat.cli") + 1] == b"node":
            return int(d.name)
    return None


def copy_bandwidth(size: int = 1 << 30) -> float:
    """Bytes per second of a `size`-byte numpy copy split over one thread per core (numpy's copy
    releases the GIL), read + write counted, best of 5: the roofline's memory ceiling."""
    import numpy as np
    x, y = np.ones(size, np.uint8), np.zeros(size, np.uint8)
    n = os.cpu_count() or 1
    cuts = [i * size // n for i in range(n + 1)]

    def part(i: int) -> None:
        np.copyto(y[cuts[i]:cuts[i + 1]], x[cuts[i]:cuts[i + 1]])

    best = float("inf")
    with ThreadPoolExecutor(n) as pool:
        for _ in range(6):  # the first pass faults the pages in
            t = time.perf_counter()
            list(pool.map(part, range(n)))
            best = min(best, time.perf_counter() - t)
    return 2 * size / best


# --- the workload

def token_prompts(n: int, tokens: int, max_tokens: int, seed: int, offset: int = 0) -> list[Item]:
    """`n` prompts of `tokens` random token ids in [1000, 10000): ordinary text tokens in every
    tokenizer here (special tokens sit below 1000 or above 100,000), so a prompt is exactly
    `tokens` long whatever the file's tokenizer."""
    rng = random.Random(seed * 1_000_003 + offset)
    return [Item(i, None, [rng.randrange(1000, 10000) for _ in range(tokens)], max_tokens, tokens)
            for i in range(n)]


def requests(a, concurrency: int) -> int:
    if a.requests:
        n = a.requests[a.concurrency.index(concurrency)]
    elif a.workload == "completions":
        n = max(3, concurrency)
    else:
        n = a.requests_per_slot * concurrency
    return max(n, a.rounds)


def workload(a, concurrency: int) -> tuple[list[Item], list[Item]]:
    """(the measured items, the warm-up) of one level, drawn with a seed of its own: random
    token prompts no other level sends, so no server answers a level from its prompt cache."""
    n, offset = requests(a, concurrency), 2 * concurrency
    if a.workload == "completions":
        return (token_prompts(n, a.prompt_tokens, a.max_tokens, a.seed, offset),
                token_prompts(a.warmup, a.prompt_tokens, a.max_tokens, a.seed, offset + 1))
    cfg = WorkloadConfig(dataset="chat", num_requests=n, output_len=a.max_tokens, seed=a.seed)
    return build(cfg, offset=offset), build(cfg, a.warmup, offset=offset + 1)


async def measure(url: str, model: str | None, items, warmup, concurrency: int,
                  a) -> tuple[list, float]:
    target = HTTPTarget(url, ENDPOINTS[a.workload], model=model, timeout=a.request_timeout,
                        ignore_eos=True, extra={"temperature": 0})
    await target.start()
    try:
        result = await run(target, items, warmup, max_concurrency=concurrency, progress=False)
    finally:
        await target.close()
    return result.records, result.duration


# --- one file: every server up at once, then the levels

async def study(a, gguf: str) -> dict:
    """Every server up at once on `gguf` (each idles at ~0% CPU while another is measured),
    then, per concurrency level, rounds that alternate the order, so a change in the machine's
    background load hits every server. A server that does not start is reported and left out."""
    servers, pids, failed = [], {}, {}
    async with contextlib.AsyncExitStack() as stack:
        if a.treechat:
            given = [] if gguf == default_model() else ["--model", gguf]  # the default: as is
            up = Up(["--nodes", "1", "--grace", "2", *a.up_args.split(), *given])
            try:
                await up.start()
                stack.push_async_callback(up.stop)
                servers.append(("treechat", up.base_url, None))
                # looked up at the end: `up` restarts a node that died
                pids["treechat"] = lambda: node_pid(up.proc.pid)
            except RuntimeError as e:
                failed["treechat"] = str(e)
        for peer in a.peer:
            port = free_port()
            argv, model = peer_command(peer, port, gguf, a)
            print(f"--- {' '.join(argv)}", file=sys.stderr, flush=True)
            child = Child(peer, argv, marker=None)
            await child.start()
            stack.push_async_callback(child.stop)
            url = f"http://127.0.0.1:{port}"
            try:
                await wait_http(url, "/health", 600, child)
            except RuntimeError as e:
                failed[peer] = str(e)
                continue
            servers.append((peer, url, model))
            pids[peer] = lambda child=child: child.proc.pid
        for label, why in failed.items():
            print(f"    {label} did not start on {gguf}: {why.strip()[-1500:]}", file=sys.stderr,
                  flush=True)
        levels = {c: await level(servers, c, a) for c in a.concurrency} if servers else {}
        memory = await at_rest(pids)
    return {"file": file_facts(gguf), "levels": levels, "memory": memory, "failed": failed}


async def level(servers, concurrency: int, a) -> list[dict]:
    items, warmup = workload(a, concurrency)
    n = len(items)
    per_round = -(-n // a.rounds)
    runs = {label: {"label": label, "records": [], "t0": 0.0, "duration": 0.0, "rounds": []}
            for label, _, _ in servers}
    for r in range(a.rounds):
        chunk = items[r * per_round:(r + 1) * per_round]
        if not chunk:
            break
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


# --- tables

def table(runs: list[dict]) -> str:
    """One level of one file: every server, relative to the first (treechat, when it ran)."""
    first = runs[0]["label"]
    ours = runs[0]["summary"]["output_throughput"] or 1.0
    return report.markdown_table(
        ["server", "output tokens/s", f"vs {first}", "per round", "p50 TTFT (ms)",
         "p99 TTFT (ms)", "p50 TPOT (ms)", "p99 E2E (ms)", "failed"], "lrrlrrrrr",
        [[r["label"], f"{s['output_throughput']:.1f}", f"{s['output_throughput'] / ours:.2f}",
          ", ".join(f"{x:.0f}" for x in r["rounds"]), f"{s['ttft_ms']['p50']:.0f}",
          f"{s['ttft_ms']['p99']:.0f}", f"{s['tpot_ms']['p50']:.1f}", f"{s['e2el_ms']['p99']:.0f}",
          str(s["failed"])]
         for r in runs for s in [r["summary"]]])


def decode_rate(study_: dict, label: str) -> float | None:
    """Weight bytes per second of decode steps at 1 open: the bytes a step reads / p50 TPOT."""
    run_ = next((r for r in study_["levels"].get(1, []) if r["label"] == label), None)
    tpot = run_ and run_["summary"]["tpot_ms"]["p50"]
    return study_["file"]["decode_bytes"] / (tpot / 1000) if tpot else None


def files_table(studies: list[dict], labels: list[str], bandwidth: float | None) -> str:
    """Every file x level: each server's tokens/s, treechat's ratio to each peer, TTFT p50,
    resident memory at the end (peak), and at 1 open for files of 1B parameters and up the
    weight bytes decode reads per second (and their share of the copy bandwidth)."""
    both = " / ".join(labels)
    peers = [x for x in labels if x != "treechat"]
    ratio = ("treechat / " + ", ".join(peers)) if "treechat" in labels and peers else None
    headers = ["file", "GB", "open", f"output tok/s {both}"] + ([ratio] if ratio else []) + [
        f"p50 TTFT (ms) {both}", f"RSS MB at rest (peak) {both}",
        f"weights read GB/s at 1 open {both}"]
    rows = []
    for st in studies:
        f = st["file"]
        for c in [*st["levels"]] or ["–"]:
            by = {r["label"]: r["summary"] for r in st["levels"].get(c, [])}

            def each(fmt, labels=labels, by=by):
                return " / ".join(fmt(by[x], x) if x in by else "failed" if x in st["failed"]
                                  else "–" for x in labels)
            row = [f["name"], f"{f['bytes'] / BILLION:.2f}", str(c),
                   each(lambda s, x: f"{s['output_throughput']:.1f}")]
            if ratio:
                ours = by.get("treechat", {}).get("output_throughput")
                row.append(", ".join(f"{ours / by[p]['output_throughput']:.2f}"
                                     if ours is not None and by.get(p, {}).get("output_throughput")
                                     else "–" for p in peers))
            row.append(each(lambda s, x: f"{s['ttft_ms']['p50']:.0f}"))
            mem = st["memory"]
            row.append(" / ".join(f"{mem[x]['rss_mb']:.0f} ({mem[x]['peak_mb']:.0f})"
                                  if mem.get(x) else "–" for x in labels))
            if c == 1 and f["parameters"] >= ROOFLINE_FROM:
                row.append(" / ".join(
                    f"{r / BILLION:.1f}" + (f" ({r / bandwidth:.0%})" if bandwidth else "")
                    if (r := decode_rate(st, x)) else "–" for x in labels))
            else:
                row.append("")
            rows.append(row)
    return report.markdown_table(headers, "lrr" + "l" * (len(headers) - 3), rows)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(prog="python -m bench.peer", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "--gguf", action="append", dest="models", default=None,
                   metavar="FILE", help="a GGUF file (repeatable, benched in turn; default: the "
                   "default model's)")
    p.add_argument("--peer", action="append", choices=PEERS, default=None,
                   help="a server to run beside treechat (repeatable; default llama-server)")
    p.add_argument("--no-treechat", dest="treechat", action="store_false",
                   help="bench the peers alone")
    p.add_argument("--workload", choices=list(ENDPOINTS), default="chat",
                   help="chat prompts, or random token ids on /v1/completions (issue 19's)")
    p.add_argument("--concurrency", default="1,8", help="requests open at once, per level")
    p.add_argument("--requests", default=None, metavar="N,N",
                   help="requests per level, one number per --concurrency level")
    p.add_argument("--requests-per-slot", type=int, default=4,
                   help="chat: requests per level = this x the level's concurrency")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds (A B, B A, ...)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=None, help="default: chat 128, completions 64")
    p.add_argument("--prompt-tokens", type=int, default=64, help="completions: prompt length")
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
    a.models = a.models or [default_model()]
    a.max_tokens = a.max_tokens or MAX_TOKENS[a.workload]
    try:
        a.concurrency = [int(c) for c in a.concurrency.split(",")]
        a.requests = [int(n) for n in a.requests.split(",")] if a.requests else None
    except ValueError:
        p.error("--concurrency and --requests take numbers separated by commas, e.g. 1,8")
    if a.rounds < 1 or min(a.concurrency) < 1 or a.requests_per_slot < 1:
        p.error("need --rounds >= 1, --concurrency >= 1 and --requests-per-slot >= 1")
    if a.requests and (len(a.requests) != len(a.concurrency) or min(a.requests) < 1):
        p.error("--requests takes one positive number per --concurrency level")
    missing = [m for m in a.models if not Path(m).is_file()]
    if missing:
        p.error(f"no such file: {', '.join(missing)}")
    report.check_plot(p, a.plot)
    bandwidth = None
    if 1 in a.concurrency and any(Header(m).parameters() >= ROOFLINE_FROM for m in a.models):
        bandwidth = copy_bandwidth()  # before any server starts: a quiet machine
        print(f"copy bandwidth: {bandwidth / BILLION:.1f} GB/s", file=sys.stderr, flush=True)
    what = (f"chat prompts, max_tokens {a.max_tokens}" if a.workload == "chat" else
            f"/v1/completions, {a.prompt_tokens} random token ids, max_tokens {a.max_tokens}")
    labels = (["treechat"] if a.treechat else []) + a.peer
    studies, everything = [], []
    for m in a.models:  # each file's tables as soon as it is done: a long run loses nothing
        print(f"=== {m}", file=sys.stderr, flush=True)
        st = asyncio.run(study(a, m))
        studies.append(st)
        for c, runs in st["levels"].items():
            print(f"\n{st['file']['name']}, {c} open: {what} with ignore_eos, temperature 0, "
                  f"{len(runs[0]['records'])} requests per server in {a.rounds} alternating "
                  f"rounds after {a.warmup} warm-up; 'per round' is output tokens/s")
            print(table(runs), flush=True)
        everything += [{**r, "label": f"{st['file']['name']}: {r['label']} ({c} open)",
                        "file": st["file"], "open": c, "memory": st["memory"].get(r["label"], {})}
                       for c, runs in st["levels"].items() for r in runs]
        if a.save_result:
            config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
            config["copy_bandwidth"] = bandwidth
            config["failed"] = {s["file"]["name"]: s["failed"] for s in studies if s["failed"]}
            report.save_result(a.save_result, config, everything)
    print(f"\nEvery file: {what}" + (f"; copy bandwidth {bandwidth / BILLION:.1f} GB/s (read + "
                                     "write)" if bandwidth else ""))
    print(files_table(studies, labels, bandwidth))
    if a.plot:
        report.plot(a.plot, everything, title="treechat vs its peers (same model files, CPU)")
    return 0 if everything else 1

if __name__ == "__main__":
    sys.exit(main())

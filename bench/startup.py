"""Warm-start time of `treechat up`: where it goes until the first answer.

    python -m bench.startup [--runs 3] [--up-args "--engine fake"] [--json out.json]

Each run starts `treechat up` on free ports (the default model unless --up-args says otherwise)
and stamps every line of its output as it arrives: the root listening, the node's engine loaded
(model and tokenizer), the node registered and ready, each gateway listening, the banner. Then
one streamed chat request: its first token and its end. A fresh process beside it splits the
node's share into Python's start, imports (torch, transformers, the rest) and building the
engine. "Warm" means the model is already converted in the cache; run it once before measuring.
Each figure is the median over the runs, in seconds since `up` was started.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.report import markdown_table
from broker.sockets import free_port

REPO = Path(__file__).resolve().parent.parent

# (milestone, a piece of the log line that marks it), in the order they happen.
MILESTONES = [
    ("root listening", "treechat.root: root "),
    ("node engine loaded", "treechat.engine: hf engine:"),
    ("node registered", "treechat.node: node node-1 ready"),
    ("tcp gateway listening", "treechat.tcp: TCP gateway on"),
    ("http gateway listening", "treechat.http: HTTP gateway on"),
    ("banner", "treechat is up"),
]

NODE_PARTS = """
import json, sys, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
import transformers
t2 = time.perf_counter()
import treechat.cli, nodes.engine.hf
t3 = time.perf_counter()
from nodes.engine.hf import HFEngine, HFEngineConfig
HFEngine(HFEngineConfig(**json.loads(sys.argv[1])))
t4 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import transformers": t2 - t1,
                  "import treechat and the engine": t3 - t2, "build the engine": t4 - t3}))
"""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", type=int, default=3, help="how many starts (default 3)")
    p.add_argument("--up-args", default="", help="extra `treechat up` flags, one string")
    p.add_argument("--question", default="What is the capital of France?")
    p.add_argument("--json", default=None, help="also write every run's figures here")


def run_up(up_args: list[str], question: str) -> dict[str, float]:
    """One start of `treechat up`: {milestone: seconds since it was started}."""
    root = free_port(5)  # the root's three, then the gateways': five distinct ports
    http_port, tcp_port = root + 3, root + 4
    argv = [sys.executable, "-m", "treechat.cli", "up", "--port", str(root), "--http-port",
            str(http_port), "--tcp-port", str(tcp_port), *up_args]
    seen: dict[str, float] = {}
    banner = threading.Event()
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True)

    def read() -> None:
        for line in proc.stdout:
            for name, mark in MILESTONES:
                if mark in line and name not in seen:
                    seen[name] = time.monotonic() - t0
            if "treechat is up" in line:
                banner.set()
        banner.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not banner.wait(900) or proc.poll() is not None:
            raise SystemExit(f"treechat up did not start (exit {proc.poll()})")
        seen.update({k: v - t0 for k, v in ask(http_port, question).items()})
    finally:
        proc.terminate()
        proc.wait(60)
    return seen


def ask(port: int, question: str) -> dict[str, float]:
    """Stream one answer: when its first token and its end came (monotonic clock)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"messages": [{"role": "user", "content": question}], "stream": True,
                       "max_tokens": 64})
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    times = {}
    for raw in resp:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            times["answer done"] = time.monotonic()
            break
        if line.startswith("data:") and "first token" not in times:
            choices = json.loads(line[5:]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                times["first token"] = time.monotonic()
    conn.close()
    return times


def node_parts(up_args: list[str]) -> dict[str, float]:
    """The node's start split in a fresh process: Python itself, imports, building the engine."""
    t = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    parts = {"python start": time.monotonic() - t}
    config = {}
    if "--model" in up_args:
        config["model"] = up_args[up_args.index("--model") + 1]
    out = subprocess.run([sys.executable, "-c", NODE_PARTS, json.dumps(config)], cwd=REPO,
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"})
    parts.update(json.loads(out.stdout.strip().splitlines()[-1]))
    return parts


def main(args: argparse.Namespace | None = None) -> int:
    if args is None:
        parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        add_args(parser)
        args = parser.parse_args()
    up_args = shlex.split(args.up_args)
    load = os.getloadavg()[0]
    print(f"load average before: {load:.2f}" + ("  (busy: figures will be high)" if load > 1.5
                                                 else ""), file=sys.stderr)
    runs = [run_up(up_args, args.question) for _ in range(args.runs)]
    whole = {name: statistics.median(r[name] for r in runs if name in r)
             for name in [m for m, _ in MILESTONES] + ["first token", "answer done"]
             if any(name in r for r in runs)}
    rows = [[name, f"{t:.2f}"] for name, t in sorted(whole.items(), key=lambda kv: kv[1])]
    print(markdown_table(["milestone (`treechat up`)", "s since start"], "lr", rows))
    parts = None
    if "--engine" not in up_args or "hf" in up_args:
        parts = [node_parts(up_args) for _ in range(args.runs)]
        median = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
        print()
        print(markdown_table(["the node's share (a fresh process)", "s"], "lr",
                             [[k, f"{v:.2f}"] for k, v in median.items()]))
    if args.json:
        Path(args.json).write_text(json.dumps({"load_before": load, "runs": runs,
                                               "node_parts": parts}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

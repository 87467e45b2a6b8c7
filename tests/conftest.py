"""Fixtures: real treechat processes on free 127.0.0.1 ports, torn down after each test.

    def test_x(cluster):
        tree = cluster.tree(["node-1", ("node-2", "node-1")], engine="fake", slots=1)
        ...  tree.root is "127.0.0.1:PORT"; tree.procs["node-2"].kill()

    def test_y(cluster):
        up = cluster.up("--engine", "fake", "--nodes", "3")   # the whole `treechat up`
        ...  up.http_port, up.tcp_port, up.root
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker.sockets import free_port  # noqa: E402
from model_fixtures import *  # noqa: E402,F401,F403  (the tiny real model, for engine tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# `treechat up` makes its tree's keys here; clients of these tests find them by the root's address.
os.environ.setdefault("TREECHAT_KEYS", tempfile.mkdtemp(prefix="treechat-keys-"))
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

READY = "TREECHAT-READY "
HB = "0.2"  # fast heartbeats keep failure tests short (dead after 3 misses = 0.6 s)


def free_ports(n: int, span: int = 1) -> list[int]:
    """`n` free 127.0.0.1 ports, each the first of `span` consecutive free ports, none shared
    (below the kernel's ephemeral range: broker.sockets.free_port)."""
    return [free_port(span) for _ in range(n)]


class Proc:
    """A treechat process: its stdout is read by a thread that notes the READY line."""

    def __init__(self, name: str, args: list[str], log_dir: Path, env: dict | None = None):
        self.name = name
        self.args = args
        self.log = log_dir / f"{name}.log"
        self.info: dict | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "treechat.cli", *args], cwd=REPO, stdout=subprocess.PIPE,
            stderr=open(self.log, "ab"), stdin=subprocess.DEVNULL, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            if line.startswith(READY) and self.info is None:
                self.info = orjson.loads(line[len(READY):])
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout: float = 60.0) -> dict:
        if not self._ready.wait(timeout) or self.info is None:
            raise RuntimeError(f"{self.name} not ready (exit {self.proc.poll()}):\n{self.tail()}")
        return self.info

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


class Tree:
    def __init__(self, root: str, procs: dict[str, Proc]):
        self.root = root
        self.procs = procs


class Up:
    def __init__(self, proc: Proc, root: str, http_port: int, tcp_port: int):
        self.proc = proc
        self.root = root
        self.http_port = http_port
        self.tcp_port = tcp_port
        self.http = f"http://127.0.0.1:{http_port}"


class Cluster:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, *args: str, env: dict | None = None) -> Proc:
        proc = Proc(name, list(args), self.log_dir, env)
        self.procs.append(proc)
        return proc

    def root(self, *extra: str, port: int | None = None) -> tuple[str, Proc]:
        port = port or free_ports(1, span=3)[0]
        proc = self.start("root", "root", "--port", str(port), "--heartbeat", HB, "--grace", "2",
                          *extra)
        proc.wait_ready()
        return f"127.0.0.1:{port}", proc

    def node(self, root: str, name: str, parent: str | None = None, *extra: str,
             engine: str = "fake", wait: bool = True) -> Proc:
        args = ["node", "--name", name, "--root", root, "--heartbeat", HB, "--grace", "2",
                "--engine", engine, *extra]
        if parent:
            args += ["--parent", parent]
        proc = self.start(name, *args)
        if wait:
            proc.wait_ready()
        return proc

    def tree(self, layout: list, *node_args: str, root_args: tuple = (), engine: str = "fake") -> Tree:
        """layout: names of top-level nodes, or (name, parent) pairs, parents first."""
        root, root_proc = self.root(*root_args)
        procs = {"root": root_proc}
        for item in layout:
            name, parent = (item, None) if isinstance(item, str) else item
            procs[name] = self.node(root, name, parent, *node_args, engine=engine, wait=False)
        for proc in procs.values():
            proc.wait_ready()
        return Tree(root, procs)

    def up(self, *args: str, timeout: float = 60.0) -> Up:
        # the root's three ports, then the gateways': one span, so no later pick can hand out a
        # port of the root's before it binds it (CI once gave the TCP gateway the root's port)
        port = free_ports(1, span=5)[0]
        http_port, tcp_port = port + 3, port + 4
        proc = self.start("up", "up", "--port", str(port), "--http-port", str(http_port),
                          "--tcp-port", str(tcp_port), "--heartbeat", HB, "--grace", "2", *args)
        deadline = time.monotonic() + timeout
        while not any(line.startswith("treechat is up") for line in proc.lines):
            if proc.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"treechat up failed (exit {proc.proc.poll()}):\n"
                                   + "\n".join(proc.lines[-40:]) + proc.tail())
            time.sleep(0.05)
        return Up(proc, f"127.0.0.1:{port}", http_port, tcp_port)

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.proc.poll() is None:
                proc.proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def pytest_terminal_summary(terminalreporter):
    """One line per reason tests were skipped (slapd or Chromium missing, ...), so a run that
    skips some says so at its end without -rs (which lists each test instead)."""
    if "s" in terminalreporter.reportchars or "a" in terminalreporter.reportchars.lower():
        return
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        if isinstance(report.longrepr, tuple):  # (file, line, "Skipped: why")
            why = report.longrepr[2].removeprefix("Skipped: ")
            reasons[why] = reasons.get(why, 0) + 1
    for why, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        terminalreporter.write_line(f"skipped {count} test{'s' if count > 1 else ''}: {why}",
                                    yellow=True)


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path)
    yield c
    c.close()


def run(coro, timeout: float = 60.0):
    """Run a coroutine in a fresh loop, with a timeout so a hang fails fast."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def connect(root: str, name: str = "test"):
    from broker.client import RootClient
    client = RootClient(root, name=name, heartbeat=float(HB))
    await client.start()
    if not await client.wait_connected(10):
        raise RuntimeError(f"no root at {root}")
    return client


async def wait_for(predicate, timeout: float = 20.0, interval: float = 0.05):
    """Poll an async or plain predicate until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(interval)


async def wait_tree(client, names: set[str], timeout: float = 20.0) -> dict:
    """Wait until the root sees every node in `names` alive and reachable down the tree."""
    async def ok():
        st = await client.status()
        alive = {n["name"] for n in st["nodes"] if n["state"] == "alive"}
        return st if names <= alive and st["root"]["children"] else None
    return await wait_for(ok, timeout)

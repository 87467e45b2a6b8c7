"""The multi-host test bed: treechat on hosts that are Linux network namespaces (`bench.netns`).

    def test_x(hosts):
        net = hosts(delay=0.02, loss=0.02)            # root, node-1..3, gateway, client hosts
        records = net.streams(["hello there", ...], concurrency=8)   # through the gateway host
        net.bed.cut("node-1"); net.bed.heal("node-1")
        net = hosts(standby=True)                     # and a standby root on a host of its own

Each process is started inside its host with the README's commands for several machines, bound
to its host's address: `treechat root --host A`, `treechat node --name N --root A:5550 --host B
[--parent P]`, `treechat gateway http|tcp --root A:5550 --host G`. Every process gets the same
link security (`Net.security`: its own key from one `treechat keys DIR --add NAME ...`, in a
folder with only its machine's share of DIR), so the tree runs with keys on every link, and the
gateways want an API key. The test itself talks to the hosts from a
client host (`Net.on_client`: a thread inside that namespace), never from the machine's own
network.

Teardown, also after a failure: every process SIGTERM then SIGKILL, then the namespaces and the
wire. Skips with the reason where namespaces cannot be made.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest

from conftest import Proc
from http_helpers import poll

from bench.clients import Target, TCPTarget
from bench.http_client import HTTPTarget
from bench.metrics import Record
from bench import netns as bench_netns
from bench.netns import Bed, unavailable
from bench.workload import Item
from treechat.tls import client_context

REPO = Path(__file__).resolve().parent.parent
ROOT_PORT = 5550
HTTP_PORT, TCP_PORT = 8000, 8001
METRICS_PORT = 9100  # on every node host and the gateway host (TCP gateway)
API_KEY = "sk-netns-edge"  # the gateways listen beyond loopback: clients show a key
TREE = [("node-1", None), ("node-2", None), ("node-3", "node-1")]  # node-3 hangs under node-1
MEMBERS = [n for n, _ in TREE] + ["http-gateway", "tcp-gateway", "standby"]  # each its own key


class HostProc(Proc):
    """conftest's Proc (READY line, log file, terminate/kill), run inside a host: `argv` is the
    whole command line (`ip netns exec NS python -m treechat.cli ...`, which execs python, so
    signals reach treechat itself)."""

    def __init__(self, name: str, argv: list[str], log: Path):
        self.name, self.args, self.log = name, argv, log
        self.info: dict | None = None
        self.lines: list[str] = []
        self._ready = threading.Event()
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True,
                                     stderr=open(log, "ab"), stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        threading.Thread(target=self._read, daemon=True).start()

    def logged(self, text: str) -> bool:
        try:
            return text in self.log.read_text(errors="replace")
        except OSError:
            return False

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        try:
            self.terminate(10)
        except subprocess.TimeoutExpired:
            self.kill()


class Net:
    """A Bed with a treechat on it: the root host, node hosts, a gateway host, a client host."""

    def __init__(self, tmp: Path, delay: float, loss: float, heartbeat: float):
        self.tmp = tmp
        self.heartbeat = heartbeat
        self.procs: dict[str, HostProc] = {}
        self.bed = Bed(["root", *[n for n, _ in TREE], "gateway", "rogue", "client", "standby"],
                       delay=delay, loss=loss).up()
        self.keys = tmp / "keys"  # made once, as on an operator's machine; hosts get their part
        try:
            self.treechat_here("keys", str(self.keys))
            self.treechat_here("keys", str(self.keys), *[x for m in MEMBERS for x in ("--add", m)])
        except BaseException:
            self.bed.close()
            raise
        self.root = f"{self.bed.addr('root')}:{ROOT_PORT}"  # what members are given (--root)
        self.primary = self.root
        self.standby = f"{self.bed.addr('standby')}:{ROOT_PORT}"
        self.http = f"http://{self.bed.addr('gateway')}:{HTTP_PORT}"
        self.tcp = f"{self.bed.addr('gateway')}:{TCP_PORT}"
        self.gateway_args: list[str] = []
        self.tls: ssl.SSLContext | None = None  # the client's, once the gateways serve TLS

    def use_tls(self, cert: Path, key: Path, ca: Path) -> None:
        """Both gateways serve TLS (call before start_tree); the client verifies against `ca`."""
        self.gateway_args = ["--tls-cert", str(cert), "--tls-key", str(key)]
        self.tls = client_context(str(ca))
        self.http = self.http.replace("http://", "https://")

    def security(self, member: str | None, listens: bool) -> list[str]:
        """The link flags of one process (the one place to change when the tree's key model
        changes): `--curve` a folder holding only what docs/deploy.md copies to its machine
        (server.key and its member's keypair; a listener also server.key_secret and authorized/),
        `--member` its key's name (None: the root, which only listens)."""
        folder = self.tmp / f"keys-{member or 'root'}"
        if not folder.exists():
            names = ["server.key"] + ([f"{member}.key", f"{member}.key_secret"] if member else [])
            names += ["server.key_secret"] if listens else []
            folder.mkdir(mode=0o700)
            for name in names:
                shutil.copy2(self.keys / name, folder / name)
            if listens:
                shutil.copytree(self.keys / "authorized", folder / "authorized")
        return ["--curve", str(folder)] + (["--member", member] if member else [])

    def treechat_here(self, *args: str) -> str:
        return subprocess.run([sys.executable, "-m", "treechat.cli", *args], cwd=REPO, check=True,
                              capture_output=True, text=True, timeout=60).stdout

    def start(self, host: str, name: str, *args: str) -> HostProc:
        argv = self.bed.command(host, [sys.executable, "-m", "treechat.cli", *args])
        proc = self.procs[name] = HostProc(name, argv, self.tmp / f"{name}.log")
        return proc

    def start_tree(self, engine: tuple[str, ...] = ("--fake-delay", "0.02", "--max-slots", "4"),
                   gateways: tuple[str, ...] = ("http", "tcp"), root_host: str | None = None,
                   standby: bool = False) -> None:
        """The tree; the root listens on its host's address (or `root_host`, e.g. 0.0.0.0).
        `standby`: a standby root on the standby host, and members given both addresses."""
        self.start_root(root_host)
        if standby:
            self.start_standby()
            self.root = f"{self.primary},{self.standby}"
        hb = ["--heartbeat", str(self.heartbeat), "--grace", "2"]
        for name, parent in TREE:
            self.start(name, name, "node", "--name", name, "--root", self.root,
                       "--host", self.bed.addr(name), *(["--parent", parent] if parent else []),
                       "--engine", "fake", "--metrics-port", str(METRICS_PORT), *engine, *hb,
                       *self.security(name, listens=True))
        for kind in gateways:
            port = HTTP_PORT if kind == "http" else TCP_PORT
            metrics = ["--metrics-port", str(METRICS_PORT)] if kind == "tcp" else []
            self.start("gateway", f"{kind}-gateway", "gateway", kind, "--root", self.root,
                       "--host", self.bed.addr("gateway"), "--port", str(port), *metrics,
                       "--heartbeat", str(self.heartbeat), "--api-key", API_KEY,
                       *self.gateway_args, *self.security(f"{kind}-gateway", listens=False))
        for proc in self.procs.values():
            proc.wait_ready()
        self.wait_tree()

    def start_root(self, root_host: str | None = None) -> HostProc:
        """The primary root (again, after it was killed: as it was started)."""
        proc = self.start("root", "root", "root", "--host", root_host or self.bed.addr("root"),
                          "--port", str(ROOT_PORT), "--heartbeat", str(self.heartbeat), "--grace",
                          "2", *self.security(None, listens=True))
        proc.wait_ready()
        return proc

    def start_standby(self) -> HostProc:
        proc = self.start("standby", "standby", "root", "--host", self.bed.addr("standby"),
                          "--port", str(ROOT_PORT), "--standby-of", self.primary, "--heartbeat",
                          str(self.heartbeat), "--grace", "2",
                          *self.security("standby", listens=True))
        proc.wait_ready()
        return proc

    def separate(self, a: str, b: str, cut: bool = True) -> None:
        """Cut (or heal) only the path between hosts `a` and `b`: each drops the other's
        address; every other link stays."""
        for here, there in ((a, b), (b, a)):
            bench_netns.ip("-n", self.bed.ns(here), "route", "add" if cut else "del", "blackhole",
                           f"{self.bed.addr(there)}/32")

    def close(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        self.bed.close()

    # --- talking to it from the client host ------------------------------------------------------

    def on_client(self, fn, *args, timeout: float = 120.0):
        return self.bed.call_in("client", fn, *args, timeout=timeout)

    def get(self, path: str, base: str | None = None) -> tuple[int, bytes]:
        """GET base+path from the client host (base: the HTTP gateway): (status, body)."""
        async def ask():
            target = HTTPTarget(base or self.http, tls=None if base else self.tls, api_key=API_KEY)
            try:
                return await asyncio.wait_for(target.get(path), 5)
            finally:
                await target.close()
        return self.on_client(lambda: asyncio.run(ask()))

    def tcp_target(self) -> TCPTarget:
        """A bench client of the TCP gateway host (TLS when the gateways serve it)."""
        return TCPTarget(self.tcp, tls=self.tls, api_key=API_KEY, timeout=60)

    def metrics(self, host: str) -> str:
        """The Prometheus page of the node (or TCP gateway) on `host`, scraped from the client."""
        status, body = self.get("/metrics", f"http://{self.bed.addr(host)}:{METRICS_PORT}")
        assert status == 200, body
        return body.decode()

    def cli(self, *args: str, root: str | None = None) -> str:
        """`treechat ARGS --root ROOT` run on the client host, as an operator would."""
        argv = [sys.executable, "-m", "treechat.cli", *args, "--root", root or self.root,
                *self.security("client", listens=False)]
        r = subprocess.run(self.bed.command("client", argv), cwd=REPO, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout

    def tree(self) -> dict:
        status, body = self.get("/v1/tree")
        assert status == 200, body
        return orjson.loads(body)

    def wait_tree(self, timeout: float = 30.0) -> dict:
        """Until the gateway is ready and every node is alive, and in the tree (top-level nodes
        attached to the root's tree socket)."""
        names = {n for n, _ in TREE}
        tops = {n for n, p in TREE if p is None}
        return poll(lambda: self._whole(names, tops), timeout)

    def _whole(self, names: set[str], tops: set[str]) -> dict | None:
        try:
            status, ready = self.get("/readyz")
            tree = self.tree() if status == 200 else None
        except (OSError, asyncio.TimeoutError):
            return None
        if tree is None:
            return None
        alive = {n["name"] for n in tree["nodes"] if n["state"] == "alive"}
        return tree if names <= alive and tops <= set(tree["root"]["children"]) else None

    def streams(self, prompts: list[str], concurrency: int, target: Target | None = None,
                progress: list | None = None, timeout: float = 120.0) -> list[Record]:
        """Every prompt as one streamed request from the client host, `concurrency` at a time;
        the records in prompt order. `progress` gets each finished index as it finishes."""
        async def load():
            t = target or HTTPTarget(self.http, tls=self.tls, api_key=API_KEY, timeout=60)
            gate = asyncio.Semaphore(concurrency)

            async def one(i: int, text: str) -> Record:
                async with gate:
                    item = Item(i, [{"role": "user", "content": text}], None, 256,
                                len(text.split()))
                    rec = await t.send(item, Record(i))
                    if progress is not None:
                        progress.append(i)
                    return rec
            try:
                return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
            finally:
                await t.close()
        return self.on_client(lambda: asyncio.run(load()), timeout=timeout)


def echo(prompt: str) -> str:
    """What the fake engine answers: the prompt's words, each followed by a space."""
    return "".join(w + " " for w in prompt.split())


@pytest.fixture
def hosts(tmp_path):
    """hosts(delay=, loss=, heartbeat=) -> a started Net; everything is torn down after the test."""
    why = unavailable()
    if why:
        pytest.skip(f"no network namespaces here: {why}")
    made: list[Net] = []

    def make(delay: float = 0.0, loss: float = 0.0, heartbeat: float = 0.2, start: bool = True,
             **tree) -> Net:
        where = tmp_path / f"net{len(made)}"
        where.mkdir()
        net = Net(where, delay, loss, heartbeat)
        made.append(net)
        if start:
            net.start_tree(**tree)
        return net

    yield make
    for net in made:
        net.close()

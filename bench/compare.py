"""`treechat bench --compare`: start treechat configurations one after another and bench each.

Runs in the `treechat bench` process; each configuration is a child `treechat up` on free
127.0.0.1 ports (root PORT..PORT+2, --http-port, --tcp-port), stopped with SIGTERM before the next.

Syntax: every `--compare` argument is one axis, `FLAG=V1,V2,...`, where FLAG is a `treechat up`
option without its dashes; the configurations are every combination of the axes, each with the
`--up-args` flags (default `--engine fake`) added:

    treechat bench --compare policy=seed,least-loaded nodes=1,3,7 --up-args "--engine fake
        --fake-delay 0.01 --max-slots 2" --num-requests 200 --max-concurrency 16

is six configurations, labelled `policy=seed nodes=1` ... `policy=least-loaded nodes=7`. A
configuration is benched once it is ready: the "treechat is up" line, then `GET /readyz` = 200
for --via http, every node alive in the root's status for --via root, a connection for --via tcp.
"""

from __future__ import annotations

import asyncio
import itertools
import shlex
import sys
import time

from bench.clients import Failure, RootTarget, TCPTarget
from bench.http_client import HTTPTarget
from bench.procs import Child
from bench.targets import target_options
from broker.sockets import free_port

READY_TIMEOUT = 900.0  # seconds: a first real-model start may convert the model
RESERVED = {"port", "http-port", "tcp-port"}  # chosen here, on free ports


def parse_axes(axes: list[str]) -> list[tuple[str, list[str]]]:
    out = []
    for axis in axes:
        flag, sep, values = axis.partition("=")
        flag = flag.strip().lstrip("-")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not sep or not flag or not vals:
            raise ValueError(f"--compare takes FLAG=V1,V2 (a `treechat up` flag), not '{axis}'")
        if flag in RESERVED:
            raise ValueError(f"--compare cannot vary --{flag}: the bench picks free ports itself")
        out.append((flag, vals))
    return out


def configurations(axes: list[str], up_args: str) -> list[tuple[str, list[str]]]:
    """[(label, `treechat up` argv)] for every combination; each argv is checked by up's parser."""
    from treechat.launch import up_parser
    parsed = parse_axes(axes)
    base = shlex.split(up_args or "")
    configs = []
    for combo in itertools.product(*[[(f, v) for v in vals] for f, vals in parsed]):
        argv = base + [x for f, v in combo for x in (f"--{f}", v)]
        check_up_args(up_parser(), argv)
        configs.append((" ".join(f"{f}={v}" for f, v in combo), argv))
    return configs


def check_up_args(parser, argv: list[str]) -> None:
    """argparse exits on bad flags; turn that into a readable error before anything starts."""
    try:
        parser.parse_args(argv)
    except SystemExit:
        raise ValueError(f"`treechat up {' '.join(argv)}` is not a valid command line "
                         "(see `treechat up --help`)") from None


class Up(Child):
    """One `treechat up` on free ports, ready for `via`: `async with Up(argv) as up:` ... up.root."""

    def __init__(self, argv: list[str], via: str = "http", ready_timeout: float = READY_TIMEOUT):
        self.port = free_port(5)  # the root's three, then the gateways': distinct, all free
        self.http_port, self.tcp_port = self.port + 3, self.port + 4
        self.up_args = argv
        self.via = via
        self.root = f"127.0.0.1:{self.port}"
        self.base_url = f"http://127.0.0.1:{self.http_port}"
        self.tcp = f"127.0.0.1:{self.tcp_port}"
        super().__init__("treechat up", [
            sys.executable, "-m", "treechat.cli", "up", "--port", str(self.port),
            "--http-port", str(self.http_port), "--tcp-port", str(self.tcp_port),
            "--log-level", "WARNING", *argv], marker="treechat is up", timeout=ready_timeout)

    async def start(self) -> None:
        await super().start()
        deadline = time.monotonic() + 60
        while not await self.serving():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                await self.stop()
                raise RuntimeError(f"treechat up {' '.join(self.up_args)} did not serve over "
                                   f"{self.via}:\n{self.tail()}")
            await asyncio.sleep(0.1)

    async def serving(self) -> bool:
        if self.via == "http":
            t = HTTPTarget(self.base_url)
            try:
                status, _ = await asyncio.wait_for(t.get("/readyz"), 5)
                return status == 200
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, Failure):
                return False
            finally:
                await t.close()
        if self.via == "tcp":
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.tcp_port)
                writer.close()
                return True
            except OSError:
                return False
        return await self.nodes_alive()

    async def nodes_alive(self) -> bool:
        return await tree_alive(self.root, int(self.flag("--nodes", "1")))

    def flag(self, name: str, default: str) -> str:
        argv = self.up_args
        return argv[argv.index(name) + 1] if name in argv[:-1] else default

    def target(self, args):
        kw = target_options(args)
        if self.via == "http":
            return HTTPTarget(self.base_url, args.endpoint, args.model, args.api_key, **kw)
        if self.via == "tcp":
            return TCPTarget(self.tcp, api_key=args.api_key, **kw)
        return RootTarget(self.root, **kw)


async def tree_alive(root: str, want: int, curve: str | None = None) -> bool:
    """Does the root see `want` nodes alive, with children under it to dispatch to?"""
    from broker.client import RootClient
    client = RootClient(root, name="bench-ready", curve=curve)
    await client.start()
    try:
        if not await client.wait_connected(2.0):
            return False
        st = await client.status()
        alive = [n for n in st["nodes"] if n["state"] == "alive"]
        return len(alive) >= want and bool(st["root"]["children"])
    except asyncio.TimeoutError:
        return False
    finally:
        client.close()


def check_via(via: str) -> None:
    from treechat.installed import gateway_module
    if via in ("http", "tcp") and gateway_module(via) is None:
        raise ValueError(f"the {via} gateway is not built in this checkout; use --via root")


async def compare(args, bench_target) -> list[dict]:
    """Bench each configuration with `bench_target(args, target, label)` (`bench.serve`'s, which
    calls this module: it hands its own down rather than have it imported back)."""
    check_via(args.via)
    configs = configurations(args.compare, args.up_args)
    runs = []
    for label, argv in configs:
        print(f"--- {label}: treechat up {' '.join(argv)}", file=sys.stderr, flush=True)
        started = time.monotonic()
        async with Up(argv, via=args.via) as up:
            print(f"    ready in {time.monotonic() - started:.1f}s", file=sys.stderr, flush=True)
            run = await bench_target(args, up.target(args), label)
        run["up_args"] = argv
        runs.append(run)
    return runs

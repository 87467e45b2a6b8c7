"""What a standby root costs and what a failover costs, on network-namespace hosts.

    sudo python -m bench.failover [--streams 200] [--heartbeat 1.0] [--fault cut|kill]

Hosts (bench/netns.py): `root` (the primary), `standby` (`treechat root --standby-of`), three
node hosts (fake engine) and a `client` host, whose RootClient is given both roots as a gateway
would be (`A:5550,B:5550`). Every link has the tree's keys.

1. Steady state: closed-loop short requests for `--seconds`, with the standby running, then with
   it stopped: requests/s each way (the standby's cost is one Peer message per heartbeat).
2. Failover: `--streams` streams (48 at a time); once 20 have finished the primary's host is cut
   off (`--fault cut`: its cable) or its root is killed (`kill`). Reported: how long from the
   fault until the standby is active, and to the first token the standby's tree served, and
   each stream's extra stall (its longest gap between tokens less the median longest gap of a
   fault-free run), p50/p99, and
   whether every stream completed with the fault-free run's text. A gap counts the wait for the
   first token too.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.netns import Bed, unavailable
from bench.procs import Child
from bench.metrics import percentile

PORT = 5550
NODES = ("node-1", "node-2", "node-3")


class Pair:
    """The primary, the standby and three nodes on their hosts, with keys."""

    def __init__(self, bed: Bed, keys: str, heartbeat: float):
        self.bed, self.keys, self.heartbeat = bed, keys, heartbeat
        self.primary = f"{bed.addr('root')}:{PORT}"
        self.standby = f"{bed.addr('standby')}:{PORT}"
        self.roots = f"{self.primary},{self.standby}"
        self.procs: dict[str, Child] = {}

    async def start(self, name: str, host: str, *args: str) -> Child:
        argv = self.bed.command(host, [sys.executable, "-m", "treechat.cli", *args,
                                       "--heartbeat", str(self.heartbeat), "--grace", "2",
                                       "--log-level", "WARNING", "--curve", self.keys])
        child = self.procs[name] = Child(name, argv)
        await child.start()
        return child

    async def __aenter__(self) -> "Pair":
        await self.start("root", "root", "root", "--host", self.bed.addr("root"),
                         "--port", str(PORT))
        await self.start("standby", "standby", "root", "--host", self.bed.addr("standby"),
                         "--port", str(PORT), "--standby-of", self.primary)
        for name in NODES:
            await self.start(name, name, "node", "--name", name, "--root", self.roots,
                             "--host", self.bed.addr(name), "--engine", "fake",
                             "--fake-delay", "0.02", "--max-slots", "16")
        return self

    async def __aexit__(self, *exc) -> None:
        for child in reversed(list(self.procs.values())):
            await child.stop()


async def client(pair: Pair):
    from broker.client import RootClient
    c = RootClient(pair.roots, name="bench", heartbeat=pair.heartbeat, curve=pair.keys)
    await c.start()
    deadline = time.monotonic() + 60
    while True:
        status = await c.status() if c.connected else None
        if status and {n["name"] for n in status["nodes"] if n["state"] == "alive"} >= set(NODES) \
                and len(status["root"]["children"]) == len(NODES):
            return c
        if time.monotonic() > deadline:
            raise RuntimeError("the tree never came up")
        await asyncio.sleep(0.2)


def prompt(i: int) -> str:
    return " ".join(f"s{i}w{j}" for j in range(16))


async def one(c, i: int, tokens: int) -> tuple[str, list[float], str | None]:
    """(text, the time it was sent then each chunk's arrival, error code)."""
    stream = c.submit({"prompt": prompt(i), "max_tokens": tokens, "ignore_eos": True})
    text, times = [], [time.monotonic()]
    async for ev in stream:
        if ev.kind == "delta" and ev.text:
            text.append(ev.text)
            times.append(time.monotonic())
        elif ev.kind == "error":
            return "".join(text), times, ev.code
    return "".join(text), times, None


async def streams(c, n: int, tokens: int, finished: list[int]) -> list:
    gate = asyncio.Semaphore(48)

    async def run(i):
        async with gate:
            out = await one(c, i, tokens)
            finished.append(i)
            return out
    return await asyncio.gather(*(run(i) for i in range(n)))


async def rate(c, seconds: float) -> float:
    """Closed-loop short requests, 32 at a time: requests/s."""
    done = 0
    end = time.monotonic() + seconds

    async def worker(w):
        nonlocal done
        while time.monotonic() < end:
            await one(c, w, 4)
            done += 1
    start = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(32)))
    return done / (time.monotonic() - start)


async def watch(pair: Pair):
    """A client of the standby alone: it answers status queries while passive."""
    from broker.client import RootClient
    w = RootClient(pair.standby, name="watch", heartbeat=pair.heartbeat, curve=pair.keys)
    await w.start()
    await w.wait_connected(3 * pair.heartbeat)
    return w


async def became_active(w, since: float) -> float | None:
    """Seconds from `since` until the standby says it is active (None: not within a minute)."""
    while time.monotonic() - since < 60:
        try:
            if (await w.status(1.0))["root"]["pair"]["state"] == "active":
                return time.monotonic() - since
        except TimeoutError:
            pass
        await asyncio.sleep(0.05)
    return None


def longest_gap(times: list[float]) -> float:
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


async def study(args, bed: Bed, keys: str) -> dict:
    async with Pair(bed, keys, args.heartbeat) as pair:
        c = await client(pair)
        with_standby = await rate(c, args.seconds)
        await pair.procs["standby"].stop()
        without = await rate(c, args.seconds)
        await pair.start("standby", "standby", "root", "--host", bed.addr("standby"),
                         "--port", str(PORT), "--standby-of", pair.primary)
        await asyncio.sleep(3 * args.heartbeat)  # it hears the primary and is passive
        clean = await streams(c, args.streams, args.tokens, [])
        base = statistics.median(longest_gap(t) for _, t, _ in clean)
        finished: list[int] = []
        watcher = await watch(pair)
        run = asyncio.create_task(streams(c, args.streams, args.tokens, finished))
        while len(finished) < 20:
            await asyncio.sleep(0.01)
        fault_at = time.monotonic()
        if args.fault == "cut":
            bed.cut("root")
        else:
            pair.procs["root"].proc.kill()
        active_after = await became_active(watcher, fault_at)
        watcher.close()
        faulty = await run
        moved = max(fault_at, c.switched_at)  # when the client went to the standby
        after = [t for _, times, _ in faulty for t in times[1:] if t > moved]
        stalls = [max(0.0, longest_gap(t) - base) for _, t, _ in faulty]
        same = sum(1 for (a, _, e), (b, _, _) in zip(faulty, clean) if a == b and e is None)
        served_by = c.roots[c.at]
        c.close()
        return {"served_by_after": "standby" if served_by == pair.standby else "primary",
                "heartbeat": args.heartbeat, "fault": args.fault, "streams": args.streams,
                "rps_with_standby": round(with_standby, 1), "rps_without": round(without, 1),
                "standby_cost": round(1 - with_standby / without, 3),
                "standby_active_after_s": round(active_after, 2) if active_after else None,
                "first_token_after_fault_s": round(min(after) - fault_at, 2) if after else None,
                "longest_gap_fault_free_s": round(base, 3),
                "stalled_streams": sum(1 for s in stalls if s > 0.5),
                "stall_p50_s": round(percentile(stalls, 50), 2),
                "stall_p99_s": round(percentile(stalls, 99), 2),
                "complete_and_identical": same}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.failover",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    p.add_argument("--heartbeat", type=float, default=1.0, help="the tree's (default 1.0)")
    p.add_argument("--fault", choices=("cut", "kill"), default="cut")
    p.add_argument("--seconds", type=float, default=10.0, help="each steady-state run")
    args = p.parse_args(argv)
    why = unavailable()
    if why:
        print(f"bench.failover: no network namespaces here: {why}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp, \
            Bed(["root", "standby", *NODES, "client"]) as bed:
        keys = str(Path(tmp, "keys"))
        subprocess.run([sys.executable, "-m", "treechat.cli", "keys", keys], check=True,
                       capture_output=True)  # every process shows the `client` key
        result = bed.call_in("client", lambda: asyncio.run(study(args, bed, keys)), timeout=600)
    for k, v in result.items():
        print(f"{k:28} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

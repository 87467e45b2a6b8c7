"""One benchmark run: warm-up, then the workload sent on its arrival schedule; the records back.

Runs in the `treechat bench` process, on its asyncio loop; the target's client does the I/O.
With --request-rate R, request i+1 is sent a gamma-distributed gap after request i (see
`bench.workload.arrival_gaps`); with --max-concurrency C a request that arrives while C are open
waits for one to finish, and its clock starts when it is actually sent (as in vLLM). The duration
runs from the first request sent to the last one finished; warm-up requests are not in it.
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass

from bench.clients import Target
from bench.metrics import Record
from bench.workload import Item, arrival_gaps


@dataclass
class RunResult:
    records: list[Record]
    t0: float  # perf_counter when the first request was sent
    duration: float
    warmup_failed: int = 0


def progress_bar(total: int, enabled: bool, desc: str):
    """tqdm on stderr when installed, else a one-line counter."""
    if not enabled:
        return _Counter(total, None, desc)
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total, sys.stderr, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, unit="req", leave=False)


class _Counter:
    def __init__(self, total: int, out, desc: str):
        self.total, self.out, self.desc, self.n = total, out, desc, 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.out is not None:
            self.out.write(f"\r{self.desc}: {self.n}/{self.total}")
            self.out.flush()

    def close(self) -> None:
        if self.out is not None:
            self.out.write("\n")


async def run(target: Target, items: list[Item], warmup: list[Item], *, rate: float = float("inf"),
              burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
              progress: bool = True, desc: str = "bench") -> RunResult:
    if max_concurrency is not None and max_concurrency < 1:
        raise ValueError("--max-concurrency must be at least 1")
    gaps = arrival_gaps(len(items), rate, burstiness, seed)
    limit = asyncio.Semaphore(max_concurrency or len(items) + len(warmup) or 1)

    async def send(item: Item, bar) -> Record:
        async with limit:
            rec = await target.send(item, Record(index=item.index))
        bar.update(1)
        return rec

    warmup_failed = 0
    if warmup:
        bar = progress_bar(len(warmup), False, "warm-up")
        done = await asyncio.gather(*(send(item, bar) for item in warmup))
        warmup_failed = sum(1 for r in done if not r.ok)

    bar = progress_bar(len(items), progress, desc)
    tasks = []
    t0 = time.perf_counter()
    try:
        for item, gap in zip(items, gaps):
            tasks.append(asyncio.create_task(send(item, bar)))
            if gap:
                await asyncio.sleep(gap)
        records = list(await asyncio.gather(*tasks))
    finally:
        bar.close()
    end = max((r.end for r in records if r.end is not None), default=t0)
    return RunResult(records, t0, end - t0, warmup_failed)

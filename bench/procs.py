"""Child processes of the bench: free ports, and a process started and awaited by its READY line.

Used by `--compare` and the study scripts (overhead, scaling, routing, peer). A `Child` runs one
command in its own session (so a stop reaches only what this bench started), reads its stdout
for the `TREECHAT-READY {json}` line of `treechat.process` (or a caller-given marker), keeps the
last lines for error messages, and is stopped with SIGTERM (SIGKILL after a grace period).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import orjson

from treechat.process import READY


class Child:
    """`async with Child("root", argv) as c:` waits for READY (or a line starting with `marker`;
    None: no wait); c.info is the READY line's JSON."""

    def __init__(self, name: str, argv: list[str], *, marker: str | None = READY,
                 timeout: float = 120.0, env: dict | None = None):
        self.name, self.argv, self.marker, self.timeout = name, argv, marker, timeout
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        self.lines: list[str] = []
        self.info: dict = {}
        self.proc: asyncio.subprocess.Process | None = None
        self._ready = asyncio.Event()

    @classmethod
    def treechat(cls, name: str, *args: str, **kw) -> "Child":
        return cls(name, [sys.executable, "-m", "treechat.cli", *args], **kw)

    async def __aenter__(self) -> "Child":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL, env=self.env, start_new_session=True)
        self._reader = asyncio.create_task(self.read_output())
        if self.marker is None:
            return  # the caller checks readiness its own way (an HTTP health check)
        ready = asyncio.create_task(self._ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        done, _ = await asyncio.wait([ready, exited], timeout=self.timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        exited.cancel()
        if not self._ready.is_set():
            await self.stop()
            why = "exited" if self.proc.returncode is not None else f"not ready in {self.timeout:.0f}s"
            raise RuntimeError(f"{self.name} {why} (code {self.proc.returncode}):\n{self.tail()}")

    async def read_output(self) -> None:
        async for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.lines = self.lines[-200:] + [line]
            if self.marker is not None and line.startswith(self.marker) and not self._ready.is_set():
                if self.marker == READY:
                    self.info = orjson.loads(line[len(READY):])
                self._ready.set()

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.lines[-n:])

    async def stop(self, grace: float = 60.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace)
        except asyncio.TimeoutError:
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: only what we started
            await self.proc.wait()

"""Prometheus metrics of one TCP gateway process: `treechat gateway tcp --metrics-port P`.

Process: `treechat gateway tcp`. The request metrics and their names are the HTTP gateway's
(`gateways/http/metrics.py`: running, waiting, TTFT, inter-token latency, end-to-end latency,
tokens, finishes by reason, errors by code, aborted), measured here per request by wrapping the
gateway's `RootClient` (`MeteredClient`: every Stream it returns feeds a Tracker); per-node
gauges are copied from the root's status every few seconds, as the HTTP gateway does. Added:

    treechat:tcp_connections                  client connections open
    treechat:tcp_sessions                     sessions held (attached, or waiting to be resumed)
    treechat:root_link_up                     1 while the root answers within 3 heartbeats
    treechat:root_heartbeats_missed_total     heartbeat intervals without a word from the root

Served by `treechat.metrics.Listener` on the gateway's `--host`.
"""

from __future__ import annotations

import asyncio
import time

from prometheus_client import Counter, Gauge

from broker.client import Event, RootClient, Stream
from gateways.http.metrics import Metrics, Tracker
from treechat.metrics import Listener

STATUS_EVERY = 2.0  # seconds between copies of the root's status into the node gauges


class TcpMetrics(Metrics):
    def __init__(self):
        super().__init__()
        r = self.registry
        self.connections = Gauge("treechat:tcp_connections", "Client connections open.",
                                 registry=r)
        self.sessions = Gauge("treechat:tcp_sessions",
                              "Sessions held (attached, or waiting to be resumed).", registry=r)
        self.root_up = Gauge("treechat:root_link_up", "1 while the root answers in time.",
                             registry=r)
        self.root_missed = Counter("treechat:root_heartbeats_missed",
                                   "Heartbeat intervals that passed without a word from the root.",
                                   registry=r)
        self.listener: Listener | None = None
        self.tasks: list[asyncio.Task] = []

    def start(self, gateway, client: RootClient, host: str, port: int) -> None:
        """Serve on host:port (Fatal when taken); sample the gateway on the running loop."""
        self.listener = Listener(self.registry, host, port)
        self.connections.set_function(lambda: len(gateway.connections))
        self.sessions.set_function(lambda: len(gateway.sessions.by_token))
        self.root_up.set_function(lambda: int(client.connected))
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self.watch_root(client)),
                      loop.create_task(self.copy_status(client))]

    def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        if self.listener is not None:
            self.listener.close()

    async def watch_root(self, client: RootClient) -> None:
        while True:
            await asyncio.sleep(client.heartbeat)
            if time.monotonic() - client.root_seen > 1.5 * client.heartbeat:
                self.root_missed.inc()

    async def copy_status(self, client: RootClient) -> None:
        while True:
            try:
                self.update_tree(await client.status(timeout=STATUS_EVERY))
            except TimeoutError:
                pass  # the root is away: root_link_up says so; the last numbers stay
            await asyncio.sleep(STATUS_EVERY)


class MeteredClient:
    """The gateway's RootClient as the sessions see it: each submitted Stream is measured."""

    def __init__(self, client: RootClient, metrics: Metrics):
        self.client, self.metrics = client, metrics

    def submit(self, request: dict, timeout: float | None = None) -> "MeteredStream":
        return MeteredStream(self.client.submit(request, timeout=timeout), self.metrics.track())


class MeteredStream:
    """A broker Stream (iterate it, cancel it) whose events also feed a Tracker."""

    def __init__(self, stream: Stream, tracker: Tracker):
        self.stream, self.tracker = stream, tracker

    @property
    def finished(self) -> bool:
        return self.stream.finished

    def cancel(self) -> None:
        if not self.stream.finished:  # its final event may never be read: count it now
            self.tracker.done("cancelled", 0, 0, client_gone=True)
        self.stream.cancel()

    def __aiter__(self) -> "MeteredStream":
        return self

    async def __anext__(self) -> Event:
        ev = await self.stream.__anext__()
        if ev.kind == "delta" and ev.text:
            self.tracker.delta(ev.tokens)
        elif ev.kind == "done":
            self.tracker.done(ev.finish_reason, ev.prompt_tokens, ev.completion_tokens, False)
        elif ev.kind == "error":
            self.tracker.error(ev.code or "error")
        return ev

"""`RelayHandler`: one HTTP request relayed to the tree as one request per choice, events back.

The handler owns its `broker.client.Stream`s (the per-request queues the root client's reader
fills), one per choice (`n`, and each prompt of a completions batch). `open_streams` submits them
all and waits for the root's answer to each (accepted, or a refusal such as `overloaded` that
becomes an HTTP error before any byte is sent, the others cancelled); an `X-Session-Id` header
names every request's session, outranking the body's names (gateways/sessions.py), and the
session the requests run under comes back in the response's `X-Session-Id`. `next_event` yields
(choice index, event) until every stream ended. A closed client connection cancels every request
down the tree, and the handler still reads the streams to their final events so the metrics stay
right. SIGTERM waits for the handlers registered in `Gateway.active`.

One stream (the usual case) is read directly with `Stream.next`, which takes what is already
queued without suspending, so a batch of deltas the root sent together is written in one go and
flushed once. Several streams are merged through one queue, a small task per stream.
"""

from __future__ import annotations

import asyncio

from tornado.iostream import StreamClosedError

from broker.client import Event, Stream
from gateways import sessions
from gateways.http.base import BodyHandler
from gateways.http.errors import ApiError, from_core, root_unreachable
from gateways.http.metrics import Tracker

ACCEPT_WAIT = 10.0  # seconds for the root to accept or refuse a submit before we call it lost
DRAIN_WAIT = 10.0  # seconds to wait for a cancelled request's final event


class RelayHandler(BodyHandler):
    streams: list[Stream] = []
    trackers: list[Tracker] = []
    merged: asyncio.Queue | None = None
    open = 0  # streams that have not ended yet
    client_gone = False

    @property
    def stream(self) -> Stream | None:
        return self.streams[0] if self.streams else None

    async def open_streams(self, requests: list[dict], timeout: float | None) -> None:
        """Submit every request; return once the root accepted them all, or raise ApiError."""
        client = self.gw.client
        if not (client.connected or client.failing_over):  # a failover: it waits for the standby
            raise root_unreachable()
        deadline = timeout or self.gw.cfg.request_timeout
        session = self.session_header() or requests[0].get("session")
        if session is not None:
            for request in requests:
                request["session"] = session
            self.set_header(sessions.HEADER, session)
        self.trackers = [self.gw.metrics.track() for _ in requests]
        self.streams = [client.submit(r, timeout=deadline) for r in requests]
        self.open = len(self.streams)
        self.gw.enter(self)
        firsts = await asyncio.gather(*(s.next(ACCEPT_WAIT) for s in self.streams))
        failure = None
        for i, first in enumerate(firsts):
            if first is None:
                self.streams[i].cancel()
                self.trackers[i].error("root_lost")
                failure = failure or root_unreachable()
            elif first.kind == "error":
                self.open -= 1
                failure = failure or self.failed(first, i)
        if failure is not None:
            self.cancel_all()
            raise failure
        if len(self.streams) > 1:
            self.merged = asyncio.Queue()
            loop = asyncio.get_running_loop()
            self.pumps = [loop.create_task(self._pump(i, s)) for i, s in enumerate(self.streams)]

    def session_header(self) -> str | None:
        """The session the client's `X-Session-Id` header names, if it sent one."""
        return sessions.named(self.request.headers.get(sessions.HEADER))

    async def _pump(self, index: int, stream: Stream) -> None:
        async for ev in stream:
            self.merged.put_nowait((index, ev))

    def failed(self, ev: Event, index: int = 0) -> ApiError:
        self.trackers[index].error(ev.code or "error")
        return from_core(ev.code, ev.message, ev.retry_after)

    async def next_event(self, timeout: float | None) -> tuple[int, Event] | None:
        """The next (choice, event); None after `timeout` seconds of quiet. After the client
        left, at most DRAIN_WAIT for the cancelled finals."""
        if self.client_gone:
            got = await self.receive(DRAIN_WAIT)
            if got is None:  # the root never confirmed the cancel; stop waiting on it
                return -1, Event("error", code="client_gone", message="the client went away")
        else:
            got = await self.receive(timeout)
        if got is not None and got[1].final:
            self.open -= 1
        return got

    async def receive(self, timeout: float | None) -> tuple[int, Event] | None:
        if self.merged is None:
            ev = await self.streams[0].next(timeout)
            return None if ev is None else (0, ev)
        if not self.merged.empty() or timeout is None:
            return await self.merged.get()
        try:
            async with asyncio.timeout(timeout):
                return await self.merged.get()
        except TimeoutError:
            return None

    def delta(self, index: int, ev: Event) -> None:
        self.trackers[index].delta(ev.tokens)

    def finished(self, index: int, ev: Event) -> None:
        self.trackers[index].done(ev.finish_reason or "stop", ev.prompt_tokens,
                                  ev.completion_tokens, self.client_gone)

    async def send(self) -> bool:
        """Flush what was written; False (and the requests cancelled) when the client is gone."""
        if self.client_gone:
            return False
        try:
            await self.flush()
            return True
        except StreamClosedError:
            self.on_connection_close()
            return False

    def cancel_all(self) -> None:
        for stream in self.streams:
            if not stream.finished:
                stream.cancel()

    def on_connection_close(self) -> None:
        self.client_gone = True
        self.cancel_all()

    def on_finish(self) -> None:
        self.release()

    def release(self) -> None:
        self.cancel_all()  # e.g. an unexpected error mid-way: never leave work in the tree
        for tracker in self.trackers:
            tracker.error("unfinished")  # no-op when the request already ended
        self.gw.leave(self)

"""`RelayHandler`: one HTTP request relayed to the tree as one request, and its events back.

The handler owns one `broker.client.Stream` (the per-request queue the root client's reader fills)
and consumes it: `open_stream` submits and waits for the root's answer (accepted, or a refusal
such as `overloaded` that becomes an HTTP error before any byte is sent); `collect` gathers a
whole answer. A closed client connection cancels the request down the tree, and the handler still
reads the stream to its final event so the metrics stay right. SIGTERM waits for the handlers
registered in `Gateway.active`.

Events come from `Stream.next`, which takes what is already queued without suspending, so a batch
of deltas the root sent together is written in one go and flushed once.
"""

from __future__ import annotations

from tornado.iostream import StreamClosedError

from broker.client import Event, Stream
from gateways.http.base import BodyHandler
from gateways.http.errors import ApiError, from_core, root_unreachable
from gateways.http.metrics import Tracker

ACCEPT_WAIT = 10.0  # seconds for the root to accept or refuse a submit before we call it lost
DRAIN_WAIT = 10.0  # seconds to wait for a cancelled request's final event


class RelayHandler(BodyHandler):
    stream: Stream | None = None
    tracker: Tracker | None = None
    client_gone = False

    async def open_stream(self, request: dict, timeout: float | None) -> Stream:
        """Submit `request`; return its stream once the root accepted it, or raise ApiError."""
        client = self.gw.client
        if not client.connected:
            raise root_unreachable()
        self.tracker = self.gw.metrics.track()
        self.stream = client.submit(request, timeout=timeout or self.gw.cfg.request_timeout)
        self.gw.enter(self)
        first = await self.receive(ACCEPT_WAIT)
        if first is None:
            self.stream.cancel()
            self.tracker.error("root_lost")
            raise root_unreachable()
        if first.kind == "error":
            raise self.failed(first)
        return self.stream

    def failed(self, ev: Event) -> ApiError:
        self.tracker.error(ev.code or "error")
        return from_core(ev.code, ev.message, ev.retry_after)

    async def collect(self) -> tuple[str, Event]:
        """The whole answer and its final "done" event; an "error" event raises ApiError."""
        parts = []
        while True:
            ev = await self.next_event(None)
            if ev.kind == "delta":
                parts.append(ev.text)
                self.tracker.delta(ev.tokens)
            elif ev.kind == "done":
                self.finished(ev)
                return "".join(parts), ev
            elif ev.kind == "error":
                raise self.failed(ev)

    async def next_event(self, timeout: float | None) -> Event | None:
        """The next event; after the client left, at most DRAIN_WAIT for the cancelled final."""
        if self.client_gone:
            ev = await self.receive(DRAIN_WAIT)
            if ev is None:  # the root never confirmed the cancel; stop waiting on it
                return Event("error", code="client_gone", message="the client went away")
            return ev
        return await self.receive(timeout)

    async def receive(self, timeout: float | None) -> Event | None:
        """The stream's next event, or None after `timeout` seconds."""
        return await self.stream.next(timeout)

    def finished(self, ev: Event) -> None:
        self.tracker.done(ev.finish_reason or "stop", ev.prompt_tokens, ev.completion_tokens,
                          self.client_gone)

    async def send(self) -> bool:
        """Flush what was written; False (and the request cancelled) when the client is gone."""
        if self.client_gone:
            return False
        try:
            await self.flush()
            return True
        except StreamClosedError:
            self.on_connection_close()
            return False

    def on_connection_close(self) -> None:
        self.client_gone = True
        if self.stream is not None and not self.stream.finished:
            self.stream.cancel()

    def on_finish(self) -> None:
        self.release()

    def release(self) -> None:
        if self.stream is not None and not self.stream.finished:
            self.stream.cancel()  # e.g. an unexpected error mid-way: never leave work in the tree
        if self.tracker is not None:
            self.tracker.error("unfinished")  # no-op when the request already ended
        self.gw.leave(self)

"""The root's client, for gateways, the CLI and the bench: submit, stream, cancel, ask status.

One DEALER to the root's front socket, read on the event loop by a `Channel`. Each submitted
request gets a `Stream`: an asyncio.Queue the reader fills, consumed as an async iterator of
`Event`s by the one handler that owns the request:

    async for ev in client.submit({"messages": [...], "max_tokens": 64}):
        if ev.kind == "delta": ...          # ev.text, ev.tokens
    # the last event is "done" (ev.finish_reason, ev.prompt_tokens, ev.completion_tokens)
    # or "error" (ev.code, ev.message, ev.retry_after)

If the root stops answering (three missed heartbeats) or comes back as a new instance, every open
stream ends with a `root_lost` error at once: no client waits on a request nobody holds.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import zmq

from broker import protocol as p
from broker import security
from broker.sockets import Channel, make_socket

log = logging.getLogger("treechat.client")


@dataclass(slots=True)
class Event:
    kind: str  # accepted | delta | done | error
    text: str = ""
    tokens: int = 0
    request_id: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    code: str | None = None
    message: str | None = None
    retry_after: float | None = None
    logprobs: list | None = None  # per token: [text, logprob, [[alt, logprob], ...]] (delta only)
    cached_tokens: int = 0  # prompt tokens the engine reused from its prefix cache (done only)

    @property
    def final(self) -> bool:
        return self.kind in ("done", "error")


class Stream:
    """One request's events, in order; ends after its final event."""

    def __init__(self, client: "RootClient", ref: int):
        self.client = client
        self.ref = ref
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.request_id: int | None = None
        self.finished = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self.finished and self.queue.empty():
            raise StopAsyncIteration
        ev = await self.queue.get()
        if ev.kind == "accepted":
            self.request_id = ev.request_id
        return ev

    async def next(self, timeout: float | None) -> Event | None:
        """The next event, or None after `timeout` seconds (for keep-alive comments). An event
        already queued is taken at once: no task and no extra loop turn per event."""
        if not self.queue.empty() or self.finished or timeout is None:
            return await self.__anext__()
        try:
            async with asyncio.timeout(timeout):  # a cancelled Queue.get loses no event
                return await self.__anext__()
        except TimeoutError:
            return None

    async def collect(self) -> tuple[str, Event]:
        """Wait for the whole answer: (text, final event)."""
        parts = []
        async for ev in self:
            if ev.kind == "delta":
                parts.append(ev.text)
            elif ev.final:
                return "".join(parts), ev
        raise RuntimeError("stream ended without a final event")

    def cancel(self) -> None:
        """Stop the request down the tree; the stream still ends with its final event."""
        if not self.finished:
            self.client.cancel(self.ref)

    def _put(self, ev: Event) -> None:
        if ev.final:
            self.finished = True
        self.queue.put_nowait(ev)


class RootClient:
    def __init__(self, root: str, name: str, heartbeat: float = 1.0, misses: int = 3,
                 curve: str | None = None):
        host, _, port = root.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"the root address must be HOST:PORT, not '{root}'")
        self.endpoint = f"tcp://{host}:{port}"
        self.curve = security.load(curve)
        self.name = name
        self.heartbeat = heartbeat
        self.misses = misses
        self.dead_after = heartbeat * misses
        self.streams: dict[int, Stream] = {}
        self.refs = itertools.count(1)
        self.epoch = 0
        self.root_seen = 0.0
        self._queries: dict[int, asyncio.Future] = {}
        self._found: asyncio.Future | None = None
        self._beat: asyncio.Task | None = None

    async def start(self) -> None:
        self.ch = Channel(make_socket(zmq.Context.instance(), zmq.DEALER, curve=self.curve),
                          self.on_message, f"client:{self.name}")
        self.ch.sock.connect(self.endpoint)
        self.ch.send(p.Hello(name=self.name))
        self._beat = asyncio.get_running_loop().create_task(self.heartbeat_loop())

    async def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.connected and time.monotonic() < deadline:
            self.ch.send(p.Hello(name=self.name))
            await asyncio.sleep(0.05)
        return self.connected

    def close(self) -> None:
        if self._beat is not None:
            self._beat.cancel()
        self.ch.close()

    @property
    def connected(self) -> bool:
        return self.root_seen > 0 and time.monotonic() - self.root_seen < self.dead_after

    # --- requests -------------------------------------------------------------------------------

    def submit(self, request: dict, timeout: float | None = None) -> Stream:
        ref = next(self.refs)
        stream = Stream(self, ref)
        if self.ch.send(p.Submit(ref=ref, request=request, timeout=timeout)):
            self.streams[ref] = stream
        else:
            stream._put(Event("error", code=p.ErrorCode.ROOT_LOST, retry_after=1.0,
                              message="the root is not reachable"))
        return stream

    def cancel(self, ref: int) -> None:
        if ref in self.streams:
            self.ch.send(p.Cancel(id=ref))

    async def status(self, timeout: float = 3.0) -> dict:
        ref = next(self.refs)
        fut = self._queries[ref] = asyncio.get_running_loop().create_future()
        try:
            return await self._ask(p.StatusQuery(ref=ref), fut, timeout)
        finally:
            self._queries.pop(ref, None)

    async def lookup(self, name: str | None = None, timeout: float = 3.0) -> list[dict]:
        self._found = asyncio.get_running_loop().create_future()
        return await self._ask(p.Lookup(name=name), self._found, timeout)

    async def _ask(self, msg: p.Message, answer: asyncio.Future, timeout: float):
        """Send a query until it is answered: a query sent while the connection to the root is
        still (re)forming is dropped (IMMEDIATE), and asking twice is harmless."""
        deadline = time.monotonic() + timeout
        while not answer.done():
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the root at {self.endpoint} did not answer in {timeout:.0f}s")
            self.ch.send(msg)
            await asyncio.wait([answer], timeout=min(0.25, left))
        return answer.result()

    # --- from the root --------------------------------------------------------------------------

    def on_message(self, _ident, msg: p.Message) -> None:
        self.root_seen = time.monotonic()
        if isinstance(msg, p.Deltas):
            for ref, request_id in msg.accepted:
                stream = self.streams.get(ref)
                if stream is not None:
                    stream._put(Event("accepted", request_id=request_id))
            for item in msg.items:
                stream = self.streams.get(item[0])
                if stream is not None:
                    stream._put(Event("delta", text=item[1], tokens=item[2],
                                      logprobs=item[3] if len(item) > 3 else None))
            for ref, reason, prompt_tokens, completion_tokens, *cached in msg.done:
                stream = self.streams.pop(ref, None)
                if stream is not None:
                    stream._put(Event("done", finish_reason=reason, prompt_tokens=prompt_tokens,
                                      completion_tokens=completion_tokens,
                                      cached_tokens=cached[0] if cached else 0))
        elif isinstance(msg, p.Done):
            stream = self.streams.pop(msg.id, None)
            if stream is not None:
                stream._put(Event("done", finish_reason=msg.finish_reason,
                                  prompt_tokens=msg.prompt_tokens,
                                  completion_tokens=msg.completion_tokens))
        elif isinstance(msg, p.Error):
            stream = self.streams.pop(msg.id, None)
            if stream is not None:
                stream._put(Event("error", code=msg.code, message=msg.message,
                                  retry_after=msg.retry_after))
        elif isinstance(msg, p.Heartbeat):
            if self.epoch and msg.epoch != self.epoch:
                self.lose_root("the root restarted")
            self.epoch = msg.epoch
            if msg.interval > 0:  # follow the root's pace: beat as often as it expects,
                self.heartbeat = min(self.heartbeat, msg.interval)  # and judge it by its own
                self.dead_after = msg.interval * self.misses
        elif isinstance(msg, p.StatusReply):
            fut = self._queries.get(msg.ref)
            if fut is not None and not fut.done():
                fut.set_result(msg.tree)
        elif isinstance(msg, p.Found):
            if self._found is not None and not self._found.done():
                self._found.set_result(msg.entries)

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            self.ch.send(p.Heartbeat(sender=self.name))
            if self.root_seen and time.monotonic() - self.root_seen > self.dead_after:
                self.epoch = 0  # whoever answers next is the root, not a restarted stranger
                if self.streams:
                    self.lose_root("the root stopped answering")

    def lose_root(self, why: str) -> None:
        log.warning("%s; failing %d open requests", why, len(self.streams))
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            stream._put(Event("error", code=p.ErrorCode.ROOT_LOST, retry_after=1.0,
                              message=f"{why} before the request finished; please retry"))

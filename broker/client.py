"""The root's client, for gateways, the CLI and the bench: submit, stream, cancel, ask status.

One DEALER to the root's front socket, read on the event loop by a `Channel`. Each submitted
request gets a `Stream`: an asyncio.Queue the reader fills, consumed as an async iterator of
`Event`s by the one handler that owns the request:

    async for ev in client.submit({"messages": [...], "max_tokens": 64}):
        if ev.kind == "delta": ...          # ev.text, ev.tokens
    # the last event is "done" (ev.finish_reason, ev.prompt_tokens, ev.completion_tokens)
    # or "error" (ev.code, ev.message, ev.retry_after)

Lossless through a root restart: each open stream keeps the token ids and text it delivered.
When the connection to the root closes (the socket's monitor says so), the root goes silent for
three heartbeats, or it says it does not know us (Reregister), the streams stay open; as soon as a
root answers again (a restarted one, or the same one) every unfinished request is resubmitted with
those tokens, the root continues after them, and the consumer sees one whole answer. Only when no
root answers for `resubmit_window` seconds do the open streams end with `root_lost`.

A primary root and its standby (broker/pair.py): `root` may list both, "A:5550,B:5550". The
client talks to one at a time. When it loses that one it moves to the next, saying so (`lost` in
Hello), which is what lets a standby take over; a root that answers `Standby` is left for the
one it names. Either way the open streams are resubmitted where a root answers.

Keys: `curve` is a `treechat keys` folder (`member` names whose key to show). Left out, the client
uses the keys of the `treechat up` serving that address on this machine, if one runs
(`broker.security.running_tree`); "" means none. A refused handshake is kept in `refused`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass

import zmq

from broker import limits
from broker import protocol as p
from broker import security
from broker.sockets import Channel, make_socket, refusal

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
    """One request's events, in order; ends after its final event. It remembers what it
    delivered (`ids`, `parts`) so the request can be resubmitted after a root restart."""

    def __init__(self, client: "RootClient", ref: int, request: dict, timeout: float | None):
        self.client = client
        self.ref = ref
        self.request = request
        self.timeout = timeout
        self.started = time.monotonic()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.request_id: int | None = None
        self.finished = False
        self.accepted = False  # the first admission was passed on; a resubmit's is not
        self.cancelled = False
        self.ids: list[int] = []
        self.parts: list[str] = []

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
            self.cancelled = True
            self.client.cancel(self.ref)

    def _put(self, ev: Event) -> None:
        if ev.final:
            self.finished = True
        self.queue.put_nowait(ev)


def roots(root: str) -> list[str]:
    """`HOST:PORT`, or a primary's and its standby's: `A:5550,B:5550`."""
    found = [r.strip() for r in root.split(",") if r.strip()]
    for r in found:
        host, _, port = r.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"the root address must be HOST:PORT (or HOST:PORT,HOST:PORT for a "
                             f"root and its standby), not '{root}'")
    if not found:
        raise ValueError("the root address is empty")
    return found


def too_large(msg: p.Submit, stream: Stream) -> bool:
    """A Submit larger than the root reads (it would drop our connection): the stream ends with
    `too_long` instead."""
    size = len(msg.frames()[1])
    if size <= limits.SUBMIT:
        return False
    stream._put(Event("error", code=p.ErrorCode.TOO_LONG, message=(
        f"the request is {limits.show(size)} as the tree carries it, more than its limit of "
        f"{limits.show(limits.SUBMIT)} (broker/limits.py)")))
    return True


class RootClient:
    def __init__(self, root: str, name: str, heartbeat: float = 1.0, misses: int = 3,
                 curve: str | None = None, member: str | None = None,
                 resubmit_window: float = 30.0):
        self.roots = roots(root)
        self.at = 0  # the root talked to now
        self.left: str | None = None  # the root we lost and left for the other
        self.endpoint = f"tcp://{self.roots[0]}"
        self.switched_at = 0.0
        if curve is None and (found := security.running_tree(self.roots[0])) is not None:
            curve, member = str(found), "cli"  # the keys `treechat up` made for that tree
        self.curve = security.load(curve, member or security.CLIENT)
        self.refused: str | None = None
        self.standby_reason: str | None = None  # a lone root that is a passive standby says why
        self.resubmit_window = resubmit_window
        self.lost_at: float | None = None  # when the root was lost (None: it answers)
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
        self.ch: Channel | None = None  # to the root talked to now (connect)

    async def start(self) -> None:
        self.connect(0)
        self._beat = asyncio.get_running_loop().create_task(self.heartbeat_loop())

    def connect(self, at: int) -> None:
        """Talk to root `at` of the list from now on (a fresh socket: a new identity there)."""
        if self.ch is not None:
            self.ch.close()
        self.at, self.switched_at, self.root_seen = at, time.monotonic(), 0.0
        self.standby_since = 0.0  # when this root first said it is the standby (0: it has not)
        self.endpoint = f"tcp://{self.roots[at]}"
        self.ch = Channel(make_socket(zmq.Context.instance(), zmq.DEALER, curve=self.curve,
                                      max_message=limits.FROM_ROOT),
                          self.on_message, f"client:{self.name}", on_event=self.on_event)
        self.ch.sock.connect(self.endpoint)
        self.ch.send(self.hello())

    def hello(self) -> p.Hello:
        return p.Hello(name=self.name, lost=self.lost_at is not None)

    def move(self, why: str, to: str | None = None) -> None:
        """Go to root `to` of the list (default: the next one)."""
        self.left = self.roots[self.at] if self.lost_at is not None else None
        at = self.roots.index(to) if to in self.roots else (self.at + 1) % len(self.roots)
        log.warning("%s; talking to the root at %s now", why, self.roots[at])
        self.connect(at)

    async def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not (self.connected or self.refused or self.standby_reason) \
                and time.monotonic() < deadline:
            self.ch.send(self.hello())
            await asyncio.sleep(0.05)
        return self.connected

    def close(self) -> None:
        """Say goodbye (the root forgets us quietly) and close."""
        if self._beat is not None:
            self._beat.cancel()
        self.ch.send(p.Bye(name=self.name))
        self.ch.close(linger=200)

    @property
    def connected(self) -> bool:
        return self.root_seen > 0 and time.monotonic() - self.root_seen < self.dead_after

    @property
    def failing_over(self) -> bool:
        """We lost our root and are on our way to the other one: a request submitted now waits
        for it (a gateway need not refuse it)."""
        return len(self.roots) > 1 and self.lost_at is not None

    # --- requests -------------------------------------------------------------------------------

    def submit(self, request: dict, timeout: float | None = None) -> Stream:
        ref = next(self.refs)
        stream = Stream(self, ref, request, timeout)
        msg = p.Submit(ref=ref, request=request, timeout=timeout)
        if too_large(msg, stream):
            return stream
        if self.ch.send(msg):
            self.streams[ref] = stream
        elif self.epoch:  # a root answered before: it is away, or we are moving to the other
            self.streams[ref] = stream  # sent when a root answers again
        else:
            stream._put(Event("error", code=p.ErrorCode.ROOT_LOST, retry_after=1.0,
                              message="the root is not reachable"))
        return stream

    def cancel(self, ref: int) -> None:
        if ref in self.streams and not self.ch.send(p.Cancel(id=ref)) and self.lost_at:
            stream = self.streams.pop(ref)  # nobody holds it now: it ends here
            stream._put(Event("done", finish_reason="cancelled", completion_tokens=len(stream.ids)))

    async def status(self, timeout: float = 3.0) -> dict:
        ref = next(self.refs)
        fut = self._queries[ref] = asyncio.get_running_loop().create_future()
        try:
            return await self._ask(p.StatusQuery(ref=ref), fut, timeout)
        finally:
            self._queries.pop(ref, None)

    async def keep(self, op: str, key: str, value: dict | None = None,
                   timeout: float = 3.0) -> tuple[bool, dict | None]:
        """The root's store of kept responses (broker/store.py): op "put", "get" or "delete";
        (whether the key was there, its value for "get")."""
        ref = next(self.refs)
        msg = p.Keep(ref=ref, op=op, key=key, value=value)
        if (size := len(msg.frames()[1])) > limits.KEEP:
            log.warning("not kept: %s is %s, more than the root takes (%s)", key, limits.show(size),
                        limits.show(limits.KEEP))
            return False, None
        fut = self._queries[ref] = asyncio.get_running_loop().create_future()
        try:
            return await self._ask(msg, fut, timeout)
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
        if isinstance(msg, p.Standby):
            return self.on_standby(msg)
        self.root_seen = time.monotonic()
        self.standby_reason = None
        if isinstance(msg, p.Deltas):
            streams = self.streams
            for ref, request_id in msg.accepted:
                stream = streams.get(ref)
                if stream is not None and not stream.accepted:
                    stream.accepted = True
                    stream._put(Event("accepted", request_id=request_id))
            for item in msg.items:
                stream = streams.get(item[0])
                if stream is not None:
                    if len(item) > 4:
                        stream.ids.extend(item[4])
                    stream.parts.append(item[1])
                    stream._put(Event("delta", text=item[1], tokens=item[2],
                                      logprobs=item[3] if len(item) > 3 else None))
            for ref, reason, prompt_tokens, completion_tokens, *cached in msg.done:
                stream = streams.pop(ref, None)
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
            if (self.epoch and msg.epoch != self.epoch) or self.lost_at is not None:
                self.resubmit("the root restarted" if self.lost_at is None else "the root is back")
            self.epoch = msg.epoch
            if msg.interval > 0:  # follow the root's pace: beat as often as it expects,
                self.heartbeat = min(self.heartbeat, msg.interval)  # and judge it by its own
                self.dead_after = msg.interval * self.misses
        elif isinstance(msg, p.Reregister):  # the root dropped us (we were silent): start over
            self.ch.send(self.hello())
            self.resubmit("the root had dropped this gateway")
        elif isinstance(msg, p.StatusReply):
            fut = self._queries.get(msg.ref)
            if fut is not None and not fut.done():
                fut.set_result(msg.tree)
        elif isinstance(msg, p.Kept):
            fut = self._queries.get(msg.ref)
            if fut is not None and not fut.done():
                fut.set_result((msg.found, msg.value))
        elif isinstance(msg, p.Found):
            if self._found is not None and not self._found.done():
                self._found.set_result(msg.entries)

    def on_event(self, event: int, value: int) -> None:
        why = refusal(event, value, keyed=self.curve is not None)
        if why is not None and self.curve is None:
            why += f" ({security.where_keys_are(self.roots[self.at])})"
        if why is not None and not self.refused:
            self.refused = why
            log.error("the root at %s refused this client: %s", self.endpoint, why)
        elif event == zmq.EVENT_DISCONNECTED:
            self.lose_root("the connection to the root closed")
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self.refused = None
            self.ch.send(self.hello())  # a new connection: the root may not know us

    def on_standby(self, msg: p.Standby) -> None:
        """This root is a passive standby. With another root to try, go there (at once when it
        names the active one); alone, say why to whatever waits."""
        if len(self.roots) > 1:
            if msg.active in self.roots and self.roots.index(msg.active) != self.at \
                    and msg.active != self.left:
                return self.move(f"the root at {self.roots[self.at]} is the standby", msg.active)
            # It names the one we lost (or none): keep saying so (the heartbeat loop) until it
            # serves, which it does once that root has been silent there for `dead_after` too.
            self.standby_since = self.standby_since or time.monotonic()
            return
        if self.standby_reason != msg.reason:
            self.standby_reason = msg.reason
            log.error("the root at %s will not serve: %s", self.endpoint, msg.reason)
        for ref in [r for r, s in self.streams.items() if not s.accepted]:
            self.streams.pop(ref)._put(Event("error", code=p.ErrorCode.ROOT_LOST, retry_after=1.0,
                                             message=msg.reason))

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat)
            now = time.monotonic()
            # While the root is lost, introduce ourselves: a restarted one does not know us.
            self.ch.send(self.hello() if self.lost_at is not None
                         else p.Heartbeat(sender=self.name))
            if self.root_seen and now - self.root_seen > self.dead_after:
                self.lose_root("the root stopped answering")
            elif len(self.roots) > 1 and not self.connected and now - self.switched_at > \
                    self.dead_after * (2 if self.standby_since else 1):
                # Silent for dead_after, or a standby for twice that: it takes over within one
                # dead_after of the root we lost falling silent, so by then it will not.
                why = f"the root at {self.roots[self.at]} does not answer"
                if self.lost_at is None:
                    self.lose_root(why)  # which moves on to the other root
                else:
                    self.move(why)
            if self.lost_at is not None and now - self.lost_at > self.resubmit_window:
                self.fail_all(f"no root answered for {self.resubmit_window:.0f} s")

    # --- losing and finding the root ------------------------------------------------------------

    def lose_root(self, why: str) -> None:
        if self.lost_at is not None:
            return
        self.lost_at = time.monotonic()
        if self.streams:
            log.warning("%s; %d open request(s) wait for it (up to %.0f s)", why,
                        len(self.streams), self.resubmit_window)
        if len(self.roots) > 1:
            self.move(why)  # the other root: it takes over, since we lost this one

    def resubmit(self, why: str) -> None:
        """A root answers again: send every unfinished request with what it already delivered."""
        self.lost_at = None
        now = time.monotonic()
        for ref, stream in list(self.streams.items()):
            if stream.cancelled:
                del self.streams[ref]
                stream._put(Event("done", finish_reason="cancelled",
                                  completion_tokens=len(stream.ids)))
                continue
            timeout = stream.timeout
            if timeout is not None:
                timeout -= now - stream.started
                if timeout <= 0:
                    del self.streams[ref]
                    stream._put(Event("error", code=p.ErrorCode.TIMEOUT,
                                      message="the request passed its deadline"))
                    continue
            # A new ref: whatever the old submission still sends (a root that only stalled may
            # still hold it) matches no stream and is dropped, and it is cancelled there.
            self.ch.send(p.Cancel(id=ref))
            del self.streams[ref]
            stream.ref = next(self.refs)
            self.streams[stream.ref] = stream
            text = "".join(stream.parts)
            stream.parts = [text]
            msg = p.Submit(ref=stream.ref, request=stream.request, timeout=timeout,
                           resume_ids=stream.ids, resume_text=text, resubmit=stream.accepted)
            if too_large(msg, stream):
                del self.streams[stream.ref]
            else:
                self.ch.send(msg)
        if self.streams:
            log.info("%s; resubmitted %d open request(s)", why, len(self.streams))

    def fail_all(self, why: str) -> None:
        self.lost_at = None
        streams, self.streams = self.streams, {}
        if streams:
            log.warning("%s; failing %d open request(s)", why, len(streams))
        for stream in streams.values():
            stream._put(Event("error", code=p.ErrorCode.ROOT_LOST, retry_after=1.0,
                              message=f"{why} before the request finished; please retry"))

"""A node of the tree: runs requests on its engine, or hands them to a child, or queues them.

Process: `treechat node`. Sockets:

    up      DEALER (identity = node name) -> parent's ROUTER (the root's tree socket, or a node's
            down socket): Dispatch and Heartbeat arrive; Heartbeat with this subtree's Load leaves
    down    ROUTER, bound on a free port, for children: their Heartbeat+Load up, Dispatch down
    results DEALER -> the root's results socket, directly: Register, Lookup, Acks, Tokens, Done,
            Error, Heartbeat, Bye leave; Welcome, Refused, Found, Reregister, Cancel arrive

On a Dispatch (the original algorithm, then the policy): a free engine slot runs it here;
otherwise a child chosen by the policy gets it; otherwise it waits in this node's bounded queue,
and everything queued joins the engine's batch as slots free up. Every placement is acknowledged
to the root, so the root always knows who holds what and can re-dispatch when a node is lost.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from dataclasses import dataclass

import zmq

from broker import protocol as p
from broker import security
from broker.sockets import Channel, bind, make_socket
from nodes.engine.base import Engine, EngineError, EngineRequest, StepOutput
from nodes.routing import POLICIES, Children, Load

log = logging.getLogger("treechat.node")


class RegistrationRefused(Exception):
    pass


@dataclass(frozen=True)
class NodeConfig:
    name: str
    root: str = "127.0.0.1:5550"  # the root's base address (front port)
    parent: str | None = None  # None: a top-level node, child of the root
    host: str = "127.0.0.1"  # where this node's down socket listens (and is advertised)
    policy: str = "least-loaded"
    max_queue: int = 64
    heartbeat: float = 1.0
    misses: int = 3
    grace: float = 30.0
    curve: str | None = None  # a `treechat keys` folder: encrypt and authenticate every socket

    def __post_init__(self):
        if not self.name or not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"bad node name '{self.name}': use letters, digits, '-', '_' or '.'")
        if self.name == "root":
            raise ValueError("'root' is the root's own name; choose another --name")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy '{self.policy}' (choose from {', '.join(POLICIES)})")
        if self.max_queue < 0:
            raise ValueError("--max-queue cannot be negative")
        host, _, port = self.root.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--root must be HOST:PORT, not '{self.root}'")

    def root_endpoint(self, offset: int) -> str:
        host, _, port = self.root.rpartition(":")
        return f"tcp://{host}:{int(port) + offset}"

    def reachable(self, endpoint: str) -> str:
        """A root listening on every address (`--host 0.0.0.0`) advertises that wildcard: reach
        its port at the address --root gave instead."""
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        if host.strip("[]") in ("0.0.0.0", "::", "*"):
            return f"tcp://{self.root.rpartition(':')[0]}:{port}"
        return endpoint

    @property
    def dead_after(self) -> float:
        return self.heartbeat * self.misses


class Node:
    def __init__(self, cfg: NodeConfig, engine: Engine | None, metrics=None):
        self.cfg = cfg
        self.engine = engine
        self.metrics = metrics  # nodes.metrics.NodeMetrics (--metrics-port) or None
        self.instance = uuid.uuid4().hex
        self.children = Children(cfg.policy)
        self.queue: deque[p.Dispatch] = deque()
        self.running: dict[int, p.Dispatch] = {}
        self.acks: list[list] = []
        self.draining = False
        self.epoch = 0
        self.parent_seen = self.root_seen = time.monotonic()
        self.last_load: dict | None = None
        self._flush_scheduled = False
        self._welcome: asyncio.Future | None = None
        self._found: asyncio.Future | None = None
        self._parent_answered: asyncio.Future | None = None
        self._repairs: dict[str, asyncio.Task] = {}

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready=None) -> None:
        self.ctx = zmq.Context.instance()
        self.loop = asyncio.get_running_loop()
        self.curve = security.load(self.cfg.curve)
        self.down = Channel(self.socket(zmq.ROUTER), self.on_down, "down")
        self.endpoint = bind(self.down.sock, f"tcp://{self.cfg.host}:0")
        self.results = self.up = None
        try:
            if await self.join(stop):
                log.info("node %s ready: children connect to %s, parent %s", self.cfg.name,
                         self.endpoint, self.cfg.parent or "root")
                if ready:
                    ready({"name": self.cfg.name, "endpoint": self.endpoint})
                beat = self.loop.create_task(self.heartbeat_loop())
                await stop.wait()
                await self.drain()
                beat.cancel()
        finally:
            if self.engine is not None:
                self.engine.stop()
            for ch in (self.up, self.down, self.results):
                if ch is not None:
                    ch.close()
            if self.curve is not None:
                self.curve.close()

    async def join(self, stop: asyncio.Event) -> bool:
        """Register, reach the parent, start the engine; False when stopped before that."""
        async def steps():
            await self.register()
            await self.connect_parent()
        joining = self.loop.create_task(steps())
        stopping = self.loop.create_task(stop.wait())
        await asyncio.wait([joining, stopping], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not joining.done():
            joining.cancel()
            log.info("node %s stopped before it joined the tree", self.cfg.name)
            return False
        joining.result()  # a refused registration raises here
        if self.engine is not None:
            self.engine.start(self.loop, self.on_step)
        return True

    def socket(self, kind: int, identity: str | None = None):
        return make_socket(self.ctx, kind, identity=identity, curve=self.curve)

    async def register(self) -> None:
        """Bind our name at the root. A refused name is retried for `dead_after` (a crashed
        previous instance of this node may still count as alive), then given up."""
        give_up = time.monotonic() + self.cfg.dead_after + self.cfg.heartbeat
        while True:
            if self.results is not None:
                self.results.close()
            self.results = Channel(self.socket(zmq.DEALER), self.on_results, "results")
            if self.metrics:
                self.metrics.watch(self.results)
            self.results.sock.connect(self.cfg.root_endpoint(2))
            self._welcome = self.loop.create_future()
            info = {**(self.engine.describe() if self.engine else {"engine": "none"}),
                    "pid": os.getpid(), **(self.metrics.describe() if self.metrics else {})}
            msg = p.Register(name=self.cfg.name, instance=self.instance, parent=self.cfg.parent,
                             endpoint=self.endpoint, slots=self.engine.slots if self.engine else 0,
                             model=info.get("model"), engine=info.get("engine", "none"), info=info)
            try:
                while not self._welcome.done():
                    self.results.send(msg)
                    await asyncio.wait([self._welcome], timeout=min(0.2, self.cfg.heartbeat))
                welcome = self._welcome.result()
            except RegistrationRefused as e:
                if time.monotonic() > give_up:
                    raise
                log.warning("%s; retrying while the old holder may be a dead instance", e)
                await asyncio.sleep(self.cfg.heartbeat)
                continue
            self.epoch = welcome.epoch
            self.tree_endpoint = self.cfg.reachable(welcome.tree)
            self.root_seen = time.monotonic()
            return

    async def connect_parent(self) -> None:
        """Connect `up` to the parent (the root's tree socket, or a node found in the registry)
        and wait until it answers: ready means the parent knows us. Retries with backoff."""
        backoff = self.cfg.heartbeat / 2
        while True:
            endpoint = self.tree_endpoint if self.cfg.parent is None else await self.lookup_parent()
            if endpoint and await self.attach(endpoint):
                self.parent_seen = time.monotonic()
                return
            log.warning("parent %s is not reachable yet; retrying in %.1fs",
                        self.cfg.parent or "root", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 8.0)

    async def attach(self, endpoint: str) -> bool:
        if self.up is not None:
            self.up.close()
        self.up = Channel(self.socket(zmq.DEALER, identity=self.cfg.name), self.on_up, "up")
        if self.metrics:
            self.metrics.watch(self.up)
        self.link, self.received = uuid.uuid4().hex[:8], 0  # see nodes/routing.py: recv
        self.up.sock.connect(endpoint)
        self._parent_answered = self.loop.create_future()  # a parent answers a new child at once
        give_up = time.monotonic() + self.cfg.dead_after
        while not self._parent_answered.done() and time.monotonic() < give_up:
            self.report_load(force=True)
            await asyncio.wait([self._parent_answered], timeout=min(0.1, self.cfg.heartbeat))
        return self._parent_answered.done()

    def repair(self, what: str, coro_fn) -> None:
        """Run a reconnection in the background, one per link, so heartbeats keep flowing."""
        task = self._repairs.get(what)
        if task is None or task.done():
            self._repairs[what] = self.loop.create_task(coro_fn())

    async def lookup_parent(self) -> str | None:
        self._found = self.loop.create_future()
        self.results.send(p.Lookup(name=self.cfg.parent))
        done, _ = await asyncio.wait([self._found], timeout=self.cfg.heartbeat)
        entries = self._found.result() if done else []
        return entries[0]["endpoint"] if entries else None

    async def drain(self) -> None:
        """SIGTERM: take no new work, hand queued work back, let running work finish (up to
        `grace`), hand back what is still running, say goodbye."""
        self.draining = True
        self.report_load(force=True)
        while self.queue:
            self.hand_back(self.queue.popleft())
        deadline = time.monotonic() + self.cfg.grace
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rid in list(self.running):
            self.engine.cancel(rid)
            self.hand_back(self.running.pop(rid))
        self.flush_acks()
        self.results.send(p.Bye(name=self.cfg.name))
        await asyncio.sleep(0)  # let the send leave before the sockets close

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat)
            now = time.monotonic()
            hb = p.Heartbeat(sender=self.cfg.name)
            for child in self.children.expired(now - self.cfg.dead_after):
                log.warning("child %s stopped answering; removing it from the ring", child.name)
                self.children.remove(child.name)
            for child in self.children:
                self.down.send(hb, child.identity)
            self.report_load(force=True)
            self.results.send(p.Heartbeat(sender=self.cfg.name, load=self.own_load().to_dict()))
            if now - self.root_seen > self.cfg.dead_after and "root" not in self._busy_repairs():
                log.warning("the root stopped answering; registering again")
                self.repair("root", self.register)
            if now - self.parent_seen > self.cfg.dead_after and "parent" not in self._busy_repairs():
                log.warning("parent %s stopped answering; reconnecting", self.cfg.parent or "root")
                self.repair("parent", self.connect_parent)

    def _busy_repairs(self) -> set[str]:
        return {what for what, task in self._repairs.items() if not task.done()}

    # --- placing requests -----------------------------------------------------------------------

    def engine_free(self) -> bool:
        return self.engine is not None and not self.draining and len(self.running) < self.engine.slots

    def place(self, d: p.Dispatch) -> None:
        """The original algorithm: run it if idle, else a child (per policy), else queue it."""
        if self.draining:
            return self.hand_back(d)
        if self.engine_free():
            return self.run_here(d)
        if self.children and self.forward(d, need_free=True):
            return
        if len(self.queue) < self.cfg.max_queue:
            self.queue.append(d)
            self.ack(d, "queued")
            return self.report_load()
        if self.children and self.forward(d, need_free=False):  # a queue place further down
            return
        self.results.send(p.Error(id=d.rid, code=p.ErrorCode.OVERLOADED,
                                  message=f"node {self.cfg.name} is full"))

    def forward(self, d: p.Dispatch, need_free: bool) -> bool:
        while (child := self.children.pick(need_free=need_free)) is not None:
            msg = p.Dispatch(rid=d.rid, request=d.request, hop=d.hop + 1, resume_ids=d.resume_ids,
                             resume_text=d.resume_text)
            if self.down.send(msg, child.identity):
                self.children.note_sent(child)
                self.ack(d, "forwarded", child.name)
                self.report_load()
                return True
            log.warning("child %s is unreachable; removing it", child.name)
            self.children.remove(child.name)
        return False

    def run_here(self, d: p.Dispatch) -> None:
        try:
            request = p.Request.from_dict(d.request, strict=False)
            self.engine.submit(EngineRequest(d.rid, request, d.resume_ids, d.resume_text))
        except (EngineError, p.BadRequest) as e:
            code = getattr(e, "code", p.ErrorCode.BAD_REQUEST)
            self.results.send(p.Error(id=d.rid, code=code, message=str(e)))
            return
        self.running[d.rid] = d
        self.ack(d, "running")
        self.report_load()

    def pump(self) -> None:
        """Slots freed here or below: move queued requests into the engine or down to children."""
        while self.queue and not self.draining:
            if self.engine_free():
                self.run_here(self.queue.popleft())
            elif self.children and self.children.total().free > 0:
                d = self.queue.popleft()
                if not self.forward(d, need_free=True):
                    self.queue.appendleft(d)
                    return
            else:
                return

    def hand_back(self, d: p.Dispatch) -> None:
        self.results.send(p.Error(id=d.rid, code=p.ErrorCode.HANDED_BACK,
                                  message=f"node {self.cfg.name} is shutting down"))

    def cancel(self, rid: int) -> None:
        for d in self.queue:
            if d.rid == rid:
                self.queue.remove(d)
                self.results.send(p.Done(id=rid, finish_reason="cancelled"))
                return self.report_load()
        if rid in self.running:
            self.engine.cancel(rid)

    # --- engine output --------------------------------------------------------------------------

    def on_step(self, step: StepOutput) -> None:
        self.flush_acks()  # acks go before the tokens they explain
        done = [[f.rid, f.reason, f.prompt_tokens, f.completion_tokens] for f in step.done
                if self.running.pop(f.rid, None) is not None]
        if step.tokens or done:
            self.results.send(p.Tokens(items=step.tokens, done=done))  # one message per step
        for rid, code, message in step.errors:
            if self.running.pop(rid, None) is not None:
                self.results.send(p.Error(id=rid, code=code, message=message))
        if step.done or step.errors:
            self.pump()
            self.report_load()

    # --- load and acks --------------------------------------------------------------------------

    def own_load(self) -> Load:
        slots = self.engine.slots if self.engine is not None else 0
        free = 0 if self.draining else max(0, slots - len(self.running))
        room = 0 if self.draining else self.cfg.max_queue - len(self.queue)
        return Load(slots=slots, free=free, queued=len(self.queue), room=room,
                    running=len(self.running), draining=self.draining)

    def subtree_load(self) -> Load:
        load = self.own_load()
        if not self.draining:
            kids = self.children.total()
            load.slots += kids.slots
            load.free += kids.free
            load.queued += kids.queued
            load.room += kids.room
            load.running += kids.running
        return load

    def report_load(self, force: bool = False) -> None:
        """Tell the parent our subtree's load: on every heartbeat, and once per loop turn when it
        changed (so least-loaded parents route on fresh numbers)."""
        if force:
            return self.send_load()
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def load_report(self) -> dict:
        """Our subtree's load, and how many Dispatches we had received when we wrote it."""
        return {**self.subtree_load().to_dict(), "recv": self.received, "link": self.link}

    def send_load(self) -> None:
        report = self.load_report()
        if self.up is not None:
            self.up.send(p.Heartbeat(sender=self.cfg.name, load=report))
        self.last_load = report  # the root hears our own load with each heartbeat (for status)

    def ack(self, d: p.Dispatch, state: str, to: str | None = None) -> None:
        self.acks.append([d.rid, d.hop, state, to])
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False
        self.flush_acks()
        if self.up is not None and self.load_report() != self.last_load:
            self.send_load()

    def flush_acks(self) -> None:
        if self.acks:
            self.results.send(p.Acks(items=self.acks))
            self.acks = []

    # --- sockets --------------------------------------------------------------------------------

    def on_up(self, _ident, msg: p.Message) -> None:
        self.parent_seen = time.monotonic()
        if self._parent_answered is not None and not self._parent_answered.done():
            self._parent_answered.set_result(None)
        if isinstance(msg, p.Dispatch):
            self.received += 1
            self.place(msg)
        elif not isinstance(msg, p.Heartbeat):
            log.warning("up: unexpected %s from the parent", type(msg).__name__)

    def on_down(self, ident: bytes, msg: p.Message) -> None:
        if isinstance(msg, p.Heartbeat):
            name = ident.decode(errors="replace")
            if self.children.get(name) is None:
                self.down.send(p.Heartbeat(sender=self.cfg.name), ident)  # welcome a new child
            self.children.seen(name, ident, msg.load)
            self.pump()
            self.report_load()
        else:
            log.warning("down: unexpected %s from %r", type(msg).__name__, ident)

    def on_results(self, _ident, msg: p.Message) -> None:
        self.root_seen = time.monotonic()
        if isinstance(msg, p.Cancel):
            self.cancel(msg.id)
        elif isinstance(msg, p.Heartbeat):
            if self.epoch and msg.epoch != self.epoch:
                log.warning("the root restarted (epoch %x -> %x)", self.epoch, msg.epoch)
                self.root_seen = 0.0  # the heartbeat loop registers again
        elif isinstance(msg, p.Welcome):
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_result(msg)
        elif isinstance(msg, p.Refused):
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(RegistrationRefused(msg.reason))
        elif isinstance(msg, p.Found):
            if self._found is not None and not self._found.done():
                self._found.set_result(msg.entries)
        elif isinstance(msg, p.Reregister):
            self.root_seen = 0.0
        else:
            log.warning("results: unexpected %s from the root", type(msg).__name__)

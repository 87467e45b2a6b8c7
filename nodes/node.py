"""A node of the tree: runs requests on its engine, or hands them to a child, or queues them.

Process: `treechat node`. Sockets:

    up      DEALER -> parent's ROUTER (the root's tree socket, or a node's down socket): Dispatch
            and Heartbeat arrive; Heartbeat with this subtree's Load leaves (nodes/links.py)
    down    ROUTER, bound on a free port, for children: their Heartbeat+Load up, Dispatch down
    results DEALER -> the root's results socket, directly: Register, Lookup, Acks, Tokens, Done,
            Error, Heartbeat, Bye leave; Welcome, Refused, Found, Reregister, Cancel, Adopt
            arrive (nodes/links.py)

On a Dispatch (the original algorithm, then the policy): a free engine slot runs it here;
otherwise a child chosen by the policy gets it; otherwise it waits in this node's bounded queue,
and everything queued joins the engine's batch as slots free up. Every placement is acknowledged
to the root, so the root always knows who holds what and can re-dispatch when a node is lost.
A child is adopted on the down socket only for the incarnation the root vouched for (Adopt).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import zmq

from broker import limits
from broker import protocol as p
from broker import security
from broker.quiet import Quiet
from broker.routing import POLICIES, Children, Load
from broker.client import roots
from broker.sockets import bind
from nodes.engine.base import Engine, EngineError, EngineRequest, StepOutput
from nodes.links import Links, RegistrationRefused  # noqa: F401  (the CLI catches it from here)

log = logging.getLogger("treechat.node")


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
    member: str | None = None  # whose key of that folder to show (default: the node's name, else
    #                            the folder's `client`)
    insecure: bool = False  # allow listening on a non-loopback address without keys
    aliases: tuple[str, ...] = ()  # other names of its model: the root resolves them to it

    def __post_init__(self):
        if not security.valid_name(self.name):  # it is also its key's name
            raise ValueError(f"bad node name '{self.name}': use letters, digits, '-', '_' or '.'")
        if self.name == "root":
            raise ValueError("'root' is the root's own name; choose another --name")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy '{self.policy}' (choose from {', '.join(POLICIES)})")
        if self.max_queue < 0:
            raise ValueError("--max-queue cannot be negative")
        roots(self.root)  # HOST:PORT, or HOST:PORT,HOST:PORT (a root and its standby)
        security.require_keys(self.host, bool(self.curve), self.insecure,
                              "CurveZMQ keys (--curve DIR)")

    def key_name(self) -> str:
        if self.member:
            return self.member
        own = Path(self.curve or "") / f"{self.name}.key_secret"
        return self.name if self.curve and own.exists() else security.CLIENT

    @property
    def roots(self) -> list[str]:
        return roots(self.root)

    @property
    def dead_after(self) -> float:
        return self.heartbeat * self.misses


class Node(Links):
    def __init__(self, cfg: NodeConfig, engine: Engine | None, metrics=None):
        self.cfg = cfg
        self.engine = engine
        self.metrics = metrics  # nodes.metrics.NodeMetrics (--metrics-port) or None
        self.instance = uuid.uuid4().hex
        self.root_at = 0  # which of --root's addresses we talk to (a root, or its standby)
        self.left: str | None = None  # the root we last left for the other
        self.asked_back = False  # the root asked us to register again (it restarted, or lost us)
        self.model = engine.describe().get("model") if engine is not None else None
        self.children = Children(cfg.policy)
        self.queue: deque[p.Dispatch] = deque()
        self.running: dict[int, p.Dispatch] = {}
        self.fenced: set[int] = set()  # rids of an old incarnation, still leaving the engine
        self.vouched: dict[str, int] = {}  # child name -> the incarnation the root registered
        self.acks: list[list] = []
        self.quiet = Quiet(log)
        self.draining = False
        self.epoch = 0
        self.incarnation = 0
        self.link = 0  # up links made so far (the parent adopts only a newer one)
        self.received = 0
        self.parent_seen = self.root_seen = time.monotonic()
        self.last_load: dict | None = None
        self._flush_scheduled = False
        self._welcome: asyncio.Future | None = None
        self._found: asyncio.Future | None = None
        self._parent_answered: asyncio.Future | None = None
        self._repairs: dict[str, asyncio.Task] = {}
        self._beat: asyncio.Task | None = None
        self._joined: asyncio.Future | None = None
        self._no_detail: dict[str, int] = {}
        self._probing = False
        self.failure: asyncio.Future | None = None

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready=None) -> None:
        self.ctx = zmq.Context.instance()
        self.loop = asyncio.get_running_loop()
        self.failure = self.loop.create_future()
        self._joined = self.loop.create_future()
        self.curve = security.load(self.cfg.curve, self.cfg.key_name())
        self.results = self.up = None
        self.down = self.channel(zmq.ROUTER, self.on_down, "down")
        self.endpoint = bind(self.down.sock, f"tcp://{self.cfg.host}:0")
        try:
            if await self.join(stop):
                log.info("node %s ready: children connect to %s, parent %s", self.cfg.name,
                         self.endpoint, self.cfg.parent or "root")
                if ready:
                    ready({"name": self.cfg.name, "endpoint": self.endpoint})
                stopping = self.loop.create_task(stop.wait())
                await asyncio.wait([stopping, self.failure], return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if self.failure.done():
                    raise self.failure.exception()
                await self.drain()
        finally:
            if self._beat is not None:
                self._beat.cancel()
            for task in self._repairs.values():
                task.cancel()
            if self.engine is not None:
                self.engine.stop()
            for ch in (self.up, self.down):
                if ch is not None:
                    ch.close()
            if self.results is not None:
                self.results.close(linger=500)  # the Bye leaves first
            if self.curve is not None:
                self.curve.close()

    async def join(self, stop: asyncio.Event) -> bool:
        """Register, reach the parent, start the engine; False when stopped before that.
        Heartbeats start with the registration: a node still looking for its parent (it may
        register before its parent does, or the link may be slow) stays registered meanwhile."""
        async def steps():
            await self.register()
            self._beat = self.loop.create_task(self.heartbeat_loop())
            self.repair("parent", self.connect_parent)  # a heartbeat sees it under repair
            await self._joined  # the first parent link; rejoin() may be the one that makes it
        joining = self.loop.create_task(steps())
        stopping = self.loop.create_task(stop.wait())
        await asyncio.wait([joining, stopping, self.failure], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if self.failure.done():
            joining.cancel()
            raise self.failure.exception()
        if not joining.done():
            joining.cancel()
            log.info("node %s stopped before it joined the tree", self.cfg.name)
            return False
        joining.result()  # a refused registration raises here
        if self.engine is not None:
            self.engine.start(self.loop, self.on_step)
        return True

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

    # --- placing requests -----------------------------------------------------------------------

    def engine_free(self) -> bool:
        return self.engine is not None and not self.draining and len(self.running) < self.engine.slots

    def can_run(self, d: p.Dispatch) -> bool:
        """A free engine slot here, of the request's model."""
        return self.engine_free() and d.model in (None, self.model)

    def serves(self, model: str | None) -> bool:
        """Is there a node of `model` here or below?"""
        return model in (None, self.model) or self.children.total().of(model) is not None

    def home_child(self, d: p.Dispatch) -> str | None:
        """The child on the way to the node that holds `d`'s conversation, if any (see Dispatch)."""
        route = d.route or []
        return route[d.hop] if len(route) > d.hop and route[d.hop - 1] == self.cfg.name else None

    def place(self, d: p.Dispatch) -> None:
        """The original algorithm: run it if idle, else a child (per policy), else queue it.
        Only a node of the request's model runs it; a conversation's home is preferred."""
        if self.draining:
            return self.hand_back(d)
        if self.can_run(d) and self.home_child(d) is None:
            return self.run_here(d)
        if self.children and self.forward(d, need_free=True):
            return
        if self.can_run(d):  # its home below is full: here is as good as anywhere
            return self.run_here(d)
        if not self.serves(d.model):  # our report was stale: the root places it again
            return self.send_result(p.Error(id=d.rid, code=p.ErrorCode.OVERLOADED, message=(
                f"node {self.cfg.name} has no node of model '{d.model}' below it")))
        if len(self.queue) < self.cfg.max_queue:
            self.queue.append(d)
            self.ack(d, "queued")
            return self.report_load()
        if self.children and self.forward(d, need_free=False):  # a queue place further down
            return
        self.send_result(p.Error(id=d.rid, code=p.ErrorCode.OVERLOADED,
                                 message=f"node {self.cfg.name} is full"))

    def forward(self, d: p.Dispatch, need_free: bool) -> bool:
        while (child := self.children.pick(d.model, need_free=need_free,
                                           prefer=self.home_child(d))) is not None:
            msg = p.Dispatch(rid=d.rid, request=d.request, hop=d.hop + 1, resume_ids=d.resume_ids,
                             resume_text=d.resume_text, model=d.model, route=d.route)
            if self.down.send(msg, child.identity):
                self.children.note_sent(child, d.model)
                self.ack(d, "forwarded", child.name)
                self.report_load()
                return True
            log.info("child %s is unreachable; removing it", child.name)
            self.children.remove(child.name)
        return False

    def run_here(self, d: p.Dispatch) -> None:
        try:
            request = p.Request.from_dict(d.request, strict=False)
            self.engine.submit(EngineRequest(d.rid, request, d.resume_ids, d.resume_text))
        except (EngineError, p.BadRequest) as e:
            code = getattr(e, "code", p.ErrorCode.BAD_REQUEST)
            self.send_result(p.Error(id=d.rid, code=code, message=str(e)))
            return
        self.running[d.rid] = d
        self.ack(d, "running")
        self.report_load()

    def pump(self) -> None:
        """Slots freed here or below: move queued requests into the engine or down to children,
        oldest first; a request whose model has no free slot anywhere below keeps its place."""
        if self.draining or not self.queue:
            return
        waiting: deque[p.Dispatch] = deque()
        while self.queue:
            d = self.queue.popleft()
            if self.can_run(d):
                self.run_here(d)
                continue
            below = self.children.total().of(d.model) if self.children else None
            if below is None or below.free <= 0 or not self.forward(d, need_free=True):
                waiting.append(d)
        self.queue = waiting

    def hand_back(self, d: p.Dispatch) -> None:
        self.send_result(p.Error(id=d.rid, code=p.ErrorCode.HANDED_BACK,
                                 message=f"node {self.cfg.name} is shutting down"))

    def cancel(self, rid: int) -> None:
        for d in self.queue:
            if d.rid == rid:
                self.queue.remove(d)
                self.send_result(p.Done(id=rid, finish_reason="cancelled"))
                return self.report_load()
        if rid in self.running:
            self.engine.cancel(rid)

    def send_result(self, msg: p.Message) -> None:
        """A Done or Error for a rid, after the acks still waiting (the root reads in order)."""
        self.flush_acks()
        self.results.send(msg)

    # --- engine output --------------------------------------------------------------------------

    def on_step(self, step: StepOutput) -> None:
        self.flush_acks()  # acks go before the tokens they explain
        done = [[f.rid, f.reason, f.prompt_tokens, f.completion_tokens, f.cached_tokens]
                for f in step.done if self.running.pop(f.rid, None) is not None]
        errors = [e for e in step.errors if self.running.pop(e[0], None) is not None]
        tokens = step.tokens
        if self.fenced:  # an old incarnation's requests leave the engine: nothing of them is sent
            fenced = self.fenced
            tokens = [t for t in tokens if t[0] not in fenced]
            done = [d for d in done if d[0] not in fenced]
            errors = [e for e in errors if e[0] not in fenced]
            fenced.difference_update([f.rid for f in step.done] + [e[0] for e in step.errors])
        if tokens or done:
            for msg in limits.tokens_messages(tokens, done):  # one per step, unless it is large
                self.results.send(msg)
        for rid, code, message in errors:
            self.results.send(p.Error(id=rid, code=code, message=message))
        if step.done or step.errors:
            self.pump()
            self.report_load()

    # --- load and acks --------------------------------------------------------------------------

    def own_load(self) -> Load:
        slots = self.engine.slots if self.engine is not None else 0
        free = 0 if self.draining else max(0, slots - len(self.running))
        room = 0 if self.draining else self.cfg.max_queue - len(self.queue)
        load = Load(slots=slots, free=free, queued=len(self.queue), room=room,
                    running=len(self.running), draining=self.draining)
        if self.engine is not None:
            load.models[self.model] = Load(slots=slots, free=free, running=len(self.running))
        return load

    def subtree_load(self) -> Load:
        """Our engine's and our children's capacity, in all and per model; our queue takes
        requests of any model served here or below, so its room counts for each."""
        load = self.own_load()
        room = load.room
        if not self.draining:
            load.add(self.children.total())
        for model, part in load.models.items():
            part.room += room
            part.queued += sum(1 for d in self.queue if d.model == model)
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
            self.up.send(p.Heartbeat(sender=self.cfg.name, load=report,
                                     incarnation=self.incarnation))
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

    # --- children -------------------------------------------------------------------------------

    def on_down(self, ident: bytes, msg: p.Message) -> None:
        if not isinstance(msg, p.Heartbeat):
            return self.quiet.warning("unexpected down messages", ident, "down: unexpected %s "
                                      "from %r", type(msg).__name__, ident)
        child = self.children.find(ident)
        if child is None:
            if not msg.incarnation or self.vouched.get(msg.sender) != msg.incarnation:
                if msg.sender in self.vouched or self.children.get(msg.sender):
                    return log.debug("down: ignored an old incarnation of child %s", msg.sender)
                return self.quiet.info("unregistered child connections", ident,
                                       "down: ignored '%s': the root registered no such child "
                                       "of %s", msg.sender[:64], self.cfg.name)
            child = self.children.adopt(msg.sender, ident, msg.incarnation, msg.load)
            if child is None:
                return  # an older link of the incarnation we adopted
            log.info("child %s attached", child.name)
            self.down.send(p.Heartbeat(sender=self.cfg.name), ident)  # welcome: it waits for it
        else:
            self.children.seen(child, msg.load)
        self.pump()
        self.report_load()

    def vouch(self, name: str, incarnation: int) -> None:
        """The root says which incarnation of child `name` is registered (0: none any more)."""
        child = self.children.get(name)
        if child is not None and child.incarnation != incarnation:
            log.info("child %s: its %s", name, "registration ended" if not incarnation
                     else "new registration replaces the old link")
            self.children.remove(name)
        if incarnation:
            self.vouched[name] = incarnation
        else:
            self.vouched.pop(name, None)

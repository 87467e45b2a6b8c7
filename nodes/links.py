"""A node's two links, to the root and to its parent, with registration and fencing (part of
`nodes.node.Node`).

    results DEALER -> the root's results socket: Register, Lookup, Heartbeat (load, held rids),
            Acks, Tokens, Done, Error, Bye leave; Welcome, Refused, Found, Reregister, Cancel,
            Adopt, Heartbeat arrive
    up      DEALER -> the parent's ROUTER (the root's tree socket, or a node's down socket):
            Heartbeat (incarnation, link number, subtree Load) leaves; Dispatch, Heartbeat arrive

Registering makes an incarnation (its id comes in Welcome). Every new registration (the root
restarted, declared this node lost, or stopped answering) is a new one, and the old one's work is
fenced: the root has already dispatched it again elsewhere, so the node drops its queue, cancels
what its engine runs and sends nothing more about it. Then it attaches to its parent afresh: a new
`up` socket whose heartbeats show the new incarnation and a higher link number, which is all a
parent adopts. A parent link that closes or goes silent is replaced the same way (same
incarnation, next link number).

A handshake the root or the parent refuses (a key it does not authorize, CurveZMQ on one side
only) is not retried in silence: the node says why and exits non-zero.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

import zmq

from broker import limits
from broker import protocol as p
from broker.sockets import Channel, make_socket, refusal

log = logging.getLogger("treechat.node")

NO_DETAIL_TRIES = 3  # failed handshakes without a reason before they count as a refusal


class RegistrationRefused(Exception):
    pass


class StandbyRoot(Exception):
    """The root we asked will not serve (a passive standby, or silent); `active`: the one that
    does, when it said."""

    def __init__(self, reason: str, active: str | None = None):
        super().__init__(reason)
        self.active = active


class Links:
    """Mixed into `Node`: registration with the root, the parent link, fencing."""

    def channel(self, kind: int, handler, name: str) -> Channel:
        ch = Channel(make_socket(self.ctx, kind, curve=self.curve,
                                 max_message=limits.NODE_SOCKETS[name]), handler, name,
                     on_event=lambda ev, value: self.on_link_event(name, ev, value))
        # --metrics-port: count what passes (down carries only Dispatches out and heartbeats,
        # of which nothing is counted)
        if self.metrics and name != "down":
            self.metrics.watch(ch)
        return ch

    def on_link_event(self, link: str, event: int, value: int) -> None:
        if link == "down":  # our listening socket: a stranger's failed handshake is not ours
            if event == zmq.EVENT_DISCONNECTED and not self._probing:
                self._probing = True
                self.loop.call_soon(self.probe_children)
            return
        why = refusal(event, value, keyed=self.curve is not None)
        if why is not None and event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
            self._no_detail[link] = self._no_detail.get(link, 0) + 1
            if self._no_detail[link] < NO_DETAIL_TRIES:
                return
        if why is not None:
            where = "the root" if link == "results" else f"parent {self.cfg.parent or 'root'}"
            self.fail(RegistrationRefused(f"{where} refused the connection: {why}"))
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            self._no_detail.pop(link, None)
        elif event == zmq.EVENT_DISCONNECTED and not self.draining and self.incarnation:
            # Reconnect at once, not after missed heartbeats. The root keeps nothing of a closed
            # results connection (it is a lost node to it), so that one means registering again.
            if link == "up" and not self.repairing():
                self.repair("parent", self.connect_parent)
            elif link == "results" and "root" not in self.repairing():
                self.repair("root", self.rejoin)

    def fail(self, error: Exception) -> None:
        """A condition the node cannot serve through: `run` stops and reports it."""
        for fut in (self._welcome, self.failure):
            if fut is not None and not fut.done():
                fut.set_exception(error)

    # --- the root -------------------------------------------------------------------------------

    def root_endpoint(self, offset: int) -> str:
        host, _, port = self.cfg.roots[self.root_at].rpartition(":")
        return f"tcp://{host}:{int(port) + offset}"

    def reachable(self, endpoint: str) -> str:
        """A root listening on every address (`--host 0.0.0.0`) advertises that wildcard: reach
        its port at the address --root gave instead."""
        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        if host.strip("[]") in ("0.0.0.0", "::", "*"):
            return f"tcp://{self.cfg.roots[self.root_at].rpartition(':')[0]}:{port}"
        return endpoint

    def next_root(self, why: str, to: str | None = None) -> None:
        """Talk to the other root of --root (the one named, or the next)."""
        roots = self.cfg.roots
        self.left = roots[self.root_at]
        self.root_at = roots.index(to) if to in roots else (self.root_at + 1) % len(roots)
        log.warning("%s; registering with the root at %s", why, roots[self.root_at])

    async def register(self, lost: bool = False) -> None:
        """Bind our name at the root (a new incarnation). A refused name is retried for
        `dead_after` (a crashed previous instance of this node may still count as alive).
        With a root and its standby (broker/pair.py), one that does not answer in `dead_after`,
        or says it is the standby, is left for the other; `lost`: we lost the root we had."""
        give_up = time.monotonic() + self.cfg.dead_after + self.cfg.heartbeat
        # Standby answers naming the root we lost, before we go back to it: asked every half
        # heartbeat for twice `dead_after` (the standby takes over within one).
        patience = 4 * self.cfg.misses
        while True:
            if self.results is not None:
                self.results.close()
            self.results = self.channel(zmq.DEALER, self.on_results, "results")
            self.results.sock.connect(self.root_endpoint(2))
            self._welcome = self.loop.create_future()
            info = {**(self.engine.describe() if self.engine else {"engine": "none"}),
                    "pid": os.getpid(), **(self.metrics.describe() if self.metrics else {})}
            if self.cfg.aliases and self.engine is not None:
                info["aliases"] = list(self.cfg.aliases)
            msg = p.Register(name=self.cfg.name, instance=self.instance, parent=self.cfg.parent,
                             endpoint=self.endpoint, slots=self.engine.slots if self.engine else 0,
                             model=info.get("model"), engine=info.get("engine", "none"), info=info,
                             lost=lost)
            other = time.monotonic() + self.cfg.dead_after  # then the other root, if there is one
            try:
                while not self._welcome.done():
                    if len(self.cfg.roots) > 1 and time.monotonic() > other:
                        raise StandbyRoot(f"the root at {self.cfg.roots[self.root_at]} does not "
                                          "answer")
                    self.results.send(msg)
                    await asyncio.wait([self._welcome], timeout=min(0.2, self.cfg.heartbeat))
                welcome = self._welcome.result()
            except StandbyRoot as e:
                patience -= 1
                if len(self.cfg.roots) == 1 or (lost and e.active == self.left and patience > 0):
                    # Alone, or it names the root we lost: ask again (it takes over once that
                    # root's heartbeats have stopped there too; for a while: our own path to
                    # that root may have been what broke).
                    log.info("%s; asking again", e)
                    await asyncio.sleep(self.cfg.heartbeat / 2)
                else:
                    self.next_root(str(e), e.active)
                    lost = lost or e.active is None  # it did not answer: we lost it
                continue
            except RegistrationRefused as e:
                if "taken by a live node" not in str(e) or time.monotonic() > give_up:
                    raise
                log.warning("%s; retrying while the old holder may be a dead instance", e)
                await asyncio.sleep(self.cfg.heartbeat)
                continue
            self.incarnation = welcome.incarnation  # fenced at the Welcome (on_results)
            self.epoch = welcome.epoch
            self.tree_endpoint = self.reachable(welcome.tree)
            self.root_seen = time.monotonic()
            return

    async def rejoin(self) -> None:
        """The root lost us (it restarted, or declared us lost: it asked us back), or we lost it:
        register (with the other root, when we lost ours and have a standby), then attach anew."""
        lost = not self.asked_back
        self.asked_back = False
        if lost and len(self.cfg.roots) > 1:
            self.next_root("lost the root")
        await self.register(lost=lost)
        parent = self._repairs.pop("parent", None)
        if parent is not None:
            parent.cancel()  # it would attach with the old incarnation
        await self.connect_parent()

    def fence(self) -> None:
        """A new incarnation: what the old one held is the root's to place again, not ours."""
        dropped = len(self.queue) + len(self.running)
        self.queue.clear()
        self.acks = []
        for rid in self.running:
            self.fenced.add(rid)
            self.engine.cancel(rid)  # its slot frees at the next step; its output is dropped
        self.vouched.clear()  # the root vouches for our children again
        if dropped:
            log.info("registered again: dropped %d request(s) the root placed elsewhere", dropped)
        self.report_load()

    async def lookup_parent(self) -> str | None:
        self._found = self.loop.create_future()
        self.results.send(p.Lookup(name=self.cfg.parent))
        done, _ = await asyncio.wait([self._found], timeout=self.cfg.heartbeat)
        entries = self._found.result() if done else []
        return entries[0]["endpoint"] if entries else None

    def on_results(self, _ident, msg: p.Message) -> None:
        self.root_seen = time.monotonic()
        if isinstance(msg, p.Cancel):
            self.cancel(msg.id)
        elif isinstance(msg, p.Adopt):
            self.vouch(msg.name, msg.incarnation)
        elif isinstance(msg, p.Heartbeat):
            if self.epoch and msg.epoch != self.epoch:
                log.info("the root restarted (epoch %x -> %x); registering again", self.epoch,
                         msg.epoch)
                self.root_seen = 0.0  # the heartbeat loop registers again
                self.asked_back = True
        elif isinstance(msg, p.Welcome):
            if self._welcome is not None and not self._welcome.done():
                if self.incarnation and msg.incarnation != self.incarnation:
                    self.fence()  # now: the Adopts that follow the Welcome belong to the new one
                self._welcome.set_result(msg)
        elif isinstance(msg, p.Refused):
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(RegistrationRefused(msg.reason))
        elif isinstance(msg, p.Found):
            if self._found is not None and not self._found.done():
                self._found.set_result(msg.entries)
        elif isinstance(msg, p.Reregister):
            self.root_seen = 0.0
            self.asked_back = True
        elif isinstance(msg, p.Standby):  # a passive root: the other one, if we know it
            if self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(StandbyRoot(msg.reason, msg.active))
            else:
                self.root_seen = 0.0  # it stepped down: the heartbeat loop registers again
        else:
            log.warning("results: unexpected %s from the root", type(msg).__name__)

    # --- the parent -----------------------------------------------------------------------------

    async def connect_parent(self) -> None:
        """Connect `up` to the parent (the root's tree socket, or a node found in the registry)
        and wait until it answers: ready means the parent adopted us. Retries with backoff."""
        backoff = self.cfg.heartbeat / 2
        while True:
            endpoint = self.tree_endpoint if self.cfg.parent is None else await self.lookup_parent()
            if endpoint and await self.attach(endpoint):
                self.parent_seen = time.monotonic()
                if not self._joined.done():
                    self._joined.set_result(None)
                return
            log.info("parent %s is not reachable yet; retrying in %.1fs",
                     self.cfg.parent or "root", backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 8.0)

    async def attach(self, endpoint: str) -> bool:
        if self.up is not None:
            self.up.close()
        self.up = self.channel(zmq.DEALER, self.on_up, "up")
        self.link += 1  # the parent takes only a link newer than the one it holds
        self.received = 0  # see broker/routing.py: recv
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
            self._repairs[what] = task = self.loop.create_task(coro_fn())
            task.add_done_callback(self._repaired)

    def _repaired(self, task: asyncio.Task) -> None:
        if not task.cancelled() and isinstance(task.exception(), RegistrationRefused):
            self.fail(task.exception())

    def repairing(self) -> set[str]:
        return {what for what, task in self._repairs.items() if not task.done()}

    def on_up(self, _ident, msg: p.Message) -> None:
        self.parent_seen = time.monotonic()
        if self._parent_answered is not None and not self._parent_answered.done():
            self._parent_answered.set_result(None)
        if isinstance(msg, p.Dispatch):
            self.received += 1
            self.place(msg)
        elif not isinstance(msg, p.Heartbeat):
            log.warning("up: unexpected %s from the parent", type(msg).__name__)

    # --- liveness -------------------------------------------------------------------------------

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat)
            self.beat()

    def beat(self) -> None:
        now = time.monotonic()
        for child in self.children.expired(now - self.cfg.dead_after):
            log.info("child %s stopped answering; removing it from the ring", child.name)
            self.children.remove(child.name)
        self.probe_children()
        self.report_load(force=True)
        self.flush_acks()  # the root reads `held` after every ack sent before it
        self.results.send(p.Heartbeat(sender=self.cfg.name, load=self.own_load().to_dict(),
                                      held=self.held()))
        if self.draining:
            return  # leaving: nothing to repair
        if now - self.root_seen > self.cfg.dead_after and "root" not in self.repairing():
            log.warning("the root stopped answering; registering again")
            self.repair("root", self.rejoin)
        if now - self.parent_seen > self.cfg.dead_after and not self.repairing():
            log.warning("parent %s stopped answering; reconnecting", self.cfg.parent or "root")
            self.repair("parent", self.connect_parent)

    def probe_children(self) -> None:
        """Heartbeat every child; one whose connection is gone leaves the ring at once."""
        self._probing = False
        hb = p.Heartbeat(sender=self.cfg.name)
        for child in list(self.children):
            if not self.down.reaches(hb, child.identity):
                log.info("child %s closed its connection; removing it from the ring", child.name)
                self.children.remove(child.name)

    def held(self) -> list[int]:
        return [rid for rid in self.running if rid not in self.fenced] + \
            [d.rid for d in self.queue]

"""The root: admits requests from gateways, sends each down the node tree, streams results back.

Process: `treechat root`. It runs no model. Three ROUTER sockets on consecutive ports:

    front   (port)     gateways' DEALERs:   Hello, Heartbeat, Submit, Cancel, StatusQuery, Bye up;
                                            Deltas, Done, Error, StatusReply, Reregister down
    tree    (port+1)   top-level nodes:     Heartbeat (incarnation, subtree Load) up; Dispatch,
                                            Heartbeat down
    results (port+2)   every node, direct:  Register, Lookup, Heartbeat (held rids), Acks, Tokens,
                                            Done, Error, Bye up; Welcome, Refused, Found,
                                            Reregister, Heartbeat, Cancel, Adopt down

Every request gets a `request_id` (arrival order) and, per dispatch, a fresh random `rid`. The
in-flight table knows, from the nodes' acks, which node holds each request and the tokens
delivered so far. When a node is lost (its connection closes, its heartbeats stop, it hands work
back on SIGTERM), when a dispatch is not acknowledged in time, or when a node's heartbeat does not
list what the table places there, the request is dispatched again with those tokens, and the new
node continues after them: the client sees one answer, nothing missing and nothing twice.

This module is the core: lifecycle, heartbeats, admission and placement, endings. The gateway side
is `broker/front.py`, the node side (registration, adoption, acks, results, fencing)
`broker/nodeside.py`.

A tree may serve several models (each node one). A request runs only on a node of its model: the
root resolves its `model` at admission and every parent routes by the per-model capacity its
children report. Admission is per model and bounded: a request goes down only when a subtree of
its model has room; otherwise it waits in its model's queue at the root (`max_queue` each, so one
model's flood never holds back another's requests); when that is full too the gateway gets
`overloaded` at once. When the last node of a model is lost, that model's requests wait
`model_wait` seconds for one to come back (`up` restarts a node that dies), then fail clearly.

A request whose conversation ran on some node before goes back there when that node is not much
busier than the others (broker/affinity.py): its `route` names the way down.

Every request ends by its deadline (its own `timeout`, else `deadline`), with a `timeout` error.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import zmq

from broker import affinity
from broker import limits
from broker import protocol as p
from broker import security
from broker.front import Front
from broker.inflight import InFlight, Table
from broker.nodeside import NodeSide
from broker.pair import ACTIVE, PASSIVE, Pair
from broker.quiet import Quiet
from broker.registry import Registry
from broker.routing import POLICIES, Children
from broker.sockets import Channel, bind, make_socket
from broker.store import Store

log = logging.getLogger("treechat.root")

MAX_ATTEMPTS = 5  # dispatches per request before it fails with node_lost
ACK_BEATS = 2  # heartbeats a dispatch may go unacknowledged before it is taken back


@dataclass(frozen=True)
class RootConfig:
    host: str = "127.0.0.1"
    port: int = 5550
    policy: str = "least-loaded"
    max_queue: int = 256
    heartbeat: float = 1.0
    misses: int = 3  # heartbeats missed before a peer is declared dead
    grace: float = 30.0  # seconds SIGTERM waits for in-flight requests
    registry: str = "builtin"  # or "ldap": registrations are also written to an LDAP directory
    ldap_url: str | None = None
    ldap_base: str = "dc=treechat,dc=local"
    ldap_bind_dn: str | None = None
    ldap_password_file: str | None = None
    curve: str | None = None  # a `treechat keys` folder: encrypt and authenticate every socket
    deadline: float = 600.0  # seconds a request may take unless it sets its own timeout; 0: none
    insecure: bool = False  # allow listening on a non-loopback address without keys
    state_dir: str | None = None  # kept responses persist here (None: in memory, as long as we run)
    store_max: int = 10_000  # kept responses at most (the oldest go first)
    store_max_age: float = 30 * 86400.0  # seconds a kept response lives (OpenAI keeps 30 days)
    affinity: bool = True  # send a conversation's turns to the node that holds its cache
    standby_of: str | None = None  # HOST:PORT of the primary root this one stands by for
    member: str | None = None  # whose key of `curve` a standby shows its primary (default client)
    model_wait: float = 30.0  # seconds a model's requests wait for a node after its last is lost

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy '{self.policy}' (choose from {', '.join(POLICIES)})")
        if not 0 < self.port < 65534:
            raise ValueError("--port must leave room for three consecutive ports (front, tree, results)")
        if self.max_queue < 0:
            raise ValueError("--max-queue cannot be negative")
        if self.heartbeat <= 0:
            raise ValueError("--heartbeat must be positive")
        if self.deadline < 0:
            raise ValueError("--deadline cannot be negative (0: none)")
        if self.model_wait < 0:
            raise ValueError("--model-wait cannot be negative")
        if self.registry not in ("builtin", "ldap"):
            raise ValueError("--registry must be builtin or ldap")
        if self.registry == "ldap" and not (self.ldap_url and self.ldap_bind_dn
                                            and self.ldap_password_file):
            raise ValueError("--registry ldap needs --ldap-url, --ldap-bind-dn and "
                             "--ldap-password-file")
        if self.store_max < 1 or self.store_max_age <= 0:
            raise ValueError("--store-max and --store-max-age must be positive")
        security.require_keys(self.host, bool(self.curve), self.insecure,
                              "CurveZMQ keys (--curve DIR)")
        if self.standby_of is not None:
            host, _, port = self.standby_of.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"--standby-of must be HOST:PORT, not '{self.standby_of}'")

    def endpoint(self, offset: int) -> str:
        return f"tcp://{self.host}:{self.port + offset}"

    @property
    def dead_after(self) -> float:
        return self.heartbeat * self.misses

    @property
    def ack_timeout(self) -> float:
        return self.heartbeat * ACK_BEATS


class Root(Front, NodeSide):
    def __init__(self, cfg: RootConfig):
        self.cfg = cfg
        self.epoch = secrets.randbits(24) + 1  # tells peers a restarted root from the old one
        self.next_request_id = 0
        self.registry = Registry(cfg.dead_after)
        path = Path(cfg.state_dir, f"responses-{cfg.port}.jsonl") if cfg.state_dir else None
        self.store = Store(cfg.store_max, cfg.store_max_age, path)
        self.children = Children(cfg.policy)
        self.table = Table()
        self.queues: dict[str | None, deque[InFlight]] = {}  # per model, oldest first
        self.homes = affinity.Homes()
        self.lost_models: dict[str, tuple[float, str]] = {}  # model -> (when, its last node)
        self.gateways: dict = {}
        self.dropped: dict[bytes, float] = {}  # gateways declared lost: told to register again
        self._outboxes: dict[bytes, p.Deltas] = {}
        self._probing: set[str] = set()
        self.draining = False
        self.idle = asyncio.Event()
        self.quiet = Quiet(log)
        self.pair = Pair(cfg.standby_of, cfg.dead_after)
        self.peer = None  # a standby's link to its primary's front socket

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready=None) -> None:
        if self.cfg.registry == "ldap":
            from broker.ldap_store import LdapStore  # only roots that use LDAP need its client
            self.registry.store = await LdapStore.open(self.cfg)  # raises Fatal, clearly
        ctx = zmq.Context.instance()
        # It only listens, unless it stands by for a primary: then it connects to it as a member.
        member = (self.cfg.member or security.CLIENT) if self.cfg.standby_of else None
        curve = security.load(self.cfg.curve, member=member)

        def channel(handler, name):
            return Channel(make_socket(ctx, zmq.ROUTER, curve=curve,
                                       max_message=limits.ROOT_SOCKETS[name]), handler, name,
                           on_event=lambda ev, _value: self.on_event(name, ev))
        self.front = channel(self.on_front, "front")
        self.tree = channel(self.on_tree, "tree")
        self.results = channel(self.on_results, "results")
        for offset, ch in enumerate((self.front, self.tree, self.results)):
            bind(ch.sock, self.cfg.endpoint(offset))
        log.info("root %x listening: front %s, tree %s, nodes %s (policy %s, %s)", self.epoch,
                 self.cfg.endpoint(0), self.cfg.endpoint(1), self.cfg.endpoint(2), self.cfg.policy,
                 f"keys {self.cfg.curve}" if curve else "no keys")
        if self.cfg.standby_of:
            self.peer = Channel(make_socket(ctx, zmq.DEALER, curve=curve,
                                            max_message=limits.CONTROL), self.on_peer, "peer")
            self.peer.sock.connect(f"tcp://{self.cfg.standby_of}")
            log.info("standing by for the root at %s", self.cfg.standby_of)
        if ready:
            ready({"root": self.cfg.endpoint(0), "epoch": self.epoch})
        beat = asyncio.get_running_loop().create_task(self.heartbeat_loop())
        await stop.wait()
        await self.drain()
        beat.cancel()
        for ch in (self.front, self.tree, self.results, self.peer):
            if ch is not None:
                ch.close()
        if curve is not None:
            curve.close()
        if self.registry.store is not None:
            await self.registry.store.close()

    async def drain(self) -> None:
        """SIGTERM: refuse new work, let what runs finish (up to `grace`), fail the rest clearly."""
        self.draining = True
        for queue in list(self.queues.values()):
            for req in list(queue):
                self.fail(req, p.ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        self.queues.clear()
        if self.table.requests:
            self.idle.clear()
            try:
                await asyncio.wait_for(self.idle.wait(), self.cfg.grace)
            except asyncio.TimeoutError:
                pass
        for req in list(self.table.requests.values()):
            self.fail(req, p.ErrorCode.SHUTTING_DOWN, "the server shut down before it finished")

    async def heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat)
            self.beat()

    def heartbeat(self) -> p.Heartbeat:
        return p.Heartbeat(sender="root", epoch=self.epoch, interval=self.cfg.heartbeat)

    def beat(self) -> None:
        """Once a heartbeat: beat every peer (a send that finds no connection loses it), expire
        the silent ones, take back what was not acknowledged, fail what passed its deadline."""
        now = time.monotonic()
        if self.peer is not None:
            self.peer.send(self.peer_message(now))
        limit = now - self.cfg.dead_after
        for gw in list(self.gateways.values()):
            if gw.last_seen < limit:
                self.lose_gateway(gw, "stopped answering")
        self.probe("front")
        for child in self.children.expired(limit):
            log.info("top-level node %s stopped answering on the tree socket", child.name)
            self.children.remove(child.name)
        self.probe("tree")
        for entry in self.registry.expired():
            self.lose_node(entry.name, "missed its heartbeats")
        self.probe("results")
        self.take_back(now - self.cfg.ack_timeout)
        self.expire_deadlines(now)
        self.give_up_models(now - self.cfg.model_wait)
        self.forget_dropped(now)

    # --- the other root (broker/pair.py) --------------------------------------------------------

    def peer_message(self, now: float) -> p.Peer:
        return p.Peer(state=self.pair.state, epoch=self.epoch, active_for=self.pair.active_for(now),
                      address=f"{self.cfg.host}:{self.cfg.port}")

    def on_peer(self, _ident: bytes, msg: p.Message) -> None:
        """The primary's answer on a standby's peer link."""
        if isinstance(msg, p.Peer):
            self.heard_peer(msg)

    def heard_peer(self, msg: p.Peer) -> None:
        was = self.pair.state
        if self.pair.heard(msg.state, msg.active_for, msg.address, time.monotonic()) == PASSIVE \
                and was == ACTIVE:
            self.step_down()

    def standby(self) -> p.Standby:
        """What a passive root tells a member it will not serve."""
        now = time.monotonic()
        hint = self.pair.peer_address if self.pair.peer_alive(now) else None
        return p.Standby(reason=self.pair.why_not(now), active=hint)

    def step_down(self) -> None:
        """Both roots were active and the other has been for longer: tell every member to go
        there (gateways resubmit, nodes register there) and forget everything, as a restart."""
        bye = self.standby()
        for gw in self.gateways.values():
            self.front.send(bye, gw.identity)
        for entry in self.registry.entries.values():
            if entry.state != "dead":
                self.results.send(bye, entry.identity)
        self.gateways.clear()
        self._outboxes.clear()
        self.table = Table()
        self.queues.clear()
        self.children = Children(self.cfg.policy)
        self.registry.clear()
        self.epoch = secrets.randbits(24) + 1

    def on_event(self, socket: str, event: int) -> None:
        """A connection on `socket` closed: find out whose, on the next loop turn (once)."""
        if event == zmq.EVENT_DISCONNECTED and socket not in self._probing:
            self._probing.add(socket)
            asyncio.get_running_loop().call_soon(self.probe, socket)

    def probe(self, socket: str) -> None:
        """Heartbeat every peer of `socket`; a peer whose connection is gone is lost at once."""
        self._probing.discard(socket)
        hb = self.heartbeat()
        if socket == "front":
            for gw in list(self.gateways.values()):
                if not self.front.reaches(hb, gw.identity):
                    self.lose_gateway(gw, "disconnected")
        elif socket == "tree":
            for child in list(self.children):
                if not self.tree.reaches(hb, child.identity):
                    log.info("top-level node %s closed its tree connection", child.name)
                    self.children.remove(child.name)
        else:
            for entry in list(self.registry.entries.values()):
                if entry.state != "dead" and not self.results.reaches(hb, entry.identity):
                    self.lose_node(entry.name, "disconnected")

    # --- models ---------------------------------------------------------------------------------

    def models(self) -> set[str]:
        """The models some live node serves, and those whose last node may still come back."""
        return self.registry.models() | set(self.lost_models)

    def resolve(self, model: str | None, models: set[str]) -> str | None:
        """The model a request runs on, of `models` (the tree's now): the one it names (or the
        one a node gives that name as an alias), else the tree's first (as the gateways show
        it), else any (None: no node yet, as after a root restart)."""
        if model is not None:
            return model if model in models else self.registry.aliases().get(model, model)
        return min(models, default=None)

    def node_lost_model(self, name: str, model: str | None) -> None:
        """Node `name` of `model` is gone: when it was the model's last, its requests wait."""
        if model and model not in self.registry.models():
            waiting = sum(1 for r in self.table.requests.values() if r.model == model)
            log.log(logging.WARNING if waiting else logging.INFO, "model %s has no node left (its "
                    "last, %s, is gone); its %d request(s) wait %.0fs for one", model, name,
                    waiting, self.cfg.model_wait)
            self.lost_models[model] = (time.monotonic(), name)

    def give_up_models(self, older_than: float) -> None:
        for model, (at, name) in list(self.lost_models.items()):
            if model in self.registry.models():
                del self.lost_models[model]
            elif at < older_than:
                del self.lost_models[model]
                for req in [r for r in self.table.requests.values() if r.model == model]:
                    self.fail(req, p.ErrorCode.NODE_LOST, f"no node serves the model '{model}' "
                              f"any more (its last node, {name}, was lost)")

    # --- down the tree --------------------------------------------------------------------------

    def has_room(self, model: str | None) -> bool:
        if self.cfg.policy == "seed":
            total = self.children.total().of(model)
            return total is not None and total.free + total.room > 0
        return any((load := c.load.of(model)) is not None and load.free > 0 and not c.load.draining
                   for c in self.children)

    def queued(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def enqueue(self, req: InFlight, first: bool = False) -> None:
        queue = self.queues.setdefault(req.model, deque())
        queue.appendleft(req) if first else queue.append(req)

    def new_rid(self) -> int:
        """A random 63-bit rid: a node that sees some rids cannot guess another request's."""
        while True:
            rid = secrets.randbits(63)
            if rid and rid not in self.table.by_rid:
                return rid

    @staticmethod
    def conversation(req: InFlight) -> list[bytes]:
        """`req`'s conversation keys (broker/affinity.py), made once."""
        if req.keys is None:
            req.keys = affinity.keys(req.model, req.request)
        return req.keys

    def home_route(self, req: InFlight) -> list[str] | None:
        """The way down to the node that ran `req`'s conversation, when it may take one more
        request (broker/affinity.py); None: let the policy choose."""
        if not self.cfg.affinity:
            return None

        def serves(name: str) -> bool:
            entry = self.registry.entries.get(name)
            return entry is not None and entry.state == "alive" and entry.model == req.model
        home = self.homes.find(self.conversation(req), serves)
        if home is None:
            return None
        peers = [e for e in self.registry.entries.values()
                 if e.state == "alive" and e.model == req.model and e.slots > 0]
        placed = self.table.placed()
        if not affinity.fits(placed.get(home, 0), self.registry.entries[home].slots,
                             sum(placed.get(e.name, 0) for e in peers), len(peers)):
            return None
        return self.registry.path(home)

    def dispatch(self, req: InFlight) -> bool:
        """Send `req` to a child; False when no child has room (the caller queues it)."""
        route = self.home_route(req) if self.has_room(req.model) else None
        while self.has_room(req.model):
            child = self.children.pick(req.model, need_free=True,
                                       prefer=route[0] if route else None)
            if child is None:
                return False
            if route and child.name != route[0]:
                route = None  # its home's subtree is full: wherever the policy says
            rid = self.new_rid()
            msg = p.Dispatch(rid=rid, request=req.request, hop=1, resume_ids=req.ids,
                             resume_text=req.text, model=req.model, route=route)
            if self.tree.send(msg, child.identity):
                self.children.note_sent(child, req.model)
                self.table.place(req, rid, holder="root", state="forwarded", to=child.name,
                                 now=time.monotonic())
                req.home = route[-1] if route else None
                return True
            log.info("top-level node %s is unreachable; removing it", child.name)
            self.children.remove(child.name)
        return False

    def pump(self) -> None:
        """Room appeared somewhere: send queued requests down, each model's oldest first."""
        for model, queue in list(self.queues.items()):
            while queue and self.dispatch(queue[0]):
                queue.popleft()
            if not queue:
                del self.queues[model]

    def redispatch(self, req: InFlight, why: str) -> None:
        self.cancel_at_node(req)  # wherever a copy may still run, it stops
        self.table.unplace(req)
        req.attempts += 1
        if req.attempts >= MAX_ATTEMPTS:
            return self.fail(req, p.ErrorCode.NODE_LOST,
                             f"the request was lost with {req.attempts} nodes ({why})")
        log.info("request %d: dispatching again after %d tokens (%s)", req.request_id,
                 len(req.ids), why)
        if not self.dispatch(req):
            self.enqueue(req, first=True)  # it was admitted long ago: first in line

    def take_back(self, older_than: float) -> None:
        for req in self.table.unacknowledged(older_than):
            self.redispatch(req, f"no node acknowledged it on its way to {req.to}")

    # --- endings --------------------------------------------------------------------------------

    def finish(self, req: InFlight, final: p.Done | p.Error | None, *, stop_node=True) -> None:
        """Remove `req` everywhere and tell its gateway `final` (None: the caller tells it, or the
        gateway is gone). `stop_node`: the node still works on it and must be told to cancel."""
        if stop_node and req.rid is not None:
            self.cancel_at_node(req)
        queue = self.queues.get(req.model)
        if req.rid is None and queue and req in queue:  # never dispatched: it waits at the root
            queue.remove(req)
        self.table.remove(req)
        if final is not None:
            self.to_gateway(final, req.gateway)
        if not self.table.requests:
            self.idle.set()

    def fail(self, req: InFlight, code: str, message: str) -> None:
        self.finish(req, p.Error(id=req.ref, code=code, message=message))

    def expire_deadlines(self, now: float) -> None:
        for req in [r for r in self.table.requests.values() if r.deadline and r.deadline < now]:
            self.fail(req, p.ErrorCode.TIMEOUT, "the request passed its deadline")

    def status(self) -> dict:
        return {"root": {"epoch": self.epoch, "policy": self.cfg.policy, "queued": self.queued(),
                         "pair": self.pair.describe(),
                         "queued_by_model": {m or "any": len(q) for m, q in self.queues.items()},
                         "affinity": self.cfg.affinity,
                         "max_queue": self.cfg.max_queue, "in_flight": len(self.table.requests),
                         "deadline": self.cfg.deadline or None,
                         "gateways": sorted(g.name for g in self.gateways.values()),
                         "children": [c.name for c in self.children],
                         "connections_dropped": {ch.name: ch.dropped for ch in
                                                 (self.front, self.tree, self.results)}},
                "nodes": [e.public() for e in self.registry.entries.values()]}

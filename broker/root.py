"""The root: admits requests from gateways, sends each down the node tree, streams results back.

Process: `treechat root`. It runs no model. Three ROUTER sockets on consecutive ports:

    front   (port)     gateways' DEALERs:   Hello, Heartbeat, Submit, Cancel, StatusQuery
    tree    (port+1)   top-level nodes:     Heartbeat (with subtree Load) up; Dispatch, Heartbeat down
    results (port+2)   every node, direct:  Register, Lookup, Heartbeat, Acks, Tokens, Done, Error, Bye
                                            up; Welcome, Refused, Found, Reregister, Heartbeat, Cancel down

Every request gets a `request_id` (arrival order) and, per dispatch, a fresh `rid`. The in-flight
table knows, from the nodes' acks, which node holds each request and the tokens delivered so far.
When a node is lost (heartbeats stop, or it hands work back on SIGTERM), every request it held is
dispatched again with those tokens, and the new node continues after them: the client sees one
answer, nothing missing and nothing twice. Results for a superseded rid match nothing and are
dropped; the node that sent them is told to cancel.

Admission is bounded: a request goes down only when the tree reports room; otherwise it waits in
the root's queue (`max_queue`); when that is full too the gateway gets `overloaded` at once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from broker import protocol as p
from broker import security
from broker.inflight import InFlight, Table
from broker.registry import Registry
from broker.sockets import Channel, bind, make_socket
from broker.routing import POLICIES, Children

log = logging.getLogger("treechat.root")

MAX_ATTEMPTS = 5  # dispatches per request before it fails with node_lost


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

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy '{self.policy}' (choose from {', '.join(POLICIES)})")
        if not 0 < self.port < 65534:
            raise ValueError("--port must leave room for three consecutive ports (front, tree, results)")
        if self.max_queue < 0:
            raise ValueError("--max-queue cannot be negative")
        if self.heartbeat <= 0:
            raise ValueError("--heartbeat must be positive")
        if self.registry not in ("builtin", "ldap"):
            raise ValueError("--registry must be builtin or ldap")
        if self.registry == "ldap" and not (self.ldap_url and self.ldap_bind_dn
                                            and self.ldap_password_file):
            raise ValueError("--registry ldap needs --ldap-url, --ldap-bind-dn and "
                             "--ldap-password-file")

    def endpoint(self, offset: int) -> str:
        return f"tcp://{self.host}:{self.port + offset}"

    @property
    def dead_after(self) -> float:
        return self.heartbeat * self.misses


@dataclass(slots=True)
class Gateway:
    identity: bytes
    name: str = "?"
    last_seen: float = field(default_factory=time.monotonic)


class Root:
    def __init__(self, cfg: RootConfig):
        self.cfg = cfg
        self.epoch = secrets.randbits(24) + 1  # rids are epoch << 32 | n: unique across restarts
        self.next_rid = 0
        self.next_request_id = 0
        self.registry = Registry(cfg.dead_after)
        self.children = Children(cfg.policy)
        self.table = Table()
        self.queue: deque[InFlight] = deque()
        self.gateways: dict[bytes, Gateway] = {}
        self._outboxes: dict[bytes, p.Deltas] = {}
        self.draining = False
        self.idle = asyncio.Event()

    # --- lifecycle ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event, ready=None) -> None:
        if self.cfg.registry == "ldap":
            from broker.ldap_store import LdapStore  # only roots that use LDAP need its client
            self.registry.store = await LdapStore.open(self.cfg)  # raises Fatal, clearly
        ctx = zmq.Context.instance()
        curve = security.load(self.cfg.curve)
        self.front = Channel(make_socket(ctx, zmq.ROUTER, curve=curve), self.on_front, "front")
        self.tree = Channel(make_socket(ctx, zmq.ROUTER, curve=curve), self.on_tree, "tree")
        self.results = Channel(make_socket(ctx, zmq.ROUTER, curve=curve), self.on_results,
                               "results")
        for offset, ch in enumerate((self.front, self.tree, self.results)):
            bind(ch.sock, self.cfg.endpoint(offset))
        log.info("root %x listening: front %s, tree %s, nodes %s (policy %s)", self.epoch,
                 self.cfg.endpoint(0), self.cfg.endpoint(1), self.cfg.endpoint(2), self.cfg.policy)
        if ready:
            ready({"root": self.cfg.endpoint(0), "epoch": self.epoch})
        beat = asyncio.get_running_loop().create_task(self.heartbeat_loop())
        await stop.wait()
        await self.drain()
        beat.cancel()
        for ch in (self.front, self.tree, self.results):
            ch.close()
        if curve is not None:
            curve.close()
        if self.registry.store is not None:
            await self.registry.store.close()

    async def drain(self) -> None:
        """SIGTERM: refuse new work, let what runs finish (up to `grace`), fail the rest clearly."""
        self.draining = True
        for req in list(self.queue):
            self.fail(req, p.ErrorCode.SHUTTING_DOWN, "the server is shutting down")
        self.queue.clear()
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

    def beat(self) -> None:
        hb = p.Heartbeat(sender="root", epoch=self.epoch, interval=self.cfg.heartbeat)
        now = time.monotonic()
        limit = now - self.cfg.dead_after
        for gw in list(self.gateways.values()):
            if gw.last_seen < limit:
                self.lose_gateway(gw)
            else:
                self.front.send(hb, gw.identity)
        for child in self.children.expired(limit):
            log.warning("top-level node %s stopped answering on the tree socket", child.name)
            self.children.remove(child.name)
        for child in self.children:
            self.tree.send(hb, child.identity)
        for entry in self.registry.expired():
            self.lose_node(entry.name, "missed its heartbeats")
        for entry in self.registry.entries.values():
            if entry.state != "dead":
                self.results.send(hb, entry.identity)
        self.expire_deadlines(now)

    # --- gateways -------------------------------------------------------------------------------

    def on_front(self, ident: bytes, msg: p.Message) -> None:
        gw = self.gateways.get(ident)
        if gw is None:
            gw = self.gateways[ident] = Gateway(ident)
        gw.last_seen = time.monotonic()
        if isinstance(msg, p.Submit):
            self.submit(gw, msg)
        elif isinstance(msg, p.Cancel):
            self.cancel_ref(ident, msg.id)
        elif isinstance(msg, p.Hello):
            gw.name = msg.name
            self.front.send(p.Heartbeat(sender="root", epoch=self.epoch, interval=self.cfg.heartbeat), ident)
        elif isinstance(msg, p.StatusQuery):
            self.front.send(p.StatusReply(ref=msg.ref, tree=self.status()), ident)
        elif isinstance(msg, p.Lookup):
            self.front.send(p.Found(entries=self.registry.lookup(msg.name)), ident)
        elif not isinstance(msg, p.Heartbeat):
            log.warning("front: unexpected %s from a gateway", type(msg).__name__)

    def submit(self, gw: Gateway, msg: p.Submit) -> None:
        def refuse(code, text, retry_after=None):
            self.to_gateway(p.Error(id=msg.ref, code=code, message=text, retry_after=retry_after),
                            gw.identity)

        if self.draining:
            return refuse(p.ErrorCode.SHUTTING_DOWN, "the server is shutting down", 1.0)
        try:
            request = p.Request.from_dict(msg.request)
        except p.BadRequest as e:
            return refuse(p.ErrorCode.BAD_REQUEST, str(e))
        models = self.registry.models()
        if request.model and models and request.model not in models:
            return refuse(p.ErrorCode.UNKNOWN_MODEL, f"the model '{request.model}' does not exist "
                          f"here; this tree serves {', '.join(sorted(models))}")
        if not self.has_room() and len(self.queue) >= self.cfg.max_queue:
            return refuse(p.ErrorCode.OVERLOADED, "every node is busy and the queue is full; "
                          "try again shortly", 1.0)
        self.next_request_id += 1
        req = InFlight(self.next_request_id, gw.identity, msg.ref, msg.request)
        if msg.timeout:
            req.deadline = time.monotonic() + msg.timeout
        self.table.add(req)
        self.outbox(gw.identity).accepted.append([msg.ref, req.request_id])
        if self.queue or not self.dispatch(req):
            self.queue.append(req)
            self.pump()

    def cancel_ref(self, gateway: bytes, ref: int) -> None:
        req = self.table.by_ref.get((gateway, ref))
        if req is None:
            return  # already finished: the gateway has (or will get) its final message
        self.finish(req, p.Done(id=ref, finish_reason="cancelled",
                                completion_tokens=len(req.ids)))

    def lose_gateway(self, gw: Gateway) -> None:
        log.warning("gateway %s stopped answering; cancelling its requests", gw.name)
        del self.gateways[gw.identity]
        for req in [r for r in self.table.requests.values() if r.gateway == gw.identity]:
            # If it is only slow, not gone, it must still hear that its requests ended.
            self.fail(req, p.ErrorCode.ROOT_LOST,
                      "the root lost contact with this gateway and cancelled the request")

    # --- down the tree --------------------------------------------------------------------------

    def has_room(self) -> bool:
        if self.cfg.policy == "seed":
            total = self.children.total()
            return total.free + total.room > 0
        return any(c.load.free > 0 and not c.load.draining for c in self.children)

    def dispatch(self, req: InFlight) -> bool:
        """Send `req` to a child; False when no child has room (the caller queues it)."""
        while self.has_room():
            child = self.children.pick(need_free=True)
            if child is None:
                return False
            self.next_rid += 1
            rid = (self.epoch << 32) | self.next_rid
            msg = p.Dispatch(rid=rid, request=req.request, hop=1, resume_ids=req.ids,
                             resume_text=req.text)
            if self.tree.send(msg, child.identity):
                self.children.note_sent(child)
                self.table.place(req, rid, holder="root", state="forwarded", to=child.name)
                return True
            log.warning("top-level node %s is unreachable; removing it", child.name)
            self.children.remove(child.name)
        return False

    def pump(self) -> None:
        """Room appeared somewhere: send queued requests down, oldest first."""
        while self.queue and self.dispatch(self.queue[0]):
            self.queue.popleft()

    def redispatch(self, req: InFlight, why: str) -> None:
        self.table.unplace(req)
        req.attempts += 1
        if req.attempts >= MAX_ATTEMPTS:
            return self.fail(req, p.ErrorCode.NODE_LOST,
                             f"the request was lost with {req.attempts} nodes ({why})")
        log.info("request %d: dispatching again after %d tokens (%s)", req.request_id,
                 len(req.ids), why)
        if not self.dispatch(req):
            self.queue.appendleft(req)  # it was admitted long ago: first in line

    def on_tree(self, ident: bytes, msg: p.Message) -> None:
        if isinstance(msg, p.Heartbeat):
            name = ident.decode(errors="replace")
            if self.children.get(name) is None:
                self.tree.send(p.Heartbeat(sender="root", epoch=self.epoch, interval=self.cfg.heartbeat), ident)  # welcome it
            self.children.seen(name, ident, msg.load)
            self.pump()
        else:
            log.warning("tree: unexpected %s from %r", type(msg).__name__, ident)

    # --- results, straight from the nodes -------------------------------------------------------

    def on_results(self, ident: bytes, msg: p.Message) -> None:
        if isinstance(msg, p.Register):
            return self.register(ident, msg)
        if isinstance(msg, p.Lookup):
            return self.results.send(p.Found(entries=self.registry.lookup(msg.name)), ident)
        entry = self.registry.by_identity.get(ident)
        if entry is None:
            # A node registered with an earlier root, or one declared dead: it must register again.
            self.results.send(p.Reregister(epoch=self.epoch), ident)
            if isinstance(msg, p.Tokens):
                for rid in {item[0] for item in msg.items}:
                    self.results.send(p.Cancel(id=rid), ident)
            return
        entry.last_seen = time.monotonic()
        if isinstance(msg, p.Tokens):
            self.tokens(entry.name, ident, msg)
        elif isinstance(msg, p.Acks):
            self.acks(entry.name, ident, msg)
        elif isinstance(msg, (p.Done, p.Error)):
            self.node_result(ident, msg)
        elif isinstance(msg, p.Heartbeat):
            if msg.load is not None:
                entry.load.__init__(**{k: msg.load.get(k, 0) for k in ("slots", "free", "queued",
                                                                         "room", "running")})
                entry.state = "draining" if msg.load.get("draining") else "alive"
        elif isinstance(msg, p.Bye):
            self.lose_node(entry.name, "left", unregister=True)

    def register(self, ident: bytes, msg: p.Register) -> None:
        why = self.registry.conflict(msg)
        if why:
            log.warning("refused node %s: %s", msg.name, why)
            return self.results.send(p.Refused(name=msg.name, reason=why), ident)
        old = self.registry.entries.get(msg.name)
        if old is not None and old.instance != msg.instance and old.state != "dead":
            self.lose_node(old.name, "restarted")
        entry, _ = self.registry.bind(ident, msg)
        log.info("node %s registered (parent %s, %d slots, %s)", msg.name, msg.parent or "root",
                 msg.slots, msg.model or msg.engine)
        self.results.send(p.Welcome(name=msg.name, epoch=self.epoch, tree=self.cfg.endpoint(1),
                                    heartbeat=self.cfg.heartbeat), ident)

    def acks(self, name: str, ident: bytes, msg: p.Acks) -> None:
        for rid, hop, state, to in msg.items:
            req = self.table.by_rid.get(rid)
            if req is None:
                if state != "forwarded":
                    self.results.send(p.Cancel(id=rid), ident)  # cancelled or superseded
                continue
            if hop >= req.hop:
                req.holder, req.state, req.to, req.hop = name, state, to, hop

    def tokens(self, name: str, ident: bytes, msg: p.Tokens) -> None:
        for item in msg.items:
            rid, text, ids = item[0], item[1], item[2]
            req = self.table.by_rid.get(rid)
            if req is None:
                self.results.send(p.Cancel(id=rid), ident)
                continue
            if req.state != "running":  # the first token can beat its ack: same socket, but
                req.holder, req.state = name, "running"  # acks are batched a turn later
            req.ids.extend(ids)
            req.text += text
            if req.first_token_at is None:
                req.first_token_at = time.monotonic()
            out = [req.ref, text, len(ids)]
            if len(item) > 3:
                out.append(item[3])  # logprobs, passed through untouched
            self.outbox(req.gateway).items.append(out)
        for rid, reason, prompt_tokens, completion_tokens in msg.done:
            req = self.table.by_rid.get(rid)
            if req is None:
                continue  # late result of a superseded dispatch, or of a cancelled request
            completion = max(completion_tokens, len(req.ids))
            self.outbox(req.gateway).done.append([req.ref, reason, prompt_tokens, completion])
            self.finish(req, None, stop_node=False)

    def outbox(self, gateway: bytes) -> p.Deltas:
        """What this loop turn has for `gateway`: sent as one message when the turn ends."""
        box = self._outboxes.get(gateway)
        if box is None:
            if not self._outboxes:  # the first of this turn: send them all when it ends
                asyncio.get_running_loop().call_soon(self.flush_outboxes)
            box = self._outboxes[gateway] = p.Deltas(items=[])
        return box

    def flush_outboxes(self) -> None:
        boxes, self._outboxes = self._outboxes, {}
        for gateway, box in boxes.items():
            self.front.send(box, gateway)

    def to_gateway(self, msg: p.Message, gateway: bytes) -> None:
        """Send at once, after what this turn already holds for the gateway (order is kept)."""
        box = self._outboxes.pop(gateway, None)
        if box is not None:
            self.front.send(box, gateway)
        self.front.send(msg, gateway)

    def node_result(self, ident: bytes, msg: p.Done | p.Error) -> None:
        req = self.table.by_rid.get(msg.id)
        if req is None:
            return  # late result of a superseded dispatch, or of a cancelled request
        if isinstance(msg, p.Error) and msg.code in (p.ErrorCode.HANDED_BACK,
                                                     p.ErrorCode.OVERLOADED):
            return self.redispatch(req, f"node answered {msg.code}")
        if isinstance(msg, p.Done):
            completion = max(msg.completion_tokens, len(req.ids))
            self.finish(req, p.Done(id=req.ref, finish_reason=msg.finish_reason,
                                    prompt_tokens=msg.prompt_tokens, completion_tokens=completion),
                        stop_node=False)
        else:
            self.finish(req, p.Error(id=req.ref, code=msg.code, message=msg.message),
                        stop_node=False)

    def lose_node(self, name: str, why: str, unregister: bool = False) -> None:
        entry = self.registry.entries.get(name)
        if entry is None:
            return
        log.warning("node %s %s; re-dispatching what it held", name, why)
        if unregister:
            self.registry.unbind(name)
        else:
            self.registry.mark_dead(entry)
        self.children.remove(name)
        for req in self.table.held_by(name):
            self.redispatch(req, f"node {name} {why}")
        self.pump()

    # --- endings --------------------------------------------------------------------------------

    def finish(self, req: InFlight, final: p.Done | p.Error | None, *, stop_node=True) -> None:
        """Remove `req` everywhere and tell its gateway `final` (None: the caller tells it, or the
        gateway is gone). `stop_node`: the node still works on it and must be told to cancel."""
        if stop_node and req.rid is not None:
            self.cancel_at_node(req)
        if req.rid is None and req in self.queue:  # never dispatched: it waits at the root
            self.queue.remove(req)
        self.table.remove(req)
        if final is not None:
            self.to_gateway(final, req.gateway)
        if not self.table.requests:
            self.idle.set()

    def cancel_at_node(self, req: InFlight) -> None:
        for name in {req.holder, req.to} - {None, "root"}:
            entry = self.registry.entries.get(name)
            if entry is not None and entry.state != "dead":
                self.results.send(p.Cancel(id=req.rid), entry.identity)

    def fail(self, req: InFlight, code: str, message: str) -> None:
        self.finish(req, p.Error(id=req.ref, code=code, message=message))

    def expire_deadlines(self, now: float) -> None:
        for req in [r for r in self.table.requests.values() if r.deadline and r.deadline < now]:
            self.fail(req, p.ErrorCode.TIMEOUT, "the request passed its deadline")

    def status(self) -> dict:
        return {"root": {"epoch": self.epoch, "policy": self.cfg.policy, "queued": len(self.queue),
                         "max_queue": self.cfg.max_queue, "in_flight": len(self.table.requests),
                         "gateways": sorted(g.name for g in self.gateways.values()),
                         "children": [c.name for c in self.children]},
                "nodes": [e.public() for e in self.registry.entries.values()]}

"""The root's gateway side: the front socket (part of `broker.root.Root`).

    gateway -> root:  Hello, Heartbeat, Submit, Cancel, StatusQuery, Lookup, Keep, Bye
    root -> gateway:  Heartbeat, Deltas (one per gateway per loop turn), Done, Error, StatusReply,
                      Found, Kept, Reregister

A gateway is known from its first message. It is lost when its connection closes (the socket's
monitor sees the close, a probe finds which one), when it stops beating, or when it says Bye; its
requests are cancelled down the tree at once. A lost gateway that speaks again (it was only slow)
is told to register again: it says Hello and resubmits what it still has open, with the tokens it
already delivered, as it does after a root restart, so its clients still get whole answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from broker import protocol as p
from broker.inflight import InFlight

log = logging.getLogger("treechat.root")

DROPPED_KEPT = 60.0  # seconds a lost gateway's identity is remembered (to tell it to register)


@dataclass(slots=True)
class Gateway:
    identity: bytes
    name: str = "?"
    last_seen: float = field(default_factory=time.monotonic)


class Front:
    """Mixed into `Root`: everything the front socket carries."""

    def on_front(self, ident: bytes, msg: p.Message) -> None:
        if isinstance(msg, p.Peer):  # our standby, every heartbeat: answer with our state
            self.heard_peer(msg)
            self.front.send(self.peer_message(time.monotonic()), ident)
            return
        if not self.pair.active and not self.serves(ident, msg):
            return
        gw = self.gateways.get(ident)
        if gw is None:
            if isinstance(msg, p.Bye):
                return
            if self.dropped.pop(ident, None) is not None and not isinstance(msg, p.Hello):
                # We declared it lost and cancelled its requests: it must say Hello and resubmit.
                self.front.send(p.Reregister(epoch=self.epoch), ident)
                return
            gw = self.gateways[ident] = Gateway(ident)
        gw.last_seen = time.monotonic()
        if isinstance(msg, p.Submit):
            self.submit(gw, msg)
        elif isinstance(msg, p.Cancel):
            self.cancel_ref(ident, msg.id)
        elif isinstance(msg, p.Hello):
            gw.name = msg.name
            log.debug("gateway %s connected", gw.name)
            self.front.send(self.heartbeat(), ident)
        elif isinstance(msg, p.StatusQuery):
            self.front.send(p.StatusReply(ref=msg.ref, tree=self.status()), ident)
        elif isinstance(msg, p.Lookup):
            self.front.send(p.Found(entries=self.registry.lookup(msg.name)), ident)
        elif isinstance(msg, p.Keep):
            self.front.send(self.keep(msg), ident)
        elif isinstance(msg, p.Bye):
            self.lose_gateway(gw, "left")
        elif not isinstance(msg, p.Heartbeat):
            self.quiet.warning("unexpected front messages", ident,
                               "front: unexpected %s from gateway %s", type(msg).__name__, gw.name)

    def serves(self, ident: bytes, msg: p.Message) -> bool:
        """A passive root: a status query is answered (it shows this root's state), a member
        that lost the active root may make this one active (broker/pair.py), anything else is
        told that this root is the standby."""
        if isinstance(msg, p.StatusQuery):
            self.front.send(p.StatusReply(ref=msg.ref, tree=self.status()), ident)
            return False
        if isinstance(msg, p.Bye):
            return False
        lost = isinstance(msg, p.Hello) and msg.lost
        if self.pair.member(lost, time.monotonic()):
            return True
        self.front.send(self.standby(), ident)
        return False

    def submit(self, gw, msg: p.Submit) -> None:
        def refuse(code, text, retry_after=None):
            self.to_gateway(p.Error(id=msg.ref, code=code, message=text, retry_after=retry_after),
                            gw.identity)

        if self.draining:
            return refuse(p.ErrorCode.SHUTTING_DOWN, "the server is shutting down", 1.0)
        try:
            request = p.Request.from_dict(msg.request)
        except p.BadRequest as e:
            return refuse(p.ErrorCode.BAD_REQUEST, str(e))
        models = self.models()
        model = self.resolve(request.model, models)
        if not msg.resubmit:  # a resubmitted request was admitted before: it gets back in
            if model is not None and models and model not in models:
                return refuse(p.ErrorCode.UNKNOWN_MODEL, f"the model '{model}' does not "
                              f"exist here; this tree serves {', '.join(sorted(models))}")
            if not self.has_room(model) and len(self.queues.get(model, ())) >= self.cfg.max_queue:
                return refuse(p.ErrorCode.OVERLOADED, "every node is busy and the queue is full; "
                              "try again shortly", 1.0)
        self.next_request_id += 1
        req = InFlight(self.next_request_id, gw.identity, msg.ref, msg.request,
                       ids=list(msg.resume_ids), text=msg.resume_text, model=model)
        timeout = msg.timeout or self.cfg.deadline
        if timeout:
            req.deadline = time.monotonic() + timeout
        self.table.add(req)
        self.outbox(gw.identity).accepted.append([msg.ref, req.request_id])
        if request.max_tokens is not None and len(req.ids) >= request.max_tokens:
            # Resubmitted with every token it may have: only its finish was lost.
            return self.finish(req, p.Done(id=msg.ref, finish_reason="length",
                                           completion_tokens=len(req.ids)))
        if self.queues.get(model) or not self.dispatch(req):
            self.enqueue(req)
            self.pump()

    def keep(self, msg: p.Keep) -> p.Kept:
        """The store of kept responses (broker/store.py); asking twice is harmless."""
        if msg.op == "put" and msg.value is not None:
            self.store.put(msg.key, msg.value)
            return p.Kept(ref=msg.ref, found=True)
        if msg.op == "delete":
            return p.Kept(ref=msg.ref, found=self.store.delete(msg.key))
        value = self.store.get(msg.key) if msg.op == "get" else None
        return p.Kept(ref=msg.ref, found=value is not None, value=value)

    def cancel_ref(self, gateway: bytes, ref: int) -> None:
        req = self.table.by_ref.get((gateway, ref))
        if req is None:
            return  # already finished: the gateway has (or will get) its final message
        self.finish(req, p.Done(id=ref, finish_reason="cancelled",
                                completion_tokens=len(req.ids)))

    def lose_gateway(self, gw, why: str) -> None:
        """Forget a gateway and cancel its requests in the tree (nobody reads their answers)."""
        if self.gateways.pop(gw.identity, None) is None:
            return
        mine = [r for r in self.table.requests.values() if r.gateway == gw.identity]
        if why != "left":
            self.dropped[gw.identity] = time.monotonic()
        if mine:
            log.warning("gateway %s %s; cancelling its %d request(s)", gw.name, why, len(mine))
        else:
            log.debug("gateway %s %s", gw.name, why)
        self._outboxes.pop(gw.identity, None)
        for req in mine:
            self.finish(req, None)

    def forget_dropped(self, now: float) -> None:
        for ident, at in list(self.dropped.items()):
            if at < now - DROPPED_KEPT:
                del self.dropped[ident]

    # --- to the gateways ------------------------------------------------------------------------

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

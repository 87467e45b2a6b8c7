"""The root's node side: the tree and results sockets (part of `broker.root.Root`).

    results:  Register, Lookup, Heartbeat (held rids), Acks, Tokens, Done, Error, Bye up;
              Welcome, Refused, Found, Reregister, Heartbeat, Cancel, Adopt down
    tree:     Heartbeat (incarnation, subtree Load) up from top-level nodes; Dispatch down

Registration and adoption, per incarnation: every Register from a new connection is a new
incarnation (broker/registry.py); an older incarnation of that name is lost first, and whatever
it held is dispatched again. The root adopts a top-level connection on its tree socket only when
its heartbeat shows the incarnation registered now, and tells every other parent, with Adopt,
which incarnation of each child to take (0: drop it). So a node that wakes from a stall, or an
old connection still draining, is handed no work: it must register again, and then it holds
nothing of before.

Fencing of results: Tokens, Done and Error for a rid count only from the node that holds it
(`claims`), and an ack only from a node inside the subtree it was sent to. Reconciliation: each
node's heartbeat lists the rids it holds; a request the table places there that is not listed
is dispatched again, and a listed rid the table does not know is cancelled there.
"""

from __future__ import annotations

import logging
import time

from broker import protocol as p
from broker.inflight import InFlight
from broker.registry import Entry
from broker.routing import Load

log = logging.getLogger("treechat.root")


class NodeSide:
    """Mixed into `Root`: everything the tree and results sockets carry."""

    # --- the tree socket: adoption of top-level nodes -------------------------------------------

    def on_tree(self, ident: bytes, msg: p.Message) -> None:
        if not self.pair.active:
            return  # a passive root adopts nobody: its nodes register first (on_results)
        if not isinstance(msg, p.Heartbeat):
            return self.quiet.warning("unexpected tree messages", ident, "tree: unexpected %s "
                                      "from %r", type(msg).__name__, ident)
        child = self.children.find(ident)
        if child is None:
            entry = self.registry.entries.get(msg.sender)
            if entry is not None and entry.parent is None and msg.incarnation \
                    and entry.incarnation != msg.incarnation:
                return log.debug("tree: ignored an old incarnation of %s", msg.sender)
            if entry is None or entry.state == "dead" or entry.parent is not None \
                    or not msg.incarnation:
                return self.quiet.info("unregistered tree connections", ident,
                                       "tree: ignored '%s': not a registered top-level node",
                                       msg.sender[:64])
            child = self.children.adopt(msg.sender, ident, msg.incarnation, msg.load)
            if child is None:
                return  # an older connection of the incarnation we adopted: drop it
            log.info("top-level node %s attached", child.name)
            self.tree.send(self.heartbeat(), ident)  # welcome it: it waits for an answer
        else:
            self.children.seen(child, msg.load)
        self.pump()

    # --- the results socket ---------------------------------------------------------------------

    def on_results(self, ident: bytes, msg: p.Message) -> None:
        if not self.pair.active:
            lost = isinstance(msg, p.Register) and msg.lost
            if not self.pair.member(lost, time.monotonic()):
                return self.results.send(self.standby(), ident)
        if isinstance(msg, p.Register):
            return self.register(ident, msg)
        if isinstance(msg, p.Lookup):
            return self.results.send(p.Found(entries=self.registry.lookup(msg.name)), ident)
        entry = self.registry.by_identity.get(ident)
        if entry is None:
            # A node of an earlier root, one declared lost, or a stranger: register first.
            self.results.send(p.Reregister(epoch=self.epoch), ident)
            return
        entry.last_seen = time.monotonic()
        if isinstance(msg, p.Tokens):
            self.tokens(entry, ident, msg)
        elif isinstance(msg, p.Acks):
            self.acks(entry, ident, msg)
        elif isinstance(msg, (p.Done, p.Error)):
            self.node_result(entry, msg)
        elif isinstance(msg, p.Heartbeat):
            if msg.load is not None:
                entry.load = Load.from_dict(msg.load)
                entry.state = "draining" if msg.load.get("draining") else "alive"
            if msg.held is not None:
                self.reconcile(entry, ident, msg.held)
        elif isinstance(msg, p.Bye):
            self.lose_node(entry.name, "left", unregister=True)

    def register(self, ident: bytes, msg: p.Register) -> None:
        old = self.registry.entries.get(msg.name)
        if old is not None and old.identity == ident and old.instance == msg.instance \
                and old.state != "dead":
            return self.welcome(old)  # the same registration sent again: same incarnation
        why = self.registry.conflict(msg)
        if why:
            log.warning("refused node %s: %s", msg.name, why)
            return self.results.send(p.Refused(name=msg.name, reason=why), ident)
        if old is not None and old.state != "dead":
            self.lose_node(old.name, "registered again" if old.instance == msg.instance
                           else "restarted")
        entry, _ = self.registry.bind(ident, msg)
        self.children.remove(msg.name)  # a tree link of an older incarnation
        log.info("node %s registered (parent %s, %d slots, %s)", msg.name, msg.parent or "root",
                 msg.slots, msg.model or msg.engine)
        self.welcome(entry)
        self.vouch(entry.parent, entry.name, entry.incarnation)
        for child in self.registry.children_of(entry.name):  # its children may be older
            self.results.send(p.Adopt(name=child.name, incarnation=child.incarnation), ident)

    def welcome(self, entry: Entry) -> None:
        self.results.send(p.Welcome(name=entry.name, epoch=self.epoch, tree=self.cfg.endpoint(1),
                                    heartbeat=self.cfg.heartbeat, incarnation=entry.incarnation),
                          entry.identity)

    def vouch(self, parent: str | None, name: str, incarnation: int) -> None:
        """Tell node `parent` which incarnation of its child `name` to adopt (0: none)."""
        entry = self.registry.entries.get(parent) if parent else None
        if entry is not None and entry.state != "dead":
            self.results.send(p.Adopt(name=name, incarnation=incarnation), entry.identity)

    def claims(self, name: str, req: InFlight) -> bool:
        """May node `name` speak for `req`? The node holding it may, and so may a node inside the
        subtree it was last sent to or queued at (its ack may still be on the way)."""
        if req.holder == name:
            return True
        anchor = req.to if req.state == "forwarded" else req.holder
        return anchor is not None and anchor != "root" and self.registry.descends(name, anchor)

    def acks(self, entry: Entry, ident: bytes, msg: p.Acks) -> None:
        now = time.monotonic()
        for rid, hop, state, to in msg.items:
            req = self.table.by_rid.get(rid)
            if req is None:
                if state != "forwarded":
                    self.results.send(p.Cancel(id=rid), ident)  # cancelled or superseded
                continue
            if hop < req.hop:
                continue  # an earlier hop's ack, overtaken by a later one
            if not self.claims(entry.name, req):
                self.quiet.warning("acks for requests held elsewhere", entry.name, "node %s acked "
                                   "a request it was never sent; ignored", entry.name)
                continue
            req.holder, req.state, req.to, req.hop, req.moved_at = entry.name, state, to, hop, now

    def tokens(self, entry: Entry, ident: bytes, msg: p.Tokens) -> None:
        name = entry.name
        by_rid = self.table.by_rid
        for item in msg.items:
            rid, text, ids = item[0], item[1], item[2]
            req = by_rid.get(rid)
            if req is None:
                self.results.send(p.Cancel(id=rid), ident)
                continue
            if req.holder != name:  # its first token beat the ack of a hop above: same subtree
                if not self.claims(name, req):
                    self.quiet.warning("results for requests held elsewhere", name,
                                       "node %s sent tokens for a request it does not hold; "
                                       "dropped", name)
                    continue
                req.holder, req.state = name, "running"
            req.ids.extend(ids)
            req.text += text
            if req.first_token_at is None:
                req.first_token_at = time.monotonic()
                if self.cfg.affinity:  # its node will hold its prompt: the conversation's home
                    self.homes.note(self.conversation(req), name)
            self.outbox(req.gateway).items.append(
                [req.ref, text, len(ids), item[3] if len(item) > 3 else None, ids])
        for rid, reason, prompt_tokens, completion_tokens, *cached in msg.done:
            req = by_rid.get(rid)
            if req is None or req.holder != name:
                continue  # a superseded dispatch, a cancelled request, or not this node's
            completion = max(completion_tokens, len(req.ids))
            self.outbox(req.gateway).done.append([req.ref, reason, prompt_tokens, completion,
                                                  *cached])
            self.finish(req, None, stop_node=False)

    def node_result(self, entry: Entry, msg: p.Done | p.Error) -> None:
        req = self.table.by_rid.get(msg.id)
        if req is None or not self.claims(entry.name, req):
            return  # a superseded dispatch, a cancelled request, or not this node's to end
        if isinstance(msg, p.Error) and msg.code in (p.ErrorCode.HANDED_BACK,
                                                     p.ErrorCode.OVERLOADED):
            return self.redispatch(req, f"node {entry.name} answered {msg.code}")
        if isinstance(msg, p.Done):
            completion = max(msg.completion_tokens, len(req.ids))
            self.finish(req, p.Done(id=req.ref, finish_reason=msg.finish_reason,
                                    prompt_tokens=msg.prompt_tokens, completion_tokens=completion),
                        stop_node=False)
        else:
            self.finish(req, p.Error(id=req.ref, code=msg.code, message=msg.message),
                        stop_node=False)

    def reconcile(self, entry: Entry, ident: bytes, held: list) -> None:
        """The node says what it holds (sent after all its acks): compare with the table."""
        held = {rid for rid in held if isinstance(rid, int)}
        for req in self.table.missing_at(entry.name, held):
            self.redispatch(req, f"node {entry.name} does not hold it")
        for rid in held.difference(self.table.by_rid):
            self.results.send(p.Cancel(id=rid), ident)  # nobody waits for it any more

    def lose_node(self, name: str, why: str, unregister: bool = False) -> None:
        entry = self.registry.entries.get(name)
        if entry is None or (entry.state == "dead" and not unregister):
            return
        held = self.table.held_by(name)
        if held or why not in ("left", "registered again"):
            log.warning("node %s %s; dispatching again the %d request(s) it held", name, why,
                        len(held))
        else:
            log.info("node %s %s", name, why)
        if unregister:
            self.registry.unbind(name)
        else:
            self.registry.mark_dead(entry)
        self.children.remove(name)
        self.vouch(entry.parent, name, 0)
        self.node_lost_model(name, entry.model)
        for req in held:
            self.redispatch(req, f"node {name} {why}")
        self.pump()

    def cancel_at_node(self, req: InFlight) -> None:
        for name in {req.holder, req.to} - {None, "root"}:
            entry = self.registry.entries.get(name)
            if entry is not None and entry.state != "dead":
                self.results.send(p.Cancel(id=req.rid), entry.identity)

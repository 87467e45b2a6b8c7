"""Children and the routing policies, shared by the root and every node (both import it from here).

A parent keeps its children in a ring (the original design's ring buffer) with the load each last
reported for its whole subtree. Two policies choose the child a request goes to:

- `seed`: the original. Next child in the ring, whatever its load.
- `least-loaded`: the child whose subtree has the most free engine slots; ring order breaks ties,
  so equal children still take turns. A parent sends nothing down to a subtree with no free slot:
  the request waits in the parent's own queue (late binding), so it never sits behind a long
  request at a busy leaf while another leaf is idle.

Reports arrive with every heartbeat and as soon as a child's load changes. A report can be older
than the requests the parent sent since: each report says how many Dispatches the child had
received on this link (`recv`), and the parent counts what it sent (`sent`), so the difference,
still in flight, is taken off the reported free slots. A burst never piles onto one child.

A tree may serve several models, each node one (a router node none). Every report counts the
subtree's capacity per model too, and a request goes only down a child whose subtree serves its
model. A parent may be told where a request would rather go (`prefer`: the child on the way to
the node that holds its conversation's cache); it goes there when that child has a free slot.

A child joins the ring only by `adopt`, for the incarnation the root registered (the caller checks
that), on a link newer than the one it replaces: a connection of an older link of the same
incarnation (a stale socket still draining) is never taken back.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

POLICIES = ("least-loaded", "seed")


COUNTS = ("slots", "free", "queued", "room", "running")
MAX_MODELS = 64  # models one report may list (more from a child is an attack or a bug: cut)


@dataclass(slots=True)
class Load:
    """A subtree's capacity: engine slots, free slots, requests queued, queue places left; and the
    same per model served (`models`), since a request may only run on a node of its model."""

    slots: int = 0
    free: int = 0
    queued: int = 0
    room: int = 0
    running: int = 0
    draining: bool = False
    models: dict[str, "Load"] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Load":
        if not d:
            return cls()
        load = cls(**{k: d[k] for k in (*COUNTS, "draining")
                      if k in d and isinstance(d[k], (int, bool))})
        models = d.get("models")
        if isinstance(models, dict):
            load.models = {m: cls.from_dict(v) for m, v in list(models.items())[:MAX_MODELS]
                           if isinstance(v, dict)}
        return load

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in COUNTS}
        d["draining"] = self.draining
        if self.models:
            d["models"] = {m: load.to_dict() for m, load in self.models.items()}
        return d

    def add(self, other: "Load") -> None:
        if other.draining:
            return  # a draining subtree takes no new work: its capacity is not ours to offer
        for k in COUNTS:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for model, load in other.models.items():
            self.models.setdefault(model, Load()).add(load)

    def of(self, model: str | None) -> "Load | None":
        """The capacity for requests of `model` (None: of any model); None when this subtree
        serves no such model."""
        return self if model is None else self.models.get(model)


@dataclass(slots=True)
class Child:
    name: str
    identity: bytes
    load: Load = field(default_factory=Load)
    last_seen: float = field(default_factory=time.monotonic)
    incarnation: int = 0  # the child's registration (see broker/registry.py)
    link: int = 0  # the child's connection to us, numbered by the child; a new one restarts counts
    sent: int = 0  # Dispatches sent on this link
    models_sent: deque = field(default_factory=lambda: deque(maxlen=256))  # their models, in order


class Children:
    """The ring of a parent's live children."""

    def __init__(self, policy: str):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy '{policy}' (choose from {', '.join(POLICIES)})")
        self.policy = policy
        self.ring: list[Child] = []
        self.next = 0

    def __len__(self) -> int:
        return len(self.ring)

    def __iter__(self):
        return iter(self.ring)

    def get(self, name: str) -> Child | None:
        return next((c for c in self.ring if c.name == name), None)

    def find(self, identity: bytes) -> Child | None:
        """The child on this connection, or None: a stranger, or a link no longer adopted."""
        return next((c for c in self.ring if c.identity == identity), None)

    def adopt(self, name: str, identity: bytes, incarnation: int,
              load: dict | None) -> Child | None:
        """Take a new connection as child `name` of `incarnation` (registered: the caller checked),
        replacing whatever connection held that name; None when it is an older link of the
        incarnation already adopted."""
        link = (load or {}).get("link", 0)
        old = self.get(name)
        if old is not None:
            if old.incarnation == incarnation and not (isinstance(link, int) and link > old.link):
                return None
            self.remove(name)
        child = Child(name, identity, incarnation=incarnation)
        self.ring.append(child)
        self.seen(child, load)
        return child

    def seen(self, child: Child, load: dict | None) -> Child:
        """A heartbeat from `child`: refresh its load."""
        child.last_seen = time.monotonic()
        if load is not None:
            recv = load.get("recv", 0)
            if load.get("link", 0) != child.link:
                child.link, child.sent = load.get("link", 0), recv
                child.models_sent.clear()
            child.load = Load.from_dict(load)
            unseen = max(0, child.sent - recv)  # sent after this report was written
            models = list(child.models_sent)[-unseen:] if unseen else []
            for model in [None] * (unseen - len(models)) + models:
                self._count(child.load, model)
        return child

    def remove(self, name: str) -> Child | None:
        child = self.get(name)
        if child is not None:
            i = self.ring.index(child)
            self.ring.remove(child)
            if i < self.next:
                self.next -= 1
            if self.next >= len(self.ring):
                self.next = 0
        return child

    def expired(self, older_than: float) -> list[Child]:
        return [c for c in self.ring if c.last_seen < older_than]

    def total(self) -> Load:
        load = Load()
        for c in self.ring:
            load.add(c.load)
        return load

    def pick(self, model: str | None = None, *, need_free: bool,
             prefer: str | None = None) -> Child | None:
        """The child to send the next request of `model` to, advancing the ring; None when no
        child serving it fits. `prefer`: that child if it has a free slot (a conversation's home).

        seed ignores load (but never picks a draining child). least-loaded picks most free slots;
        with `need_free=False` it falls back to most queue room."""
        order = self.ring[self.next:] + self.ring[:self.next]
        live = [c for c in order if not c.load.draining and c.load.of(model) is not None]
        home = next((c for c in live if c.name == prefer), None) if prefer else None
        if home is not None and home.load.of(model).free > 0:
            chosen = home
        elif self.policy == "seed":
            chosen = live[0] if live else None
        else:
            chosen = max(live, key=lambda c: c.load.of(model).free, default=None)  # first tie
            if chosen is not None and chosen.load.of(model).free <= 0:
                chosen = None if need_free else max(live, key=lambda c: c.load.of(model).room)
                if chosen is not None and chosen.load.of(model).room <= 0:
                    chosen = None
        if chosen is not None:
            self.next = (self.ring.index(chosen) + 1) % len(self.ring)
        return chosen

    def note_sent(self, child: Child, model: str | None = None) -> None:
        """Count a request sent to `child` until a report that includes it arrives."""
        child.sent += 1
        child.models_sent.append(model)
        self._count(child.load, model)

    @staticmethod
    def _count(load: Load, model: str | None) -> None:
        for part in [load] + ([load.models[model]] if model in load.models else []):
            if part.free > 0:
                part.free -= 1
                part.running += 1
            else:
                part.queued += 1
                part.room = max(0, part.room - 1)

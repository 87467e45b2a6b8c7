"""The node registry built into the root: name -> endpoint, parent, capacity, model.

The original bound each node's remote reference under `cn=<node>,ou=Nodes` in LDAP, looked a name
up before binding to refuse duplicates, and unbound on delete. Here the root holds the same table
in memory; nodes re-register on their own when a root restarts, so nothing needs to persist.

A name is taken while its holder is alive (heard from within `dead_after` seconds). A node that
restarts under the same name after a crash gets it back once the old instance is declared dead;
until then it is refused, and `treechat node` retries for that long before giving up.

Every registration is a new *incarnation*: a random id, told to the node in Welcome and to its
parent in Adopt, and never shown by `public()`. A parent adopts a connection only for the
incarnation registered now, so a woken or reconnected old incarnation cannot be handed work.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Protocol

from broker.protocol import Register
from broker.routing import Load


@dataclass(slots=True)
class Entry:
    name: str
    instance: str
    identity: bytes  # the node's results-socket identity at the root
    parent: str | None
    endpoint: str
    slots: int
    model: str | None
    engine: str
    info: dict
    incarnation: int = field(default_factory=lambda: secrets.randbits(63) or 1)
    state: str = "alive"  # alive | draining | dead
    load: Load = field(default_factory=Load)  # the node's own load (not its subtree's)
    last_seen: float = field(default_factory=time.monotonic)

    def public(self) -> dict:
        return {"name": self.name, "parent": self.parent, "endpoint": self.endpoint,
                "state": self.state, "slots": self.slots, "running": self.load.running,
                "queued": self.load.queued, "engine": self.engine, "model": self.model,
                "info": self.info}


class Store(Protocol):
    """Where registrations are also written (the `ldap` backend); the root's memory stays the
    source of truth for liveness. Calls must not block the event loop."""

    def publish(self, entry: Entry) -> None: ...

    def withdraw(self, name: str) -> None: ...


class Registry:
    def __init__(self, dead_after: float, store: Store | None = None):
        self.dead_after = dead_after
        self.store = store
        self.entries: dict[str, Entry] = {}
        self.by_identity: dict[bytes, Entry] = {}

    def conflict(self, msg: Register) -> str | None:
        """Why `msg` may not take its name, or None."""
        old = self.entries.get(msg.name)
        if old is None or old.instance == msg.instance or old.state == "dead":
            return None
        age = time.monotonic() - old.last_seen
        if age > self.dead_after:
            return None
        return (f"the name '{msg.name}' is taken by a live node at {old.endpoint} "
                f"(heard from {age:.1f}s ago); choose another --name")

    def bind(self, identity: bytes, msg: Register) -> tuple[Entry, Entry | None]:
        """Register `msg`; return the new entry and the old instance it replaces (if any)."""
        old = self.entries.get(msg.name)
        if old is not None:
            self.by_identity.pop(old.identity, None)
        entry = Entry(msg.name, msg.instance, identity, msg.parent, msg.endpoint, msg.slots,
                      msg.model, msg.engine, msg.info or {})
        self.entries[msg.name] = entry
        self.by_identity[identity] = entry
        if self.store is not None:
            self.store.publish(entry)
        replaced = old if old is not None and old.instance != msg.instance else None
        return entry, replaced

    def descends(self, name: str, ancestor: str | None) -> bool:
        """Is `name` the node `ancestor` or one of its descendants (by registered parents)?"""
        for _ in range(64):  # a parent loop in the registry must not hang the root
            if name == ancestor:
                return True
            entry = self.entries.get(name)
            if entry is None or entry.parent is None:
                return False
            name = entry.parent
        return False

    def path(self, name: str) -> list[str] | None:
        """The live nodes from a top-level one down to `name`; None when one of them is not."""
        path: list[str] = []
        while name is not None and len(path) < 64:  # a parent loop must not hang the root
            entry = self.entries.get(name)
            if entry is None or entry.state != "alive":
                return None
            path.append(name)
            name = entry.parent
        return path[::-1] if name is None else None

    def children_of(self, name: str) -> list[Entry]:
        return [e for e in self.entries.values() if e.parent == name and e.state != "dead"]

    def clear(self) -> None:
        for name in list(self.entries):
            self.unbind(name)

    def unbind(self, name: str) -> Entry | None:
        entry = self.entries.pop(name, None)
        if entry is not None:
            self.by_identity.pop(entry.identity, None)
            if self.store is not None:
                self.store.withdraw(name)
        return entry

    def mark_dead(self, entry: Entry) -> None:
        entry.state = "dead"
        self.by_identity.pop(entry.identity, None)
        if self.store is not None:
            self.store.withdraw(entry.name)

    def lookup(self, name: str | None) -> list[dict]:
        if name is None:
            return [e.public() for e in self.entries.values()]
        entry = self.entries.get(name)
        return [entry.public()] if entry is not None and entry.state != "dead" else []

    def models(self) -> set[str]:
        return {e.model for e in self.entries.values() if e.model and e.state == "alive"}

    def aliases(self) -> dict[str, str]:
        """Each other name a live node gives its model (its --alias) -> that model."""
        found: dict[str, str] = {}
        for e in self.entries.values():
            aliases = e.info.get("aliases") if e.model and e.state == "alive" else None
            for alias in aliases if isinstance(aliases, list) else []:
                if isinstance(alias, str):
                    found.setdefault(alias, e.model)
        return found

    def expired(self) -> list[Entry]:
        limit = time.monotonic() - self.dead_after
        return [e for e in self.entries.values() if e.state != "dead" and e.last_seen < limit]

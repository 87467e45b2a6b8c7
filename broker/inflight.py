"""The root's in-flight table: every admitted request, where it is, and what the client has.

    request_id -> InFlight(gateway, ref, request, rid, holder, state, tokens and text so far, deadline)

`rid` is the current dispatch; `holder` the node that last acknowledged it and `state` what that
node did with it ('running', 'queued', or 'forwarded' to the child `to'). `hop` orders acks that
arrive out of order from different nodes (each node has its own connection to the root).

Nothing placed can vanish unnoticed: `moved_at` is when the dispatch last moved (sent, or
acknowledged one hop further), and a dispatch still 'forwarded' a while later was lost on a link
(`unacknowledged`); a request the table places at a node that the node's own heartbeat does not
list was dropped there (`missing_at`). The root takes both back and dispatches them again.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, eq=False)
class InFlight:
    request_id: int
    gateway: bytes
    ref: int
    request: dict
    rid: int | None = None
    holder: str | None = None
    state: str = "queued_at_root"
    to: str | None = None
    hop: int = 0
    ids: list[int] = field(default_factory=list)
    text: str = ""
    attempts: int = 0
    deadline: float | None = None
    first_token_at: float | None = None
    moved_at: float = 0.0
    model: str | None = None  # the model it must run on (None: any), resolved at admission
    keys: list[bytes] | None = None  # its conversation's keys (broker/affinity.py), made once
    home: str | None = None  # the node its dispatch is routed to (its conversation's home)


class Table:
    def __init__(self):
        self.requests: dict[int, InFlight] = {}
        self.by_rid: dict[int, InFlight] = {}
        self.by_ref: dict[tuple[bytes, int], InFlight] = {}

    def add(self, req: InFlight) -> None:
        self.requests[req.request_id] = req
        self.by_ref[(req.gateway, req.ref)] = req

    def place(self, req: InFlight, rid: int, holder: str, state: str, to: str | None,
              now: float) -> None:
        self.unplace(req)
        req.rid, req.holder, req.state, req.to, req.hop = rid, holder, state, to, 0
        req.moved_at = now
        self.by_rid[rid] = req

    def unplace(self, req: InFlight) -> None:
        if req.rid is not None:
            self.by_rid.pop(req.rid, None)
        req.rid, req.holder, req.state, req.to, req.home = None, None, "queued_at_root", None, None

    def remove(self, req: InFlight) -> None:
        self.unplace(req)
        self.requests.pop(req.request_id, None)
        self.by_ref.pop((req.gateway, req.ref), None)

    def held_by(self, name: str) -> list[InFlight]:
        """Requests a lost node held: running or queued there, or on their way to it."""
        return [r for r in self.by_rid.values()
                if r.holder == name or (r.state == "forwarded" and r.to == name)]

    def placed(self) -> dict[str, int]:
        """node -> requests running or queued there, or on their way to it as their home."""
        counts: dict[str, int] = {}
        for r in self.by_rid.values():
            node = (r.home or r.to) if r.state == "forwarded" else r.holder
            counts[node] = counts.get(node, 0) + 1
        return counts

    def unacknowledged(self, older_than: float) -> list[InFlight]:
        """Dispatches sent down a link and not acknowledged further since `older_than`."""
        return [r for r in self.by_rid.values()
                if r.state == "forwarded" and r.moved_at < older_than]

    def missing_at(self, name: str, held: set[int]) -> list[InFlight]:
        """Requests placed at `name` (running or queued there) that it says it does not hold."""
        return [r for r in self.by_rid.values()
                if r.holder == name and r.state != "forwarded" and r.rid not in held]

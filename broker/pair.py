"""A primary root and its standby: which of the two is active (ZeroMQ guide, "Binary Star").

`treechat root` alone is a primary; `treechat root --standby-of A:5550` is a standby (a backup)
that connects to the primary's front socket and exchanges `Peer` messages with it every
heartbeat. Gateways, nodes and the CLI take both addresses (`--root A:5550,B:5550`) and talk to
the active one; the passive one answers them `Standby` and serves nothing.

States: primary and backup while a root has not heard its peer yet, then active or passive.

    primary   hears backup or passive  -> active       (the usual start)
              hears active             -> passive      (the old primary came back: the other
                                                        took over meanwhile)
              a member of the tree     -> active       (a root alone serves, as always)
    backup    hears primary or active  -> passive
              a member that lost the   -> active       (the primary is gone: see below)
              root, peer not heard for dead_after
    passive   hears primary or backup  -> active       (the peer restarted and holds nothing)
              hears passive            -> the primary-configured one becomes active
              a member that lost the   -> active
              root, peer not heard for dead_after
    active    hears active             -> the one active for less time becomes passive (both
                                          became active across a partition; its members move to
                                          the other and resubmit there)

The fencing rule: a passive root becomes active only when both hold: its peer's heartbeats have
stopped, and a member of the tree (a gateway or a node) says it lost the root it talked to
(`lost` in Hello or Register). A cut between the two roots alone changes nothing (no member lost
the active one, so none asks the passive one), which is what keeps two roots from both serving.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("treechat.root")

PRIMARY, BACKUP, ACTIVE, PASSIVE = "primary", "backup", "active", "passive"


class Pair:
    def __init__(self, standby_of: str | None, dead_after: float):
        self.configured = BACKUP if standby_of else PRIMARY
        self.state = self.configured
        self.standby_of = standby_of
        self.dead_after = dead_after
        self.peer_state: str | None = None
        self.peer_seen = 0.0  # monotonic; 0: never
        self.peer_address: str | None = standby_of
        self.active_since: float | None = None

    @property
    def active(self) -> bool:
        return self.state == ACTIVE

    def active_for(self, now: float) -> float:
        return now - self.active_since if self.active_since is not None else 0.0

    def peer_alive(self, now: float) -> bool:
        return bool(self.peer_seen) and now - self.peer_seen < self.dead_after

    def heard(self, state: str, active_for: float, address: str, now: float) -> str | None:
        """The peer's Peer message; returns the new state when it changed, else None."""
        self.peer_state, self.peer_seen = state, now
        if address:
            self.peer_address = address
        s = self.state
        if s == PRIMARY and state in (BACKUP, PASSIVE):
            return self._become(ACTIVE, now, f"the peer root is {state}")
        if s == PRIMARY and state == ACTIVE:  # we came back: the other took over meanwhile
            return self._become(PASSIVE, now, "the peer root is active")
        if s == BACKUP and state in (PRIMARY, ACTIVE):
            return self._become(PASSIVE, now, f"the peer root is {state}")
        if s == PASSIVE:
            if state in (PRIMARY, BACKUP):
                return self._become(ACTIVE, now, f"the peer root restarted ({state})")
            if state == PASSIVE and self.configured == PRIMARY:
                return self._become(ACTIVE, now, "both roots were passive; the primary serves")
        if s == ACTIVE and state == ACTIVE:
            mine = self.active_for(now)
            if active_for > mine or (active_for == mine and self.configured == BACKUP):
                return self._become(PASSIVE, now, "both roots were active; the peer has been "
                                                  "for longer")
        return None

    def member(self, lost: bool, now: float) -> bool:
        """A gateway or node asks to be served (`lost`: it lost the root it talked to): may we
        serve it? Becomes active where the rules allow."""
        if self.state == ACTIVE:
            return True
        if self.state == PRIMARY:
            self._become(ACTIVE, now, "a member of the tree asked, and no peer answers")
            return True
        if lost and not self.peer_alive(now):
            self._become(ACTIVE, now, "a member of the tree lost the active root, and the peer "
                                      f"has been silent for {self.silence(now)}")
            return True
        return False

    def silence(self, now: float) -> str:
        return f"{now - self.peer_seen:.1f}s" if self.peer_seen else "ever"

    def why_not(self, now: float) -> str:
        """Why a passive root does not serve, in words for the member refused."""
        peer = self.peer_address or "its peer"
        if self.peer_alive(now):
            return (f"this root is the standby; the {self.peer_state} root is {peer} (heard "
                    f"{now - self.peer_seen:.1f}s ago)")
        return (f"this root is the standby of {peer}, which has been silent for "
                f"{self.silence(now)}; it takes over when a member of the tree lost that root")

    def _become(self, state: str, now: float, why: str) -> str:
        # A start is news (info); a takeover or a root stepping down is what an operator looks for.
        usual = self.state in (PRIMARY, BACKUP) and (state == PASSIVE or self.state == PRIMARY)
        log.log(logging.INFO if usual else logging.WARNING, "root %s -> %s: %s", self.state,
                state, why)
        self.state = state
        self.active_since = now if state == ACTIVE else None
        return state

    def describe(self, now: float | None = None) -> dict:
        now = time.monotonic() if now is None else now
        return {"state": self.state, "configured": self.configured,
                "peer": self.peer_address,
                "peer_state": self.peer_state if self.peer_alive(now) else "silent",
                "peer_heard": round(now - self.peer_seen, 1) if self.peer_seen else None}

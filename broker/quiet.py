"""Warnings a stranger could multiply, kept to one line per kind and peer per interval.

Any process: a flood of bad frames, unauthenticated lines or forged results must not become a
flood of log lines (10.9k lines for 12k bad frames before this). `Quiet.warning(kind, peer, ...)`
logs the first of its (kind, peer) in an interval and counts the rest; when the interval ends, one
line says how many more there were. Past `max_peers` distinct peers in an interval, further peers
share one count, so rotating identities buys nothing either.
"""

from __future__ import annotations

import asyncio
import logging

INTERVAL = 10.0  # seconds
MAX_PEERS = 64


class Quiet:
    def __init__(self, logger: logging.Logger, interval: float = INTERVAL,
                 max_peers: int = MAX_PEERS):
        self.log = logger
        self.interval = interval
        self.max_peers = max_peers
        self._windows: dict[tuple[str, object], list] = {}  # key -> [level, suppressed]

    def warning(self, kind: str, peer, message: str, *args) -> None:
        self._note(logging.WARNING, kind, peer, message, *args)

    def info(self, kind: str, peer, message: str, *args) -> None:
        """The same, at INFO: what also happens without an attacker (a restart's old links)."""
        self._note(logging.INFO, kind, peer, message, *args)

    def _note(self, level: int, kind: str, peer, message: str, *args) -> None:
        key = (kind, peer)
        if key not in self._windows and len(self._windows) >= self.max_peers:
            key = (kind, "*")  # too many peers at once: they share one count
        window = self._windows.get(key)
        if window is not None:
            window[1] += 1
            return
        self._windows[key] = [level, 0]
        self.log.log(level, message, *args)
        try:
            asyncio.get_running_loop().call_later(self.interval, self._close, key)
        except RuntimeError:  # no loop (a tool or a test): nothing is suppressed
            del self._windows[key]

    def _close(self, key) -> None:
        level, suppressed = self._windows.pop(key)
        if suppressed:
            kind, peer = key
            self.log.log(level, "%d more %s from %s in the last %.0f s", suppressed, kind,
                         _show(peer), self.interval)


def _show(peer) -> str:
    if isinstance(peer, bytes):
        return peer.hex() if not peer.isascii() or not peer.isalnum() else peer.decode()
    return str(peer)

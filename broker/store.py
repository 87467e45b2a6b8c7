"""The root's small key-value store: the OpenAI Responses a client asked to keep (`store`).

Lives in the root process, so every gateway of the tree finds what any other stored, and a
gateway's restart loses nothing. Gateways reach it through the front socket (`Keep` in, `Kept`
out, broker/front.py); the root only keeps opaque JSON values under string keys and never looks
inside them.

Bounded two ways: at most `max_items` entries (the oldest go first) and none older than `max_age`
seconds (an expired entry is gone, whether or not it was read). With a `path`, every change is
appended to a JSON-lines file, one line per put or delete:

    {"k": "resp_...", "t": 1765100000.0, "v": {...}}        (a put, at unix time t)
    {"k": "resp_...", "t": 1765100001.0, "v": null}         (a delete)

read back at start (expired entries dropped), and rewritten whole once it holds more than twice
as many lines as there are live entries, so the file stays within about twice the bounds. A line
is a few kilobytes written to the page cache: done on the loop, like the rest of the root. A file
that cannot be read is one warning and an empty store, never a root that does not start.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path

import orjson

log = logging.getLogger("treechat.root")


class Store:
    def __init__(self, max_items: int, max_age: float, path: str | Path | None = None):
        if max_items < 1:
            raise ValueError("the store must hold at least one item")
        if max_age <= 0:
            raise ValueError("the store's max age must be positive")
        self.max_items = max_items
        self.max_age = max_age
        self.path = Path(path) if path else None
        self.items: OrderedDict[str, tuple[float, dict]] = OrderedDict()  # oldest first
        self.lines = 0  # lines in the file
        if self.path is not None:
            self._load()

    def get(self, key: str) -> dict | None:
        self.expire()
        entry = self.items.get(key)
        return entry[1] if entry is not None else None

    def put(self, key: str, value: dict) -> None:
        now = time.time()
        self.items.pop(key, None)
        self.items[key] = (now, value)
        self._append(key, now, value)
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)
        self.expire()

    def delete(self, key: str) -> bool:
        self.expire()
        if self.items.pop(key, None) is None:
            return False
        self._append(key, time.time(), None)
        return True

    def expire(self) -> None:
        limit = time.time() - self.max_age
        while self.items and next(iter(self.items.values()))[0] < limit:
            self.items.popitem(last=False)

    # --- the file -------------------------------------------------------------------------------

    def _load(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            text = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("cannot read the response store %s (%s); starting empty", self.path, e)
            return
        for line in text.splitlines():
            try:
                rec = orjson.loads(line)
                key, at, value = rec["k"], float(rec["t"]), rec["v"]
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # a line cut short by a crash mid-write
            self.items.pop(key, None)
            if isinstance(value, dict):
                self.items[key] = (at, value)
        self.items = OrderedDict(sorted(self.items.items(), key=lambda kv: kv[1][0]))
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)
        self.expire()
        self._rewrite()
        log.info("response store %s: %d kept", self.path, len(self.items))

    def _append(self, key: str, at: float, value: dict | None) -> None:
        if self.path is None:
            return
        if self.lines + 1 > 2 * max(len(self.items), 16):
            return self._rewrite()
        try:
            with open(self.path, "ab") as f:
                f.write(orjson.dumps({"k": key, "t": at, "v": value}) + b"\n")
            self.lines += 1
        except OSError as e:
            log.warning("cannot write the response store %s: %s", self.path, e)

    def _rewrite(self) -> None:
        """The live entries only, written beside the file and renamed over it (never half)."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                for key, (at, value) in self.items.items():
                    f.write(orjson.dumps({"k": key, "t": at, "v": value}) + b"\n")
            os.replace(tmp, self.path)
            self.lines = len(self.items)
        except OSError as e:
            log.warning("cannot write the response store %s: %s", self.path, e)

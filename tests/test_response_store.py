"""The root's store of kept responses (broker/store.py), alone: its bounds by count and by age,
and its file read back after a restart, rewritten once it holds twice the live entries."""

from __future__ import annotations

import time

import orjson
import pytest

from broker.store import Store

pytestmark = pytest.mark.timeout(30)


def test_the_oldest_go_first_past_the_count():
    store = Store(max_items=3, max_age=3600)
    for i in range(5):
        store.put(f"k{i}", {"i": i})
    assert [store.get(f"k{i}") for i in range(5)] == [None, None, {"i": 2}, {"i": 3}, {"i": 4}]
    assert store.delete("k3") and not store.delete("k3")


def test_an_entry_past_its_age_is_gone(monkeypatch):
    store = Store(max_items=10, max_age=60)
    store.put("old", {"v": 1})
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)
    store.put("new", {"v": 2})
    assert store.get("old") is None and store.get("new") == {"v": 2}


def test_the_file_survives_a_restart_and_stays_small(tmp_path):
    path = tmp_path / "state" / "responses.jsonl"
    store = Store(max_items=100, max_age=3600, path=path)
    for i in range(200):
        store.put("same", {"i": i})  # one live entry, many changes
    store.put("kept", {"v": True})
    store.delete("same")
    assert len(path.read_bytes().splitlines()) <= 2 * 16 + 1  # rewritten, not grown
    with open(path, "ab") as f:
        f.write(b'{"k": "cut sh')  # a crash mid-line
    again = Store(max_items=100, max_age=3600, path=path)
    assert again.get("kept") == {"v": True} and again.get("same") is None
    assert [orjson.loads(line)["k"] for line in path.read_bytes().splitlines()] == ["kept"]
    assert Store(max_items=100, max_age=1e-9, path=path).get("kept") is None  # expired on load

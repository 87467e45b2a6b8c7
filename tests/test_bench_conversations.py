"""The multi-turn dataset (bench/conversations.py) and the affinity study (bench/affinity.py) end to
end on the fake engine, which reports no cached tokens: the report's shape and counts, not a
cache share."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from conftest import REPO

from bench.affinity import TurnRecord, imbalance, set_ideals
from bench.conversations import SYSTEM_PROMPTS, ConversationConfig, build


def test_the_dataset_is_the_same_for_the_same_seed_and_differs_for_another():
    cfg = ConversationConfig(users=12, turns=4, seed=3)
    a, b = build(cfg), build(cfg)
    assert a == b
    assert build(ConversationConfig(users=12, turns=4, seed=4)) != a
    # the first users of a larger dataset are the smaller dataset
    assert build(ConversationConfig(users=30, turns=4, seed=3))[:12] == a


def test_users_are_interleaved_with_real_chat_lengths():
    cfg = ConversationConfig(users=200, turns=3, systems=2, think_min=1.0, think_max=4.0,
                             stagger=10.0, seed=1)
    convs = build(cfg)
    assert {c.system for c in convs} == set(SYSTEM_PROMPTS[:2])
    assert len({(c.system, c.turns[0].text) for c in convs}) == len(convs)  # unique openings
    assert all(0 <= c.start <= 10 for c in convs) and len({c.start for c in convs}) > 100
    assert all(len(c.turns) == 3 and c.turns[0].think == 0 for c in convs)
    assert all(1 <= t.think <= 4 for c in convs for t in c.turns[1:])
    words = sorted(len(t.text.split()) for c in convs for t in c.turns)
    assert words[0] >= 3 and words[-1] <= 400
    assert 10 <= words[len(words) // 2] <= 60  # the median user message: a few dozen words
    assert words[int(0.95 * len(words))] >= 100  # a long tail of pasted text
    assert build(ConversationConfig(users=3, systems=0))[0].system is None


def test_each_turn_carries_the_history_with_the_real_answers():
    conv = build(ConversationConfig(users=1, turns=3, seed=2))[0]
    first = conv.messages(0, [])
    assert first == [{"role": "system", "content": conv.system},
                     {"role": "user", "content": conv.turns[0].text}]
    third = conv.messages(2, ["answer one", "answer two"])
    assert [m["role"] for m in third] == ["system", "user", "assistant", "user", "assistant",
                                          "user"]
    assert [m["content"] for m in third[1:]] == [conv.turns[0].text, "answer one",
                                                 conv.turns[1].text, "answer two",
                                                 conv.turns[2].text]
    assert third[:len(first)] == first  # every turn's prompt begins with the one before
    with pytest.raises(ValueError):
        conv.messages(2, ["only one answer"])


def test_bad_dataset_settings_are_refused_clearly():
    for bad in ({"users": 0}, {"systems": 9}, {"think_min": 3.0, "think_max": 1.0},
                {"min_words": 50, "median_words": 10}, {"stagger": -1.0}):
        with pytest.raises(ValueError):
            ConversationConfig(**bad)


def test_the_ideal_is_the_turn_before_capped_at_the_prompt():
    records = [TurnRecord(0, user=0, turn=1, prompt_tokens=100, output_tokens=30),
               TurnRecord(1, user=0, turn=2, prompt_tokens=150, output_tokens=30),
               TurnRecord(2, user=0, turn=3, prompt_tokens=170, output_tokens=5),
               TurnRecord(3, user=1, turn=1, prompt_tokens=50, error="timeout"),
               TurnRecord(4, user=1, turn=2, prompt_tokens=90)]
    set_ideals(records)
    assert [r.ideal for r in records] == [0, 130, 170, 0, 0]
    leaves = {"a": {"requests": 3, "prompt_tokens": 100, "completion_tokens": 20},
              "b": {"requests": 1, "prompt_tokens": 20, "completion_tokens": 20}}
    assert imbalance(leaves) == {"requests": pytest.approx(1.5), "tokens": pytest.approx(1.5)}


@pytest.mark.timeout(180)
def test_the_affinity_study_runs_end_to_end_on_the_fake_engine(tmp_path):
    out = tmp_path / "affinity.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.affinity", "--engine", "fake", "--users", "3", "--turns", "3",
         "--nodes", "2", "--fanout", "2", "--max-tokens", "4", "--think-min", "0",
         "--think-max", "0.1", "--stagger", "0.2", "--up-args", "--fake-delay 0.002",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "| affinity |" in r.stdout and "| no-affinity |" in r.stdout and "goal:" in r.stdout
    data = orjson.loads(out.read_bytes())
    assert [run["mode"] for run in data["runs"]] == ["affinity", "no-affinity"]
    for run in data["runs"]:
        s = run["summary"]
        assert (s["turns_planned"], s["completed"], s["failed"], s["not_sent"]) == (9, 9, 0, 0)
        assert s["later_turns"] == 6 and s["later_cached_tokens"] == 0  # the fake caches nothing
        assert 0 < s["later_ideal_tokens"] <= s["later_prompt_tokens"]
        assert s["output_tokens"] == 9 * 4 and s["output_throughput"] > 0
        assert s["ttft_ms"]["p50"] > 0 and s["ttft_later_ms"]["p99"] >= s["ttft_later_ms"]["p50"]
        # the leaves' counters saw exactly the drive's turns (not the warm-up)
        assert set(run["leaves"]) == {"node-1", "node-2"}
        assert sum(v["requests"] for v in run["leaves"].values()) == 9
        assert sum(v["completion_tokens"] for v in run["leaves"].values()) == 9 * 4
        assert sum(v["prompt_tokens"] for v in run["leaves"].values()) == \
            sum(rec["prompt_tokens"] for rec in run["records"])
        assert run["imbalance"]["requests"] >= 1.0
        turns = sorted((rec["user"], rec["turn"]) for rec in run["records"])
        assert turns == [(u, t) for u in range(3) for t in (1, 2, 3)]
        # each turn's prompt holds the one before and its answer
        by = {(rec["user"], rec["turn"]): rec for rec in run["records"]}
        assert all(by[u, t]["prompt_tokens"] > by[u, t - 1]["prompt_tokens"]
                   + by[u, t - 1]["output_tokens"] for u in range(3) for t in (2, 3))
    assert data["dataset"]["users"] == 3 and set(data["goal"]) >= {"of_ideal", "balance_ok"}


@pytest.mark.timeout(180)
def test_the_two_model_study_runs_end_to_end_on_the_fake_engine(tmp_path):
    out = tmp_path / "two.json"
    r = subprocess.run(
        [sys.executable, "-m", "bench.two_models", "--engine", "fake", "--requests", "6",
         "--rate", "20", "--slots", "2", "--max-tokens", "4", "--fake-delay", "0.005",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=170)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "B's p99 TTFT in A's flood" in r.stdout
    runs = orjson.loads(out.read_bytes())["runs"]
    assert [(x["phase"], x["model"], x["role"]) for x in runs] == [
        ("steady", "alpha", "light"), ("steady", "beta", "light"),
        ("flood", "alpha", "flooded"), ("flood", "beta", "light")]
    for x in runs:
        assert x["summary"]["failed"] == 0 and x["summary"]["ttft_ms"]["p99"] > 0
        assert x["summary"]["total_output_tokens"] == 4 * x["summary"]["completed"]
    assert [x["summary"]["completed"] for x in runs if x["role"] == "light"] == [6, 6, 6]
    # the flood: 16 clients on alpha's 2 x 2 slots, until beta's light load ended
    assert runs[2]["summary"]["completed"] >= 16 and not runs[2]["flood_cut"]

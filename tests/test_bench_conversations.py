"""The multi-turn dataset (bench/conversations.py): seeded, interleaved, real chat lengths, each
turn carrying the history."""

from __future__ import annotations

import pytest

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

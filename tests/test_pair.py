"""Which of a root and its standby is active (broker/pair.py), rule by rule, on a clock the test
holds. The same rules between real processes: test_standby.py and test_netns_standby.py."""

from __future__ import annotations

from broker.pair import ACTIVE, BACKUP, PASSIVE, PRIMARY, Pair

DEAD = 3.0  # seconds of a peer's silence before it counts as gone


def primary() -> Pair:
    return Pair(None, DEAD)


def standby() -> Pair:
    return Pair("a:5550", DEAD)


def test_a_usual_start_makes_the_primary_active_and_the_standby_passive():
    a, b = primary(), standby()
    assert (a.state, b.state) == (PRIMARY, BACKUP)
    assert b.heard(PRIMARY, 0.0, "a:5550", 1.0) == PASSIVE
    assert a.heard(PASSIVE, 0.0, "b:5550", 1.0) == ACTIVE
    assert a.peer_address == "b:5550" and b.peer_address == "a:5550"


def test_a_root_alone_serves_whoever_asks():
    a = primary()
    assert a.member(lost=False, now=0.0) and a.active


def test_the_standby_takes_over_only_when_the_primary_is_silent_and_a_member_lost_it():
    b = standby()
    b.heard(ACTIVE, 10.0, "a:5550", 1.0)
    assert not b.member(lost=False, now=2.0)  # a member that lost nothing: told to go to A
    assert not b.member(lost=True, now=2.0)  # A still beats here: the member's link was the fault
    assert "a:5550" in b.why_not(2.0)
    assert not b.member(lost=False, now=10.0)  # A silent, but no member lost it: a cut between us
    assert b.state == PASSIVE
    assert b.member(lost=True, now=10.0) and b.active  # both: A is gone


def test_a_primary_that_comes_back_finds_the_standby_active_and_becomes_the_standby():
    a = primary()
    assert a.heard(ACTIVE, 30.0, "b:5550", 1.0) == PASSIVE
    assert not a.member(lost=False, now=1.5)
    assert a.member(lost=True, now=10.0)  # later the other one goes, and a member says so


def test_a_passive_root_whose_peer_restarted_takes_over():
    b = standby()
    b.heard(ACTIVE, 10.0, "a:5550", 1.0)
    assert b.heard(PRIMARY, 0.0, "a:5550", 2.0) == ACTIVE  # A restarted: it holds nothing


def test_of_two_active_roots_the_one_active_for_less_time_steps_down():
    a, b = primary(), standby()
    a.member(lost=False, now=0.0)  # A active since 0
    b.heard(ACTIVE, 0.0, "a:5550", 0.0)
    b.member(lost=True, now=20.0)  # B active since 20 (a partition)
    assert a.heard(ACTIVE, b.active_for(25.0), "b:5550", 25.0) is None  # A: longer, stays
    assert b.heard(ACTIVE, a.active_for(25.0), "a:5550", 25.0) == PASSIVE


def test_two_passive_roots_make_the_primary_active():
    a = primary()
    a.heard(ACTIVE, 5.0, "b:5550", 1.0)  # passive
    assert a.heard(PASSIVE, 0.0, "b:5550", 2.0) == ACTIVE


def test_status_says_when_the_peer_went_silent():
    b = standby()
    b.heard(ACTIVE, 1.0, "a:5550", 1.0)
    assert b.describe(2.0)["peer_state"] == ACTIVE
    assert b.describe(9.0)["peer_state"] == "silent" and b.describe(9.0)["peer_heard"] == 8.0

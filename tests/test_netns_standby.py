"""No single machine to lose: a root and its standby on hosts of their own (network namespaces:
tests/netns.py), three nodes, the gateways and the client each on their own host. The gateways
and nodes are given both roots (`--root A:5550,B:5550`)."""

from __future__ import annotations

import threading
import time

import pytest

from http_helpers import poll
from netns import echo, hosts  # noqa: F401  (the fixture)
from test_netns_faults import answers, prompts

pytestmark = pytest.mark.timeout(240)
ENGINE = ("--fake-delay", "0.02", "--max-slots", "6")


def root_state(net, which: str) -> str:
    """`treechat status --root ONE` on the client host: the state that root reports."""
    first = net.cli("status", root=which).splitlines()[1]
    return first.split()[3].rstrip(";") if first.startswith("this root is") else "?"


def standing_by(hosts):
    """The tree with a standby root, once the standby hears the primary (passive)."""
    net = hosts(standby=True, engine=ENGINE)
    poll(lambda: root_state(net, net.standby) == "passive", 30)
    return net


def under_load(net, work: list[str], fault, when=lambda done: len(done) >= 20) -> list[str]:
    """The answers to `work` (200 streams, 48 at a time) with `fault()` done mid-way."""
    done: list[int] = []
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(
        records=net.streams(work, concurrency=48, progress=done, timeout=200)))
    load.start()
    poll(lambda: when(done), 60)
    fault()
    at = len(done)
    load.join(200)
    assert not load.is_alive(), "the streams did not finish"
    assert at < len(work) * 3 // 4, "the fault came too late to matter"
    return answers(result["records"])


def test_the_active_roots_cable_is_cut_under_200_streams(hosts):
    net = standing_by(hosts)
    work = prompts(200, 16)
    clean = [echo(p) for p in work]
    assert root_state(net, net.primary) == "active"
    cut_at: list[float] = []
    got = under_load(net, work, lambda: (net.bed.cut("root"), cut_at.append(time.monotonic())))
    assert got == clean  # 200/200, each identical to a fault-free run
    assert root_state(net, net.standby) == "active"
    status = net.cli("status")  # what an operator sees: the standby serves now
    assert status.splitlines()[1].startswith("this root is active")
    assert net.procs["standby"].logged("-> active: a member of the tree lost the active root")


def test_everything_on_the_active_roots_host_is_killed_under_200_streams(hosts):
    net = standing_by(hosts)
    work = prompts(200, 16)
    assert under_load(net, work, net.procs["root"].kill) == [echo(p) for p in work]
    assert root_state(net, net.standby) == "active"


def test_a_cut_between_the_two_roots_alone_leaves_exactly_one_active(hosts):
    net = standing_by(hosts)
    net.separate("root", "standby")
    try:
        # The standby no longer hears the primary, but no member lost it: it stays passive.
        poll(lambda: "silent" in net.cli("status", root=net.standby), 30)
        assert root_state(net, net.standby) == "passive"
        assert root_state(net, net.primary) == "active"
        work = prompts(40, 8)
        assert answers(net.streams(work, concurrency=16)) == [echo(p) for p in work]
        assert root_state(net, net.standby) == "passive"
        # Asked directly, it refuses work and says why.
        refused = net.cli("status", root=net.standby)
        assert "this root is passive" in refused
    finally:
        net.separate("root", "standby", cut=False)
    poll(lambda: "heard 0." in net.cli("status", root=net.standby), 30)


def test_the_old_primary_returns_as_the_standby_and_a_second_failover_loses_nothing(hosts):
    net = standing_by(hosts)
    work = prompts(200, 16)
    clean = [echo(p) for p in work]
    net.procs["root"].kill()
    poll(lambda: root_state(net, net.standby) == "active", 30)
    net.wait_tree()
    net.start_root()  # the old primary, started as it was
    poll(lambda: root_state(net, net.primary) == "passive", 30)
    assert root_state(net, net.standby) == "active"
    assert under_load(net, work, lambda: net.bed.cut("standby")) == clean  # the other way now
    assert root_state(net, net.primary) == "active"


def test_killing_the_standby_does_nothing_to_traffic(hosts):
    net = standing_by(hosts)
    work = prompts(200, 16)
    assert under_load(net, work, net.procs["standby"].kill) == [echo(p) for p in work]
    assert root_state(net, net.primary) == "active"
    assert not net.procs["http-gateway"].logged("talking to the root at")

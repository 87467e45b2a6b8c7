"""The tree across hosts (network namespaces, `tests/netns.py`): a root host, three node hosts
(node-3 under node-1), a gateway host and a client host on one LAN, keys on every link. Faults
are the network's own: a host's cable cut and plugged back, slow and lossy links."""

from __future__ import annotations

import threading

import pytest

from http_helpers import poll
from netns import TREE, echo, hosts  # noqa: F401  (hosts is the fixture)
from test_metrics_ports import samples, value


WORDS = "the quick brown fox jumps over the lazy dog while seven wise owls count stars".split()


def prompts(n: int, words: int) -> list[str]:
    """n different prompts (the fake engine echoes each, so every answer is different too)."""
    return [" ".join([f"r{i}"] + [WORDS[(i + k) % len(WORDS)] for k in range(words - 1)])
            for i in range(n)]


def answers(records) -> list[str]:
    bad = [(r.index, r.error, r.error_message) for r in records if not r.ok]
    assert not bad, f"{len(bad)} failed, first: {bad[:3]}"
    return [r.text for r in records]


def node_of(tree: dict, name: str) -> dict:
    return next(n for n in tree["nodes"] if n["name"] == name)


@pytest.mark.timeout(180)
def test_200_streams_through_the_gateway_host_while_a_node_host_is_cut_off(hosts):
    net = hosts(engine=("--fake-delay", "0.02", "--max-slots", "6"))
    work = prompts(200, 16)
    clean = answers(net.streams(work, concurrency=48))  # the fault-free answers
    assert clean == [echo(p) for p in work]

    done: list[int] = []
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(
        records=net.streams(work, concurrency=48, progress=done)))
    load.start()
    # Cut node-1 (it has a child, node-3) while it is running requests and most are still to come.
    poll(lambda: len(done) >= 20 and node_of(net.tree(), "node-1")["running"] > 0, 60)
    net.bed.cut("node-1")
    cut_at = len(done)
    load.join(150)
    assert not load.is_alive(), "the streams did not finish"
    assert cut_at < 150, "the cut came too late to matter"
    assert answers(result["records"]) == clean  # 200/200, each identical to the fault-free run
    assert node_of(net.tree(), "node-1")["state"] == "dead"
    assert net.procs["root"].logged("node node-1 missed its heartbeats; dispatching again")
    # What an operator sees from another machine: each host's address and its links' health.
    status = {line.split("── ")[1].split()[0]: line for line in net.cli("status").splitlines()
              if "── " in line}
    assert f"{net.bed.addr('node-1')} " in status["node-1"] and "link lost" in status["node-1"]
    assert f"{net.bed.addr('node-3')} " in status["node-3"] and "link parent lost" in status["node-3"]
    assert "link ok" in status["node-2"]
    orphan = lambda: samples(net.metrics("node-3"))  # noqa: E731  (node-3's own view)
    poll(lambda: value(orphan(), "treechat:node_link_up", peer="parent") == 0, 30)  # it noticed
    assert value(orphan(), "treechat:node_link_up", peer="root") == 1

    net.bed.heal("node-1")  # the cable back: node-1 registers again by itself, node-3 reattaches
    net.wait_tree()
    poll(lambda: value(orphan(), "treechat:node_link_up", peer="parent") == 1, 30)  # reattached
    assert value(orphan(), "treechat:node_heartbeats_missed_total", peer="parent") >= 2
    assert "link lost" not in net.cli("status")
    assert all(p.alive for p in net.procs.values())
    assert answers(net.streams(work[:24], concurrency=24)) == clean[:24]


@pytest.mark.timeout(90)
def test_a_root_listening_on_every_address_is_reached_at_the_one_nodes_were_given(hosts):
    """The README's `treechat root --host 0.0.0.0`: its nodes and gateways on other hosts join."""
    net = hosts(root_host="0.0.0.0")
    work = prompts(6, 5)
    assert answers(net.streams(work, concurrency=6)) == [echo(p) for p in work]


@pytest.mark.timeout(150)
def test_a_cut_root_link_heals_without_restarting_anything(hosts):
    net = hosts()
    pids = {name: p.proc.pid for name, p in net.procs.items()}
    work = prompts(30, 8)
    assert answers(net.streams(work, concurrency=10)) == [echo(p) for p in work]

    net.bed.cut("root")
    # Everyone notices: each node says the root went silent, the gateway stops being ready.
    for name, _ in TREE:
        poll(lambda: net.procs[name].logged("the root stopped answering"), 30)
    poll(lambda: net.get("/readyz")[0] == 503, 30)
    lost = net.streams(work[:4], concurrency=4)
    assert all(r.error and r.error.startswith("http_503") for r in lost), [r.error for r in lost]

    net.bed.heal("root")
    net.wait_tree(timeout=60)  # nodes registered again, top-level ones reattached
    assert answers(net.streams(work, concurrency=10)) == [echo(p) for p in work]
    assert {name: p.proc.pid for name, p in net.procs.items()} == pids
    assert all(p.alive for p in net.procs.values()), "a process had to be restarted"


@pytest.mark.timeout(180)
def test_every_request_completes_over_slow_lossy_links(hosts):
    """20 ms each way and 2% of frames lost on every link (host to host: 40 ms, two chances to
    lose a frame), over both gateways."""
    net = hosts(delay=0.02, loss=0.02, heartbeat=0.5)
    work = prompts(60, 10)
    assert answers(net.streams(work, concurrency=20)) == [echo(p) for p in work]
    tcp = net.tcp_target()
    assert answers(net.streams(work[:30], concurrency=10, target=tcp)) == \
        [echo(p) for p in work[:30]]

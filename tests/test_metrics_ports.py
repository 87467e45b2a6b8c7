"""Prometheus metrics of nodes and the TCP gateway (`--metrics-port`), scraped over real sockets
from a real tree (fake engine) while it serves, loses its root for a moment, and loses a node."""

from __future__ import annotations

import signal
from collections import defaultdict

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import HB, free_ports
from http_helpers import poll
from test_tcp_gateway import Line


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    return samples(requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text)


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture
def tree(cluster):
    """A root, node-1 (2 slots, metrics), node-2 (metrics), a TCP gateway (metrics)."""
    m1, m2, mt = free_ports(3)
    root, root_proc = cluster.root()
    nodes = {name: cluster.node(root, name, None, "--max-slots", "2", "--fake-delay", "0.01",
                                "--metrics-port", str(port), wait=False)
             for name, port in (("node-1", m1), ("node-2", m2))}
    gw = cluster.start("tcp", "gateway", "tcp", "--root", root, "--port", "0", "--heartbeat", HB,
                       "--metrics-port", str(mt))
    for proc in [*nodes.values(), gw]:
        proc.wait_ready()
    return {"root": root_proc, "nodes": nodes, "ports": {"node-1": m1, "node-2": m2, "tcp": mt},
            "tcp": int(gw.info["url"].rsplit(":", 1)[1])}


def ask_all(port: int, texts: list[str]) -> dict:
    conn = Line(port)
    for i, text in enumerate(texts):
        conn.send({"id": f"q{i}", "text": text})
    return conn.collect([f"q{i}" for i in range(len(texts))])


def test_tokens_and_requests_are_counted_where_they_happen(tree):
    texts = [f"w{i} " * (3 + i) for i in range(8)]  # 3..10 words each: 52 tokens in all
    finals = ask_all(tree["tcp"], texts)
    assert all(f.get("done") for f in finals.values()), finals
    nodes = [scrape(tree["ports"][n]) for n in ("node-1", "node-2")]
    assert sum(value(m, "treechat:node_generation_tokens_total") for m in nodes) == 52
    assert sum(value(m, "treechat:node_requests_finished_total", finished_reason="stop")
               for m in nodes) == 8
    assert sum(value(m, "treechat:node_dispatches_total", kind="new") for m in nodes) == 8
    for m in nodes:
        assert value(m, "treechat:node_slots") == 2
        assert value(m, "treechat:node_running") == 0 and value(m, "treechat:node_queued") == 0
        assert value(m, "treechat:node_link_up", peer="root") == 1
    gw = scrape(tree["ports"]["tcp"])
    assert value(gw, "treechat:request_success_total", finished_reason="stop") == 8
    assert value(gw, "treechat:generation_tokens_total") == 52
    assert value(gw, "treechat:time_to_first_token_seconds_count") == 8
    assert value(gw, "treechat:num_requests_running") == 0
    assert value(gw, "treechat:root_link_up") == 1
    poll(lambda: value(scrape(tree["ports"]["tcp"]), "treechat:node_slots", node="node-1") == 2)


def test_the_node_advertises_its_metrics_in_the_registry(tree, cluster):
    from conftest import connect, run

    async def entries():
        client = await connect(tree["root"].info["root"].removeprefix("tcp://"))
        try:
            return await client.lookup()
        finally:
            client.close()
    urls = {e["name"]: e["info"].get("metrics") for e in run(entries())}
    assert urls["node-1"] == f"http://127.0.0.1:{tree['ports']['node-1']}/metrics"


def test_a_silent_root_shows_as_missed_heartbeats_and_a_link_down(tree):
    root = tree["root"].proc
    root.send_signal(signal.SIGSTOP)  # the root host hangs: no heartbeats, sockets stay open
    try:
        poll(lambda: value(scrape(tree["ports"]["node-1"]), "treechat:node_link_up",
                           peer="root") == 0)
        poll(lambda: value(scrape(tree["ports"]["tcp"]), "treechat:root_link_up") == 0)
    finally:
        root.send_signal(signal.SIGCONT)
    node = poll(lambda: (m := scrape(tree["ports"]["node-1"]))
                and value(m, "treechat:node_link_up", peer="root") == 1 and m)
    assert value(node, "treechat:node_heartbeats_missed_total", peer="root") >= 1
    assert value(scrape(tree["ports"]["tcp"]), "treechat:root_heartbeats_missed_total") >= 1
    poll(lambda: value(scrape(tree["ports"]["tcp"]), "treechat:root_link_up") == 1)


def test_a_resumed_request_is_counted_by_the_node_that_took_it_over(tree):
    conn = Line(tree["tcp"])
    conn.send({"id": "long", "text": " ".join(f"w{i}" for i in range(300))})  # 3 s at 10 ms
    texts = defaultdict(str)
    while "delta" not in (msg := conn.read()):
        pass  # the answer is running on one of the nodes
    texts["long"] += msg["delta"]
    holder = next(n for n in ("node-1", "node-2")
                  if value(scrape(tree["ports"][n]), "treechat:node_running") == 1)
    other = "node-2" if holder == "node-1" else "node-1"
    tree["nodes"][holder].kill()
    final = conn.collect(["long"], texts)["long"]
    assert final.get("done") and final["text"].split() == [f"w{i}" for i in range(300)]
    m = scrape(tree["ports"][other])
    assert value(m, "treechat:node_dispatches_total", kind="resumed") == 1
    assert value(m, "treechat:node_requests_finished_total", finished_reason="stop") == 1


def test_a_taken_metrics_port_is_a_clear_error(cluster, tree):
    root = tree["root"].info["root"].removeprefix("tcp://")
    proc = cluster.node(root, "node-3", None, "--metrics-port", str(tree["ports"]["node-1"]),
                        wait=False)
    assert proc.proc.wait(30) == 1
    assert "cannot serve metrics on 127.0.0.1" in proc.tail()


def test_up_gives_the_tcp_gateway_and_each_node_a_metrics_port(cluster):
    (base,) = free_ports(1, span=3)
    up = cluster.up("--engine", "fake", "--nodes", "2", "--metrics-port", str(base))
    assert ask_all(up.tcp_port, ["one two"])["q0"]["done"]
    assert value(scrape(base), "treechat:request_success_total", finished_reason="stop") == 1
    nodes = [scrape(base + i) for i in (1, 2)]
    assert sum(value(m, "treechat:node_generation_tokens_total") for m in nodes) == 2

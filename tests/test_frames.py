"""Bounded frames: every socket of the tree reads messages up to its limit (broker/limits.py).

A frame over a socket's limit drops that connection before ZeroMQ allocates it: the root's memory
stays where it was (before the limits, one 256 MB frame on the front socket took the root from
30 MB to 3.7 GB), the drop is counted and logged, and the tree serves on. The largest request a
gateway accepts still goes through.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import urllib.request

import pytest
import requests
import zmq

from broker import limits
from broker import protocol as p
from conftest import HB, REPO, connect, free_ports, run, wait_for, wait_tree

pytestmark = pytest.mark.timeout(180)

MB = 1_000_000
RSS_GROWTH = 100 * MB  # what the root may grow by while it drops 384 MB of frames


def rss(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory in bytes (VmHWM: its peak so far), from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no {field} for {pid}")


def endpoint(root: str, offset: int) -> str:
    host, _, port = root.rpartition(":")
    return f"tcp://{host}:{int(port) + offset}"


def send_big(where: str, size: int, cmd: bytes = b"s") -> None:
    """One frame of `size` bytes from a fresh DEALER, as an insider would send it (no keys on
    loopback), kept until it has left."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 10_000)
    sock.connect(where)
    sock.send_multipart([cmd, bytes(size)], copy=False)
    sock.close()  # lingers until the frame is written (or the root drops the connection)


async def dropped(client, socket: str, at_least: int) -> dict:
    async def enough():
        st = await client.status()
        return st if st["root"]["connections_dropped"][socket] >= at_least else None
    return await wait_for(enough, timeout=60)


async def answer(client, prompt: str = "still here") -> str:
    text, final = await client.submit({"prompt": prompt}).collect()
    assert final.finish_reason == "stop"
    return text


def test_huge_frames_on_the_front_socket_leave_the_roots_memory_flat(cluster):
    tree = cluster.tree(["node-1"])
    root = tree.procs["root"]
    pid = root.proc.pid

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"node-1"})
        assert await answer(client) == "still here "
        before = rss(pid)
        for size in (256 * MB, 64 * MB, 64 * MB):
            await asyncio.to_thread(send_big, endpoint(tree.root, 0), size)
        st = await dropped(client, "front", 3)
        after, peak = rss(pid), rss(pid, "VmHWM")
        print(f"root RSS before {before / MB:.1f} MB, after {after / MB:.1f} MB, "
              f"peak {peak / MB:.1f} MB")
        assert peak < before + RSS_GROWTH
        assert st["root"]["connections_dropped"]["front"] == 3
        assert await answer(client, "served after the flood") == "served after the flood "
        client.close()

    run(scenario(), timeout=150)
    status = subprocess.run([sys.executable, "-m", "treechat.cli", "status", "--root", tree.root],
                            cwd=REPO, capture_output=True, text=True, timeout=30)
    assert "connections dropped: front 3" in status.stdout, status.stdout + status.stderr
    log = root.log.read_text()
    assert "front: a connection closed without a goodbye" in log
    assert log.count("closed without a goodbye") <= 2  # once per 10 s, with a count


def test_a_frame_over_the_results_limit_is_dropped_and_nodes_serve_on(cluster):
    tree = cluster.tree(["node-1"])

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"node-1"})
        await asyncio.to_thread(send_big, endpoint(tree.root, 2), limits.RESULTS + 1, b"t")
        await asyncio.to_thread(send_big, endpoint(tree.root, 1), limits.HEARTBEAT + 1, b"b")
        st = await dropped(client, "results", 1)
        await dropped(client, "tree", 1)
        assert {n["name"]: n["state"] for n in st["nodes"]} == {"node-1": "alive"}
        assert await answer(client) == "still here "
        client.close()

    run(scenario())


def test_a_frame_over_a_nodes_down_limit_is_dropped_and_counted(cluster):
    root, _ = cluster.root()
    metrics_port = free_ports(1)[0]
    cluster.node(root, "node-1", None, "--metrics-port", str(metrics_port))
    cluster.node(root, "node-2", "node-1")

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as r:
            return r.read().decode()

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"node-1", "node-2"})
        [entry] = await client.lookup("node-1")
        await asyncio.to_thread(send_big, entry["endpoint"], limits.HEARTBEAT + 1, b"b")
        await wait_for(lambda: "treechat:node_connections_dropped_total 1.0" in scrape(),
                       timeout=30)
        st = await wait_tree(client, {"node-1", "node-2"})
        assert {n["name"]: n["state"] for n in st["nodes"]} == {"node-1": "alive",
                                                                "node-2": "alive"}
        assert await answer(client) == "still here "
        client.close()

    run(scenario())


def test_the_largest_request_a_gateway_accepts_goes_through_the_tree(cluster):
    """`--max-body` at its ceiling (limits.REQUEST): a prompt that fills it is served; the
    client of the tree refuses a larger request itself, clearly, instead of losing its
    connection to the root."""
    tree = cluster.tree(["node-1"])
    port = free_ports(1)[0]
    gw = cluster.start("http", "gateway", "http", "--root", tree.root, "--port", str(port),
                       "--heartbeat", HB, "--max-body", str(limits.REQUEST))
    gw.wait_ready()
    words = "word " * ((limits.REQUEST - 200) // 5)
    body = {"prompt": "first " + words, "max_tokens": 3}
    r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "first word word "
    body["prompt"] += "word " * 100
    r = requests.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
    assert r.status_code == 413

    async def scenario():
        client = await connect(tree.root)
        text, final = await client.submit({"prompt": "x" * (limits.SUBMIT + 1)}).collect()
        assert (text, final.code) == ("", p.ErrorCode.TOO_LONG)
        assert "more than its limit" in final.message
        long = {"prompt": "w " * (limits.PROMPT_LOGPROBS_TOKENS + 1), "prompt_logprobs": 1}
        text, final = await client.submit(long).collect()
        assert (final.code, final.message) == (p.ErrorCode.TOO_LONG, (
            f"prompt_logprobs are given for prompts of up to {limits.PROMPT_LOGPROBS_TOKENS} "
            f"tokens; this prompt has {limits.PROMPT_LOGPROBS_TOKENS + 1}"))
        assert await answer(client) == "still here "
        st = await client.status()
        assert st["root"]["connections_dropped"]["front"] == 0
        client.close()

    run(scenario())


def test_prompt_logprobs_are_bounded_and_a_large_step_is_split():
    items = [[i, "w", [7], [["w", -0.5, [["a", -1.0]] * 20]]] for i in range(3000)]
    prompt = [9, "", [], [["w", -0.5, []]] * limits.PROMPT_LOGPROBS_TOKENS]
    messages = limits.tokens_messages([prompt] + items, [[1, "stop", 3, 1, 0]])
    assert [len(m.items) for m in messages] == [1, 1024, 1024, 952]
    assert [m.done for m in messages] == [[], [], [], [[1, "stop", 3, 1, 0]]]
    assert max(len(m.frames()[1]) for m in messages) <= limits.RESULTS
    assert len(limits.tokens_messages(items[:8], [])) == 1

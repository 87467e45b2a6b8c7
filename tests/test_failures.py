"""Failure handling with real processes: lost nodes, stalls, restarts, duplicates, overload, cancel."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest
import zmq

from conftest import connect, run, wait_for, wait_tree

SEVEN = ["node-1", "node-2", ("node-3", "node-1"), ("node-4", "node-1"), ("node-5", "node-2"),
         ("node-6", "node-2"), ("node-7", "node-3")]  # three levels: node-7 under node-3


def words(i: int, n: int) -> str:
    return " ".join(f"r{i}w{j}" for j in range(n))


async def node_state(client, name: str) -> str | None:
    st = await client.status()
    return next((n["state"] for n in st["nodes"] if n["name"] == name), None)


@pytest.mark.timeout(180)
def test_kill_9_under_200_streams_loses_nothing(cluster):
    tree = cluster.tree(SEVEN, "--max-slots", "4", "--fake-delay", "0.01",
                        root_args=("--max-queue", "256"))

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"node-1", "node-2", "node-3", "node-4", "node-5", "node-6", "node-7"})
        prompts = [words(i, 20 + i % 13) for i in range(200)]
        streams = [client.submit({"prompt": p}) for p in prompts]
        collected = [asyncio.ensure_future(s.collect()) for s in streams]

        async def node3_busy():  # kill it while it runs requests, with tokens already delivered
            st = await client.status()
            return any(n["name"] == "node-3" and n["running"] > 0 for n in st["nodes"])
        await wait_for(node3_busy)
        await asyncio.sleep(0.05)  # let it produce a few tokens first
        tree.procs["node-3"].kill()
        results = await asyncio.gather(*collected)
        for prompt, (text, final) in zip(prompts, results):
            assert (final.kind, final.finish_reason) == ("done", "stop"), final
            assert text == prompt + " "
            assert final.completion_tokens == len(prompt.split())
        assert await node_state(client, "node-3") == "dead"
        client.close()

    run(scenario(), timeout=150)


def test_stalled_node_is_replaced_and_its_late_tokens_dropped(cluster):
    """SIGSTOP a node mid-answer: the root declares it dead and resumes the request elsewhere;
    when the node wakes up, its stale tokens are dropped and it rejoins under its name."""
    tree = cluster.tree(["a", "b"], "--max-slots", "1", "--fake-delay", "0.05")

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"a", "b"})
        prompt = words(0, 40)
        stream = client.submit({"prompt": prompt})
        first = None
        async for ev in stream:
            if ev.kind == "delta":
                first = ev.text
                break
        runner = await the_runner(client)
        os.kill(tree.procs[runner].proc.pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: _is(client, runner, "dead"))
        finally:
            os.kill(tree.procs[runner].proc.pid, signal.SIGCONT)
        text, final = await stream.collect()
        assert first + text == prompt + " "
        assert final.finish_reason == "stop"
        await wait_for(lambda: _is(client, runner, "alive"))  # rejoined on its own
        client.close()

    run(scenario())


async def _is(client, name, state):
    return await node_state(client, name) == state


def test_restarted_node_takes_its_name_back(cluster):
    tree = cluster.tree(["a", ("b", "a")], "--max-slots", "1", "--fake-delay", "0.01")

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"a", "b"})
        tree.procs["b"].kill()
        again = cluster.node(tree.root, "b", "a", "--max-slots", "1", "--fake-delay", "0.01")
        await wait_for(lambda: _is(client, "b", "alive"))
        # Both slots busy with long answers: one of them must be on the restarted b.
        streams = [client.submit({"prompt": words(i, 30)}) for i in range(2)]

        async def b_runs():
            st = await client.status()
            return any(n["name"] == "b" and n["running"] == 1 for n in st["nodes"])
        await wait_for(b_runs)
        for i, s in enumerate(streams):
            assert (await s.collect())[0] == words(i, 30) + " "
        assert again.proc.poll() is None
        client.close()

    run(scenario())


def test_duplicate_live_name_is_refused(cluster):
    tree = cluster.tree(["a"])
    dup = cluster.node(tree.root, "a", None, wait=False)
    assert dup.proc.wait(20) != 0
    assert "taken by a live node" in dup.tail()
    assert tree.procs["a"].proc.poll() is None


def test_root_restart_is_rejoined_and_the_open_answer_completes(cluster):
    """kill -9 of the root mid-answer: the nodes register with the new root, the client resubmits
    what it already has, and the answer arrives whole, nothing missing and nothing twice."""
    root, root_proc = cluster.root()
    cluster.node(root, "a", None, "--fake-delay", "0.02")
    port = int(root.rsplit(":", 1)[1])

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"a"})
        prompt = words(0, 120)
        stream = client.submit({"prompt": prompt})
        first = await anext(ev async for ev in stream if ev.kind == "delta")
        root_proc.kill()
        cluster.root(port=port)
        text, final = await stream.collect()
        assert first.text + text == prompt + " "
        assert (final.kind, final.finish_reason, final.completion_tokens) == ("done", "stop", 120)
        await wait_tree(client, {"a"})
        text, final = await client.submit({"prompt": "back again"}).collect()
        assert (text, final.finish_reason) == ("back again ", "stop")
        client.close()

    run(scenario())


def test_cancel_leaves_the_engine(cluster):
    tree = cluster.tree(["a"], "--max-slots", "1", "--fake-delay", "0.05")

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"a"})
        stream = client.submit({"prompt": "never ending story", "ignore_eos": True})
        async for ev in stream:
            if ev.kind == "delta":
                break
        stream.cancel()
        _, final = await stream.collect()
        assert final.finish_reason == "cancelled"

        async def idle():
            st = await client.status()
            return all(n["running"] == 0 for n in st["nodes"]) and st["root"]["in_flight"] == 0
        await wait_for(idle)
        text, final = await client.submit({"prompt": "slot is free"}).collect()
        assert text == "slot is free "
        client.close()

    run(scenario())


def test_overload_is_refused_at_once(cluster):
    tree = cluster.tree(["a"], "--max-slots", "1", "--node-queue", "0", "--fake-delay", "0.05",
                        root_args=("--max-queue", "1"))

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"a"})
        running = client.submit({"prompt": "hold the slot", "ignore_eos": True})
        await wait_for(lambda: _running(client, 1))
        waiting = client.submit({"prompt": "wait in the queue"})
        _, refused = await client.submit({"prompt": "no room"}).collect()
        assert (refused.kind, refused.code) == ("error", "overloaded")
        assert refused.retry_after and refused.retry_after > 0
        running.cancel()
        text, final = await waiting.collect()
        assert (text, final.finish_reason) == ("wait in the queue ", "stop")
        client.close()

    run(scenario())


async def the_runner(client) -> str:
    """The one node running the one request (the root hears loads with heartbeats: wait)."""
    await wait_for(lambda: _running(client, 1))
    st = await client.status()
    return next(n["name"] for n in st["nodes"] if n["running"] == 1)


async def _running(client, n):
    st = await client.status()
    return sum(x["running"] for x in st["nodes"]) == n


def test_engine_error_reaches_the_client_and_node_keeps_serving(cluster):
    tree = cluster.tree(["a"])

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"a"})
        _, final = await client.submit({"prompt": "please __engine_error__"}).collect()
        assert (final.kind, final.code) == ("error", "engine_error")
        _, final = await client.submit({"prompt": "x", "temperature": 9}).collect()
        assert (final.kind, final.code) == ("error", "bad_request")
        assert "temperature" in final.message
        assert (await client.submit({"prompt": "still here"}).collect())[0] == "still here "
        client.close()

    run(scenario())


def test_garbage_on_every_socket_is_dropped(cluster):
    tree = cluster.tree(["a", ("b", "a")])
    port = int(tree.root.rsplit(":", 1)[1])
    node_a = tree.procs["a"].info["endpoint"]
    ctx = zmq.Context.instance()
    garbage = [[b"\xff\xfe"], [b"s", b"not json"], [b"d", b"[1,2]"], [b"zz", b"{}"],
               [b"s", b'{"ref": "x", "request": 5}'], [b"r", b'{"name": 1}'], [b""] * 5,
               [os.urandom(64)], [b"t", b'{"items": [[1, 2]]}']]
    for endpoint in [f"tcp://127.0.0.1:{port + i}" for i in range(3)] + [node_a]:
        for kind in (zmq.DEALER, zmq.ROUTER):
            sock = ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
            for frames in garbage:
                try:
                    sock.send_multipart(frames, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
            sock.close()

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"a", "b"})
        streams = [client.submit({"prompt": f"still fine {i}"}) for i in range(10)]
        for i, s in enumerate(streams):
            assert (await s.collect())[0] == f"still fine {i} "
        client.close()

    run(scenario())
    assert all(p.proc.poll() is None for p in tree.procs.values())


def test_sigterm_hands_back_work_and_exits_zero(cluster):
    tree = cluster.tree(["a", "b"], "--max-slots", "1", "--fake-delay", "0.05")

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"a", "b"})
        prompt = words(1, 60)
        stream = client.submit({"prompt": prompt})
        runner = await the_runner(client)
        proc = tree.procs[runner]
        proc.proc.send_signal(signal.SIGTERM)  # its grace (2 s) is shorter than the answer
        text, final = await stream.collect()
        assert text == prompt + " " and final.finish_reason == "stop"
        assert await asyncio.to_thread(proc.proc.wait, 20) == 0
        client.close()

    run(scenario())
    assert tree.procs["root"].terminate() == 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("stopped", ["node-1", "node-3"], ids=["mid-level", "leaf"])
def test_sigstop_5s_under_load_every_request_ends_whole(cluster, stopped):
    """12 clients keep the tree busy while one node is stopped for 5 s and continued: the root
    declares it lost and resumes its requests elsewhere; the woken node must register again
    before it gets work (its parent fences its old connection); every request ends, with the
    text a fault-free run gives, and the tree is idle afterwards."""
    tree = cluster.tree(["node-1", "node-2", ("node-3", "node-1"), ("node-4", "node-2")],
                        "--max-slots", "2", "--fake-delay", "0.02")

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"node-1", "node-2", "node-3", "node-4"})
        stop_load = asyncio.Event()
        results: list[tuple[str, str, object]] = []

        async def user(u: int) -> None:
            i = 0
            while not stop_load.is_set():
                prompt = words(u * 1000 + i, 10 + (u + i) % 15)
                text, final = await client.submit({"prompt": prompt}).collect()
                results.append((prompt, text, final))
                i += 1

        users = [asyncio.ensure_future(user(u)) for u in range(12)]
        await wait_for(lambda: len(results) >= 24)  # the load is on everywhere
        pid = tree.procs[stopped].proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(5)  # the stall itself is the scenario, not a wait for a result
        finally:
            os.kill(pid, signal.SIGCONT)
        await wait_for(lambda: _is(client, stopped, "alive"))  # it registered again
        served = len(results)
        await wait_for(lambda: len(results) >= served + 24)  # and the tree serves on
        stop_load.set()
        await asyncio.gather(*users)
        for prompt, text, final in results:
            assert (final.kind, final.finish_reason) == ("done", "stop"), final
            assert text == prompt + " "
            assert final.completion_tokens == len(prompt.split())

        async def idle():
            st = await client.status()
            return st["root"]["in_flight"] == 0 and all(n["running"] == n["queued"] == 0
                                                        for n in st["nodes"])
        await wait_for(idle)
        client.close()

    run(scenario(), timeout=150)


@pytest.mark.timeout(240)
def test_kill_9_of_the_root_under_200_streams_loses_nothing(cluster):
    """`treechat up` restarts a killed root; the nodes register with it, the gateway's client
    resubmits every open stream with what it already delivered: 200/200 whole answers."""
    up = cluster.up("--engine", "fake", "--nodes", "3", "--max-slots", "4",
                    "--fake-delay", "0.02", "--max-queue", "256")

    async def scenario():
        client = await connect(up.root)
        st = await wait_tree(client, {"node-1", "node-2", "node-3"})
        prompts = [words(i, 15 + i % 17) for i in range(200)]
        streams = [client.submit({"prompt": p}) for p in prompts]
        collected = [asyncio.ensure_future(s.collect()) for s in streams]
        await wait_for(lambda: sum(bool(s.parts) for s in streams) >= 12)  # answers under way
        os.kill(_root_pid(up), signal.SIGKILL)
        results = await asyncio.gather(*collected)
        for prompt, (text, final) in zip(prompts, results):
            assert (final.kind, final.finish_reason) == ("done", "stop"), final
            assert text == prompt + " "
            assert final.completion_tokens == len(prompt.split())
        new = await client.status()
        assert new["root"]["epoch"] != st["root"]["epoch"]  # it really was another root
        client.close()

    run(scenario(), timeout=200)


def _root_pid(up) -> int:
    """The root's pid, a child of `treechat up`."""
    children = open(f"/proc/{up.proc.proc.pid}/task/{up.proc.proc.pid}/children").read().split()
    for pid in children:
        if " root " in open(f"/proc/{pid}/cmdline").read().replace("\0", " "):
            return int(pid)
    raise RuntimeError("no root process under treechat up")


def test_a_stalled_root_loses_no_answer(cluster):
    """SIGSTOP of the root past its gateways' patience: the client takes it for lost, the root
    (woken) for a lost gateway; the client resubmits what it has under new refs, late deltas of
    the old submissions are dropped, and every answer arrives whole, nothing twice."""
    root, root_proc = cluster.root()
    cluster.node(root, "a", None, "--max-slots", "4", "--fake-delay", "0.02")

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"a"})
        prompts = [words(i, 40 + i) for i in range(6)]
        streams = [client.submit({"prompt": q}) for q in prompts]
        collected = [asyncio.ensure_future(s.collect()) for s in streams]
        await wait_for(lambda: all(s.parts for s in streams[:4]))
        os.kill(root_proc.proc.pid, signal.SIGSTOP)
        try:
            await wait_for(lambda: client.lost_at is not None)
            await asyncio.sleep(1)  # the stall itself is the scenario
        finally:
            os.kill(root_proc.proc.pid, signal.SIGCONT)
        for prompt, (text, final) in zip(prompts, await asyncio.gather(*collected)):
            assert (final.kind, final.finish_reason) == ("done", "stop"), final
            assert text == prompt + " "
        client.close()

    run(scenario())

"""A root and its standby on one machine (real processes, loopback): who is active, and failover
without loss. The same across hosts, with cables cut: tests/test_netns_standby.py."""

from __future__ import annotations

import asyncio

from conftest import connect, free_ports, run, wait_for, wait_tree

SAY = {"ignore_eos": True}


def pair(cluster, *node_args, nodes=("node-1", "node-2")):
    """(addresses "A,B", root A's proc, standby B's proc, node procs)."""
    a, b = free_ports(2, span=3)
    root_a, proc_a = cluster.root(port=a)
    root_b, proc_b = cluster.root("--standby-of", root_a, port=b)
    both = f"{root_a},{root_b}"
    procs = {n: cluster.node(both, n, None, "--fake-delay", "0.02", *node_args, wait=False)
             for n in nodes}
    for proc in procs.values():
        proc.wait_ready()
    return both, root_a, root_b, proc_a, proc_b, procs


async def ask(root: str) -> dict:
    """The status of the root at `root` alone (a standby answers it too)."""
    from broker.client import RootClient
    client = RootClient(root, name="cli", heartbeat=0.2)
    await client.start()
    try:
        await client.wait_connected(3)
        return (await client.status())["root"]["pair"]
    finally:
        client.close()


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def test_the_standby_takes_over_when_the_primary_dies_and_nothing_is_lost(cluster):
    both, root_a, root_b, proc_a, proc_b, _ = pair(cluster)

    async def scenario():
        client = await connect(both)
        await wait_tree(client, {"node-1", "node-2"})
        assert (await ask(root_a))["state"] == "active"
        b = await wait_for(lambda: ask_state(root_b, "passive"))
        assert b["peer"] == root_a
        for text, final in await through(client, proc_a.kill, 20, 30, 90):
            assert (final.kind, final.finish_reason, final.completion_tokens) == ("done", "length",
                                                                                 90)
            assert text == (words(30) + " ") * 3
        assert (await ask(root_b))["state"] == "active"
        text, final = await client.submit({"prompt": "after the failover"}).collect()
        assert text == "after the failover "
        client.close()

    run(scenario(), timeout=90)


async def ask_state(root: str, wanted: str) -> dict | None:
    found = await ask(root)
    return found if found["state"] == wanted else None


async def through(client, fault, n: int, length: int, tokens: int) -> list:
    """`n` streams of a `length`-word prompt for `tokens` tokens, and `fault()` once every one has
    begun: [(whole text, final event)]."""
    streams = [client.submit({"prompt": words(length), "max_tokens": tokens, **SAY})
               for _ in range(n)]
    firsts = await asyncio.gather(*(first_delta(s) for s in streams))
    fault()
    results = await asyncio.gather(*(s.collect() for s in streams))
    return [(first + text, final) for first, (text, final) in zip(firsts, results)]


async def first_delta(stream) -> str:
    """Wait for the stream's first text; return it (collect() returns what follows)."""
    while (ev := await stream.next(10)).kind != "delta":
        pass
    return ev.text


def test_a_standby_alone_refuses_work_and_says_why(cluster):
    both, root_a, root_b, *_ = pair(cluster)

    async def scenario():
        await wait_for(lambda: ask_state(root_b, "passive"))
        from broker.client import RootClient
        only_b = RootClient(root_b, name="test", heartbeat=0.2)
        await only_b.start()
        assert not await only_b.wait_connected(3)  # it answers, but as the standby
        assert "standby" in only_b.standby_reason
        _, final = await only_b.submit({"prompt": "hello"}).collect()
        assert final.kind == "error" and "standby" in final.message and root_a in final.message
        only_b.close()

    run(scenario())


def test_the_old_primary_comes_back_as_the_standby_and_a_second_failover_is_lossless(cluster):
    both, root_a, root_b, proc_a, proc_b, _ = pair(cluster)

    async def scenario():
        client = await connect(both)
        await wait_tree(client, {"node-1", "node-2"})
        proc_a.kill()
        text, final = await client.submit({"prompt": "first failover"}).collect()
        assert text == "first failover ", final
        await wait_for(lambda: ask_state(root_b, "active"))
        port_a = int(root_a.rpartition(":")[2])
        cluster.root(port=port_a)  # the old primary, started as before
        back = await wait_for(lambda: ask_state(root_a, "passive"))
        assert back["peer_state"] == "active"
        for text, final in await through(client, proc_b.kill, 10, 20, 60):
            assert (final.finish_reason, text) == ("length", (words(20) + " ") * 3)
        assert (await ask(root_a))["state"] == "active"
        client.close()

    run(scenario(), timeout=120)


def test_killing_the_standby_changes_nothing_for_traffic(cluster):
    both, root_a, root_b, proc_a, proc_b, _ = pair(cluster)

    async def scenario():
        client = await connect(both)
        await wait_tree(client, {"node-1", "node-2"})
        await wait_for(lambda: ask_state(root_b, "passive"))
        epoch = client.epoch
        for text, final in await through(client, proc_b.kill, 10, 10, 40):
            assert (final.finish_reason, text) == ("length", (words(10) + " ") * 4)
        assert client.epoch == epoch  # never left the primary
        assert (await ask(root_a))["state"] == "active"
        client.close()

    run(scenario())

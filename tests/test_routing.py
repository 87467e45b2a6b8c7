"""Routing through real root and node processes: the original seed order, least-loaded, queues."""

from __future__ import annotations

import asyncio

from conftest import connect, run, wait_for, wait_tree
from broker.routing import Children, Load

FOREVER = {"ignore_eos": True}  # the fake engine's answer never ends: the request holds its slot


def sequential_tree(cluster, layout, *node_args, root_args=()):
    """Start nodes one by one (each ring's order is its children's arrival order)."""
    root, _ = cluster.root(*root_args)
    for name, parent in layout:
        cluster.node(root, name, parent, *node_args)
    return root


def test_seed_policy_reproduces_the_original_assignment_order(cluster):
    """SEED.md's worked example: root -> A, B; A -> A1, A2; B -> B1, B2; one slot per node."""
    layout = [("A", None), ("B", None), ("A1", "A"), ("A2", "A"), ("B1", "B"), ("B2", "B")]
    root = sequential_tree(cluster, layout, "--policy", "seed", "--max-slots", "1",
                           "--fake-delay", "0.5", root_args=("--policy", "seed"))
    expected = [("A", "running"), ("B", "running"), ("A1", "running"), ("B1", "running"),
                ("A2", "running"), ("B2", "running"), ("A1", "queued"), ("B1", "queued"),
                ("A2", "queued")]

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {name for name, _ in layout})
        seen = []
        for i, (node, state) in enumerate(expected, start=1):
            client.submit({"prompt": f"request {i}", **FOREVER})

            async def placed():
                st = await client.status()
                total = sum(n["running"] + n["queued"] for n in st["nodes"])
                return st if total == i else None
            st = await wait_for(placed)
            by_name = {n["name"]: n for n in st["nodes"]}
            seen.append((node, by_name[node][state]))
            assert by_name[node][state] >= 1, f"request {i} should be {state} at {node}: {st}"
        final = {n["name"]: (n["running"], n["queued"]) for n in st["nodes"]}
        assert final == {"A": (1, 0), "B": (1, 0), "A1": (1, 1), "A2": (1, 1),
                         "B1": (1, 1), "B2": (1, 0)}
        client.close()

    run(scenario())


def test_least_loaded_sends_work_past_a_full_subtree(cluster):
    """Where seed would queue behind a busy leaf, least-loaded finds the idle one."""
    layout = [("A", None), ("B", None), ("A1", "A")]
    root = sequential_tree(cluster, layout, "--max-slots", "1", "--fake-delay", "0.5")

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"A", "B", "A1"})
        for i in range(3):  # three requests fill all three slots, wherever they are
            client.submit({"prompt": f"long {i}", **FOREVER})

        async def spread():
            st = await client.status()
            return st if all(n["running"] == 1 for n in st["nodes"]) else None
        st = await wait_for(spread)
        assert all(n["queued"] == 0 for n in st["nodes"])
        # The fourth waits at the root, not behind a long request at a leaf.
        client.submit({"prompt": "fourth", **FOREVER})
        st = await wait_for(lambda: _root_queued(client))
        assert sum(n["queued"] for n in st["nodes"]) == 0
        client.close()

    run(scenario())


async def _root_queued(client):
    st = await client.status()
    return st if st["root"]["queued"] == 1 else None


def test_streams_exact_text_through_three_levels(cluster):
    tree = cluster.tree(["n1", ("n2", "n1"), ("n3", "n2")], "--max-slots", "1",
                        "--fake-delay", "0.005")

    async def scenario():
        client = await connect(tree.root)
        await wait_tree(client, {"n1", "n2", "n3"})
        prompts = [" ".join(f"w{i}x{j}" for j in range(5 + i % 7)) for i in range(30)]
        streams = [client.submit({"messages": [{"role": "user", "content": p}]}) for p in prompts]
        results = await asyncio.gather(*(s.collect() for s in streams))
        for prompt, (text, final) in zip(prompts, results):
            assert text == prompt + " "
            assert (final.kind, final.finish_reason) == ("done", "stop")
            assert final.completion_tokens == len(prompt.split())
            assert final.prompt_tokens == len(prompt.split())
        client.close()

    run(scenario())


def test_children_ring_orders_and_tie_breaks():
    kids = Children("least-loaded")
    for name, free in (("a", 2), ("b", 3), ("c", 3)):
        kids.adopt(name, name.encode(), 1, Load(slots=3, free=free).to_dict())
    assert kids.pick(need_free=True).name == "b"  # most free slots
    assert kids.pick(need_free=True).name == "c"  # tie with b: ring order moved past b
    for c in kids:
        c.load.free = 0
    assert kids.pick(need_free=True) is None
    kids.get("a").load.room = 5
    assert kids.pick(need_free=False).name == "a"  # no free slot: most queue room
    seed = Children("seed")
    for name in "abc":
        seed.adopt(name, name.encode(), 1, Load(slots=1, free=0).to_dict())
    assert [seed.pick(need_free=True).name for _ in range(4)] == ["a", "b", "c", "a"]

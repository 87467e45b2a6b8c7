"""One tree, several models, and conversations that come home: real root and node processes on
the fake engine (its `--model` is the name it serves under). The same on real tiny models, through
the HTTP API: tests/test_http_models.py."""

from __future__ import annotations

import requests

from conftest import connect, run, wait_for, wait_tree
from test_http_limits import gateway

FOREVER = {"ignore_eos": True}  # the fake engine's answer never ends: the request holds its slot


def model_tree(cluster, layout, *node_args, root_args=()):
    """layout: [(name, parent, model)]; nodes start in order."""
    root, _ = cluster.root(*root_args)
    procs = {name: cluster.node(root, name, parent, "--model", model, *node_args)
             for name, parent, model in layout}
    return root, procs


async def placement(client) -> dict[str, tuple[int, int]]:
    st = await client.status()
    return {n["name"]: (n["running"], n["queued"]) for n in st["nodes"]}


async def running_at(client, counts: dict[str, int]) -> dict:
    """Wait until each named node runs exactly that many requests."""
    async def ok():
        placed = await placement(client)
        return placed if all(placed.get(n, (0, 0))[0] == k for n, k in counts.items()) else None
    return await wait_for(ok)


def ask(model: str, text: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], "model": model, **extra}


def test_requests_run_only_on_nodes_of_their_model(cluster):
    """alpha under the root, beta under it, alpha again under beta: each model's requests reach
    only its nodes, through nodes of the other model; a model nobody serves is refused by name."""
    layout = [("a1", None, "alpha"), ("b1", "a1", "beta"), ("a2", "b1", "alpha")]
    root, _ = model_tree(cluster, layout, "--max-slots", "2", "--fake-delay", "0.05")

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"a1", "b1", "a2"})
        betas = [client.submit(ask("beta", f"b {i}", **FOREVER)) for i in range(2)]
        await running_at(client, {"b1": 2, "a1": 0, "a2": 0})
        alphas = [client.submit(ask("alpha", f"a {i}", **FOREVER)) for i in range(4)]
        await running_at(client, {"a1": 2, "a2": 2, "b1": 2})
        late = client.submit(ask("beta", "one more", max_tokens=3))  # waits for a beta slot

        async def queued_beta():
            st = await client.status()
            return st["root"]["queued_by_model"].get("beta") == 1
        await wait_for(queued_beta)
        betas[0].cancel()
        text, final = await late.collect()
        assert (text, final.kind, final.finish_reason) == ("one more ", "done", "stop")

        _, refused = await client.submit(ask("gamma", "hello")).collect()
        assert refused.code == "unknown_model"
        assert "alpha" in refused.message and "beta" in refused.message
        for s in betas[1:] + alphas:
            s.cancel()
        client.close()

    run(scenario())


def test_a_router_without_an_engine_carries_every_model_below_it(cluster):
    root, _ = cluster.root()
    cluster.node(root, "router", None, engine="none")
    for name, model in (("a1", "alpha"), ("b1", "beta")):
        cluster.node(root, name, "router", "--model", model, "--max-slots", "1",
                     "--fake-delay", "0.05")

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"router", "a1", "b1"})
        for model, node in (("beta", "b1"), ("alpha", "a1"), ("beta", "b1")):
            s = client.submit(ask(model, f"for {model}", **FOREVER))
            await running_at(client, {node: 1})
            s.cancel()
            assert (await s.collect())[1].finish_reason == "cancelled"
            await running_at(client, {node: 0})
        client.close()

    run(scenario())


def test_a_nodes_alias_names_its_model_everywhere(cluster):
    """`treechat node --alias chat`: the root routes "chat" to that node's model, and the HTTP
    gateway lists the name and answers under it."""
    root, _ = cluster.root()
    cluster.node(root, "a1", None, "--model", "alpha", "--alias", "chat", "--max-slots", "1",
                 "--fake-delay", "0.05")
    cluster.node(root, "b1", None, "--model", "beta", "--max-slots", "1", "--fake-delay", "0.05")
    _, url, _ = gateway(cluster, root)

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"a1", "b1"})
        s = client.submit(ask("chat", "by its other name", **FOREVER))
        await running_at(client, {"a1": 1, "b1": 0})
        s.cancel()
        await s.collect()
        client.close()

    run(scenario())
    models = {m["id"]: m for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]}
    assert set(models) == {"alpha", "beta", "chat"} and models["chat"]["root"] == "alpha"
    r = requests.post(f"{url}/v1/chat/completions", json=ask("chat", "hello there"), timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "chat"
    assert r.json()["choices"][0]["message"]["content"] == "hello there "


def test_one_models_flood_does_not_hold_back_another(cluster):
    """alpha's slot and its whole queue at the root are taken; beta's requests still run at once,
    and alpha's next one is refused as overloaded."""
    layout = [("a1", None, "alpha"), ("b1", None, "beta")]
    root, _ = model_tree(cluster, layout, "--max-slots", "1", "--fake-delay", "0.02",
                         root_args=("--max-queue", "2"))

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"a1", "b1"})
        flood = [client.submit(ask("alpha", f"a {i}", **FOREVER)) for i in range(3)]

        async def full():
            st = await client.status()
            return st["root"]["queued_by_model"].get("alpha") == 2
        await wait_for(full)
        _, over = await client.submit(ask("alpha", "one too many")).collect()
        assert over.code == "overloaded"
        for i in range(3):
            text, final = await client.submit(ask("beta", f"beta answer {i}")).collect()
            assert (text, final.finish_reason) == (f"beta answer {i} ", "stop")
        for s in flood:
            s.cancel()
        client.close()

    run(scenario())


def test_losing_a_models_last_node_fails_its_requests_clearly_and_no_other(cluster):
    layout = [("a1", None, "alpha"), ("b1", None, "beta")]
    root, procs = model_tree(cluster, layout, "--fake-delay", "0.05",
                             root_args=("--model-wait", "1"))

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"a1", "b1"})
        alpha = client.submit(ask("alpha", "alpha keeps going", max_tokens=60, **FOREVER))
        beta = client.submit(ask("beta", "beta is cut", **FOREVER))
        first = await beta.next(10)
        while first.kind != "delta":
            first = await beta.next(10)
        procs["b1"].kill()
        _, lost = await beta.collect()
        assert lost.kind == "error" and lost.code == "node_lost"
        assert "beta" in lost.message
        text, done = await alpha.collect()
        assert (done.finish_reason, done.completion_tokens) == ("length", 60)
        assert text == "alpha keeps going " * 20
        _, refused = await client.submit(ask("beta", "anyone?")).collect()
        assert refused.code == "unknown_model" and "alpha" in refused.message
        client.close()

    run(scenario())


def test_losing_one_of_two_nodes_of_a_model_loses_nothing(cluster):
    layout = [("a1", None, "alpha"), ("b1", None, "beta"), ("b2", None, "beta")]
    root, procs = model_tree(cluster, layout, "--fake-delay", "0.05",
                             root_args=("--model-wait", "1"))

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"a1", "b1", "b2"})
        beta = client.submit(ask("beta", "one two three", max_tokens=45, **FOREVER))
        placed = await wait_for(lambda: running_somewhere(client, ("b1", "b2")))
        procs[placed].kill()
        text, done = await beta.collect()
        assert (done.kind, done.finish_reason, done.completion_tokens) == ("done", "length", 45)
        assert text == "one two three " * 15  # nothing missing, nothing twice
        client.close()

    run(scenario())


async def running_somewhere(client, names) -> str | None:
    placed = await placement(client)
    return next((n for n in names if placed.get(n, (0, 0))[0]), None)


def conversation(turns: int) -> list[dict]:
    """A chat history of `turns` user turns (and the answers between them)."""
    history = []
    for i in range(turns):
        if i:
            history.append({"role": "assistant", "content": f"answer {i}"})
        history.append({"role": "user", "content": f"question {i} of this chat"})
    return history


def test_a_conversations_next_turn_goes_home_unless_home_is_full(cluster):
    """Three nodes of one model, one slot each. Each conversation's second turn lands on the node
    that ran its first (by prompt prefix alone, and by a named session); with that node full, on
    another."""
    layout = [(f"n{i}", None, "alpha") for i in range(1, 4)]
    root, _ = model_tree(cluster, layout, "--max-slots", "1", "--fake-delay", "0.05")
    nodes = ("n1", "n2", "n3")

    async def where(client, request, idle=nodes) -> tuple[str, object]:
        """Run `request` while `idle` run nothing: the node it runs on, and its stream."""
        await running_at(client, {n: 0 for n in idle})
        stream = client.submit(request)
        while (await stream.next(10)).kind != "delta":  # its node has computed its prompt
            pass
        node = await wait_for(lambda: running_somewhere(client, idle))
        return node, stream

    async def scenario():
        client = await connect(root)
        await wait_tree(client, set(nodes))
        system = {"role": "system", "content": "You are terse."}
        for chat in range(4):
            first = [system, {"role": "user", "content": f"chat {chat} turn one"}]
            home, s1 = await where(client, {"messages": first, "model": "alpha", **FOREVER})
            s1.cancel()
            await s1.collect()
            second = first + [{"role": "assistant", "content": "ok"},
                              {"role": "user", "content": "turn two"}]
            node, s2 = await where(client, {"messages": second, "model": "alpha", **FOREVER})
            assert node == home, f"chat {chat}: turn 2 ran on {node}, turn 1 on {home}"
            s2.cancel()
            await s2.collect()

        # A named session: unrelated prompts, one home.
        home, s = await where(client, {"prompt": "first", "session": "user-42", **FOREVER})
        s.cancel()
        await s.collect()
        node, busy = await where(client, {"prompt": "something else", "session": "user-42",
                                          **FOREVER})
        assert node == home
        # Its home's one slot is taken (by the session itself): the next turn goes elsewhere.
        others = tuple(n for n in nodes if n != home)
        node, late = await where(client, {"prompt": "and now?", "session": "user-42", **FOREVER},
                                 idle=others)
        assert node in others
        for stream in (busy, late):
            stream.cancel()
        client.close()

    run(scenario())


def test_without_affinity_the_policy_alone_places_turns(cluster):
    """--no-affinity: least-loaded's ring spreads the turns of one conversation."""
    layout = [(f"n{i}", None, "alpha") for i in range(1, 3)]
    root, _ = model_tree(cluster, layout, "--max-slots", "2", "--fake-delay", "0.05",
                         root_args=("--no-affinity",))

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"n1", "n2"})
        seen = set()
        for _ in range(4):
            s = client.submit({"prompt": "same words", "session": "s", **FOREVER})
            seen.add(await wait_for(lambda: running_somewhere(client, ("n1", "n2"))))
            s.cancel()
            await s.collect()
            await running_at(client, {"n1": 0, "n2": 0})
        assert seen == {"n1", "n2"}
        client.close()

    run(scenario())

"""Hostile peers against `treechat up`'s defaults (its own CurveZMQ keys), over real sockets.

Outsiders (no keys, or keys the tree never authorized) cannot even finish a handshake: a raw
Submit on the front port, a ghost child heartbeating free slots, a connection naming itself
`node-1`, a rogue `treechat node` all get nothing. An insider holding a member key (any process
of this user can read up's key folder) is fenced by the protocol: a forged child is never
adopted, forged results for requests it does not hold are dropped.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time

import orjson
import pytest
import zmq

from broker import protocol as p
from broker import security
from conftest import REPO, Cluster, connect, run, wait_tree

NODES = {"node-1", "node-2", "node-3"}  # node-3 sits under node-1


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    where = tmp_path_factory.mktemp("attacks")
    cluster = Cluster(where)
    up = cluster.up("--engine", "fake", "--nodes", "3", "--max-slots", "2", "--fake-delay", "0.01")
    up.keys = security.running_tree(up.root)
    up.pids = run(_pids(up))  # no attack may kill a node (`up` would restart it unnoticed)
    up.stranger = where / "stranger"
    security.create_keys(up.stranger)  # valid keys, authorized by nobody in this tree
    yield up
    cluster.close()


def capacity(n: int, **extra) -> dict:
    """A load report claiming `n` free slots of the fake engine's model (so a parent that took
    it at its word would send work there)."""
    room = {"slots": n, "free": n, "room": extra.pop("room", n)}
    return {**room, "models": {"fake": room}, **extra}


def raw(endpoint: str, keys=None, member: str = security.CLIENT, identity: bytes | None = None,
        tree_keys=None):
    """A bare DEALER, as an attacker would write it, with `keys`'s client key (and the server
    key of `tree_keys`, default the same folder)."""
    tree_keys = tree_keys or keys
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if keys is not None:
        security.Curve(keys, member).client(sock)
        # server.key is public (every member has it): a stranger may well know the tree's.
        sock.curve_serverkey = security.Curve(tree_keys, None).server_public
    sock.connect(endpoint)
    return sock


def received(sock) -> list:
    out = []
    while sock.poll(0):
        out.append(p.decode(sock.recv_multipart()))
    return out


def port(root: str, offset: int) -> str:
    host, _, base = root.rpartition(":")
    return f"tcp://{host}:{int(base) + offset}"


async def legit_answers(up, n: int = 20, during=None) -> None:
    """n requests through a member's client, all exact, while `during()` runs each 20 ms."""
    client = await connect(up.root)
    await wait_tree(client, NODES)
    prompts = [" ".join(f"q{i}w{j}" for j in range(8 + i % 5)) for i in range(n)]
    collected = asyncio.gather(*(client.submit({"prompt": q}).collect() for q in prompts))
    while during is not None and not collected.done():
        during()
        await asyncio.sleep(0.02)
    for prompt, (text, final) in zip(prompts, await collected):
        assert (text, final.finish_reason) == (prompt + " ", "stop")
    assert await _pids(up, client) == up.pids
    client.close()


async def _pids(up, client=None) -> dict:
    own = client is None
    client = client or await connect(up.root)
    st = await wait_tree(client, NODES)
    if own:
        client.close()
    return {n["name"]: n["info"]["pid"] for n in st["nodes"] if n["name"] in NODES}


@pytest.mark.parametrize("who", ["no-keys", "stranger-keys"])
def test_a_raw_submit_on_the_front_port_gets_nothing(up, who):
    keys = up.stranger if who == "stranger-keys" else None
    sock = raw(port(up.root, 0), keys, tree_keys=up.keys)
    submit = p.Submit(ref=1, request={"prompt": "let me in"})
    for msg in (p.Hello(name="intruder"), submit, p.StatusQuery(ref=1), p.Lookup(name=None)):
        try:
            sock.send_multipart(msg.frames(), zmq.NOBLOCK)
        except zmq.Again:
            pass  # no connection ever completes
    assert not sock.poll(2000)  # no answer, no registry, no status
    sock.close()
    run(legit_answers(up, 5))


@pytest.mark.parametrize("who", ["no-keys", "stranger-keys"])
def test_a_ghost_child_and_an_identity_takeover_get_no_work(up, who):
    keys = up.stranger if who == "stranger-keys" else None
    node1 = run(_endpoint(up, "node-1"))
    socks = [raw(port(up.root, 1), keys, tree_keys=up.keys),
             raw(port(up.root, 1), keys, identity=b"node-1", tree_keys=up.keys),
             raw(node1, keys, tree_keys=up.keys),
             raw(node1, keys, identity=b"node-3", tree_keys=up.keys)]
    ghost = p.Heartbeat(sender="node-1", incarnation=secrets.randbits(63),
                        load=capacity(99, link=10**9))

    def beat():
        for sock in socks:
            try:
                sock.send_multipart(ghost.frames(), zmq.NOBLOCK)
            except zmq.Again:
                pass
    run(legit_answers(up, 20, during=beat))
    for sock in socks:
        assert received(sock) == []
        sock.close()


async def _endpoint(up, name: str) -> str:
    client = await connect(up.root)
    st = await wait_tree(client, NODES)
    client.close()
    return next(n["endpoint"] for n in st["nodes"] if n["name"] == name)


def test_an_insider_cannot_pose_as_a_child(up):
    """Holding a member key lets a process connect, not be adopted: a parent takes a child only
    for the incarnation the root registered, so forged heartbeats (as node-1 to the root, as
    node-3 to node-1, as a stranger) never receive a Dispatch, and node-1 keeps its link."""
    async def scenario():
        client = await connect(up.root)
        st = await wait_tree(client, NODES)
        client.close()
        node1 = next(n["endpoint"] for n in st["nodes"] if n["name"] == "node-1")
        socks = [(raw(port(up.root, 1), up.keys, "cli"), "node-1"),
                 (raw(node1, up.keys, "cli"), "node-3"), (raw(node1, up.keys, "cli"), "ghost")]

        def beat():
            for sock, name in socks:
                forged = p.Heartbeat(sender=name, incarnation=secrets.randbits(63),
                                     load=capacity(99, link=10**9))
                sock.send_multipart(forged.frames(), zmq.NOBLOCK)
        await legit_answers(up, 20, during=beat)
        for sock, name in socks:
            assert not any(isinstance(m, p.Dispatch) for m in received(sock)), name
            sock.close()

    run(scenario())


def test_an_insider_cannot_inject_text_into_other_answers(up):
    """A registered node (an insider's) floods Tokens and Done for request ids it guesses (the
    old scheme put the root's epoch in them) and for random ones: no answer changes, none ends
    early."""
    async def scenario():
        client = await connect(up.root)
        st = await wait_tree(client, NODES)
        epoch = st["root"]["epoch"]
        client.close()
        evil = raw(port(up.root, 2), up.keys, "cli")
        evil.send_multipart(p.Register(name="evil", instance="x", parent=None, endpoint="tcp://x:1",
                                       slots=0).frames())
        assert evil.poll(5000) and isinstance(received(evil)[0], p.Welcome)
        # Popped from the end: the old scheme's first 4000 rids first, then random ones.
        guesses = [secrets.randbits(63) for _ in range(2000)] + \
            [(epoch << 32) | n for n in range(4000, 0, -1)]

        def inject():
            batch = [guesses.pop() for _ in range(min(200, len(guesses)))]
            if batch:
                evil.send_multipart(p.Tokens(items=[[rid, "INJECTED ", [0]] for rid in batch],
                                             done=[[rid, "stop", 0, 0] for rid in batch]).frames())
        await legit_answers(up, 20, during=inject)
        evil.send_multipart(p.Bye(name="evil").frames())
        evil.close()

    run(scenario())


@pytest.mark.parametrize("who,says", [("no-keys", "CurveZMQ"), ("stranger-keys", "refused")])
def test_a_rogue_node_is_refused_and_exits_saying_why(up, who, says):
    args = ["node", "--name", "rogue", "--root", up.root, "--engine", "fake", "--heartbeat", "0.2"]
    if who == "stranger-keys":
        args += ["--curve", str(up.stranger)]  # without: no keys (a node never picks up up's)
    result = subprocess.run([sys.executable, "-m", "treechat.cli", *args], cwd=REPO, text=True,
                            capture_output=True, timeout=60)
    assert result.returncode != 0
    assert says in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]

    async def registry():
        client = await connect(up.root)
        names = {e["name"] for e in await client.lookup()}
        client.close()
        return names
    assert "rogue" not in run(registry())


def test_request_ids_are_not_predictable_and_swallowed_dispatches_come_back(up):
    """The rids an insider's node is sent share nothing with the epoch and are not a count; and
    the dispatches it swallows (never acknowledged) are taken back and answered elsewhere."""
    async def scenario():
        client = await connect(up.root)
        st = await wait_tree(client, NODES)
        node = raw(port(up.root, 2), up.keys, "cli")
        node.send_multipart(p.Register(name="counter", instance="y", parent=None,
                                       endpoint="tcp://x:1", slots=0).frames())
        assert node.poll(5000)
        welcome = received(node)[0]
        up_link = raw(port(up.root, 1), up.keys, "cli")
        free = capacity(50, room=0, link=1, recv=0)
        rids = []
        streams = []
        deadline = time.monotonic() + 20
        while len(rids) < 6 and time.monotonic() < deadline:
            up_link.send_multipart(p.Heartbeat(sender="counter", incarnation=welcome.incarnation,
                                               load=free).frames())
            streams.append(client.submit({"prompt": "count me"}))
            await asyncio.sleep(0.05)
            rids += [m.rid for m in received(up_link) if isinstance(m, p.Dispatch)]
        assert len(rids) >= 6
        assert all(rid >> 32 != st["root"]["epoch"] for rid in rids)
        gaps = {b - a for a, b in zip(rids, rids[1:])}
        assert not gaps & {1, 2, 3}  # not a counter
        # It never acknowledged what it was sent: the root took each back and sent it on.
        for s in streams:
            assert (await s.collect())[0] == "count me "
        node.send_multipart(p.Bye(name="counter").frames())
        node.close()
        up_link.close()
        client.close()

    run(scenario())


def test_frames_survive_an_insider_flood_quietly(up):
    """12k bad frames from one peer: served on, and the root's log holds a handful of lines."""
    sock = raw(port(up.root, 2), up.keys, "cli")
    for i in range(12000):
        sock.send_multipart([b"t", b"{not json" if i % 2 else orjson.dumps({"items": 5})])
    run(legit_answers(up, 5))
    sock.close()
    lines = [ln for ln in up.proc.log.read_text().splitlines() if "undecodable" in ln]
    assert 0 < len(lines) <= 10

"""CurveZMQ: with `--curve`, only processes holding an authorized key can join or ask the tree."""

from __future__ import annotations

import subprocess
import sys

import pytest

from broker.client import RootClient
from broker.security import create_keys
from conftest import REPO, run, wait_tree


@pytest.fixture
def keys(tmp_path):
    create_keys(tmp_path / "keys")
    create_keys(tmp_path / "stranger")  # valid keys, but nobody authorized them
    return tmp_path / "keys", tmp_path / "stranger"


async def client_for(root, curve):
    client = RootClient(root, name="curve-test", heartbeat=0.2, curve=str(curve) if curve else None)
    await client.start()
    return client


def test_an_authenticated_tree_serves_only_authorized_keys(cluster, keys):
    good, stranger = keys
    tree = cluster.tree(["a", ("b", "a")], "--curve", str(good),
                        root_args=("--curve", str(good)))

    async def scenario():
        member = await client_for(tree.root, good)
        assert await member.wait_connected(10)
        await wait_tree(member, {"a", "b"})
        text, final = await member.submit({"prompt": "only friends here"}).collect()
        assert (text, final.finish_reason) == ("only friends here ", "stop")
        for curve in (None, stranger):  # no keys at all, or keys the tree never authorized
            outsider = await client_for(tree.root, curve)
            assert not await outsider.wait_connected(1.5)
            with pytest.raises(TimeoutError):
                await outsider.status(timeout=1.0)
            outsider.close()
        member.close()

    run(scenario())
    intruder = cluster.node(tree.root, "intruder", None, "--curve", str(keys[1]), wait=False)
    with pytest.raises(RuntimeError):  # its registration never gets through
        intruder.wait_ready(timeout=3)


def test_bad_key_folder_is_a_readable_error(tmp_path):
    result = subprocess.run([sys.executable, "-m", "treechat.cli", "status", "--curve",
                             str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "treechat keys" in result.stderr and "Traceback" not in result.stderr

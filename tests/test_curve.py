"""CurveZMQ: with `--curve`, only processes holding an authorized key can join or ask the tree."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from broker.client import RootClient
from broker import security
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


def treechat(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "treechat.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def test_each_member_has_its_own_key_and_a_revoked_one_is_refused(cluster, tmp_path):
    keys = tmp_path / "tree"
    assert treechat("keys", str(keys)).returncode == 0
    assert treechat("keys", str(keys), "--add", "a", "--add", "b").returncode == 0
    assert treechat("keys", str(keys), "--list").stdout.split() == ["a", "b", "client"]
    tree = cluster.tree(["a"], "--curve", str(keys), root_args=("--curve", str(keys)))

    async def serves():
        member = await client_for(tree.root, keys)
        assert await member.wait_connected(10)
        await wait_tree(member, {"a"})
        text, _ = await member.submit({"prompt": "own keys"}).collect()
        member.close()
        return text
    assert run(serves()) == "own keys "
    revoked = treechat("keys", str(keys), "--revoke", "b")
    assert revoked.returncode == 0 and "revoked b" in revoked.stdout
    assert "b" not in treechat("keys", str(keys), "--list").stdout.split()
    result = treechat("node", "--name", "b", "--root", tree.root, "--engine", "fake",
                      "--heartbeat", "0.2", "--curve", str(keys), "--member", "b")
    assert result.returncode == 2 and "--add NAME" in result.stderr  # its keypair is gone here
    assert tree.procs["a"].proc.poll() is None


def test_a_revoked_key_cannot_connect_again(cluster, tmp_path):
    keys = tmp_path / "tree"
    create_keys(keys, ("a", "b"))
    b_machine = tmp_path / "b-machine"  # what b's own machine holds: the server keys and b's
    b_machine.mkdir()
    for name in ("server.key", "server.key_secret", "b.key", "b.key_secret"):
        shutil.copy(keys / name, b_machine / name)
    tree = cluster.tree(["a"], "--curve", str(keys), root_args=("--curve", str(keys)))
    ok = cluster.node(tree.root, "b", None, "--curve", str(b_machine))
    assert ok.info["name"] == "b"
    ok.terminate()
    assert treechat("keys", str(keys), "--revoke", "b").returncode == 0
    result = treechat("node", "--name", "b", "--root", tree.root, "--engine", "fake",
                      "--heartbeat", "0.2", "--curve", str(b_machine))
    assert result.returncode == 1
    assert "refused" in result.stderr and "CurveZMQ key" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["root", "--port", "1"], ["node", "--name", "n"],
                                     ["gateway", "http", "--port", "1"],
                                     ["gateway", "tcp", "--port", "1"]], ids=lambda c: c[0] + c[1])
def test_no_listening_beyond_loopback_without_keys(command):
    """(Checked before anything listens: nothing here binds beyond loopback.)"""
    result = treechat(*command, "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["status", "registry"])
def test_asking_a_keyed_tree_without_keys_says_which_keys_to_pass(cluster, keys, command):
    good, _ = keys
    tree = cluster.tree(["a"], "--curve", str(good), root_args=("--curve", str(good)))
    result = treechat(command, "--root", tree.root)
    assert result.returncode != 0
    host, _, port = tree.root.rpartition(":")
    assert ("the tree uses CurveZMQ keys and this process has none: give it --curve DIR"
            in result.stderr), result.stderr
    assert str(security.tree_folder(host, int(port))) in result.stderr  # where `up` keeps them
    assert "server key that is not the peer's" not in result.stderr
    assert "Traceback" not in result.stderr
    node = treechat("node", "--name", "keyless", "--root", tree.root, "--engine", "fake",
                    "--heartbeat", "0.2")
    assert node.returncode != 0
    assert "the tree uses CurveZMQ keys and this process has none" in node.stderr, node.stderr

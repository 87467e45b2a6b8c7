"""The `treechat` command as a user runs it: up, status/log, registry, node --parent, errors."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys

from conftest import REPO, connect, free_ports, run, wait_for, wait_tree
from treechat.launch import command_name
from treechat.layout import from_flags, tree_layout


def treechat(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "treechat.cli", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout)


def test_up_starts_a_tree_answers_and_stops_cleanly(cluster):
    up = cluster.up("--engine", "fake", "--nodes", "4", "--fanout", "2")
    status = treechat("status", "--root", up.root)
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert "policy least-loaded" in lines[0]
    for name in ("node-1", "node-2", "node-3", "node-4"):
        assert any(name in line and "alive" in line for line in lines), status.stdout
    assert any(line.startswith("│   ├── node-3") or line.startswith("│   └── node-3")
               for line in lines), status.stdout  # node-3 sits under node-1
    registry = treechat("registry", "--root", up.root)
    assert registry.stdout.count("tcp://127.0.0.1:") == 4
    log = treechat("log", "--root", up.root, "--json")
    assert log.returncode == 0 and '"nodes"' in log.stdout

    async def ask():
        client = await connect(up.root)
        text, final = await client.submit({"messages": [{"role": "user", "content": "hi up"}]}).collect()
        client.close()
        return text, final.finish_reason
    assert run(ask()) == ("hi up ", "stop")
    assert up.proc.terminate(timeout=30) == 0
    assert not any("Traceback" in line for line in up.proc.lines)


def test_the_banner_names_a_status_command_that_works(cluster, monkeypatch):
    up = cluster.up("--engine", "fake")
    banner = next(line for line in up.proc.lines if line.strip().startswith("status:"))
    status = subprocess.run(shlex.split(banner.split(":", 1)[1]), cwd=REPO, capture_output=True,
                            text=True, timeout=30)
    assert status.returncode == 0 and "node-1" in status.stdout, banner
    monkeypatch.setenv("TREECHAT_COMMAND", "./dev.sh")  # what dev.sh sets for the commands it runs
    assert command_name() == "./dev.sh"


def test_up_restarts_a_node_that_dies(cluster):
    up = cluster.up("--engine", "fake", "--nodes", "2")

    async def scenario():
        client = await connect(up.root)
        st = await wait_tree(client, {"node-1", "node-2"})
        node2 = next(n for n in st["nodes"] if n["name"] == "node-2")
        before = node2["endpoint"]
        os.kill(node2["info"]["pid"], signal.SIGKILL)

        async def replaced():
            st = await client.status()
            n = next((n for n in st["nodes"] if n["name"] == "node-2"), None)
            return n and n["state"] == "alive" and n["endpoint"] != before
        await wait_for(replaced, timeout=30)
        client.close()

    run(scenario())


def test_node_attaches_to_a_parent_by_name(cluster):
    root, _ = cluster.root()
    cluster.node(root, "top", None)
    cluster.node(root, "leaf", "top")
    out = treechat("status", "--root", root).stdout
    assert "└── top" in out and "    └── leaf" in out


def test_tree_layout_is_breadth_first():
    assert tree_layout(7, 2) == [("node-1", None), ("node-2", None), ("node-3", "node-1"),
                                 ("node-4", "node-1"), ("node-5", "node-2"), ("node-6", "node-2"),
                                 ("node-7", "node-3")]


def test_several_models_take_turns_down_the_tree():
    """--model A --model B --nodes 2: two nodes of each, every subtree of two or more mixed."""
    placed = [(p.name, p.parent, p.model) for p in from_flags(["A", "B"], 2, 2)]
    assert placed == [("node-1", None, "A"), ("node-2", None, "B"), ("node-3", "node-1", "A"),
                      ("node-4", "node-1", "B")]


def test_bad_input_gives_a_readable_error_and_nonzero_exit():
    port = free_ports(1)[0]
    cases = [
        (["status", "--root", f"127.0.0.1:{port}"], "no root answers"),
        (["node", "--name", "bad name!", "--engine", "fake"], "bad node name"),
        (["node", "--name", "x", "--root", "nowhere", "--engine", "fake"], "HOST:PORT"),
        (["root", "--max-queue", "-1"], "--max-queue"),
        (["up", "--nodes", "0", "--engine", "fake"], "--nodes"),
    ]
    for args, message in cases:
        result = treechat(*args)
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    result = treechat("node", "--policy", "random")
    assert result.returncode == 2 and "invalid choice" in result.stderr


LEVEL = re.compile(r"^\d\d:\d\d:\d\d (?:\S+ )?([DIWEC]) ")


def test_a_status_query_and_a_clean_stop_log_nothing_above_info(cluster):
    up = cluster.up("--engine", "fake", "--nodes", "3", "--fanout", "2")

    async def ask():
        client = await connect(up.root)
        await wait_tree(client, {"node-1", "node-2", "node-3"})
        text, _ = await client.submit({"prompt": "one answer"}).collect()
        client.close()
        return text
    assert run(ask()) == "one answer "
    for _ in range(3):
        assert treechat("status", "--root", up.root).returncode == 0
    assert up.proc.terminate(timeout=30) == 0
    log = up.proc.log.read_text().splitlines() + up.proc.lines
    loud = [ln for ln in log if (m := LEVEL.match(ln)) and m.group(1) in "WEC"]
    assert loud == []
    assert any("node node-1 left" in ln for ln in log)  # the log was read, and says it at INFO


def test_a_request_ends_by_the_root_deadline(cluster):
    root, _ = cluster.root("--deadline", "1")
    cluster.node(root, "a")

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"a"})
        _, final = await client.submit({"prompt": "never ending", "ignore_eos": True}).collect()
        assert (final.kind, final.code) == ("error", "timeout")
        text, final = await client.submit({"prompt": "short"}).collect()
        assert (text, final.finish_reason) == ("short ", "stop")  # the slot was freed
        st = await client.status()
        assert st["root"]["deadline"] == 1.0
        client.close()

    run(scenario())


def test_status_without_root_asks_the_tree_up_started(cluster, monkeypatch, tmp_path):
    monkeypatch.setenv("TREECHAT_KEYS", str(tmp_path / "keys"))  # no other test's trees here
    first = cluster.up("--engine", "fake")
    status = treechat("status")
    assert status.returncode == 0, status.stderr
    assert f"at {first.root}" in status.stdout and "node-1" in status.stdout
    assert status.stderr == ""
    registry = treechat("registry")
    assert registry.returncode == 0 and "node-1" in registry.stdout

    second = cluster.up("--engine", "fake", "--nodes", "2")
    status = treechat("status")
    assert status.returncode == 0, status.stderr
    assert f"at {second.root}" in status.stdout and "node-2" in status.stdout
    assert "2 trees run here" in status.stderr and "--root HOST:PORT" in status.stderr

    second.proc.kill()  # kill -9: its note stays behind, naming a process that is gone
    status = treechat("status")
    assert status.returncode == 0, status.stderr
    assert f"at {first.root}" in status.stdout and status.stderr == ""

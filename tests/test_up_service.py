"""`treechat up` as a service: a hang-up or a kill -9 of `up` leaves nothing running, and busy
ports are one clear line. Linux: the children are found through /proc."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, free_ports
from treechat.ports import is_free


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ports_of(up) -> list[int]:
    base = int(up.root.rsplit(":", 1)[1])
    return [base, base + 1, base + 2, up.http_port, up.tcp_port]


def load(up, n: int = 4) -> socket.socket:
    """`n` endless answers streaming through the TCP gateway; returns once each has a delta."""
    sock = socket.create_connection(("127.0.0.1", up.tcp_port), timeout=30)
    reader = sock.makefile("rb")
    reader.readline()  # hello
    for i in range(n):
        sock.sendall(json.dumps({"id": str(i), "text": "tick", "ignore_eos": True,
                                 "max_tokens": 100000}).encode() + b"\n")
    streaming: set[str] = set()
    while len(streaming) < n:
        line = json.loads(reader.readline())
        if "delta" in line:
            streaming.add(line["id"])
    return sock


def test_sighup_under_load_stops_every_child_and_frees_the_ports(cluster):
    up = cluster.up("--engine", "fake", "--fake-delay", "0.02", "--nodes", "2")
    children = children_of(up.proc.proc.pid)
    assert len(children) == 5  # root, two nodes, two gateways
    sock = load(up)
    try:
        up.proc.proc.send_signal(signal.SIGHUP)  # the terminal closed
        assert up.proc.proc.wait(30) == 0  # --grace 2: each stage within one 7 s deadline
    finally:
        sock.close()
    assert [pid for pid in children if alive(pid)] == []
    assert [port for port in ports_of(up) if not is_free("127.0.0.1", port)] == []
    assert not any("Traceback" in line for line in up.proc.lines)
    assert "Traceback" not in up.proc.log.read_text()


def test_kill_9_of_up_takes_its_children_with_it(cluster):
    up = cluster.up("--engine", "fake", "--nodes", "2")
    children = children_of(up.proc.proc.pid)
    assert len(children) == 5
    up.proc.kill()
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, "children outlived a killed `treechat up`"
        time.sleep(0.1)
    assert [port for port in ports_of(up) if not is_free("127.0.0.1", port)] == []


def test_a_second_up_on_busy_ports_is_one_clear_line(cluster):
    up = cluster.up("--engine", "fake")
    base = int(up.root.rsplit(":", 1)[1])
    second = subprocess.run(
        [sys.executable, "-m", "treechat.cli", "up", "--engine", "fake", "--port", str(base),
         "--http-port", str(up.http_port), "--tcp-port", str(up.tcp_port)],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    lines = second.stderr.splitlines()
    assert len(lines) == 1, second.stderr
    assert f"{base}-{base + 2} (--port)" in lines[0] and f"{up.http_port} (--http-port)" in lines[0]
    assert f"an earlier treechat, treechat up (pid {up.proc.proc.pid})" in lines[0]
    assert len(children_of(up.proc.proc.pid)) == 4  # the first one still runs, whole


def test_a_port_held_by_something_else_is_named():
    base, tcp_port = free_ports(2, span=3)
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "treechat.cli", "up", "--engine", "fake", "--http-port",
             str(port), "--port", str(base), "--tcp-port", str(tcp_port)],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.startswith(f"treechat: port {port} (--http-port) already in use")
    assert f"(pid {os.getpid()})" in result.stderr and "Traceback" not in result.stderr


def test_a_child_whose_launcher_vanished_stops_quietly():
    """What a child of a killed `up` sees: its stdout pipe and its watchdog pipe both closed."""
    read_end, write_end = os.pipe()
    (port,) = free_ports(1, span=3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "treechat.cli", "root", "--port", str(port)], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        pass_fds=(read_end,), env={**os.environ, "TREECHAT_WATCHDOG": f"{read_end}:10"})
    os.close(read_end)
    proc.stdout.close()
    os.close(write_end)
    assert proc.wait(30) == 0
    assert "Traceback" not in proc.stderr.read()

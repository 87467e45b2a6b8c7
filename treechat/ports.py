"""Which of `treechat up`'s ports are taken, and by whom: checked before any child starts, so a
busy port is one clear line instead of a child's traceback.

A port is free when a listening socket can bind it with SO_REUSEADDR, as ZeroMQ and Tornado do (a
port in TIME_WAIT after an earlier run is free). On Linux the holder of a busy port is found in
/proc (the listening socket's inode in /proc/net/tcp*, then the process with that descriptor), so
the message can say that an earlier treechat holds it and which process to stop.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path


def is_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def busy_message(host: str, wanted: list[tuple[int, str]]) -> str | None:
    """None when every (port, flag) in `wanted` is free; else one line naming the busy ports,
    who holds them where that can be told, and what to do."""
    busy = [(port, flag) for port, flag in wanted if not is_free(host, port)]
    if not busy:
        return None
    by_flag: dict[str, list[int]] = {}
    for port, flag in busy:
        by_flag.setdefault(flag, []).append(port)
    ports = ", ".join(f"{_span(p)} ({flag})" for flag, p in by_flag.items())
    line = f"port{'s' if len(busy) > 1 else ''} {ports} already in use on {host}"
    held = dict(owner(pid, what) for pid, what in holders([port for port, _ in busy]))
    if not held:
        return f"{line}: stop what listens there, or choose other ports"
    earlier = "an earlier treechat, " if all(w.startswith("treechat") for w in held.values()) else ""
    who = ", ".join(f"{what} (pid {pid})" for pid, what in sorted(held.items()))
    return f"{line}, held by {earlier}{who}: stop it (kill {' '.join(map(str, sorted(held)))}) " \
           "or choose other ports"


def _span(ports: list[int]) -> str:
    consecutive = ports == list(range(ports[0], ports[0] + len(ports)))
    return f"{ports[0]}-{ports[-1]}" if consecutive and len(ports) > 1 else \
        ", ".join(map(str, ports))


def holders(ports: list[int]) -> list[tuple[int, str]]:
    """[(pid, command)] of the processes listening on `ports`; empty where /proc cannot tell."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) in ports:  # LISTEN
                inodes.add(f"socket:[{fields[9]}]")
    found = []
    for pid in _pids():
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") in inodes for fd in fds):
                found.append((pid, command_of(pid)))
        except OSError:  # gone, or not ours to look at
            continue
    return found


def owner(pid: int, what: str) -> tuple[int, str]:
    """The `treechat up` that started a treechat process, if that is its parent; else itself."""
    try:
        parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return pid, what
    return (parent, "treechat up") if command_of(parent) == "treechat up" else (pid, what)


def command_of(pid: int) -> str:
    """'treechat root', 'treechat gateway http', ... for a treechat process; else its argv[0]."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return "?"
    for i, arg in enumerate(argv):
        if arg == "treechat.cli" or os.path.basename(arg) == "treechat":
            words = [a for a in argv[i + 1:i + 3] if a and not a.startswith("-")]
            return " ".join(["treechat", *words[:2 if words[:1] == ["gateway"] else 1]])
    return os.path.basename(argv[0]) if argv and argv[0] else "?"


def _pids() -> list[int]:
    try:
        return [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return []

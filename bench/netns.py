"""Hosts in Linux network namespaces: a small LAN for the multi-host tests and the bench.

No process of its own besides, where needed, the wire. `Bed(["root", "node-1", ..., "client"])`
makes one network namespace per host and a switch namespace holding a bridge; each host has one
interface, `eth0`, with the address 10.77.0.N/24 (N = 1, 2, ... in the order given), joined to
the bridge by a veth pair:

    host ns  eth0 10.77.0.N ==veth== pN (on br0)          switch ns (br0)
    with a wire (no netem):  eth0 ==veth== wN ~~bench.wire~~ xN ==veth== pN (on br0)

Link conditions (`delay`, `loss`, per link and direction, so host to host crosses two links) use
`tc qdisc ... netem` on both ends of each veth where the kernel has netem, and otherwise the
user-space `bench.wire` spliced into every link. `cut(host)` / `heal(host)` is `ip link set eth0
down/up` in that host: the cable pulled and plugged back. Treechat processes run inside a host
with `command(host, argv)` (`ip netns exec`); `call_in(host, fn)` runs Python in a thread that
entered the host's namespace (sockets it makes live there).

Names are `tcb-<pid>-<n>-...`, unique per run; `close()` removes everything it made (and kills
a process left running inside), and a new Bed first removes what a killed earlier run (a dead
pid) left behind, processes included. Needs root (or
CAP_SYS_ADMIN + CAP_NET_ADMIN) and iproute2; `unavailable()` says why a machine cannot.
"""

from __future__ import annotations

import ctypes
import itertools
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

PREFIX = "tcb-"
CLONE_NEWNET = 0x40000000
_beds = itertools.count(1)


class NetnsError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")
    return r


def unavailable() -> str | None:
    """Why this machine cannot make namespaces (None: it can): checked by making one."""
    if not sys.platform.startswith("linux"):
        return "network namespaces are Linux only"
    if shutil.which("ip") is None:
        return "iproute2's `ip` command is not installed"
    probe = f"{PREFIX}{os.getpid()}-probe"
    r = ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"`ip netns add` failed (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}"
    try:
        r = ip("-n", probe, "link", "add", "v0", "type", "veth", "peer", "name", "v1", check=False)
        if r.returncode != 0:
            return f"cannot make a veth pair: {r.stderr.strip()}"
        r = ip("-n", probe, "link", "add", "br0", "type", "bridge", check=False)
        if r.returncode != 0:
            return f"cannot make a bridge: {r.stderr.strip()}"
    finally:
        ip("netns", "del", probe, check=False)
    return None


def has_netem(ns: str) -> bool:
    r = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root",
                        "netem", "delay", "1ms"], capture_output=True, timeout=30)
    subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "lo", "root"],
                   capture_output=True, timeout=30)
    return r.returncode == 0


def remove(ns: str) -> None:
    """Kill whatever still runs inside `ns` (only a bed starts processes there; not this one,
    which may have entered it), then delete it."""
    for pid in ip("netns", "pids", ns, check=False).stdout.split():
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    ip("netns", "del", ns, check=False)


def sweep() -> list[str]:
    """Remove the namespaces of earlier runs whose process is gone (a run killed mid-test), and
    the processes that run was running in them."""
    gone = []
    for line in ip("netns", "list", check=False).stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            remove(name)
            gone.append(name)
    return gone


class Bed:
    def __init__(self, hosts: list[str], delay: float = 0.0, loss: float = 0.0,
                 subnet: str = "10.77.0", shaping: str = "auto"):
        if len(set(hosts)) != len(hosts) or not hosts:
            raise ValueError("hosts must be distinct names")
        if len(hosts) > 200:
            raise ValueError("at most 200 hosts")
        self.hosts = list(hosts)
        self.delay, self.loss = delay, loss
        self.subnet = subnet
        self.prefix = f"{PREFIX}{os.getpid()}-{next(_beds)}-"
        self.switch = self.prefix + "sw"
        self.made: list[str] = []
        self.shaping = shaping  # auto | netem | wire: how delay and loss are made
        self.wire: subprocess.Popen | None = None

    # --- building and tearing down ---------------------------------------------------------------

    def up(self) -> "Bed":
        sweep()
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def build(self) -> None:
        self.add_ns(self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        shaped = self.delay > 0 or self.loss > 0
        if self.shaping == "auto":
            self.shaping = ("netem" if has_netem(self.switch) else "wire") if shaped else "none"
        pairs = []
        for i, host in enumerate(self.hosts, 1):
            ns = self.ns(host)
            self.add_ns(ns)
            port = f"p{i}"
            if self.shaping == "wire":
                # host eth0 == w_i ~wire~ x_i == p_i on the bridge
                ip("-n", self.switch, "link", "add", f"w{i}", "type", "veth", "peer", "name",
                   "eth0", "netns", ns)
                ip("-n", self.switch, "link", "add", f"x{i}", "type", "veth", "peer", "name", port)
                for name in (f"w{i}", f"x{i}"):
                    self.quiet(self.switch, name)
                    ip("-n", self.switch, "link", "set", name, "up")
                pairs.append(f"w{i}:x{i}")
            else:
                ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
                   "netns", ns)
            ip("-n", self.switch, "link", "set", port, "master", "br0")
            ip("-n", self.switch, "link", "set", port, "up")
            ip("-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            if self.shaping == "netem":
                for where, dev in ((ns, "eth0"), (self.switch, port)):
                    self.tc(where, "qdisc", "add", "dev", dev, "root", "netem",
                            "delay", f"{self.delay * 1000:g}ms", "loss", f"{self.loss * 100:g}%")
        if pairs:
            self.start_wire(pairs)

    def add_ns(self, ns: str) -> None:
        ip("netns", "add", ns)
        self.made.append(ns)
        ip("-n", ns, "link", "set", "lo", "up")

    def quiet(self, ns: str, dev: str) -> None:
        """No IPv6 chatter (router solicitations, DAD) on the wire's own interfaces."""
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
                        f"net.ipv6.conf.{dev}.disable_ipv6=1"], capture_output=True, timeout=30)

    @staticmethod
    def tc(ns: str, *args: str) -> None:
        r = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            raise NetnsError(f"tc {' '.join(args)}: {r.stderr.strip()}")

    def start_wire(self, pairs: list[str]) -> None:
        self.wire = subprocess.Popen(
            self.command(None, [sys.executable, "-m", "bench.wire", "--delay", str(self.delay),
                                "--loss", str(self.loss), *pairs]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        line = self.wire.stdout.readline()
        if line.strip() != "WIRE-READY":
            self.wire.kill()
            raise NetnsError(f"bench.wire did not start: {self.wire.stderr.read()[-2000:]}")

    def close(self) -> None:
        """Stop the wire, delete every namespace made (their interfaces go with them), killing
        any process its user left running in one."""
        if self.wire is not None and self.wire.poll() is None:
            os.killpg(self.wire.pid, signal.SIGKILL)
            self.wire.wait(10)
        for ns in reversed(self.made):
            remove(ns)
        self.made = []

    def __enter__(self) -> "Bed":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- using it --------------------------------------------------------------------------------

    def ns(self, host: str | None) -> str:
        """The namespace of `host` (None: the switch's, where every frame passes)."""
        return self.prefix + host if host is not None else self.switch

    def addr(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts.index(host) + 1}"

    def command(self, host: str | None, argv: list[str]) -> list[str]:
        """argv run inside `host`'s namespace (None: the switch's)."""
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def cut(self, host: str) -> None:
        ip("-n", self.ns(host), "link", "set", "eth0", "down")

    def heal(self, host: str) -> None:
        ip("-n", self.ns(host), "link", "set", "eth0", "up")

    def enter(self, host: str | None) -> None:
        """Move the calling thread into `host`'s namespace (sockets it makes from now on live
        there; child processes too). For a whole process: call it before anything opens a socket
        or starts a thread (ZeroMQ's I/O threads are made with the first socket)."""
        fd = os.open(f"/run/netns/{self.ns(host)}", os.O_RDONLY)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise NetnsError(f"setns into {host}: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)

    def call_in(self, host: str | None, fn, *args, timeout: float = 300.0):
        """fn(*args) in a fresh thread inside `host`'s namespace; its result (or its exception)."""
        out: dict = {}

        def body():
            try:
                self.enter(host)
                out["value"] = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                out["error"] = e

        t = threading.Thread(target=body, name=f"netns-{host}", daemon=True)
        t.start()
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"{fn.__name__} in {host} did not finish in {timeout:.0f}s")
        if "error" in out:
            raise out["error"]
        return out["value"]

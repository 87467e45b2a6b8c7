"""Keys on every link, across hosts (`tests/netns.py`): the tree's ZeroMQ links carry CurveZMQ
(a key per member, each host holding only its share), the gateways serve TLS, and a capture of
every frame on the LAN finds none of a user's words; a node without the tree's keys is refused
and says why; a revoked node cannot come back."""

from __future__ import annotations

import shutil
import socket
import struct
import threading

import pytest

from http_helpers import poll
from netns import TREE, echo, hosts  # noqa: F401  (hosts is the fixture)
from test_tls import make_certs


ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_STATISTICS = 263, 6  # linux/if_packet.h
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SECRET = "zebra-violet-7319"  # in every prompt and every answer


class Capture:
    """Every frame that crosses the switch namespace (all ports of the bridge), kept in memory.

    The socket's queue is made large and drained at the end, and the kernel's own count of what
    it dropped must be zero: a capture that lost frames under load proves nothing either way."""

    QUEUE = 64 << 20  # bytes the kernel may hold for us while the test's threads are busy

    def __init__(self, net):
        self.net = net
        self.frames = bytearray()
        self.count = 0
        self.dropped = None
        self.stop = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: net.bed.call_in(None, self.listen, timeout=600),
                                       daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the capture did not start"

    def listen(self) -> None:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, self.QUEUE)  # we are root in the bed
        sock.settimeout(0.1)
        self.ready.set()
        with sock:
            while not self.stop.is_set():
                try:
                    self.keep(sock.recv(1 << 17))
                except socket.timeout:
                    continue
            sock.setblocking(False)
            while True:  # what the kernel still holds for us: the last frames of the test
                try:
                    self.keep(sock.recv(1 << 17))
                except BlockingIOError:
                    break
            _, self.dropped = struct.unpack("II", sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))

    def keep(self, frame: bytes) -> None:
        self.frames += frame
        self.count += 1

    def finish(self) -> bytes:
        self.stop.set()
        self.thread.join(10)
        assert self.dropped == 0, f"the capture lost {self.dropped} frames"
        return bytes(self.frames)


def send_plain(net, text: str) -> None:
    """One UDP datagram from the client host to the root host, in clear, and received there (so
    it crossed the switch before this returns): the capture's control."""
    bound, got = threading.Event(), []

    def receive():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((net.bed.addr("root"), 9999))
            s.settimeout(20)
            bound.set()
            got.append(s.recv(4096))
    receiver = threading.Thread(target=lambda: net.bed.call_in("root", receive, timeout=30))
    receiver.start()
    assert bound.wait(10)

    def send():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(text.encode(), (net.bed.addr("root"), 9999))
    net.on_client(send)
    receiver.join(30)
    assert got == [text.encode()]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl makes the test certificate")
@pytest.mark.timeout(150)
def test_no_user_word_crosses_any_link_in_clear(hosts, tmp_path):
    net = hosts(start=False)
    make_certs(tmp_path, ips=(net.bed.addr("gateway"),))
    net.use_tls(tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem")
    net.start_tree()
    capture = Capture(net)
    work = [f"please repeat {SECRET} number {i}" for i in range(12)]
    records = net.streams(work, concurrency=6)  # HTTPS to the gateway host, then the tree
    tcp = net.tcp_target()
    records += net.streams(work[:6], concurrency=3, target=tcp)  # TLS on the TCP gateway
    send_plain(net, f"control {SECRET[::-1]}")
    seen = capture.finish()
    assert [r.text for r in records] == [echo(p) for p in work + work[:6]], \
        [r.error_message for r in records if not r.ok][:3]
    assert capture.count > 100  # the tree's traffic was there to read
    assert seen.count(SECRET[::-1].encode()) >= 1  # and it does see what travels in clear
    assert seen.count(SECRET.encode()) == 0  # (counts: a failure message without 1 MB of frames)


@pytest.mark.timeout(120)
def test_a_node_without_the_trees_keys_is_refused_and_says_so(hosts, tmp_path):
    net = hosts()
    strangers = tmp_path / "stranger-keys"  # a tree's keys, but another tree's
    net.treechat_here("keys", str(strangers))
    common = ["--root", net.root, "--host", net.bed.addr("rogue"), "--engine", "fake",
              "--heartbeat", str(net.heartbeat)]
    rogues = {
        "another tree's keys": (net.start("rogue", "rogue-1", "node", "--name", "rogue-1",
                                          *common, "--curve", str(strangers)),
                                "handshake with the peer failed"),
        "no keys (--insecure)": (net.start("rogue", "rogue-2", "node", "--name", "rogue-2",
                                           *common, "--insecure"), "was refused by the root"),
        "no keys": (net.start("rogue", "rogue-3", "node", "--name", "rogue-3", *common),
                    f"refusing to listen on {net.bed.addr('rogue')} without"),
    }
    for what, (proc, why) in rogues.items():
        assert proc.proc.wait(60) != 0, what
        assert why in proc.tail(), f"{what}:\n{proc.tail()}"
        assert proc.info is None, what  # it never served
    assert {n["name"] for n in net.tree()["nodes"]} == {n for n, _ in TREE}


@pytest.mark.timeout(120)
def test_a_revoked_node_cannot_come_back_after_its_cable_is_cut(hosts):
    net = hosts()
    root_keys = net.security(None, listens=True)[1]  # the root host's folder
    net.treechat_here("keys", root_keys, "--revoke", "node-2")  # its live links stay, for now
    net.bed.cut("node-2")
    poll(lambda: net.procs["root"].logged("node node-2 missed its heartbeats"), 30)
    net.bed.heal("node-2")  # it registers again, with a key the root no longer lets in
    node = net.procs["node-2"]
    assert node.proc.wait(60) != 0
    assert "refused this process's CurveZMQ key" in node.tail()
    work = [f"still serving {i}" for i in range(8)]
    assert [r.text for r in net.streams(work, concurrency=4)] == [echo(p) for p in work]

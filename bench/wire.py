"""A wire with delay and loss, in user space, for kernels without `tc netem`.

Process: `python -m bench.wire --delay S --loss P [--seed N] A:B [A:B ...]`, started by
`bench.netns.Bed` inside its switch namespace. For each pair of interfaces it opens one AF_PACKET
socket per interface and copies every frame that arrives on one out of the other `delay` seconds
later, dropping each frame with probability `loss`: what `tc qdisc ... netem delay S loss P` does
on the egress queue of both ends of a veth pair. One thread, one epoll, one FIFO (every frame waits
the same time, so the queue stays in due order).

Frames keep their virtio-net header (PACKET_VNET_HDR): a TCP super-frame the host's stack left
for segmentation offload, or a checksum it left to the "hardware", is passed on as it is and
finished by the kernel on the far side, so no offload settings (ethtool) are needed. A dropped
super-frame loses all of its segments at once; treechat's small messages are single frames.

Prints `WIRE-READY` on stdout once every socket is bound; SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import collections
import random
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4  # a frame this socket's interface sent: not ours to copy
MAX_FRAME = 65536 + 64  # a GSO super-frame plus its virtio-net header


def open_port(name: str) -> socket.socket:
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    sock.bind((name, 0))
    sock.setblocking(False)
    return sock


class Wire:
    def __init__(self, pairs: list[tuple[str, str]], delay: float, loss: float, seed: int):
        self.delay, self.loss = delay, loss
        self.rng = random.Random(seed)
        self.out: dict[int, socket.socket] = {}  # fd of the receiving socket -> the other end
        self.socks: dict[int, socket.socket] = {}
        for a, b in pairs:
            sa, sb = open_port(a), open_port(b)
            self.out[sa.fileno()], self.out[sb.fileno()] = sb, sa
            self.socks[sa.fileno()], self.socks[sb.fileno()] = sa, sb
        self.fifo: collections.deque[tuple[float, socket.socket, bytes]] = collections.deque()
        self.poll = select.epoll()
        for fd in self.socks:
            self.poll.register(fd, select.EPOLLIN)

    def run(self) -> None:
        while True:
            wait = max(0.0, self.fifo[0][0] - time.monotonic()) if self.fifo else -1
            for fd, _ in self.poll.poll(wait):
                self.take(fd)
            self.send_due()

    def take(self, fd: int) -> None:
        """Every frame waiting on this socket: drop it, or queue it for the other end."""
        sock, out = self.socks[fd], self.out[fd]
        due = time.monotonic() + self.delay
        while True:
            try:
                frame, addr = sock.recvfrom(MAX_FRAME)
            except BlockingIOError:
                return
            except OSError:  # the interface went down under us (a cut link): frames are gone
                return
            if addr[2] == PACKET_OUTGOING or self.rng.random() < self.loss:
                continue
            self.fifo.append((due, out, frame))

    def send_due(self) -> None:
        now = time.monotonic()
        while self.fifo and self.fifo[0][0] <= now:
            _, out, frame = self.fifo.popleft()
            try:
                out.send(frame)
            except OSError:  # the far end is down (a cut link): the frame is lost, as on a cable
                pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.wire", description=__doc__.split("\n\n")[0])
    p.add_argument("--delay", type=float, default=0.0, help="seconds each frame waits")
    p.add_argument("--loss", type=float, default=0.0, help="probability a frame is dropped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("pairs", nargs="+", metavar="A:B", help="interfaces to join, both ways")
    a = p.parse_args(argv)
    if a.delay < 0 or not 0 <= a.loss < 1:
        p.error("--delay must be >= 0 and --loss in [0, 1)")
    pairs = [tuple(x.split(":", 1)) for x in a.pairs]
    if any(len(x) != 2 or not all(x) for x in pairs):
        p.error("pairs are INTERFACE:INTERFACE")
    wire = Wire(pairs, a.delay, a.loss, a.seed)
    print("WIRE-READY", flush=True)
    wire.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""ZeroMQ sockets, made and configured in one place, and read on the asyncio event loop.

Every process runs one asyncio loop (Tornado shares it). A `Channel` wraps one socket: the loop
watches the socket's file descriptor, and when it fires the channel drains every waiting message
without blocking and hands each decoded message to its handler. Handlers are plain functions: the
routing code never awaits, so it needs no locks.

ZeroMQ's descriptor is edge-triggered: it only signals a change of state, and a send can consume
that signal. So after sending, a channel schedules one more drain on the next loop turn; without it
a message that arrived during a send could sit unread until the next one.

Options (the design's rules): ROUTER_MANDATORY on every ROUTER (a send to a gone peer raises
instead of vanishing, which is also how a peer's departure is confirmed: `Channel.reaches`),
IMMEDIATE on DEALERs (no queueing toward a peer that is not connected), explicit HWMs, linger 0.
No socket picks its own identity and ROUTER_HANDOVER is off: every connection gets a fresh
identity from the ROUTER, so no peer can take over another's connection by naming it.

Every socket reads messages of a bounded size (`ZMQ_MAXMSGSIZE`, per socket: `broker.limits`):
ZeroMQ drops a connection that sends a larger frame before it allocates the frame, and reports
only that the connection closed. So a listening channel counts the connections that closed
without a goodbye (`Channel.dropped`: a peer that exited or was cut, or one that sent a frame
over the limit) and logs them at most once per 10 s.

A `Monitor` reads a socket's connection events on the loop: a ROUTER learns at once that a peer's
connection closed (then probes its peers to see which one), a DEALER learns that its handshake
was refused (a key the other side does not authorize) instead of retrying in silence.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import TYPE_CHECKING, Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from broker.limits import show
from broker.protocol import Bye, Message, ProtocolError, decode
from broker.quiet import Quiet

if TYPE_CHECKING:
    from broker.security import Curve

log = logging.getLogger(__name__)

HWM = 100_000  # messages; admission control bounds real traffic far below this
DRAIN_BATCH = 512  # messages read per loop turn before yielding to other work
MAX_LEAVING = 1024  # goodbyes remembered until their connections close


def make_socket(ctx: zmq.Context, kind: int, *, max_message: int,
                curve: "Curve | None" = None) -> zmq.Socket:
    """A configured socket that reads messages of at most `max_message` bytes (`broker.limits`).
    With `curve`, ROUTERs (which listen) accept only authorized keys and DEALERs (which connect)
    present the tree's client key: see `broker.security`."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if kind == zmq.DEALER:
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)  # zmq's own reconnect backoff, in ms
    if curve is not None:
        (curve.server if kind == zmq.ROUTER else curve.client)(sock)
    return sock


def bind(sock: zmq.Socket, endpoint: str) -> str:
    """Bind, resolving port 0 to a free port; return the endpoint peers should connect to."""
    if endpoint.endswith(":0"):
        host = endpoint[len("tcp://"):-2]
        port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{host}:{port}"
    sock.bind(endpoint)
    return endpoint


def _ephemeral_floor() -> int:
    """The lowest port the kernel hands out for outgoing connections (and for binds to port 0)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


# free_port picks below the ephemeral range: a port found free by binding port 0 lies inside it,
# and any connection made before the server binds may take it as its local port ("Address
# already in use"); below the range only an explicit bind takes a port. A cursor walks the range
# from a point of this process's own, so no two calls hand out the same port until it wraps.
_PORT_FLOOR = 20000
_PORT_CEILING = max(_PORT_FLOOR + 2000, _ephemeral_floor())
_next_port = _PORT_FLOOR + (os.getpid() * 37) % (_PORT_CEILING - _PORT_FLOOR)


def free_port(span: int = 1, host: str = "127.0.0.1") -> int:
    """The first of `span` consecutive free ports (the root takes three: PORT, PORT+1, PORT+2),
    below the kernel's ephemeral range, none handed out before by this process."""
    global _next_port
    for _ in range(_PORT_CEILING - _PORT_FLOOR):
        if _next_port + span > _PORT_CEILING:
            _next_port = _PORT_FLOOR
        base, _next_port = _next_port, _next_port + span
        if all(_is_free(host, base + i) for i in range(span)):
            return base
    raise RuntimeError(f"no {span} consecutive free ports on {host} below {_PORT_CEILING}")


def _is_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


class Channel:
    """One socket on the event loop. `on_message(identity, message)` gets every decoded message
    (identity is None on a DEALER); frames that do not decode are logged and dropped."""

    def __init__(self, sock: zmq.Socket, on_message: Callable[[bytes | None, Message], None],
                 name: str, on_event: Callable[[int, int], None] | None = None):
        """`on_event(event, value)`: the socket's connection events (see `Monitor`), read only
        after the messages already waiting, so a peer's goodbye is handled before its close."""
        self.sock = sock
        self.name = name
        self.on_message = on_message
        self.router = sock.type == zmq.ROUTER
        self.loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._drain_scheduled = False
        self.loop.add_reader(self._fd, self._drain)
        self._schedule_drain()  # messages may already be waiting
        self.quiet = Quiet(log)  # bad frames from strangers: one line per kind and peer and 10 s
        self.dropped = 0  # connections that closed without a goodbye (a listening socket's)
        self._leaving: set[bytes] = set()  # peers that said Bye: their close is expected
        self.monitor = None
        if on_event is not None:
            self.monitor = Monitor(sock, lambda ev, value: (self._drain(), self._closed(ev),
                                                            on_event(ev, value)))

    def send(self, msg: Message, identity: bytes | None = None) -> bool:
        """Send without blocking. False (and logged) when the peer is gone or its queue is full:
        the caller decides what that means (a ROUTER peer that vanished, a DEALER not connected)."""
        return self._send(msg, identity) == 0

    def reaches(self, msg: Message, identity: bytes) -> bool:
        """Send `msg` to a ROUTER peer; False only when its connection is gone (EHOSTUNREACH).
        A full queue still counts as reachable: that peer is slow, not gone."""
        return self._send(msg, identity) != zmq.EHOSTUNREACH

    def _send(self, msg: Message, identity: bytes | None) -> int:
        frames = msg.frames()
        if identity is not None:
            frames.insert(0, identity)
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
            return 0
        except zmq.Again:
            log.debug("%s: no route to %r for %s", self.name, identity, type(msg).__name__)
            return zmq.EAGAIN
        except zmq.ZMQError as e:  # EHOSTUNREACH from ROUTER_MANDATORY
            log.debug("%s: send to %r failed: %s", self.name, identity, e)
            return e.errno
        finally:
            self._schedule_drain()

    def close(self, linger: int = 0) -> None:
        """Close; `linger` (ms) lets a last message (a Bye) leave first without blocking."""
        if self.monitor is not None:
            self.monitor.close()
        try:
            self.loop.remove_reader(self._fd)
        except (ValueError, OSError):
            pass
        self.sock.close(linger=linger)

    def _schedule_drain(self) -> None:
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._drain_scheduled = False
        sock = self.sock
        for _ in range(DRAIN_BATCH):
            try:
                if sock.closed or not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError as e:
                log.warning("%s: receive failed: %s", self.name, e)
                return
            self._dispatch(frames)
        self._schedule_drain()  # more is waiting: continue on the next loop turn

    def _dispatch(self, frames: list[bytes]) -> None:
        identity = None
        if self.router:
            if len(frames) < 2:
                self.quiet.warning("frames with no identity", self.name,
                              "%s: dropped a frame with no identity", self.name)
                return
            identity, frames = frames[0], frames[1:]
        try:
            msg = decode(frames)
        except ProtocolError as e:
            self.quiet.warning(f"undecodable messages on {self.name}", identity, "%s: dropped an "
                               "undecodable message from %r: %s", self.name, identity, e)
            return
        if identity is not None and isinstance(msg, Bye) and len(self._leaving) < MAX_LEAVING:
            self._leaving.add(identity)
        try:
            self.on_message(identity, msg)
        except Exception:  # a handler bug must not take the whole process down
            log.exception("%s: handler failed on %s", self.name, type(msg).__name__)

    def _closed(self, event: int) -> None:
        """A listening socket's connection closed: expected after a Bye, else counted. ZeroMQ
        says nothing more (a frame over the limit closes a connection as an exit does)."""
        if event != zmq.EVENT_DISCONNECTED or not self.router:
            return
        if self._leaving:
            self._leaving.pop()
            return
        self.dropped += 1
        self.quiet.info("connections dropped", self.name, "%s: a connection closed without a "
                        "goodbye: its peer exited or was cut, or it sent a frame over %s, which "
                        "ZeroMQ drops (%d so far)", self.name,
                        show(self.sock.getsockopt(zmq.MAXMSGSIZE)), self.dropped)


class Monitor:
    """A socket's connection events (`zmq_socket_monitor`) read on the event loop.

    `on_event(event, value)` gets each event: DISCONNECTED (a peer's connection closed),
    HANDSHAKE_SUCCEEDED, HANDSHAKE_FAILED_AUTH (value: the ZAP status, 400 for a refused key),
    HANDSHAKE_FAILED_PROTOCOL (value: the ZMTP error, e.g. a CURVE/NULL mechanism mismatch),
    HANDSHAKE_FAILED_NO_DETAIL (e.g. the wrong server key).
    """

    EVENTS = (zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
              | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
              | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)

    def __init__(self, sock: zmq.Socket, on_event: Callable[[int, int], None]):
        self.sock = sock
        self.on_event = on_event
        self.pair = sock.get_monitor_socket(self.EVENTS)
        self.loop = asyncio.get_running_loop()
        self._fd = self.pair.getsockopt(zmq.FD)
        self.loop.add_reader(self._fd, self._drain)
        self.loop.call_soon(self._drain)

    def _drain(self) -> None:
        pair = self.pair
        while not pair.closed and pair.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                event = parse_monitor_message(pair.recv_multipart(zmq.NOBLOCK))
            except (zmq.ZMQError, ValueError):
                return
            try:
                self.on_event(event["event"], event["value"])
            except Exception:
                log.exception("monitor: handler failed on event %s", event["event"])

    def close(self) -> None:
        try:
            self.loop.remove_reader(self._fd)
        except (ValueError, OSError):
            pass
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.pair.close(linger=0)


def refusal(event: int, value: int, keyed: bool | None = None) -> str | None:
    """Why a DEALER's handshake failed, in words, or None for any other event. `keyed`: whether
    this process has CurveZMQ keys (None: not said). Without keys against a keyed peer, ZeroMQ
    reports a mechanism mismatch, or no detail at all when the peer hangs up first."""
    if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
        return ("the peer refused this process's CurveZMQ key (not in its authorized folder, or "
                "revoked: see `treechat keys --add`)")
    mismatch = event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and \
        value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH
    if keyed is False and (mismatch or event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
        return ("the tree uses CurveZMQ keys and this process has none: give it --curve DIR, "
                "the tree's key folder")
    if mismatch and keyed:
        return ("the peer has no CurveZMQ keys and this process has: give both the same --curve "
                "DIR, or neither (both --insecure beyond loopback)")
    if mismatch:
        return ("the peer and this process disagree on CurveZMQ: one has keys and the other not "
                "(give both the same --curve DIR, or both --insecure)")
    if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
        return ("the CurveZMQ handshake with the peer failed (a server key that is not the "
                "peer's: is this --curve DIR the tree's?)")
    return None

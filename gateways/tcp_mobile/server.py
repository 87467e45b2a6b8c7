"""The TCP gateway (`treechat gateway tcp`): newline-delimited JSON for mobile apps, text for nc.

Process: one Tornado `TCPServer` on `--host:--port` (default 127.0.0.1:8001; TLS with
`--tls-cert`/`--tls-key`, `treechat.tls`) and one `RootClient` (a DEALER to the root's front
socket) on the same event loop.

Per connection, a `Connection`: greets with a hello line (session token, limits), then reads
lines with `LineReader` and handles each (docs/protocol.md has the format):

    {"id", "messages"|"text", sampling...}  -> Session.submit: deltas, then a final line
    {"cancel": id}                          -> Stream.cancel down the tree
    {"ping": x}                             -> {"pong": x}
    {"resume": token, "offsets": {...}}     -> take over a dropped connection's session
    {"hello": {"api_key": K, ...}}          -> {"authenticated": true} (or unauthorized)
    first line TEXT [KEY], or not "{"...    -> text mode (gateways/tcp_mobile/text.py)

API keys (`--api-key`, `--api-key-file`, gateways/tcp_mobile/auth.py): when set, the greeting
says `"auth": "api_key"` and a connection must authenticate once, with a hello line carrying
`api_key` (or a resume line carrying one), before anything else and within `--auth-timeout`
seconds (empty lines do not buy time); every other line until then gets an `unauthorized` error,
and the connection is closed after MAX_AUTH_FAILURES of them or when the time is up.

Limits: `--max-line` (an error line, then the rest of the line is skipped), JSON nested deeper
than `broker.nesting.MAX_DEPTH` (an error line; the connection lives on), `--max-inflight`
requests per connection, `--max-write-buffer` bytes queued for a client that does not read (its
requests are cancelled and it is closed), `--idle-timeout` with nothing in flight.
Metrics: `--metrics-port P` serves Prometheus metrics on http://HOST:P/metrics (metrics.py).
SIGTERM: stop listening, refuse new requests (shutting_down), wait `--drain` seconds for running
ones, cancel the rest, close.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import ssl
import time
from dataclasses import dataclass

import orjson

from tornado.iostream import IOStream, StreamBufferFullError, StreamClosedError
from tornado.netutil import bind_sockets
from tornado.tcpserver import TCPServer

from broker import limits, security
from broker.client import RootClient
from broker.errors import Fatal
from broker.quiet import Quiet
from gateways.tcp_mobile.auth import ApiKeys, add_key_args, load_api_keys
from gateways.tcp_mobile.lines import CHUNK, TOO_LONG, LineReader
from gateways.tcp_mobile.metrics import MeteredClient, TcpMetrics
from gateways.tcp_mobile.protocol import CancelLine, Code, HelloLine, LineError, Ping, Resume, \
    Submit, decode_json, encode, error_line, parse_line
from gateways.tcp_mobile.session import Session, Sessions
from treechat.metrics import add_metrics_arg
from treechat.tls import add_server_args, server_context

log = logging.getLogger("treechat.tcp")

MiB = 1 << 20
MAX_AUTH_FAILURES = 3  # unauthenticated lines a connection may send before it is closed


@dataclass(frozen=True)
class TcpConfig:
    host: str = "127.0.0.1"
    port: int = 8001
    max_line: int = MiB
    max_inflight: int = 16
    max_write_buffer: int = 4 * MiB
    idle_timeout: float = 300.0
    auth_timeout: float = 10.0
    resume_window: float = 30.0
    drain: float = 30.0
    backlog: int = 1024  # as the HTTP gateway's: a burst of 1000 clients all get their hello
    api_keys: frozenset[str] = frozenset()

    def __post_init__(self):
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port must be 0..65535, not {self.port}")
        for name in ("max_line", "max_inflight", "max_write_buffer", "backlog"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if self.max_line > limits.REQUEST:
            raise ValueError(f"--max-line can be at most {limits.REQUEST} bytes (the largest "
                             "request the tree carries)")
        for name in ("idle_timeout", "auth_timeout", "resume_window", "drain"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} cannot be negative")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TcpConfig":
        fields = {k: getattr(args, k) for k in cls.__dataclass_fields__ if k != "api_keys"}
        keys = load_api_keys(args.api_key, args.api_key_file)
        security.require_keys(args.host, bool(keys), args.insecure, "API keys (--api-key)")
        return cls(**fields, api_keys=keys)


def add_args(parser: argparse.ArgumentParser) -> None:
    d = TcpConfig()
    parser.add_argument("--host", default=d.host, help="address to listen on")
    parser.add_argument("--port", type=int, default=d.port, help="port to listen on (0: any)")
    parser.add_argument("--max-line", type=int, default=d.max_line,
                        help="longest line a client may send, in bytes, at most 4 MiB (default 1 MiB)")
    parser.add_argument("--max-inflight", type=int, default=d.max_inflight,
                        help="requests one connection may have running (default 16)")
    parser.add_argument("--max-write-buffer", type=int, default=d.max_write_buffer,
                        help="bytes queued for a client that does not read before its requests "
                             "are cancelled and it is closed (default 4 MiB)")
    parser.add_argument("--idle-timeout", type=float, default=d.idle_timeout,
                        help="close a connection silent this many seconds with nothing running")
    parser.add_argument("--auth-timeout", type=float, default=d.auth_timeout,
                        help="with API keys: seconds a connection has to authenticate before it "
                             "is closed (default 10; 0: no limit)")
    parser.add_argument("--resume-window", type=float, default=d.resume_window,
                        help="seconds a dropped connection's requests wait to be resumed "
                             "(0: cancel them at once)")
    parser.add_argument("--drain", type=float, default=d.drain,
                        help="seconds SIGTERM waits for running requests before cancelling them")
    parser.add_argument("--backlog", type=int, default=d.backlog,
                        help="connections the kernel queues before they are accepted (default "
                             "1024; Tornado's own 128 left clients of a burst without a hello)")
    add_key_args(parser)
    add_server_args(parser)
    add_metrics_arg(parser)


def limit_kernel_buffer(stream: IOStream, max_write_buffer: int) -> None:
    """Cap the kernel's send buffer too: Linux grows it to 4 MiB for a peer that stops reading,
    which would hide a stalled client from `--max-write-buffer` for a long while."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF,
                             max(64 * 1024, min(max_write_buffer, MiB)))


class Connection:
    """One client socket: JSON lines (or text mode), attached to one session at a time."""

    def __init__(self, gateway: "Gateway", stream: IOStream, address):
        self.gw = gateway
        self.cfg = gateway.cfg
        self.stream = stream
        self.address = address
        self.reader = LineReader(stream, self.cfg.max_line)
        self.session: Session = gateway.sessions.create()
        self.last_active = time.monotonic()
        self.busy = False  # text mode: an answer is streaming
        self.closed = False
        self.authed = not gateway.keys  # no keys configured: nothing to prove
        self.opened = time.monotonic()
        self.auth_failures = 0
        stream.max_write_buffer_size = self.cfg.max_write_buffer
        stream.set_nodelay(True)
        limit_kernel_buffer(stream, self.cfg.max_write_buffer)

    async def run(self) -> None:
        self.session.attach(self)
        greeting = {"hello": "treechat", "session": self.session.token,
                    "resume_window": self.cfg.resume_window, "max_line": self.cfg.max_line,
                    "max_inflight": self.cfg.max_inflight}
        if self.gw.keys:
            greeting["auth"] = "api_key"
        self.send(greeting)
        watchdog = asyncio.get_running_loop().create_task(self.watch_idle())
        try:
            await self.read_lines()
        except StreamClosedError:
            pass
        finally:
            watchdog.cancel()
            self.closed = True
            if self.session.conn is self:
                self.session.detach()

    async def read_lines(self) -> None:
        first = True
        while True:
            raw = await self.reader.read_line()
            self.last_active = time.monotonic()
            if raw is TOO_LONG and not self.authed:
                await self.authenticate(b"")  # refused too: a stranger gets no free lines
                continue
            if raw is TOO_LONG:
                self.send(error_line(None, Code.LINE_TOO_LONG, f"a line may hold at most "
                                     f"{self.cfg.max_line} bytes; skipped to the next newline"))
                continue
            if not raw.strip():
                continue  # an empty line is a harmless keep-alive
            if first:
                first = False
                if not raw.lstrip().startswith(b"{"):
                    from gateways.tcp_mobile.text import TextChat
                    await TextChat(self).run(raw)
                    return
            if self.authed:
                self.handle(raw)
            else:
                await self.authenticate(raw)

    def handle(self, raw: bytes) -> None:
        try:
            self.serve_line(raw)
        except Exception:  # a bug must cost this line, not the connection's reader
            log.exception("client %s: failed on a line", self.address)
            self.send(error_line(None, Code.ENGINE, "the gateway failed on this line"))

    def serve_line(self, raw: bytes) -> None:
        try:
            cmd = parse_line(raw)
            if isinstance(cmd, Submit):
                self.session.submit(cmd)
            elif isinstance(cmd, CancelLine):
                self.session.cancel(cmd.id)
            elif isinstance(cmd, Ping):
                self.send({"pong": cmd.value})
            elif isinstance(cmd, Resume):
                self.resume(cmd)
            elif isinstance(cmd, HelloLine):
                self.greet(cmd.info)
        except LineError as e:
            self.send(e.line)

    # --- authentication -------------------------------------------------------------------------

    async def authenticate(self, raw: bytes) -> None:
        """A line before the client proved its key: a hello or resume with a good `api_key`
        lets it in; anything else is refused, and too many refusals close the connection."""
        try:
            data = decode_json(raw)
        except LineError:
            data = {}
        hello = data.get("hello")
        key = hello.get("api_key") if isinstance(hello, dict) else \
            data.get("api_key") if "resume" in data else None
        if key is not None and self.gw.keys.check(key):
            self.authed = True
            log.info("client %s authenticated", self.address)
            if "resume" in data:
                self.handle(raw)  # the resume line's answer says it worked
            else:
                self.greet(hello)
            return
        rid = data.get("id") if isinstance(data.get("id"), str) else None
        why = ("missing API key: first send {\"hello\": {\"api_key\": \"YOUR_KEY\"}}"
               if key is None else "incorrect API key provided")
        await self.refuse(lambda closing: encode(error_line(rid, Code.UNAUTHORIZED, why + closing)))

    async def refuse(self, render) -> None:
        """Answer an unauthenticated line with `render(closing)`; after MAX_AUTH_FAILURES of them
        the answer says so, is flushed, and the connection closes (its fresh session with it)."""
        self.auth_failures += 1
        if self.auth_failures < MAX_AUTH_FAILURES:
            self.write(render(""))
            return
        self.gw.quiet.warning("closed unauthenticated connections", self.address[0],
                      "closing %s: %d unauthenticated lines", self.address, self.auth_failures)
        try:
            await asyncio.wait_for(self.stream.write(render("; closing the connection")), 5.0)
        except (StreamClosedError, StreamBufferFullError, asyncio.TimeoutError):
            pass
        self.stream.close()  # the reader's StreamClosedError ends run(), which drops the session

    def greet(self, info) -> None:
        """A client's hello: logged (without its key); one carrying `api_key` gets an answer."""
        if not isinstance(info, dict) or "api_key" not in info:
            log.debug("client %s says hello: %r", self.address, info)
            return
        log.debug("client %s says hello: %r", self.address,
                  {k: v for k, v in info.items() if k != "api_key"})
        if self.gw.keys.check(info["api_key"]):
            self.send({"authenticated": True})
        else:  # already let in on another key: say this one is wrong, keep serving
            self.send(error_line(None, Code.UNAUTHORIZED, "incorrect API key provided"))

    def resume(self, cmd: Resume) -> None:
        session = self.gw.sessions.resume(self.session, cmd)
        lines = session.catch_up(cmd.offsets)
        old = session.conn
        self.session = session
        session.attach(self)
        if old is not None and old is not self:
            old.abort("the session was resumed on another connection")
        self.send({"resumed": session.token, "ids": list(cmd.offsets)})
        for line in lines:
            self.send(line)

    # --- writing --------------------------------------------------------------------------------

    def send(self, line: dict) -> None:
        try:
            data = encode(line)
        except orjson.JSONEncodeError as e:  # e.g. a ping echoing what orjson cannot write
            data = encode(error_line(line.get("id") if isinstance(line.get("id"), str) else None,
                                     Code.BAD_REQUEST, f"the answer cannot be encoded ({e})"))
        self.write(data)

    def write(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.stream.write(data)
        except StreamBufferFullError:
            log.warning("client %s stopped reading (%d bytes queued); cancelling its requests",
                        self.address, self.cfg.max_write_buffer)
            if self.session.conn is self:
                self.session.cancel_all()
                self.gw.sessions.drop(self.session)
            self.abort("write buffer full")
        except StreamClosedError:
            self.closed = True  # the reader sees the close and detaches the session

    def abort(self, why: str) -> None:
        """Close without detaching: the session now belongs elsewhere or is gone."""
        log.info("closing %s: %s", self.address, why)
        self.closed = True
        if self.session.conn is self:
            self.session.conn = None
        self.stream.close()

    async def watch_idle(self) -> None:
        """Close the connection when it idles too long, or stays unauthenticated too long."""
        idle, auth = self.cfg.idle_timeout, self.cfg.auth_timeout
        if idle <= 0 and (self.authed or auth <= 0):
            return
        while not self.closed:
            if not self.authed and auth > 0:
                left = self.opened + auth - time.monotonic()
                if left <= 0:
                    self.gw.quiet.warning("connections that never authenticated", self.address[0],
                                  "closing %s: not authenticated within %g s", self.address, auth)
                    self.send(error_line(None, Code.UNAUTHORIZED,
                                         f"not authenticated within {auth:g} s; closing"))
                    self.stream.close()
                    return
                await asyncio.sleep(min(left, 1.0))
                continue
            if idle <= 0:
                return
            if self.busy or (self.session.conn is self and self.session.running):
                self.last_active = time.monotonic()
            left = self.last_active + idle - time.monotonic()
            if left <= 0:
                self.send(error_line(None, Code.TIMEOUT, f"idle for {idle:g} s; closing"))
                self.stream.close()
                return
            await asyncio.sleep(min(left, 5.0))


class Gateway(TCPServer):
    def __init__(self, cfg: TcpConfig, client: RootClient, tls: ssl.SSLContext | None = None,
                 metrics: TcpMetrics | None = None):
        super().__init__(max_buffer_size=cfg.max_line + 4 * CHUNK, ssl_options=tls)
        self.cfg = cfg
        self.client = client
        submitter = MeteredClient(client, metrics) if metrics else client
        self.sessions = Sessions(submitter, cfg.resume_window, cfg.max_inflight)
        self.keys = ApiKeys(cfg.api_keys)
        self.quiet = Quiet(log)  # what strangers can repeat: one line per kind and address
        self.connections: set[Connection] = set()

    async def handle_stream(self, stream: IOStream, address) -> None:
        conn = Connection(self, stream, address)
        self.connections.add(conn)
        try:
            await conn.run()
        finally:
            self.connections.discard(conn)

    async def shutdown(self, drain: float) -> None:
        self.stop()
        self.sessions.closing = True
        deadline = time.monotonic() + drain
        while self.sessions.running() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for session in list(self.sessions.by_token.values()):
            session.cancel_all()
        for conn in list(self.connections):
            conn.send(error_line(None, Code.SHUTTING_DOWN, "the gateway is shutting down"))
            conn.abort("shutting down")


async def serve(args: argparse.Namespace, stop: asyncio.Event, ready) -> None:
    cfg = TcpConfig.from_args(args)
    tls = server_context(args.tls_cert, args.tls_key)  # bad files fail here, before anything runs
    try:
        sockets = bind_sockets(cfg.port, cfg.host, backlog=cfg.backlog)
    except OSError as e:
        raise Fatal(f"the TCP gateway cannot listen on {cfg.host}:{cfg.port}: {e}") from None
    port = sockets[0].getsockname()[1]
    client = RootClient(args.root, name=f"tcp:{cfg.host}:{port}", curve=args.curve,
                        member=args.member,
                        heartbeat=getattr(args, "heartbeat", 1.0))  # must match the root's
    metrics = TcpMetrics() if args.metrics_port else None
    gateway = Gateway(cfg, client, tls, metrics)
    if metrics:
        metrics.start(gateway, client, cfg.host, args.metrics_port)  # a taken port fails here
    await client.start()
    if not await client.wait_connected(10.0):
        log.warning("no root answers at %s yet; requests fail with root_lost until it does",
                    args.root)
    gateway.add_sockets(sockets)
    log.info("TCP gateway on %s:%d%s (root %s, %d API key(s))", cfg.host, port,
             " with TLS" if tls else "", args.root, len(cfg.api_keys))
    ready({"url": f"tcp://{cfg.host}:{port}", "tls": tls is not None})
    await stop.wait()
    await gateway.shutdown(cfg.drain)
    if metrics:
        metrics.close()
    client.close()

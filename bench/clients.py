"""Per-request clients of `treechat bench`: each sends one workload item and fills one `Record`.

Runs in the bench process on its asyncio loop. Three targets:

    HTTPTarget  any OpenAI-compatible server, streaming (in `bench.http_client`)
    TCPTarget   treechat's TCP line protocol (docs/protocol.md): one JSON request line, then
                {"id","delta",...} lines and a final {"id","done":true,"usage",...} or
                {"id","error":{"code","message"}} line; one request at a time per connection
    RootTarget  the root directly, through `broker.client.RootClient` (the tree without a gateway)

Connections are pooled per target and reused, so a closed-loop run measures requests, not TCP
(or TLS) handshakes. TLS: an https:// --base-url, or --tcp with --tls; the server's certificate
is verified against the system's CAs or --tls-ca FILE (--tls-no-verify: not at all). A request
never raises: whatever goes wrong becomes `record.error` (a short type such as `connect`, `tls`,
`http_503 overloaded`, `disconnected`, `timeout`) and `record.error_message`.
"""

from __future__ import annotations

import asyncio
import ssl
import time

import orjson

from bench.metrics import Record
from bench.workload import Item
from treechat import tls as tlsopt

MAX_LINE = 1 << 20  # bytes: longer header or SSE lines are a broken server, not a slow one


class Failure(Exception):
    def __init__(self, kind: str, message: str = ""):
        super().__init__(message or kind)
        self.kind = kind
        self.message = message or kind


class Target:
    """Common part: timing and turning every failure into an error record."""

    name = "target"

    def __init__(self, ignore_eos: bool = False, timeout: float | None = None,
                 extra: dict | None = None):
        self.ignore_eos = ignore_eos
        self.timeout = timeout
        self.extra = extra or {}

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, item: Item, rec: Record) -> Record:
        rec.start = time.perf_counter()
        rec.prompt_tokens = item.prompt_words
        try:
            await asyncio.wait_for(self.exchange(item, rec), self.timeout)
        except Failure as e:
            rec.error, rec.error_message = e.kind, e.message
        except asyncio.TimeoutError:
            rec.error, rec.error_message = "timeout", f"no complete answer in {self.timeout}s"
        except (ConnectionResetError, BrokenPipeError, asyncio.IncompleteReadError) as e:
            rec.error, rec.error_message = "disconnected", f"the server closed the connection ({e})"
        except OSError as e:  # refused, unreachable, unknown host
            rec.error, rec.error_message = "connect", f"{type(e).__name__}: {e}"
        except (ValueError, KeyError, TypeError, IndexError, asyncio.LimitOverrunError) as e:
            rec.error, rec.error_message = "bad_response", f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 - one odd answer must not stop the whole run
            rec.error, rec.error_message = "client_error", f"{type(e).__name__}: {e}"
        rec.end = time.perf_counter()
        return rec

    def on_text(self, rec: Record, text: str, last: list[float]) -> None:
        """A chunk with text arrived: the first one sets TTFT, later ones add an ITL gap."""
        now = time.perf_counter()
        if rec.ttft is None:
            rec.ttft = now - rec.start
        else:
            rec.itl.append(now - last[0])
        last[0] = now
        rec.text += text
        rec.output_tokens += 1  # counted chunks, replaced by the server's usage when it has one

    async def exchange(self, item: Item, rec: Record) -> None:
        raise NotImplementedError


class Pool:
    """Idle keep-alive connections to one host:port (TLS ones with `tls`)."""

    def __init__(self, host: str, port: int, tls: ssl.SSLContext | None = None):
        self.host, self.port, self.tls = host, port, tls
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def get(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        while self.idle:
            reader, writer = self.idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, limit=MAX_LINE,
                                                           ssl=self.tls)
        except ssl.SSLError as e:  # a refused certificate: say so, not "connect"
            raise Failure("tls", tlsopt.describe(e)) from None
        return reader, writer, False

    def put(self, reader, writer) -> None:
        self.idle.append((reader, writer))

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class TCPTarget(Target):
    name = "tcp"

    def __init__(self, address: str, tls: ssl.SSLContext | None = None,
                 api_key: str | None = None, **kw):
        super().__init__(**kw)
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--tcp takes HOST:PORT, not '{address}'")
        self.pool = Pool(host, int(port), tls)
        self.hello = orjson.dumps({"hello": {"client": "treechat bench", "api_key": api_key}}) \
            + b"\n" if api_key else b""  # once per connection, before its first request
        self.ids = 0

    async def close(self) -> None:
        self.pool.close()

    async def exchange(self, item: Item, rec: Record) -> None:
        self.ids += 1
        rid = f"b{self.ids}"
        line = {"id": rid, "max_tokens": item.max_tokens, **self.extra}
        if item.messages is not None:
            line["messages"] = item.messages
        else:
            line["text"] = item.prompt
        if self.ignore_eos:
            line["ignore_eos"] = True
        reader, writer, reused = await self.pool.get()
        try:
            writer.write((b"" if reused else self.hello) + orjson.dumps(line) + b"\n")
            await writer.drain()
            last = [0.0]
            while True:
                raw = await reader.readuntil(b"\n")
                msg = orjson.loads(raw)
                if msg.get("id") not in (rid, None):
                    continue  # not ours (a server notice for another request)
                if "error" in msg:
                    err = msg["error"] if isinstance(msg["error"], dict) else {"message": msg["error"]}
                    raise Failure(str(err.get("code") or "error"), str(err.get("message", "")))
                if msg.get("delta"):
                    self.on_text(rec, msg["delta"], last)
                if msg.get("done"):
                    rec.finish_reason = msg.get("finish_reason")
                    usage = msg.get("usage") or {}
                    rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
                    rec.output_tokens = usage.get("completion_tokens", rec.output_tokens)
                    break
        except BaseException as e:
            writer.close()
            if isinstance(e, asyncio.IncompleteReadError):
                raise Failure("disconnected", "the server closed the connection mid-answer") from None
            raise
        self.pool.put(reader, writer)


class RootTarget(Target):
    """The tree without a gateway: for the core's own overhead numbers."""

    name = "root"

    def __init__(self, root: str, curve: str | None = None, **kw):
        super().__init__(**kw)
        self.root = root
        self.curve = curve  # a `treechat keys` folder, for a tree with keys
        self.client = None

    async def start(self) -> None:
        from broker.client import RootClient
        # Beat often (a root started with a short --heartbeat drops a gateway that beats slower,
        # and its requests with it) but give up on the root only after 3 s of silence (a root
        # with the default 1 s heartbeat beats that seldom).
        self.client = RootClient(self.root, name="bench", heartbeat=0.2, misses=15,
                                 curve=self.curve)
        await self.client.start()
        await self.client.wait_connected(5.0)  # if not, each request fails with root_lost

    async def close(self) -> None:
        if self.client is not None:
            self.client.close()

    async def exchange(self, item: Item, rec: Record) -> None:
        request = {"max_tokens": item.max_tokens, "ignore_eos": self.ignore_eos, **self.extra}
        request["messages" if item.messages is not None else "prompt"] = item.messages or item.prompt
        stream = self.client.submit(request)
        last = [0.0]
        async for ev in stream:
            if ev.kind == "delta" and ev.text:
                n = rec.output_tokens
                self.on_text(rec, ev.text, last)
                rec.output_tokens = n + ev.tokens
            elif ev.kind == "done":
                rec.finish_reason = ev.finish_reason
                rec.prompt_tokens = ev.prompt_tokens
                rec.output_tokens = ev.completion_tokens
            elif ev.kind == "error":
                raise Failure(ev.code or "error", ev.message or "")

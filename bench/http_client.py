"""The OpenAI-compatible HTTP client of `treechat bench`: one streamed request per `Record`.

Runs in the bench process on its asyncio loop, over plain asyncio streams (no HTTP library, so
the timing is ours; TLS for an https:// URL, verified as `treechat.tls` says): POST
/v1/chat/completions (or /v1/completions) with stream: true and stream_options.include_usage,
then the SSE answer: `data: {json}` lines, `data: [DONE]`, `:` comment lines ignored. HTTP/1.1
keep-alive connections are pooled; the body may be chunked, Content-Length or close-delimited.
A non-200 answer becomes an error named by its status and the OpenAI error body's code
(`http_503 overloaded`); an error object inside the stream becomes `stream <code>`; a body that
ends with neither a finish_reason nor [DONE] is `disconnected`.
"""

from __future__ import annotations

import asyncio
import ssl
from urllib.parse import urlsplit

import orjson

from bench.clients import Failure, Pool, Target
from bench.metrics import Record
from bench.workload import Item
from treechat.tls import client_context


class HTTPTarget(Target):
    name = "http"

    def __init__(self, base_url: str, endpoint: str = "/v1/chat/completions",
                 model: str | None = None, api_key: str | None = None,
                 tls: ssl.SSLContext | None = None, **kw):
        super().__init__(**kw)
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"--base-url must look like http://HOST:PORT or https://HOST:PORT, "
                             f"not '{base_url}'")
        if endpoint not in ("/v1/chat/completions", "/v1/completions"):
            raise ValueError("--endpoint must be /v1/chat/completions or /v1/completions")
        if tls is not None and url.scheme != "https":
            raise ValueError(f"TLS options need an https:// --base-url, not '{base_url}'")
        if url.scheme == "https" and tls is None:
            tls = client_context()  # the system's CAs, as curl does
        self.host, self.port = url.hostname, url.port or (443 if tls else 80)
        self.prefix = url.path.rstrip("/")
        self.endpoint = endpoint
        self.model = model
        self.api_key = api_key
        self.pool = Pool(self.host, self.port, tls)

    async def start(self) -> None:
        """Without --model, ask /v1/models for the first model, as vLLM's bench does."""
        if self.model is None:
            try:
                status, body = await asyncio.wait_for(self.get("/v1/models"), 10)
                if status == 200:
                    self.model = orjson.loads(body)["data"][0]["id"]
            except Exception:  # noqa: BLE001 - no model list: the requests will show what is wrong
                pass

    async def close(self) -> None:
        self.pool.close()

    def payload(self, item: Item) -> dict:
        body: dict = {"max_tokens": item.max_tokens, "stream": True,
                      "stream_options": {"include_usage": True}, **self.extra}
        if self.model:
            body["model"] = self.model
        if self.endpoint == "/v1/completions":
            body["prompt"] = item.text()
        else:
            body["messages"] = item.messages or [{"role": "user", "content": item.prompt}]
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    def head(self, method: str, path: str, length: int) -> bytes:
        lines = [f"{method} {self.prefix}{path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 "Accept: text/event-stream", f"Content-Length: {length}"]
        if length:
            lines.append("Content-Type: application/json")
        if self.api_key:
            lines.append(f"Authorization: Bearer {self.api_key}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    async def request(self, method: str, path: str, body: bytes):
        """Send one request on a pooled connection; return (status, headers, reader, writer).
        A reused connection the server had closed is retried once on a fresh one."""
        for _ in range(2):
            reader, writer, reused = await self.pool.get()
            try:
                writer.write(self.head(method, path, len(body)) + body)
                await writer.drain()
                status_line = await reader.readuntil(b"\r\n")
            except (ConnectionError, asyncio.IncompleteReadError):
                writer.close()
                if reused:
                    continue
                raise Failure("disconnected", "the server closed the connection before answering")
            try:
                parts = status_line.decode("latin-1").split(" ", 2)
                if len(parts) < 2 or not parts[1].isdigit():
                    raise Failure("bad_response", f"not an HTTP status line: {status_line[:80]!r}")
                raw = await reader.readuntil(b"\r\n\r\n")
            except BaseException:
                writer.close()
                raise
            headers = {}
            for line in raw.decode("latin-1").split("\r\n"):
                key, sep, value = line.partition(":")
                if sep:
                    headers[key.strip().lower()] = value.strip()
            return int(parts[1]), headers, reader, writer
        raise Failure("disconnected", "the server closed the connection before answering")

    async def body_chunks(self, headers: dict, reader: asyncio.StreamReader):
        """The response body as it arrives, whatever its framing."""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers from the servers we speak to
                    return
                chunk = await reader.readexactly(size)
                await reader.readexactly(2)
                yield chunk
        elif "content-length" in headers:
            left = int(headers["content-length"])
            while left > 0:
                chunk = await reader.read(min(left, 65536))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", left)
                left -= len(chunk)
                yield chunk
        else:
            while chunk := await reader.read(65536):
                yield chunk

    def release(self, headers: dict, reader, writer) -> None:
        if headers.get("connection", "").lower() == "close" or not (
                "content-length" in headers or "chunked" in headers.get("transfer-encoding", "")):
            writer.close()
        else:
            self.pool.put(reader, writer)

    async def get(self, path: str) -> tuple[int, bytes]:
        return await self.call("GET", path, b"")

    async def post(self, path: str, body: dict) -> tuple[int, bytes]:
        """One whole (not streamed) JSON request: (status, body)."""
        return await self.call("POST", path, orjson.dumps(body))

    async def call(self, method: str, path: str, payload: bytes) -> tuple[int, bytes]:
        status, headers, reader, writer = await self.request(method, path, payload)
        body = b"".join([c async for c in self.body_chunks(headers, reader)])
        self.release(headers, reader, writer)
        return status, body

    async def exchange(self, item: Item, rec: Record) -> None:
        status, headers, reader, writer = await self.request(
            "POST", self.endpoint, orjson.dumps(self.payload(item)))
        try:
            if status != 200:
                body = b"".join([c async for c in self.body_chunks(headers, reader)])
                raise http_failure(status, body)
            await self.read_sse(headers, reader, rec)
        except BaseException:
            writer.close()  # a half-read response leaves the connection unusable
            raise
        self.release(headers, reader, writer)

    async def read_sse(self, headers: dict, reader, rec: Record) -> None:
        buf = b""
        last = [0.0]
        finished = False
        async for chunk in self.body_chunks(headers, reader):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                line = line.rstrip(b"\r")
                if not line.startswith(b"data:") or finished:
                    continue  # comments (":"), event names, blank separators
                data = line[5:].strip()
                if data == b"[DONE]":
                    finished = True
                    continue
                self.on_event(orjson.loads(data), rec, last)
        if not finished and rec.finish_reason is None:
            # a body that ended cleanly after a finish_reason is complete even without [DONE]
            # (transformers serve sends none); without either the answer was cut off
            raise Failure("disconnected", "the stream ended without a finish_reason or [DONE]")

    def on_event(self, event: dict, rec: Record, last: list[float]) -> None:
        if event.get("error"):
            err = event["error"] if isinstance(event["error"], dict) else {"message": event["error"]}
            code = err.get("code") or err.get("type") or "error"
            raise Failure(f"stream {code}", str(err.get("message", "")))
        for choice in event.get("choices") or []:
            text = (choice.get("delta") or {}).get("content") if "delta" in choice else choice.get("text")
            if text:
                self.on_text(rec, text, last)
            if choice.get("finish_reason"):
                rec.finish_reason = choice["finish_reason"]
        usage = event.get("usage")
        if usage:
            rec.prompt_tokens = usage.get("prompt_tokens", rec.prompt_tokens)
            rec.output_tokens = usage.get("completion_tokens", rec.output_tokens)


def http_failure(status: int, body: bytes) -> Failure:
    """An OpenAI-style error body names its code; keep it next to the status."""
    try:
        err = orjson.loads(body)["error"]
        code = err.get("code") or err.get("type")
        message = err.get("message", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        code, message = None, body[:200].decode(errors="replace")
    return Failure(f"http_{status}" + (f" {code}" if code else ""), message or f"HTTP {status}")


class MessagesTarget(HTTPTarget):
    """Anthropic's POST /v1/messages, streamed: text from content_block_delta's text_delta, the
    end and the usage from message_delta (the events' `data:` lines; `event:` lines skipped)."""

    name = "anthropic"

    def __init__(self, base_url: str, **kw):
        super().__init__(base_url, **kw)
        self.endpoint = "/v1/messages"

    def payload(self, item: Item) -> dict:
        body: dict = {"max_tokens": item.max_tokens, "stream": True, **self.extra,
                      "messages": item.messages or [{"role": "user", "content": item.prompt}]}
        if self.model:
            body["model"] = self.model
        if self.ignore_eos:
            body["ignore_eos"] = True  # treechat's extension, as on the chat path
        return body

    def on_event(self, event: dict, rec: Record, last: list[float]) -> None:
        kind = event.get("type")
        if kind == "content_block_delta" and event["delta"].get("type") == "text_delta":
            self.on_text(rec, event["delta"]["text"], last)
        elif kind == "message_delta":
            rec.finish_reason = event["delta"].get("stop_reason")
            usage = event.get("usage") or {}
            rec.prompt_tokens = usage.get("input_tokens", rec.prompt_tokens)
            rec.output_tokens = usage.get("output_tokens", rec.output_tokens)
        elif kind == "error":
            err = event.get("error") or {}
            raise Failure(f"stream {err.get('type', 'error')}", str(err.get("message", "")))

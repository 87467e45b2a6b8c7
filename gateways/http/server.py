"""The HTTP gateway: the chat page, the OpenAI-compatible API and `/arranca`, fed to the root.

Process: `treechat gateway http --root HOST:PORT --host H --port P [flags]` (started by
`treechat up`). One Tornado HTTP server on `--port` (HTTPS with `--tls-cert`/`--tls-key`,
`treechat.tls`); one DEALER to the root's front socket
(`broker.client.RootClient`: Submit, Cancel, StatusQuery, Heartbeat out; Deltas, Done, Error,
StatusReply, Heartbeat in). Routes:

    GET  /                      the chat page (web/index.html), sets the `_xsrf` cookie
    GET  /static/...            the files of web/
    POST /v1/chat/completions   OpenAI chat completions, streamed (SSE) or whole  (completions.py)
    POST /v1/completions        OpenAI text completions                          (completions.py)
    POST /v1/messages[/count_tokens]   Anthropic's Messages API                   (anthropic.py)
    POST /tokenize, /detokenize vLLM's, with --tokenizer's tokenizer              (tokens.py)
    GET  /v1/models[/ID], /v1/tree   models served, one model, the live tree     (info.py)
    POST /arranca               the original JSON contract, XSRF-protected       (arranca.py)
    POST /v1/responses, GET|DELETE /v1/responses/ID   OpenAI Responses      (responses.py)
    POST /api/chat, /api/generate, GET /api/tags, ...  Ollama's API  (ollama.py, ollama_info.py)
    GET  /healthz (/health), /readyz, /metrics

SIGTERM: stop accepting connections, refuse new requests (503 shutting_down), let open requests
and streams finish for up to `--grace` seconds, close the rest, exit 0.

Connections are bounded: a request's head must arrive within `--header-timeout` (which is also
how long an idle keep-alive connection stays open: Tornado waits for both with one timer), its
body within `--body-timeout`; past `--max-connections` open connections a new one gets a 503 and
is closed at once; the kernel queues at most `--backlog` connections not yet accepted. The access
log is quiet under attack: refusals (4xx) one line per status and client per interval, 503/504
only counted (`treechat:http_responses`), other 5xx at ERROR.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from pathlib import Path

import orjson

import tornado.httpserver
import tornado.web

import web
from broker import security
from broker.client import RootClient
from broker.quiet import Quiet
from gateways.http import ollama_info
from gateways.http.anthropic import CountTokensHandler, MessagesHandler
from gateways.http.arranca import ArrancaHandler
from gateways.http.base import Gateway, GatewayConfig, NotFoundHandler
from gateways.http.completions import ChatCompletionsHandler, CompletionsHandler
from gateways.http.info import (HealthHandler, IndexHandler, MetricsHandler, ModelHandler,
                                ModelsHandler, ReadyHandler, TreeHandler)
from gateways.http.metrics import Metrics
from gateways.http.responses import ResponsesHandler, StoredResponseHandler
from gateways.http.tokens import DetokenizeHandler, TokenizeHandler, Tokenizer
from gateways.http.treeview import TreeView
from broker.errors import Fatal
from treechat.tls import add_server_args, server_context

log = logging.getLogger("treechat.http")
access_log = logging.getLogger("tornado.access")

DEFAULT_WEB = Path(web.__file__).resolve().parent  # web/ is a package: found installed or not
BODY_CAP = 64  # the server reads (and drops) at most max_body * BODY_CAP bytes of a large body


class Server(tornado.httpserver.HTTPServer):
    """Tornado's HTTP server with Nagle's algorithm off for each connection's whole life, and a
    cap on open connections.

    Tornado turns TCP_NODELAY on when a response finishes and off again after it: two system
    calls per request, and mid-stream SSE deltas written while Nagle is on can wait for the
    client's ACK. Streams want every flushed delta sent at once, so it stays on.
    """

    def initialize(self, *args, max_connections: int = 0, metrics: Metrics | None = None,
                   **kwargs) -> None:
        super().initialize(*args, **kwargs)
        self.max_connections = max_connections
        self.metrics = metrics
        self.open = 0
        self.quiet = Quiet(access_log)

    def handle_stream(self, stream, address) -> None:
        if self.max_connections and self.open >= self.max_connections:
            return self.refuse(stream, address)
        self.open += 1
        stream.set_nodelay(True)
        stream.set_nodelay = _keep_nodelay  # this stream only: Tornado's toggles become no-ops
        super().handle_stream(stream, address)

    def on_close(self, server_conn) -> None:
        self.open -= 1
        super().on_close(server_conn)

    def refuse(self, stream, address) -> None:
        """Full: a short 503 and close, without reading the request (it costs us nothing)."""
        if self.metrics is not None:
            self.metrics.refused_connections.inc()
        self.quiet.warning("refused connections", address[0], "refused a connection from %s: "
                             "%d connections open (--max-connections)", address[0], self.open)
        stream.write(FULL).add_done_callback(lambda _f: stream.close())


def _keep_nodelay(_value: bool) -> None:
    pass


_FULL_BODY = orjson.dumps({"error": {"message": "the server has too many open connections; try "
                                                "again shortly", "type": "server_error",
                                     "param": None, "code": "too_many_connections"}})
FULL = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        b"Retry-After: 1\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
        % len(_FULL_BODY)) + _FULL_BODY


def log_request(metrics: Metrics):
    """The access log (Tornado's `log_function`): every response counted by status, successes at
    INFO, refusals rate-limited, 503/504/529 (overload, shutting down, deadlines) only counted."""
    quiet = Quiet(access_log)

    def log(handler: tornado.web.RequestHandler) -> None:
        status = handler.get_status()
        metrics.responses.labels(status=str(status)).inc()
        summary = handler._request_summary()
        if status < 400:
            ms = 1000.0 * handler.request.request_time()
            access_log.info("%d %s %.2fms", status, summary, ms)
        elif status in (503, 504, 529):  # 529: Anthropic's "overloaded"
            access_log.debug("%d %s", status, summary)
        elif status < 500:
            quiet.warning(f"{status} responses", handler.request.remote_ip, "%d %s",
                                 status, summary)
        else:
            access_log.error("%d %s", status, summary)
    return log


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--api-key", action="append", default=[],
                   help="require 'Authorization: Bearer KEY' on /v1 and /arranca (repeatable)")
    p.add_argument("--api-key-file", default=None,
                   help="a file of API keys, one per line ('#' starts a comment)")
    p.add_argument("--max-body", type=int, default=1 << 20,
                   help="largest request body in bytes, at most 4 MiB; larger gets 413 (default 1 MiB)")
    p.add_argument("--request-timeout", type=float, default=0.0,
                   help="seconds a request may take before it fails with 504 (default 0: none; "
                        "a request's own 'timeout' field wins)")
    p.add_argument("--keepalive", type=float, default=5.0,
                   help="seconds between ': keep-alive' comments on a quiet stream (default 5)")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds SIGTERM waits for open requests and streams (default 30)")
    p.add_argument("--arranca-max-tokens", type=int, default=256,
                   help="longest answer of POST /arranca, in tokens (default 256)")
    p.add_argument("--web-dir", default=str(DEFAULT_WEB), help="the chat page's folder")
    p.add_argument("--served-model-name", action="append", default=[], metavar="NAME",
                   help="another name the tree's default model answers to (repeatable); "
                        "other unknown names stay 404")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="let pages of ORIGIN (https://host[:port], or *) call the API: CORS "
                        "(repeatable; default none)")
    p.add_argument("--tokenizer", default=None, metavar="MODEL",
                   help="the tree's model (as a node's --model; 'default': the shipped one) whose "
                        "tokenizer serves /tokenize and /detokenize (default: none, 501)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="the nodes' --chat-template, for /tokenize of chat messages")
    g = p.add_argument_group("connections")
    g.add_argument("--header-timeout", type=float, default=30.0,
                   help="seconds a connection may take to send a request's head; also how long "
                        "an idle keep-alive connection stays open (default 30)")
    g.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a request's body may take to arrive (default 60)")
    g.add_argument("--max-connections", type=int, default=1024,
                   help="open connections at most; a new one past that gets 503 (default 1024)")
    g.add_argument("--backlog", type=int, default=1024,
                   help="connections the kernel queues before they are accepted (default 1024)")
    add_server_args(p)


def config_from_args(args: argparse.Namespace) -> GatewayConfig:
    keys = set(args.api_key or [])
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"cannot read --api-key-file: {e}") from None
        keys |= {ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")}
    for flag in ("header_timeout", "body_timeout"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive")
    for flag in ("max_connections", "backlog"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    security.require_keys(args.host, bool(keys), args.insecure, "API keys (--api-key)")
    return GatewayConfig(api_keys=frozenset(keys), max_body=args.max_body,
                         request_timeout=args.request_timeout or None, keepalive=args.keepalive,
                         grace=args.grace, arranca_max_tokens=args.arranca_max_tokens,
                         web_dir=args.web_dir,
                         served_names=tuple(dict.fromkeys(args.served_model_name or [])),
                         allowed_origins=frozenset(args.allowed_origin or []))


def make_app(client: RootClient, settings: GatewayConfig, metrics: Metrics | None = None,
             tree: TreeView | None = None,
             tokenizer: Tokenizer | None = None) -> tornado.web.Application:
    metrics = metrics or Metrics()
    tree = tree or TreeView(client, metrics, settings.status_every)
    gw = Gateway(client=client, cfg=settings, metrics=metrics, tree=tree)
    gw.idle.set()
    a = {"gw": gw}
    routes = [
        (r"/", IndexHandler, a),
        (r"/healthz", HealthHandler, a),
        (r"/health", HealthHandler, a),  # vLLM's name
        (r"/readyz", ReadyHandler, a),
        (r"/metrics", MetricsHandler, a),
        (r"/v1/chat/completions", ChatCompletionsHandler, a),
        (r"/v1/completions", CompletionsHandler, a),
        (r"/v1/messages", MessagesHandler, a),
        (r"/v1/messages/count_tokens", CountTokensHandler, a),
        (r"/tokenize", TokenizeHandler, {**a, "tokenizer": tokenizer}),
        (r"/detokenize", DetokenizeHandler, {**a, "tokenizer": tokenizer}),
        (r"/v1/models", ModelsHandler, a),
        (r"/v1/models/(.+)", ModelHandler, a),
        (r"/v1/tree", TreeHandler, a),
        (r"/arranca", ArrancaHandler, a),
        (r"/v1/responses", ResponsesHandler, a),
        (r"/v1/responses/([^/]+)", StoredResponseHandler, a),
        *ollama_info.routes(a),
    ]
    web = settings.web_dir
    if web and os.path.isdir(web):
        routes.append((r"/static/(.*)", tornado.web.StaticFileHandler, {"path": web}))
    app = tornado.web.Application(
        routes, xsrf_cookies=True, xsrf_cookie_kwargs={"samesite": "Strict"},
        cross_origin_protection=True,  # browsers' cross-site POSTs refused (Sec-Fetch-Site/Origin)
        default_handler_class=NotFoundHandler, default_handler_args=a, gateway=gw,
        log_function=log_request(metrics))
    return app


async def serve(args: argparse.Namespace, stop: asyncio.Event, ready) -> None:
    settings = config_from_args(args)
    tls = server_context(args.tls_cert, args.tls_key)  # bad files fail here, before anything runs
    client = RootClient(args.root, name=f"http:{args.host}:{args.port}", curve=args.curve,
                        member=args.member,
                        heartbeat=getattr(args, "heartbeat", 1.0))  # --heartbeat: from the CLI
    await client.start()
    if not await client.wait_connected(2.0):
        log.warning("no root answers at %s yet; serving anyway (/readyz says 503 until it does)",
                    args.root)
    tokenizer = None
    if args.tokenizer:
        model = None if args.tokenizer == "default" else args.tokenizer
        tokenizer = Tokenizer(model, args.chat_template)
    app = make_app(client, settings, tokenizer=tokenizer)
    gw: Gateway = app.settings["gateway"]
    server = Server(app, max_body_size=settings.max_body * BODY_CAP,
                    idle_connection_timeout=args.header_timeout, body_timeout=args.body_timeout,
                    max_connections=args.max_connections, metrics=gw.metrics, ssl_options=tls)
    try:
        server.listen(args.port, args.host, backlog=args.backlog)
    except OSError as e:
        client.close()
        raise Fatal(f"the HTTP gateway cannot listen on {args.host}:{args.port}: {e}") from None
    poller = asyncio.get_running_loop().create_task(gw.tree.poll(stop))
    url = f"{'https' if tls else 'http'}://{args.host}:{args.port}"
    log.info("HTTP gateway on %s (root %s, %d API key(s))", url, args.root, len(settings.api_keys))
    ready({"url": url, "root": args.root})
    await stop.wait()
    await shut_down(server, gw, settings.grace)
    poller.cancel()
    client.close()


async def shut_down(server: tornado.httpserver.HTTPServer, gw: Gateway, grace: float) -> None:
    gw.stopping = True
    server.stop()
    if gw.active:
        log.info("SIGTERM: waiting up to %.0fs for %d open request(s)", grace, len(gw.active))
        try:
            await asyncio.wait_for(gw.idle.wait(), grace)
        except asyncio.TimeoutError:
            log.warning("%d request(s) still open after %.0fs; closing them", len(gw.active), grace)
            for handler in list(gw.active):
                handler.on_connection_close()  # cancels it down the tree
    try:
        await asyncio.wait_for(server.close_all_connections(), 5.0)
    except asyncio.TimeoutError:
        pass

"""What every HTTP handler shares: the gateway's state, JSON errors, API keys, body limits.

`Gateway` is the per-process state handed to every handler (`initialize(gw=...)`): the root
client, the tree view, the metrics, the config, and the set of requests in progress (SIGTERM waits
for them). `BaseHandler` renders every error, Tornado's own included, as OpenAI's
`{"error": {...}}`, gives every response an `X-Request-Id` (the client's own, or a new one) and,
for origins the operator allows (`--allowed-origin`), CORS headers and preflight answers;
`ApiHandler` adds API keys (`Authorization: Bearer KEY`, or Anthropic's `x-api-key: KEY`); `BodyHandler` the body size limit, checked as the body streams in
(`stream_request_body`): a body over the limit is read and dropped, never stored, then answered
with a clear 413 instead of a dropped connection. Every refusal of a body handler (XSRF, a foreign
origin, a bad key, 413, 415) waits until the body is read, so the connection stays usable.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from dataclasses import dataclass, field

import orjson
import tornado.web

from broker import limits
from broker.client import RootClient
from broker.nesting import MAX_DEPTH, too_deep
from gateways.http.errors import ApiError, not_found, status_code_name
from gateways.http.metrics import Metrics
from gateways.http.sse import new_id
from gateways.http.treeview import TreeView

log = logging.getLogger("treechat.http")

REQUEST_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces: safe to echo
ORIGIN = re.compile(r"^https?://[^/\s]+$")
CORS_METHODS = "GET, POST, DELETE, OPTIONS"
CORS_HEADERS = ("Authorization, Content-Type, X-Request-Id, X-Session-Id, X-XSRFToken, X-Api-Key, "
                "Anthropic-Version")


@dataclass(frozen=True)
class GatewayConfig:
    api_keys: frozenset[str] = frozenset()
    max_body: int = 1 << 20
    request_timeout: float | None = None  # seconds; None: no deadline unless the request sets one
    keepalive: float = 5.0
    grace: float = 30.0
    arranca_max_tokens: int = 256
    web_dir: str | None = None
    status_every: float = 2.0
    served_names: tuple[str, ...] = ()  # more names the tree's default model answers to
    allowed_origins: frozenset[str] = frozenset()  # CORS: origins (or "*") whose pages may call

    def allows(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self.allowed_origins
                                       or origin in self.allowed_origins)

    def __post_init__(self):
        if not 1024 <= self.max_body <= limits.REQUEST:
            raise ValueError(f"--max-body must be 1024 to {limits.REQUEST} bytes (the largest "
                             "request the tree carries)")
        if self.keepalive <= 0:
            raise ValueError("--keepalive must be positive")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("--request-timeout must be positive (or 0 for none)")
        if self.grace < 0:
            raise ValueError("--grace cannot be negative")
        if self.arranca_max_tokens < 1:
            raise ValueError("--arranca-max-tokens must be at least 1")
        if any(not k or any(c.isspace() for c in k) for k in self.api_keys):
            raise ValueError("an API key cannot be empty or contain spaces")
        for origin in self.allowed_origins:
            if origin != "*" and not ORIGIN.match(origin):
                raise ValueError(f"--allowed-origin {origin}: give scheme://host[:port] "
                                 "(no path), or *")
        if any(not name.strip() for name in self.served_names):
            raise ValueError("--served-model-name cannot be empty")


@dataclass
class Gateway:
    client: RootClient
    cfg: GatewayConfig
    metrics: Metrics
    tree: TreeView
    active: set = field(default_factory=set)  # handlers with a request in the tree
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    stopping: bool = False

    def enter(self, handler) -> None:
        self.active.add(handler)
        self.idle.clear()

    def leave(self, handler) -> None:
        self.active.discard(handler)
        if not self.active:
            self.idle.set()


class BaseHandler(tornado.web.RequestHandler):
    request_id: str | None = None

    gw: Gateway | None = None

    def initialize(self, gw: Gateway) -> None:
        self.gw = gw
        self.set_default_headers()  # Tornado's first call came before `gw` was known

    def set_default_headers(self) -> None:
        # Called again when an error clears the headers: the id and CORS stay on errors too.
        if self.gw is None:
            return
        if self.request_id is None:
            given = self.request.headers.get("X-Request-Id", "")
            self.request_id = given if REQUEST_ID.match(given) else new_id()
        self.set_header("X-Request-Id", self.request_id)
        origin = self.request.headers.get("Origin")
        if self.gw.cfg.allows(origin):
            self.set_header("Access-Control-Allow-Origin",
                            "*" if "*" in self.gw.cfg.allowed_origins else origin)
            self.set_header("Access-Control-Expose-Headers",
                            "X-Request-Id, X-Session-Id, Retry-After")
            self.set_header("Vary", "Origin")

    def check_trusted_origin(self, origin: str) -> bool:
        return self.gw.cfg.allows(origin)  # Tornado's cross-origin protection asks this

    def options(self, *_args) -> None:
        """A CORS preflight (or a plain OPTIONS): 204 with what may be sent."""
        self.set_status(204)
        self.set_header("Allow", CORS_METHODS)
        if self.gw.cfg.allows(self.request.headers.get("Origin")):
            self.set_header("Access-Control-Allow-Methods", CORS_METHODS)
            self.set_header("Access-Control-Allow-Headers",
                            self.request.headers.get("Access-Control-Request-Headers")
                            or CORS_HEADERS)
            self.set_header("Access-Control-Max-Age", "600")
        self.finish()

    def write_json(self, obj, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(obj))

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if not isinstance(exc, ApiError):
            message = self._reason
            if isinstance(exc, tornado.web.HTTPError) and exc.log_message:
                message = exc.log_message % exc.args if exc.args else exc.log_message
            elif status_code >= 500:
                message = "internal error in the gateway"
            if status_code == 403 and "xsrf" in str(message).lower():
                message = (f"XSRF check failed ({message}): load GET / (it sets the _xsrf cookie) "
                           "and send the cookie's value in an X-XSRFToken header")
            exc = ApiError(status_code, message, code=status_code_name(status_code))
        header = exc.retry_after_header()
        if header:
            self.set_header("Retry-After", header)
        self.set_header("Content-Type", "application/json")
        self.finish(orjson.dumps(self.error_body(exc)))

    def error_body(self, exc: ApiError) -> dict:
        """The JSON of an error: OpenAI's envelope here; a dialect's handler renders its own."""
        return exc.body()


class ApiHandler(BaseHandler):
    """A protected endpoint: Bearer key when keys are set; XSRF only for browser requests."""

    xsrf_always = False  # True: every POST needs the XSRF token (/arranca, like the original)

    def check_xsrf_cookie(self) -> None:
        if self.xsrf_always:
            return super().check_xsrf_cookie()
        # API clients authenticate with a Bearer header, which a cross-site form or fetch cannot
        # add without a CORS preflight this server never grants (x-api-key alike); a request with
        # no `_xsrf` cookie is not a browser session either. A browser request carrying the page's
        # cookie must carry the matching X-XSRFToken header too (the page sends it).
        headers = self.request.headers
        if headers.get("Authorization") or headers.get("X-Api-Key") \
                or "_xsrf" not in self.request.cookies:
            return
        super().check_xsrf_cookie()

    def prepare(self) -> None:
        if self.request.method != "OPTIONS":  # a CORS preflight carries no key
            self.check_api_key()

    def check_api_key(self) -> None:
        keys = self.gw.cfg.api_keys
        if not keys:
            return
        scheme, _, key = self.request.headers.get("Authorization", "").partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else ""
        key = key or self.request.headers.get("X-Api-Key", "").strip()  # Anthropic's clients
        if not key:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY' (or "
                                "'x-api-key: YOUR_KEY')", code="invalid_api_key")
        if not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
            raise ApiError(401, "incorrect API key provided", code="invalid_api_key")


@tornado.web.stream_request_body
class BodyHandler(ApiHandler):
    """A POST endpoint taking a JSON body no larger than `--max-body` bytes."""

    refusal: tornado.web.HTTPError | None = None
    json_only = True  # False: any Content-Type (/arranca, whose old clients send forms' type)

    def check_xsrf_cookie(self) -> None:
        try:
            super().check_xsrf_cookie()
        except tornado.web.HTTPError as e:
            self.refusal = e  # answered once the body is read, as below

    def check_trusted_origin(self, origin: str) -> bool:
        if not super().check_trusted_origin(origin) and self.refusal is None:
            self.refusal = ApiError(403, f"cross-origin request from {origin} refused (the "
                                         "operator allows origins with --allowed-origin)",
                                    code="forbidden")
        return True  # refused once the body is read, as above

    def prepare(self) -> None:
        self.body = bytearray()
        self.too_large = False
        # A refusal (XSRF, bad key, shutting down) waits until the body is read: answering before
        # would make Tornado close the connection, and a client reusing it would see a reset.
        if self.refusal is not None:
            return
        try:
            super().prepare()
            if self.gw.stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
        except ApiError as e:
            self.refusal = e
        length = self.request.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) > self.gw.cfg.max_body:
            self.too_large = True  # the body is drained (up to the server's cap), then 413

    def data_received(self, chunk: bytes) -> None:
        if not self.too_large:
            self.body += chunk
            if len(self.body) > self.gw.cfg.max_body:
                self.too_large = True
                self.body = bytearray()

    def read_json(self):
        if self.refusal is not None:
            raise self.refusal
        if self.too_large:
            raise ApiError(413, f"the request body is larger than {self.gw.cfg.max_body} bytes",
                           code="request_too_large")
        kind = self.request.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if self.json_only and kind and kind != "application/json" and not kind.endswith("+json"):
            raise ApiError(415, f"the request body must be JSON (Content-Type: application/json),"
                                f" not {kind}", code="unsupported_media_type")
        if not self.body.strip():
            raise ApiError(400, "the request body is empty; send a JSON object",
                           code="invalid_json")
        try:
            data = orjson.loads(self.body)
        except orjson.JSONDecodeError as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}",
                           code="invalid_json") from None
        if too_deep(data):
            raise ApiError(400, f"the request body is nested deeper than {MAX_DEPTH} levels",
                           code="invalid_json")
        return data


class NotFoundHandler(BaseHandler):
    def prepare(self) -> None:
        raise not_found(self.request.path)

    def check_xsrf_cookie(self) -> None:
        pass  # a 404 is a 404, whatever the method

"""Errors of the HTTP gateway in OpenAI's shape, and the map from the tree's error codes.

Every error the gateway sends, before or during a stream, is

    {"error": {"message": "...", "type": "...", "param": "..." | null, "code": "..."}}

`ApiError` carries one; handlers raise it and `BaseHandler.write_error` renders it. A core error
(`broker.protocol.ErrorCode`) becomes an `ApiError` through `from_core`, which fixes the HTTP
status: the table below is the contract documented in docs/http-api.md.
"""

from __future__ import annotations

import math

from tornado.web import HTTPError

from broker.protocol import ErrorCode

INVALID = "invalid_request_error"
SERVER = "server_error"

# core code -> (HTTP status, OpenAI type, code shown to clients)
CORE_STATUS: dict[str, tuple[int, str, str]] = {
    ErrorCode.BAD_REQUEST: (400, INVALID, "invalid_value"),
    ErrorCode.TOO_LONG: (400, INVALID, "context_length_exceeded"),
    ErrorCode.UNKNOWN_MODEL: (404, INVALID, "model_not_found"),
    ErrorCode.OVERLOADED: (503, SERVER, "overloaded"),
    ErrorCode.ROOT_LOST: (503, SERVER, "root_lost"),
    ErrorCode.NODE_LOST: (503, SERVER, "node_lost"),
    ErrorCode.SHUTTING_DOWN: (503, SERVER, "shutting_down"),
    ErrorCode.TIMEOUT: (504, SERVER, "timeout"),
    ErrorCode.ENGINE: (500, SERVER, "engine_error"),
    ErrorCode.CANCELLED: (499, SERVER, "cancelled"),
}

# 503s the client may simply retry; they get a Retry-After header even when the core gave none
RETRYABLE = {503}


class ApiError(HTTPError):
    """One HTTP error: status, OpenAI-style body fields, and an optional Retry-After (seconds).

    An `HTTPError`, so Tornado answers it with `write_error` and logs no traceback."""

    def __init__(self, status: int, message: str, *, code: str, param: str | None = None,
                 type: str | None = None, retry_after: float | None = None):
        super().__init__(status, reason="Client Closed Request" if status == 499 else None)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or (INVALID if status < 500 else SERVER)
        if retry_after is None and status in RETRYABLE:
            retry_after = 1.0
        self.retry_after = retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def retry_after_header(self) -> str | None:
        """Retry-After wants whole seconds; round up so a client never retries too early."""
        if self.retry_after is None:
            return None
        return str(max(1, math.ceil(self.retry_after)))


def from_core(code: str | None, message: str | None, retry_after: float | None = None,
              param: str | None = None) -> ApiError:
    status, type_, shown = CORE_STATUS.get(code or "", (500, SERVER, code or "internal_error"))
    return ApiError(status, message or "the request failed", code=shown, param=param, type=type_,
                    retry_after=retry_after)


def bad_request(param: str | None, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code=code, param=param)


def no_node() -> ApiError:
    return ApiError(503, "no node with a model is serving right now; try again shortly",
                    code="no_node_available", retry_after=2.0)


def root_unreachable() -> ApiError:
    return ApiError(503, "the root broker is not reachable; try again shortly", code="root_lost",
                    retry_after=2.0)


def not_found(path: str) -> ApiError:
    return ApiError(404, f"no such endpoint: {path}", code="not_found")


def status_code_name(status: int) -> str:
    """A code for bare Tornado HTTPErrors (403 XSRF, 405 method, ...) that carry none."""
    return {400: "bad_request", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
            413: "request_too_large", 415: "unsupported_media_type"}.get(status, "http_error")

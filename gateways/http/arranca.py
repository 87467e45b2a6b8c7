"""`POST /arranca`: the original system's contract, kept for its clients.

    -> {"text": "What is a tree?", "timestamp": 1712345678}
    <- {"request_id": 7, "text": "A tree is ...", "timestamp": 1712345678}

`request_id` is the arrival order at the root; every field besides `text` is echoed back. The text
runs as one user message (at most `--arranca-max-tokens` tokens). The request options of the tree
(`broker.request.Request`: temperature, seed, stop, response_format, tools, ... the same ones the
TCP protocol takes) may ride along as fields of the body; they are used (and echoed, like every
field): `model` picks one of the tree's models (404 for one it does not serve), `session` names the
conversation (an `X-Session-Id` header outranks it; gateways/sessions.py). With `tools`, the calls
the model made come back as `tool_calls` (OpenAI's shape). Like the original page's requests, it
needs Tornado's XSRF token: the `_xsrf` cookie `GET /` sets, echoed in an `X-XSRFToken` header (or
an `_xsrf` field of a form body). A body nested deeper than the gateway takes (`broker.nesting`) is
a 400 before anything runs.
"""

from __future__ import annotations

import orjson

from broker.request import BadRequest, Request
from gateways import tools
from gateways.http.errors import bad_request
from gateways.http.relay import RelayHandler
from gateways.http.treeview import resolve_model

OPTIONS = Request.FIELDS - {"messages", "prompt"}


class ArrancaHandler(RelayHandler):
    xsrf_always = True  # unlike the /v1 API, which also takes Bearer keys
    json_only = False  # the original clients' bodies are JSON whatever their Content-Type says

    async def post(self) -> None:
        body = self.read_json()
        if not isinstance(body, dict):
            raise bad_request(None, "the request body must be a JSON object with a 'text' field")
        try:
            orjson.dumps(body)  # every field is echoed back: make sure it can be, before the work
        except orjson.JSONEncodeError as e:
            raise bad_request(None, f"the request body cannot be echoed back ({e})") from None
        text = body.get("text")
        if not isinstance(text, str) or not text.strip():
            raise bad_request("text", "'text' must be a non-empty string")
        cap = self.gw.cfg.arranca_max_tokens
        options = {k: v for k, v in body.items() if k in OPTIONS and v is not None}
        limit = options.get("max_tokens", cap)
        if isinstance(limit, int) and not isinstance(limit, bool):
            options["max_tokens"] = min(limit, cap)  # a bad value is Request's to name
        try:
            request = Request.from_dict({"messages": [{"role": "user", "content": text}],
                                         **options}).to_dict()
        except BadRequest as e:
            raise bad_request(e.param, e.message, code=e.kind) from None
        _, route = await resolve_model(self.gw.tree, request.get("model"),
                                       self.gw.cfg.served_names)  # 503 at once when none serves
        if route is not None:
            request["model"] = route
        await self.open_streams([request], None)
        answer = await self.collect_text()
        if self.client_gone:
            return
        reply = {**body, "request_id": self.stream.request_id, "text": answer}
        mode, name = tools.mode_of(request)
        if mode is not None:
            content, calls = tools.parse(mode, name, answer)
            reply.update(text=content or "", tool_calls=calls)
        self.write_json(reply)

    async def collect_text(self) -> str:
        parts = []
        while self.open:
            index, ev = await self.next_event(None)
            if ev.kind == "delta":
                self.delta(0, ev)
                parts.append(ev.text)
            elif ev.kind == "done":
                self.finished(0, ev)
            elif ev.kind == "error":
                raise self.failed(ev)
        return "".join(parts)

"""`POST /arranca`: the original system's contract, kept for its clients.

    -> {"text": "What is a tree?", "timestamp": 1712345678}
    <- {"request_id": 7, "text": "A tree is ...", "timestamp": 1712345678}

`request_id` is the arrival order at the root; every field besides `text` is echoed back. The
text runs as one user message (at most `--arranca-max-tokens` tokens). Like the original page's
requests, it needs Tornado's XSRF token: the `_xsrf` cookie `GET /` sets, echoed in an
`X-XSRFToken` header (or an `_xsrf` field of a form body). A body nested deeper than the
gateway takes (`broker.nesting`) is a 400 before anything runs.
"""

from __future__ import annotations

import orjson

from gateways.http.errors import bad_request
from gateways.http.relay import RelayHandler
from gateways.http.treeview import resolve_model


class ArrancaHandler(RelayHandler):
    xsrf_always = True  # unlike the /v1 API, which also takes Bearer keys

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
        await resolve_model(self.gw.tree, None)  # 503 at once when no node serves
        request = {"messages": [{"role": "user", "content": text}],
                   "max_tokens": self.gw.cfg.arranca_max_tokens}
        await self.open_stream(request, None)
        answer, _done = await self.collect()
        if not self.client_gone:
            self.write_json({**body, "request_id": self.stream.request_id, "text": answer})

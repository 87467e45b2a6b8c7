"""Bench targets for the HTTP gateway's other dialects, beside `bench.http_client.HTTPTarget`
(chat completions): the same pooled HTTP/1.1 client, another body and another stream to read.

    ResponsesTarget  POST /v1/responses, stream: true, store: false; SSE events, the text in
                     `response.output_text.delta`, the end and usage in `response.completed`
    OllamaTarget     POST /api/chat, NDJSON lines, the text in `message.content`, the end and
                     counts in the `"done": true` line

`store: false` measures the translation alone (a stored response adds one round trip to the
root). `ignore_eos` rides as the treechat extension each dialect accepts (a top-level field for
Responses, an option for Ollama), so every answer has exactly the workload's length.
"""

from __future__ import annotations

import orjson

from bench.clients import Failure
from bench.http_client import HTTPTarget
from bench.metrics import Record
from bench.workload import Item


class ResponsesTarget(HTTPTarget):
    name = "responses"

    def __init__(self, base_url: str, **kw):
        super().__init__(base_url, **kw)
        self.endpoint = "/v1/responses"

    def payload(self, item: Item) -> dict:
        body = {"input": item.messages or item.prompt, "max_output_tokens": item.max_tokens,
                "stream": True, "store": False, **self.extra}
        if self.model:
            body["model"] = self.model
        if self.ignore_eos:
            body["ignore_eos"] = True
        return body

    def on_event(self, event: dict, rec: Record, last: list[float]) -> None:
        kind = event.get("type")
        if kind == "response.output_text.delta":
            self.on_text(rec, event["delta"], last)
        elif kind in ("response.completed", "response.incomplete"):
            response = event["response"]
            rec.finish_reason = "length" if kind == "response.incomplete" else "stop"
            rec.prompt_tokens = response["usage"]["input_tokens"]
            rec.output_tokens = response["usage"]["output_tokens"]
        elif kind == "response.failed":
            error = event["response"].get("error") or {}
            raise Failure(f"stream {error.get('code', 'error')}", str(error.get("message", "")))


class OllamaTarget(HTTPTarget):
    name = "ollama"

    def __init__(self, base_url: str, **kw):
        super().__init__(base_url, **kw)
        self.endpoint = "/api/chat"

    def payload(self, item: Item) -> dict:
        options = {"num_predict": item.max_tokens}
        if self.ignore_eos:
            options["ignore_eos"] = True
        return {"model": self.model, "stream": True, "options": options,
                "messages": item.messages or [{"role": "user", "content": item.prompt}],
                **self.extra}

    async def read_sse(self, headers: dict, reader, rec: Record) -> None:
        """The answer's NDJSON lines (HTTPTarget.exchange calls this for its stream)."""
        buf = b""
        last = [0.0]
        async for chunk in self.body_chunks(headers, reader):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.strip():
                    self.on_line(orjson.loads(line), rec, last)
        if rec.finish_reason is None:
            raise Failure("disconnected", "the stream ended without a \"done\": true line")

    def on_line(self, line: dict, rec: Record, last: list[float]) -> None:
        if "error" in line:
            raise Failure("stream error", str(line["error"]))
        text = (line.get("message") or {}).get("content")
        if text:
            self.on_text(rec, text, last)
        if line.get("done"):
            rec.finish_reason = line.get("done_reason", "stop")
            rec.prompt_tokens = line.get("prompt_eval_count", rec.prompt_tokens)
            rec.output_tokens = line.get("eval_count", rec.output_tokens)

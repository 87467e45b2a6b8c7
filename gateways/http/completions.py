"""`POST /v1/chat/completions` and `POST /v1/completions`: OpenAI-compatible, streamed or whole.

Flow of one request: parse and validate the body (400 before anything reaches the tree), resolve
the model (404/503), submit and wait for the root to accept (503 overloaded and other refusals
become HTTP errors), then either wait for the whole answer (one JSON object with `usage`) or
stream Server-Sent Events (see `gateways.http.sse`). The HTTP status waits for the first event
(an error that comes first, such as a prompt too long, is still a plain HTTP error) or for the
first keep-alive, whichever is sooner; then an opening chunk, one chunk per delta (deltas
already queued are coalesced into one flush), `: keep-alive` comments every `--keepalive`
seconds while nothing arrives (queue, prefill), a closing chunk with `finish_reason`, the usage
chunk when asked, and `data: [DONE]`.
"""

from __future__ import annotations

from gateways.http import sse
from gateways.http.openai_schema import Parsed, parse_chat, parse_completion
from gateways.http.relay import RelayHandler
from gateways.http.treeview import resolve_model


class CompletionsHandler(RelayHandler):
    """POST /v1/completions."""

    shape_class = sse.CompletionShape

    def parse(self, body) -> Parsed:
        return parse_completion(body)

    async def post(self) -> None:
        parsed = self.parse(self.read_json())
        model = await resolve_model(self.gw.tree, parsed.model)
        shape = self.shape_class(model)
        await self.open_stream(parsed.request, parsed.timeout)
        if parsed.stream:
            await self.stream_events(shape, parsed.include_usage)
        else:
            text, done = await self.collect()
            if not self.client_gone:
                self.write_json(shape.whole(text, done.finish_reason, done.prompt_tokens,
                                            done.completion_tokens))

    async def stream_events(self, shape, include_usage: bool) -> None:
        started = False
        while True:
            ev = await self.next_event(self.gw.cfg.keepalive)
            if not started:
                if ev is not None and ev.kind == "error":
                    raise self.failed(ev)  # nothing sent yet: a real HTTP status (400 too long...)
                self.open_sse(shape)
                started = True
            if ev is None:
                self.write(sse.KEEPALIVE)
                await self.send()
            elif ev.kind == "delta":
                self.tracker.delta(ev.tokens)
                if not self.client_gone:
                    self.write(shape.delta_event(ev.text))
                    if self.stream.queue.empty():  # coalesce what is already queued
                        await self.send()
            elif ev.kind == "done":
                self.finished(ev)
                self.write(sse.event(shape.closing(ev.finish_reason)))
                if include_usage:
                    self.write(sse.event(shape.usage_chunk(ev.prompt_tokens,
                                                           ev.completion_tokens)))
                break
            elif ev.kind == "error":
                self.write(sse.event(self.failed(ev).body()))
                break
        if not self.client_gone:
            self.write(sse.DONE)
            await self.send()

    def open_sse(self, shape) -> None:
        """Commit to 200 and SSE: at the first delta, or when the first keep-alive is due."""
        self.set_header("Content-Type", "text/event-stream; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # tell proxies not to buffer the stream
        opening = shape.opening()
        if opening is not None:
            self.write(sse.event(opening))


class ChatCompletionsHandler(CompletionsHandler):
    """POST /v1/chat/completions."""

    shape_class = sse.ChatShape

    def parse(self, body) -> Parsed:
        return parse_chat(body)


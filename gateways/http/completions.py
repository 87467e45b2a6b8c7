"""`POST /v1/chat/completions` and `POST /v1/completions`: OpenAI-compatible, streamed or whole.

Flow of one request: parse and validate the body (400 before anything reaches the tree), resolve
the model (404/503), submit one tree request per choice and wait for the root to accept them
(503 overloaded and other refusals become HTTP errors), then either wait for the whole answer
(one JSON object with every choice and `usage`) or stream Server-Sent Events (see
`gateways.http.sse`). The HTTP status waits for the first event (an error that comes first, such
as a prompt too long, is still a plain HTTP error) or for the first keep-alive, whichever is
sooner; then each choice's opening chunk, chunks as deltas arrive (deltas already queued are
coalesced into one flush), `: keep-alive` comments every `--keepalive` seconds while nothing
arrives (queue, prefill), each choice's closing chunk with its `finish_reason`, the usage chunk
when asked, and `data: [DONE]`. What each chunk holds is `gateways.http.answers.Choice`'s work.
"""

from __future__ import annotations

from gateways.http import sse
from gateways.http.answers import Choice
from gateways.http.openai_schema import Parsed, parse_chat, parse_completion
from gateways.http.relay import RelayHandler
from gateways.http.treeview import resolve_model


class CompletionsHandler(RelayHandler):
    """POST /v1/completions."""

    shape_class = sse.CompletionShape
    choice_class = Choice
    keepalive = sse.KEEPALIVE  # sent while nothing arrives (b"": a dialect without comments)
    stream_end = sse.DONE

    def parse(self, body) -> Parsed:
        return parse_completion(body)

    async def post(self) -> None:
        await self.relay(self.parse(self.read_json()))

    async def relay(self, parsed: Parsed) -> None:
        """Run a parsed request in the tree and answer it, streamed or whole. Another dialect's
        handler (responses.py, ollama.py) parses its own body into a `Parsed` and comes here."""
        model, route = await resolve_model(self.gw.tree, parsed.model, self.gw.cfg.served_names)
        for request in parsed.requests:
            if route is not None:
                request["model"] = route  # a --served-model-name runs on the tree's model
        shape = self.shape_class(model)
        choices = [self.choice_class(i, shape, r, parsed.echo[i], parsed.logprobs)
                   for i, r in enumerate(parsed.requests)]
        await self.open_streams(parsed.requests, parsed.timeout)
        if parsed.stream:
            await self.stream_events(shape, choices, parsed)
        else:
            await self.collect(choices)
            if not self.client_gone:
                await self.respond(shape, choices, parsed)

    async def respond(self, shape, choices: list[Choice], parsed: Parsed) -> None:
        """The whole answer, once every choice ended."""
        self.write_json(shape.whole([c.whole() for c in choices], *usage(choices, parsed.n)))

    async def collect(self, choices: list[Choice]) -> None:
        """Every choice's whole answer; an "error" event raises ApiError."""
        while self.open:
            index, ev = await self.next_event(None)
            if ev.kind == "delta":
                self.delta(index, ev)
                choices[index].add(ev)
            elif ev.kind == "done":
                self.finished(index, ev)
                choices[index].finish(ev)
            elif ev.kind == "error":
                self.cancel_all()
                raise self.failed(ev, max(index, 0))

    async def stream_events(self, shape, choices: list[Choice], parsed: Parsed) -> None:
        started = False
        while self.open:
            got = await self.next_event(self.gw.cfg.keepalive)
            if not started:
                if got is not None and got[1].kind == "error":
                    self.cancel_all()
                    raise self.failed(got[1], max(got[0], 0))  # nothing sent yet: a real status
                self.open_sse(choices)
                started = True
            if got is None:
                self.write(self.keepalive)
                await self.send()
                continue
            index, ev = got
            if ev.kind == "delta":
                self.delta(index, ev)
                events = choices[index].delta(ev)
                if events and not self.client_gone:
                    self.write(b"".join(events))
                    if self.idle():  # coalesce what is already queued
                        await self.send()
            elif ev.kind == "done":
                self.finished(index, ev)
                self.write(b"".join(choices[index].done(ev)))
            elif ev.kind == "error":
                self.cancel_all()
                self.write(self.error_event(self.failed(ev, max(index, 0)), choices))
                break
        else:
            self.write(await self.tail(shape, choices, parsed))
        if not self.client_gone:
            self.write(self.stream_end)
            await self.send()

    def error_event(self, error, choices: list[Choice]) -> bytes:
        """An error after the stream started: OpenAI's error object as one more event."""
        return sse.event(error.body())

    async def tail(self, shape, choices: list[Choice], parsed: Parsed) -> bytes:
        """What a stream sends after every choice ended well: the usage chunk when asked."""
        if not parsed.include_usage:
            return b""
        return sse.event(shape.usage_chunk(*usage(choices, parsed.n)))

    def idle(self) -> bool:
        queue = self.merged if self.merged is not None else self.stream.queue
        return queue.empty()

    content_type = "text/event-stream; charset=utf-8"

    def open_sse(self, choices: list[Choice]) -> None:
        """Commit to 200 and SSE: at the first delta, or when the first keep-alive is due."""
        self.set_header("Content-Type", self.content_type)
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # tell proxies not to buffer the stream
        self.write(b"".join(e for c in choices for e in c.opening()))


def usage(choices: list[Choice], n: int) -> tuple[int, int, int]:
    """(prompt tokens, completion tokens, cached prompt tokens): each prompt counted once, every
    choice's answer."""
    prompt = sum(c.prompt_tokens for c in choices[::n])
    cached = sum(c.cached_tokens for c in choices[::n])
    return prompt, sum(c.completion_tokens for c in choices), cached


class ChatCompletionsHandler(CompletionsHandler):
    """POST /v1/chat/completions."""

    shape_class = sse.ChatShape

    def parse(self, body) -> Parsed:
        return parse_chat(body)

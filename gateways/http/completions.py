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

Every other dialect (anthropic.py, responses.py, ollama.py) is a subclass: its own body parsed
into the same `Parsed`, then `relay`; its own answer objects (`answers`, or just `choice_class`:
Choice's methods opening, delta, done, add, finish, whole), and where it differs its own
`respond` (a whole answer), `ending` (what ends a stream), `error_event`, `keepalive` and
`content_type`. The relay, the stream loop, the metrics and cancel-on-disconnect stay these.
"""

from __future__ import annotations

from gateways.http import sse
from gateways.http.answers import Choice
from gateways.http.errors import ApiError
from gateways.http.openai_schema import Parsed, parse_chat, parse_completion
from gateways.http.relay import RelayHandler
from gateways.http.treeview import resolve_model


class CompletionsHandler(RelayHandler):
    """POST /v1/completions."""

    shape_class = sse.CompletionShape
    choice_class = Choice
    keepalive = sse.KEEPALIVE  # what a quiet stream sends every --keepalive seconds (b"": none)
    content_type = "text/event-stream; charset=utf-8"

    def parse(self, body) -> Parsed:
        return parse_completion(body)

    def answers(self, parsed: Parsed, model: str) -> list:
        shape = self.shape_class(model)
        return [self.choice_class(i, shape, r, parsed.echo[i], parsed.logprobs)
                for i, r in enumerate(parsed.requests)]

    async def respond(self, answers: list, parsed: Parsed) -> None:
        """The whole answer, once every choice ended."""
        self.write_json(self.whole(answers, parsed))

    def whole(self, answers: list, parsed: Parsed) -> dict:
        return answers[0].shape.whole([c.whole() for c in answers], *usage(answers, parsed.n))

    async def ending(self, answers: list, parsed: Parsed, completed: bool) -> bytes:
        """What ends a stream: the usage chunk (when asked and every choice ended), [DONE]."""
        if completed and parsed.include_usage:
            return sse.event(answers[0].shape.usage_chunk(*usage(answers, parsed.n))) + sse.DONE
        return sse.DONE

    def error_event(self, error: ApiError, answers: list) -> bytes:
        """An error after the stream started: OpenAI's error object as one more event."""
        return sse.event(error.body())

    async def post(self) -> None:
        await self.relay(self.parse(self.read_json()))

    async def relay(self, parsed: Parsed) -> None:
        """Run a parsed request in the tree and answer it, streamed or whole."""
        if parsed.ignored:
            self.gw.metrics.ignored_fields.inc(parsed.ignored)
        answers = self.answers(parsed, await self.route(parsed))
        await self.open_streams(parsed.requests, parsed.timeout)
        if parsed.stream:
            await self.stream_events(answers, parsed)
        else:
            await self.collect(answers)
            if not self.client_gone:
                await self.respond(answers, parsed)

    async def route(self, parsed: Parsed) -> str:
        """The model's name as the client asked for it (404/503 when no node serves it)."""
        model, route = await resolve_model(self.gw.tree, parsed.model, self.gw.cfg.served_names)
        for request in parsed.requests:
            if route is not None:
                request["model"] = route  # a --served-model-name runs on the tree's model
        return model

    async def collect(self, answers: list) -> None:
        """Every answer whole; an "error" event raises ApiError."""
        while self.open:
            index, ev = await self.next_event(None)
            if ev.kind == "delta":
                self.delta(index, ev)
                answers[index].add(ev)
            elif ev.kind == "done":
                self.finished(index, ev)
                answers[index].finish(ev)
            elif ev.kind == "error":
                self.cancel_all()
                raise self.failed(ev, max(index, 0))

    async def stream_events(self, answers: list, parsed: Parsed) -> None:
        started = completed = False
        while self.open:
            got = await self.next_event(self.gw.cfg.keepalive)
            if not started:
                if got is not None and got[1].kind == "error":
                    self.cancel_all()
                    raise self.failed(got[1], max(got[0], 0))  # nothing sent yet: a real status
                self.open_sse(answers)
                started = True
            if got is None:
                self.write(self.keepalive)
                await self.send()
                continue
            index, ev = got
            if ev.kind == "delta":
                self.delta(index, ev)
                events = answers[index].delta(ev)
                if events and not self.client_gone:
                    self.write(b"".join(events))
                    if self.idle():  # coalesce what is already queued
                        await self.send()
            elif ev.kind == "done":
                self.finished(index, ev)
                self.write(b"".join(answers[index].done(ev)))
            elif ev.kind == "error":
                self.cancel_all()
                self.write(self.error_event(self.failed(ev, max(index, 0)), answers))
                break
        else:
            completed = True
        end = await self.ending(answers, parsed, completed)  # a dialect may store the answer
        if not self.client_gone:
            self.write(end)
            await self.send()

    def idle(self) -> bool:
        queue = self.merged if self.merged is not None else self.stream.queue
        return queue.empty()

    def open_sse(self, answers: list) -> None:
        """Commit to 200 and SSE: at the first delta, or when the first keep-alive is due."""
        self.set_header("Content-Type", self.content_type)
        self.set_header("Cache-Control", "no-cache")
        self.set_header("X-Accel-Buffering", "no")  # tell proxies not to buffer the stream
        self.write(b"".join(e for a in answers for e in a.opening()))


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

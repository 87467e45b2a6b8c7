"""One choice of an OpenAI response, built from its stream of tree events (no I/O).

`Choice` takes the events of one request in the tree (`broker.client.Event`: deltas, then done)
and gives back what to send: streamed, the SSE events for each delta (`delta`) and for the end
(`done`); whole, the choice object (`whole`). It adds what the tree does not know:

- logprobs in OpenAI's two shapes, from the tree's entries [token, logprob, [[alt, logprob]...]]:
  chat `{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`, completions
  `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`;
- `echo` (completions): the prompt before the answer; for token-id prompts its text comes with
  the prompt's logprobs, a first delta with no tokens;
- tool calls (`gateways.tools.ToolCalls`), with finish_reason "tool_calls";
- no empty deltas: a token that adds no text (the end of the answer) sends nothing.
"""

from __future__ import annotations

from broker.client import Event
from gateways import tools
from gateways.http import sse


def chat_logprobs(entries: list) -> list[dict]:
    return [{"token": text, "logprob": logprob, "bytes": list(text.encode()),
             "top_logprobs": [{"token": alt, "logprob": value, "bytes": list(alt.encode())}
                              for alt, value in top]}
            for text, logprob, top in entries]


def completion_logprobs(entries: list, offset: int) -> dict:
    out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for text, logprob, top in entries:
        out["tokens"].append(text)
        out["token_logprobs"].append(logprob)
        # vLLM's: with logprobs 0 (no alternatives) a position still names the sampled token
        out["top_logprobs"].append((dict(top) or {text: logprob}) if logprob is not None else None)
        out["text_offset"].append(offset)
        offset += len(text)
    return out


class Answer:
    """What every dialect's answer keeps from its request's final event (`done`): why it ended
    and its token counts (the base of `Choice` and of anthropic_answer.Message)."""

    reason: str | None = None
    prompt_tokens = completion_tokens = cached_tokens = 0

    def finish(self, ev: Event) -> None:
        self.reason = ev.finish_reason or "stop"
        self.prompt_tokens, self.completion_tokens = ev.prompt_tokens, ev.completion_tokens
        self.cached_tokens = ev.cached_tokens


class Choice(Answer):
    def __init__(self, index: int, shape: sse.Shape, request: dict, echo: str | None = None,
                 logprobs: bool = False):
        self.index = index
        self.shape = shape
        self.chat = isinstance(shape, sse.ChatShape)
        mode, name = tools.mode_of(request) if self.chat else (None, None)
        self.tools = tools.ToolCalls(mode, name) if mode else None
        self.echo = echo  # None: no echo; "" with token-id prompts: its text comes from the tree
        self.wants_prompt = "prompt_logprobs" in request
        self.logprobs = logprobs
        self.parts: list[str] = [echo] if echo else []
        self.length = len(echo or "")  # characters of text so far (completions' text_offset)
        self.entries: list = []  # every token's logprobs entry, prompt's first (echo)

    # --- streamed ------------------------------------------------------------------------------

    def delta(self, ev: Event) -> list[bytes]:
        """The SSE events for one delta of this choice (often none, or one)."""
        if self.wants_prompt and ev.tokens == 0 and ev.logprobs is not None:
            return self._prompt(ev.logprobs)
        entries = ev.logprobs if self.logprobs else None
        if self.tools is not None:
            text, calls = self.tools.feed(ev.text)
            return self.render(text, calls, entries)
        self.parts.append(ev.text)
        return self.render(ev.text, [], entries)

    def done(self, ev: Event) -> list[bytes]:
        """The events that end this choice: what tool parsing held back, then finish_reason."""
        self.finish(ev)
        out = []
        if self.tools is not None:
            out = self.render(*self.tools.finish(), None)
            if self.tools.calls and self.reason == "stop":
                self.reason = "tool_calls"
        return out + self.closing()

    def closing(self) -> list[bytes]:
        """The last event of this choice, which carries its finish_reason."""
        return [sse.event(self.shape.closing(self.reason, self.index))]

    def render(self, text: str, calls: list[dict], entries: list | None) -> list[bytes]:
        out = []
        if calls and text:
            out.append(sse.event(self.shape.chunk(text, index=self.index)))
            text = ""
        if not (text or calls or entries):
            return out
        if entries:
            self.entries.extend(entries)
        if calls:
            logprobs = self._logprobs(entries) if entries else None
            out.append(sse.event(self.shape.chunk({"tool_calls": calls}, index=self.index,
                                                  logprobs=logprobs)))
        elif entries:
            out.append(sse.event(self.shape.chunk(text, index=self.index,
                                                  logprobs=self._logprobs(entries))))
        else:
            out.append(self.shape.delta_event(text, self.index))
        self.length += len(text)
        return out

    def _prompt(self, entries: list) -> list[bytes]:
        """The prompt's own entries (echo): its text, when the tree had to supply it."""
        self.wants_prompt = False
        text = "".join(e[0] for e in entries) if self.echo == "" else ""
        if text:
            self.parts.append(text)
        offset, self.length = self.length - len(self.echo or ""), self.length + len(text)
        self.entries.extend(entries)
        if not self.logprobs:
            return [sse.event(self.shape.chunk(text, index=self.index))] if text else []
        chunk = self.shape.chunk(text, index=self.index,
                                 logprobs=completion_logprobs(entries, offset))
        return [sse.event(chunk)]

    def opening(self) -> list[bytes]:
        """What a stream sends for this choice before any text: the role, and an echo."""
        first = self.shape.opening(self.index)
        out = [sse.event(first)] if first is not None else []
        if self.echo:
            out.append(sse.event(self.shape.chunk(self.echo, index=self.index)))
        return out

    def _logprobs(self, entries: list) -> dict:
        if self.chat:
            return {"content": chat_logprobs(entries), "refusal": None}
        return completion_logprobs(entries, self.length)

    # --- whole ---------------------------------------------------------------------------------

    def add(self, ev: Event) -> None:
        """Collect one delta of a whole (not streamed) answer."""
        if self.wants_prompt and ev.tokens == 0 and ev.logprobs is not None:
            self.wants_prompt = False
            if self.echo == "":
                self.parts.append("".join(e[0] for e in ev.logprobs))
            self.entries[:0] = ev.logprobs
            return
        self.parts.append(ev.text)
        if self.logprobs and ev.logprobs:
            self.entries.extend(ev.logprobs)

    def whole(self) -> dict:
        text = "".join(self.parts)
        logprobs = None
        if self.logprobs:
            logprobs = ({"content": chat_logprobs(self.entries), "refusal": None} if self.chat
                        else completion_logprobs(self.entries, 0))
        calls = None
        if self.tools is not None:
            text, calls = tools.parse(self.tools.mode, self.tools.name, text)
            if calls and self.reason == "stop":
                self.reason = "tool_calls"
        return self.shape.choice(self.index, text, self.reason, logprobs, calls)

    @property
    def called(self) -> bool:
        return self.tools is not None and bool(self.tools.calls)

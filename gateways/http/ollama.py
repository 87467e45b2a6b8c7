"""Ollama's native API: `POST /api/chat` and `POST /api/generate`, streamed as NDJSON.

A translation at the edge, as for the Responses API: the body becomes a chat-completions body
(`options` to our sampling fields, `format` to `response_format`, Ollama's tool calls in the
history to OpenAI's), read by the chat path's parser (`openai_schema.parse_chat`, or
`parse_completion` for a `raw` generate) and run by the chat handler's `relay` (API keys, limits,
metrics, cancel on disconnect). The answer is one JSON object per line, streamed by default:

    {"model": M, "created_at": T, "message": {"role": "assistant", "content": "Hel"}, "done": false}
    {"model": M, "created_at": T, "message": {"role": "assistant", "content": "",
     "tool_calls": [{"function": {"name": F, "arguments": {...}}}]}, "done": false}
    {"model": M, "created_at": T, "message": {...}, "done": true, "done_reason": "stop",
     "total_duration": ns, "load_duration": 0, "prompt_eval_count": N, "prompt_eval_duration": ns,
     "eval_count": N, "eval_duration": ns}

(`/api/generate` says `"response": "Hel"` instead of a message.) `stream: false` sends the last
object alone, with the whole answer. Errors are Ollama's `{"error": "..."}`, before the stream
with an HTTP status, inside it as one more line. A request with no messages (or an empty prompt)
is Ollama's way to load a model: it is answered at once with `"done_reason": "load"`.

The model info endpoints (`/api/tags`, `/api/show`, `/api/ps`, `/api/version`, `/api/embed`) are
in ollama_info.py.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import orjson

from gateways.http.answers import Choice
from gateways.http.completions import ChatCompletionsHandler
from gateways.http.errors import ApiError, bad_request
from gateways.http.openai_schema import Parsed, parse_chat, parse_completion
from gateways.http.treeview import resolve_model

# options -> our field (same meaning, same value)
OPTIONS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "seed": "seed", "stop": "stop", "repeat_penalty": "repetition_penalty",
           "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
           "ignore_eos": "ignore_eos"}  # the last: treechat's own (benchmarks)
# options that only say how to load or run the model: nothing to do here
LOAD_OPTIONS = {"num_keep", "num_batch", "num_gpu", "main_gpu", "low_vram", "vocab_only",
                "use_mmap", "use_mlock", "num_thread", "numa", "f16_kv", "logits_all",
                "embedding_only", "penalize_newline", "repeat_last_n"}
# options that change the answer unless at their neutral value, which we accept
NEUTRAL = {"typical_p": 1.0, "tfs_z": 1.0, "mirostat": 0}
MIROSTAT = {"mirostat_tau", "mirostat_eta"}  # only read with mirostat on
COMMON = {"model", "format", "options", "stream", "keep_alive", "think", "images", "logprobs",
          "top_logprobs"}
CHAT_FIELDS = COMMON | {"messages", "tools"}
GENERATE_FIELDS = COMMON | {"prompt", "suffix", "system", "template", "raw", "context"}


def common(body: Any, known: set[str]) -> tuple[dict, dict]:
    """(the body without nulls, the chat-completions fields every dialect call shares)."""
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}
    for name in sorted(body):
        if name not in known:
            raise bad_request(name, f"unknown field '{name}'", code="unknown_field")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise bad_request("model", "model is required")
    if body.get("images"):
        raise bad_request("images", "images are not supported: this model reads text only")
    if body.get("think") not in (None, False):
        raise bad_request("think", f"\"{body['model']}\" does not support thinking")
    for name in ("logprobs", "top_logprobs"):
        if body.get(name):
            raise bad_request(name, f"'{name}' is not supported by this server's Ollama API "
                                    "(/v1/chat/completions has logprobs)")
    stream = body.get("stream", True)
    if not isinstance(stream, bool):
        raise bad_request("stream", "'stream' must be true or false")
    chat = {"model": model_name(body["model"]), "stream": stream, **options_of(body)}
    fmt = body.get("format", "")
    if fmt == "json":
        chat["response_format"] = {"type": "json_object"}
    elif isinstance(fmt, dict):
        chat["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "response", "schema": fmt}}
    elif fmt != "":
        raise bad_request("format", "'format' must be \"json\" or a JSON schema")
    return body, chat


def model_name(name: str) -> str:
    """Ollama's names carry a tag; ours are served as `name` or `name:latest`."""
    return name.removesuffix(":latest")


def options_of(body: dict) -> dict:
    options = body.get("options", {})
    if not isinstance(options, dict):
        raise bad_request("options", "'options' must be an object")
    out = {}
    for name, value in options.items():
        if value is None or name in LOAD_OPTIONS or name == "num_ctx" or \
                (name in MIROSTAT and not options.get("mirostat")):
            continue
        if name in OPTIONS:
            out[OPTIONS[name]] = value
        elif name == "num_predict":
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad_request("options.num_predict", "'num_predict' must be an integer")
            if value >= 0:  # -1: no limit, -2: fill the context (ours stops there too)
                out["max_tokens"] = max(value, 1)
        elif name in NEUTRAL:
            if value != NEUTRAL[name]:
                raise bad_request(f"options.{name}", f"'{name}' is not supported by this "
                                  f"server; it accepts only {NEUTRAL[name]} here")
        else:
            raise bad_request(f"options.{name}", f"unknown option '{name}'",
                              code="unknown_field")
    return out


def chat_request(body: Any) -> tuple[dict, dict]:
    body, chat = common(body, CHAT_FIELDS)
    if "tools" in body:
        chat["tools"] = body["tools"]
    chat["messages"] = messages_of(body.get("messages", []))
    return body, chat


def messages_of(messages: Any) -> list:
    """Ollama's messages as OpenAI's: tool calls get ids (Ollama's have none), and each tool
    result answers the first call still open of its `tool_name` (else the first open one)."""
    if not isinstance(messages, list):
        raise bad_request("messages", "'messages' must be a list")
    out, waiting = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"messages[{i}]", "each message must be an object")
        if m.get("images"):
            raise bad_request(f"messages[{i}].images",
                              "images are not supported: this model reads text only")
        message = {"role": m.get("role"), "content": m.get("content", "")}
        if m.get("tool_calls"):
            message["tool_calls"] = waiting = calls_of(m["tool_calls"], i)
        if m.get("role") == "tool":
            named = [c for c in waiting if c["function"]["name"] == m.get("tool_name")]
            answered = (named or waiting or [{"id": f"call_{i}"}])[0]
            waiting = [c for c in waiting if c is not answered]
            message["tool_call_id"] = answered["id"]
        out.append(message)
    return out


def calls_of(calls: Any, i: int) -> list:
    if not isinstance(calls, list):
        raise bad_request(f"messages[{i}].tool_calls", "'tool_calls' must be a list")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict):
            raise bad_request(f"messages[{i}].tool_calls[{j}]",
                              "each tool call needs a 'function' with 'name' and 'arguments'")
        arguments = fn.get("arguments", {})
        if not isinstance(arguments, str):
            arguments = orjson.dumps(arguments).decode()
        out.append({"id": call.get("id") or f"call_{i}_{j}", "type": "function",
                    "function": {"name": fn.get("name"), "arguments": arguments}})
    return out


def generate_request(body: Any) -> tuple[dict, dict]:
    body, chat = common(body, GENERATE_FIELDS)
    for name in ("suffix", "template", "context"):
        if body.get(name):
            raise bad_request(name, f"'{name}' is not supported by this server")
    prompt, system = body.get("prompt", ""), body.get("system")
    if not isinstance(prompt, str) or not isinstance(system or "", str):
        raise bad_request("prompt", "'prompt' and 'system' must be strings")
    if body.get("raw"):
        chat["prompt"] = prompt
    else:
        chat["messages"] = ([{"role": "system", "content": system}] if system else []) + \
            ([{"role": "user", "content": prompt}] if prompt else [])
    return body, chat


def stamp(t: float) -> str:
    """Ollama's `created_at` for the time `t` (seconds since the epoch), in UTC."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat().replace("+00:00", "Z")


def tool_calls(calls: list[dict]) -> list[dict]:
    """OpenAI's tool calls as Ollama's: arguments an object, not a string."""
    out = []
    for call in calls:
        try:
            arguments = orjson.loads(call["function"]["arguments"])
        except orjson.JSONDecodeError:
            arguments = {}
        out.append({"function": {"name": call["function"]["name"], "arguments": arguments}})
    return out


class ChatOutput(Choice):
    """One answer as Ollama's NDJSON lines (see the module's docstring)."""

    key = "message"

    def __init__(self, index, shape, request, echo=None, logprobs=False):
        super().__init__(index, shape, request)
        self.started = time.perf_counter()
        self.first: float | None = None  # when the first text arrived: prompt eval ends
        self.second, self.time = self.clock(time.time())
        self.head = b'{"model":' + orjson.dumps(shape.model) + b',"created_at":' + \
            orjson.dumps(self.time) + b',"' + self.key.encode() + b'":'

    @staticmethod
    def clock(t: float) -> tuple[int, str]:
        return int(t), stamp(t)

    def created_at(self) -> str:
        """The time for a line: the request's own while its second lasts (a line per token
        formats no date), then the current one."""
        t = time.time()
        if int(t) != self.second:
            self.second, self.time = self.clock(t)
        return self.time

    def opening(self) -> list[bytes]:
        return []

    def line(self, fields: dict, done: bool = False) -> bytes:
        obj = {"model": self.shape.model, "created_at": self.created_at(),
               self.key: self.value(fields), "done": done}
        return orjson.dumps(obj) + b"\n"

    def value(self, fields: dict):
        return {"role": "assistant", "content": fields.get("content", ""),
                **({"tool_calls": fields["tool_calls"]} if fields.get("tool_calls") else {})}

    def add(self, ev) -> None:
        self.first = self.first or time.perf_counter()
        super().add(ev)

    def render(self, text: str, calls: list[dict], entries: list | None) -> list[bytes]:
        self.first = self.first or time.perf_counter()
        out = []
        if text:  # the hot path: one line per delta, framed around the text's JSON string
            out.append(self.head + self.piece(text) + b',"done":false}\n')
        if calls:
            out.append(self.line({"tool_calls": tool_calls(calls)}))
        return out

    def piece(self, text: str) -> bytes:
        return b'{"role":"assistant","content":' + orjson.dumps(text) + b"}"

    def closing(self) -> list[bytes]:
        return [orjson.dumps(self.final({})) + b"\n"]

    def final(self, fields: dict) -> dict:
        """The last object: the answer's end (with `fields`: the whole answer) and its counts."""
        end = time.perf_counter()
        first = self.first or end
        reason = "length" if self.reason == "length" else "stop"
        return {"model": self.shape.model, "created_at": self.created_at(),
                self.key: self.value(fields), "done": True, "done_reason": reason,
                "total_duration": int((end - self.started) * 1e9), "load_duration": 0,
                "prompt_eval_count": self.prompt_tokens,
                "prompt_eval_duration": int((first - self.started) * 1e9),
                "eval_count": self.completion_tokens, "eval_duration": int((end - first) * 1e9)}

    def answer(self) -> dict:
        """The whole answer (`stream: false`)."""
        message = self.whole()["message"]
        return self.final({"content": message["content"] or "",
                           "tool_calls": tool_calls(message.get("tool_calls") or [])})


class GenerateOutput(ChatOutput):
    key = "response"

    def value(self, fields: dict):
        return fields.get("content", "")

    def piece(self, text: str) -> bytes:
        return orjson.dumps(text)


class OllamaErrors:
    """Mixed into every Ollama handler: errors as `{"error": "..."}`, and a body of any
    Content-Type read as JSON (Ollama's server does; `curl -d` sends a form's type)."""

    json_only = False

    def error_body(self, error: ApiError) -> dict:
        return {"error": error.message}


class ChatHandler(OllamaErrors, ChatCompletionsHandler):
    """POST /api/chat."""

    choice_class = ChatOutput
    content_type = "application/x-ndjson"
    keepalive = b""  # NDJSON has no comments; the status waits for the first line

    def translate(self, body) -> tuple[dict, dict]:
        return chat_request(body)

    def parse(self, chat: dict) -> Parsed:
        return parse_chat(chat)

    async def post(self) -> None:
        body, chat = self.translate(self.read_json())
        if not chat.get("messages") and not chat.get("prompt"):
            return await self.load(chat)
        parsed = self.parse(chat)
        await self.check_context(body, chat["model"])
        await self.relay(parsed)

    async def load(self, chat: dict) -> None:
        """No messages: Ollama's "load the model" call, answered at once."""
        model, _ = await resolve_model(self.gw.tree, chat["model"], self.gw.cfg.served_names)
        output = self.choice_class(0, self.shape_class(model), {"messages": []})
        self.write_json({**output.final({}), "done_reason": "load"})

    async def check_context(self, body: dict, model: str) -> None:
        """`num_ctx` larger than the model's context is a 400 (a smaller one changes nothing)."""
        num_ctx = body.get("options", {}).get("num_ctx")
        if num_ctx is None:
            return
        if not isinstance(num_ctx, int) or isinstance(num_ctx, bool) or num_ctx < 1:
            raise bad_request("options.num_ctx", "'num_ctx' must be a positive integer")
        status = await self.gw.tree.recent(max_age=5.0)
        limits = [n.get("info", {}).get("max_model_len") for n in (status or {}).get("nodes", [])
                  if n.get("model") == model or model in self.gw.cfg.served_names]
        limit = max((x for x in limits if x), default=None)
        if limit is not None and num_ctx > limit:
            raise bad_request("options.num_ctx", f"num_ctx {num_ctx} is larger than the "
                              f"context of '{model}' ({limit} tokens)")

    async def respond(self, choices: list, parsed: Parsed) -> None:
        self.write_json(choices[0].answer())

    async def ending(self, choices: list, parsed: Parsed, completed: bool) -> bytes:
        return b""  # the last line (done: true) ended it

    def error_event(self, error: ApiError, choices: list) -> bytes:
        return orjson.dumps({"error": error.message}) + b"\n"


class GenerateHandler(ChatHandler):
    """POST /api/generate."""

    choice_class = GenerateOutput

    def translate(self, body) -> tuple[dict, dict]:
        return generate_request(body)

    def parse(self, chat: dict) -> Parsed:
        return parse_chat(chat) if "messages" in chat else parse_completion(chat)

"""Anthropic's Messages API: `POST /v1/messages` and `POST /v1/messages/count_tokens`.

A translation at the edge, nothing more: `parse_messages` turns an Anthropic body into the one
core request the chat-completions path builds (`openai_schema.one_request`), and
`MessagesHandler` is `ChatCompletionsHandler` with Anthropic's answer (`anthropic_answer.Message`),
error envelope and ping. The relay, the stream loop, API keys, limits, metrics and
cancel-on-disconnect are the chat path's own. What maps to what:

    system (string | text blocks)        a system message first
    text block                           the message's text (blocks joined by newlines)
    tool_use block (assistant)           tool_calls [{"id", "function": {"name", "arguments"}}]
    tool_result block (user)             a "tool" message answering tool_use_id
    tools [{"name", "input_schema"}]     tools [{"type": "function", "function": {..., parameters}}]
    tool_choice auto | any | tool | none auto | required | {"function": {"name"}} | none
    disable_parallel_tool_use            parallel_tool_calls: false
    stop_sequences, max_tokens, temperature, top_p, top_k, model: the same fields
    ignore_eos (treechat's extension, as on the chat path: benchmarks) the same field

    output_config.format (json_schema)   response_format json_schema: the answer follows it

    metadata.user_id                     session: the conversation the request continues (outranked
                                         by an X-Session-Id header; gateways/sessions.py)

`metadata`'s other fields, `service_tier`, `cache_control`, `speed`, `output_config.effort` and the
like change nothing here and are accepted; an image or document block, a server tool (or its
`container`), or extended `thinking` is a 400 saying so; any other top-level field is a 400 naming
it. Fields of a message or a block that Anthropic does not define (an `id`, ...) are dropped and
counted, as on the chat path; its own `cache_control` and `citations` are dropped silently.
`count_tokens` runs the prompt through the tree for one token and answers its `usage`'s prompt
tokens: the count comes from the node that would serve the request, with its own tokenizer and chat
template, tools included (the gateway holds none), and the prefix cache keeps the prefill for the
request that usually follows.

Errors use Anthropic's envelope `{"type": "error", "error": {"type", "message"}}`; a full tree is
529 `overloaded_error`, as Anthropic's API says when it is overloaded.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateways import sessions
from gateways.http.anthropic_answer import Message, sse_event
from gateways.http.completions import ChatCompletionsHandler
from gateways.http.errors import ApiError, bad_request
from gateways.http.openai_schema import Parsed, one_request

FIELDS = {"model", "messages", "max_tokens", "system", "stop_sequences", "temperature", "top_p",
          "top_k", "stream", "tools", "tool_choice", "thinking", "output_config", "output_format",
          "ignore_eos"}
# Anthropic's fields that change nothing here: billing, routing, caching and speed hints
IGNORED = {"metadata", "service_tier", "cache_control", "inference_geo", "speed",
           "user_profile_id", "workspace_id", "diagnostics"}
# A block's fields; Anthropic's `cache_control` and `citations` change nothing here (not counted)
BLOCK_FIELDS = {"text": {"type", "text", "cache_control", "citations"},
                "tool_use": {"type", "id", "name", "input", "cache_control"},
                "tool_result": {"type", "tool_use_id", "content", "is_error", "cache_control"}}
SKIPPED_BLOCKS = {"thinking", "redacted_thinking"}  # a replayed turn's reasoning: not the prompt
CHOICES = {"auto": "auto", "any": "required", "none": "none"}
RENAMED = {"stop": "stop_sequences"}  # core fields named otherwise here, for error messages

# HTTP status -> Anthropic's error type
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               503: "overloaded_error", 504: "timeout_error", 529: "overloaded_error"}
PING = sse_event("ping", {"type": "ping"})


def parse_messages(body: Any, *, counting: bool = False) -> Parsed:
    """An Anthropic body -> the core request (400 naming the field when it cannot be served).
    `counting` (count_tokens): no answer is wanted, so `max_tokens` is not required."""
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}  # null means absent
    unknown = sorted(body.keys() - FIELDS - IGNORED)
    if unknown:
        raise bad_request(unknown[0], f"unknown field '{unknown[0]}'", code="unknown_field")
    thinking = body.get("thinking", {"type": "disabled"})
    if not isinstance(thinking, dict) or thinking.get("type") != "disabled":
        raise bad_request("thinking", "extended thinking is not supported by this server's "
                                      "model; leave 'thinking' out")
    messages, ignored = _messages(body.get("system"), body.get("messages"))
    core: dict = {"messages": messages}
    for name in ("model", "temperature", "top_p", "top_k", "ignore_eos"):
        if name in body:
            core[name] = body[name]
    if counting:
        core["max_tokens"] = 1  # one token: the prompt's count comes back with it
    elif "max_tokens" not in body:
        raise bad_request("max_tokens", "'max_tokens' is required: the longest answer, in tokens")
    else:
        core["max_tokens"] = body["max_tokens"]
    stops = body.get("stop_sequences", [])
    if not isinstance(stops, list):
        raise bad_request("stop_sequences", "'stop_sequences' must be a list of strings")
    if stops and not counting:
        core["stop"] = stops
        core["logprobs"] = 0  # each token's text: which stop sequence ended it (Message.stopped)
    if "tools" in body:
        core["tools"] = _tools(body["tools"])
    if "tool_choice" in body:
        core.update(_tool_choice(body["tool_choice"]))
    session = _session(body.get("metadata"))
    if session is not None:
        core["session"] = session
    output = body.get("output_config", {})
    if not isinstance(output, dict):
        raise bad_request("output_config", "'output_config' must be an object")
    fmt = output.get("format") or body.get("output_format")  # the latter: the beta's name
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
            raise bad_request("output_config.format", "'format' must be {\"type\": "
                                                      "\"json_schema\", \"schema\": {...}}")
        core["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "output", "schema": fmt.get("schema")}}
    stream = body.get("stream", False)
    if counting and stream:
        raise bad_request("stream", "count_tokens does not stream")
    try:
        return one_request(core, stream, ignored)
    except ApiError as e:
        e.param = RENAMED.get(e.param, e.param)
        raise


def _messages(system: Any, messages: Any) -> tuple[list[dict], int]:
    """Anthropic's system and turns -> chat messages, and how many unknown fields were dropped."""
    out: list[dict] = []
    if system is not None:
        out.append({"role": "system", "content": _text(system, "system")})
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages", "'messages' must be a non-empty list")
    ignored = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise bad_request(f"{where}.role", "each message needs a 'role' of 'user' or "
                                               "'assistant', and 'content'")
        ignored += len(m.keys() - {"role", "content"})
        role, content = m["role"], m.get("content")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        if not isinstance(content, list):
            raise bad_request(f"{where}.content", "'content' must be a string or a list of "
                                                  "content blocks")
        texts, calls, results = [], [], []
        for j, block in enumerate(content):
            kind = block.get("type") if isinstance(block, dict) else None
            at = f"{where}.content[{j}]"
            if kind in SKIPPED_BLOCKS:
                continue
            if kind not in BLOCK_FIELDS:
                raise bad_request(at, _unsupported(kind))
            if kind != "text" and (kind == "tool_use") != (role == "assistant"):
                raise bad_request(at, f"a '{kind}' block belongs in "
                                      f"{'an assistant' if kind == 'tool_use' else 'a user'} turn")
            ignored += len(block.keys() - BLOCK_FIELDS[kind])
            if kind == "text":
                texts.append(_text([block], at))
            elif kind == "tool_use":
                calls.append(_call(block, at))
            else:
                results.append(_result(block, at))
        out.extend(results)  # tool results answer the assistant turn before this one
        if role == "assistant":
            out.append({"role": role, "content": "\n".join(texts) if texts or not calls else None,
                        **({"tool_calls": calls} if calls else {})})
        elif texts or not results:
            out.append({"role": role, "content": "\n".join(texts)})
    return out, ignored


def _session(metadata: Any) -> str | None:
    """`metadata.user_id`, Anthropic's name for who is asking, as the request's session."""
    user = metadata.get("user_id") if isinstance(metadata, dict) else None
    if user is not None and not isinstance(user, str):
        raise bad_request("metadata.user_id", "'user_id' must be a string")
    return sessions.named(user)


def _text(content: Any, where: str) -> str:
    """A string, or text blocks joined by newlines (a system prompt, a tool result, a block)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(b, dict) for b in content):
        for j, block in enumerate(content):
            if block.get("type") != "text":
                raise bad_request(f"{where}[{j}]", _unsupported(block.get("type")))
            if not isinstance(block.get("text"), str):
                raise bad_request(f"{where}[{j}].text", "a text block needs a string 'text'")
        return "\n".join(b["text"] for b in content)
    raise bad_request(where, "must be a string or a list of text blocks")


def _unsupported(kind: Any) -> str:
    if kind in ("image", "document"):
        return f"{kind} input is not supported: this server's model reads text only"
    return f"content blocks of type {kind!r} are not supported here (text, tool_use, tool_result)"


def _call(block: dict, where: str) -> dict:
    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
            or not isinstance(block.get("input", {}), dict):
        raise bad_request(where, "a tool_use block needs a string 'id' and 'name' and an object "
                                 "'input'")
    arguments = orjson.dumps(block.get("input", {})).decode()
    return {"id": block["id"], "type": "function",
            "function": {"name": block["name"], "arguments": arguments}}


def _result(block: dict, where: str) -> dict:
    if not isinstance(block.get("tool_use_id"), str):
        raise bad_request(f"{where}.tool_use_id", "a tool_result block needs the string "
                                                  "'tool_use_id' it answers")
    text = _text(block.get("content", ""), f"{where}.content")
    if block.get("is_error") is True:
        text = f"Error: {text}"
    return {"role": "tool", "tool_call_id": block["tool_use_id"], "content": text}


def _tools(tools: Any) -> list[dict]:
    if not isinstance(tools, list):
        raise bad_request("tools", "'tools' must be a list of tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad_request(f"tools[{i}]", "each tool is an object with 'name' and "
                                             "'input_schema'")
        kind = tool.get("type", "custom")
        if kind != "custom":
            raise bad_request(f"tools[{i}].type", f"the server tool {kind!r} is not available "
                                                  "here; define your own tools with 'name' and "
                                                  "'input_schema'")
        if not isinstance(tool.get("input_schema"), dict):
            raise bad_request(f"tools[{i}].input_schema", "'input_schema' must be a JSON schema "
                                                          "(an object)")
        fn = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if "description" in tool:
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any) -> dict:
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise bad_request("tool_choice.name", "tool_choice 'tool' needs the tool's 'name'")
        core: dict = {"tool_choice": {"type": "function", "function": {"name": choice["name"]}}}
    elif kind in CHOICES:
        core = {"tool_choice": CHOICES[kind]}
    else:
        raise bad_request("tool_choice", "'tool_choice' must be {\"type\": \"auto\"}, \"any\", "
                                         "\"none\", or \"tool\" with a \"name\"")
    if choice.get("disable_parallel_tool_use") is True:
        core["parallel_tool_calls"] = False
    return core


def error_body(exc: ApiError) -> dict:
    kind = ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else
                           "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": exc.message}}


class MessagesHandler(ChatCompletionsHandler):
    """POST /v1/messages: the chat path with Anthropic's request and answer."""

    keepalive = PING

    def parse(self, body) -> Parsed:
        return parse_messages(body)

    def answers(self, parsed: Parsed, model: str) -> list[Message]:
        return [Message(model, parsed.requests[0])]

    def whole(self, answers: list[Message], parsed: Parsed) -> dict:
        return answers[0].whole()

    async def ending(self, answers: list[Message], parsed: Parsed, completed: bool) -> bytes:
        return b""  # message_stop (or the error event) already ended it

    def error_event(self, error: ApiError, answers: list[Message]) -> bytes:
        return sse_event("error", error_body(error))

    def error_body(self, exc: ApiError) -> dict:
        if exc.code == "overloaded":
            self.set_status(529, "Overloaded")  # Anthropic's status for "overloaded"
        return error_body(exc)

    def write_error(self, status_code: int, **kwargs) -> None:
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, ApiError) and exc.param and exc.param not in exc.message:
            exc.message = f"{exc.param}: {exc.message}"  # Anthropic's messages name the field
        super().write_error(status_code, **kwargs)


class CountTokensHandler(MessagesHandler):
    """POST /v1/messages/count_tokens: {"input_tokens": N}, counted by the node that would serve
    the request (its tokenizer and chat template), for one generated token."""

    def parse(self, body) -> Parsed:
        return parse_messages(body, counting=True)

    def whole(self, answers: list[Message], parsed: Parsed) -> dict:
        return {"input_tokens": answers[0].prompt_tokens}

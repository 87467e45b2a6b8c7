"""OpenAI's Responses API: `POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`.

A translation at the edge. The body becomes a chat-completions body (`input` items to messages,
`instructions` to a system message first, `text.format` to `response_format`, function `tools`
to chat tools, `max_output_tokens` to `max_tokens`), read by the chat path's own parser
(`openai_schema.parse_chat`, so limits, tools and grammar-constrained formats are the same), run
by the chat handler (`completions.ChatCompletionsHandler.relay`: API keys, limits, metrics,
cancel on disconnect), and its answer rendered as a `response` (`response_objects.py`).

`store` (default true, as OpenAI) keeps the finished response, with the conversation it ends
(history, input, output as chat messages), in the root's store (`broker/store.py`, through
`RootClient.keep`): every gateway of the tree finds it, and a gateway's restart loses nothing.
`previous_response_id` puts that conversation before the new input; instructions are not carried
over, as in OpenAI's API.

The request's session (gateways/sessions.py), the conversation the tree sends home: an
`X-Session-Id` header, else `prompt_cache_key`, else `user`, else the chain's (what its first
response ran under, kept with every stored response), else, when the response is stored, its own
id: a chain that names nothing runs under its first response's id from the first turn on.

The field policy is the chat path's (docs/http-api.md): a field that changes nothing here is
accepted, one that would change the answer in a way we do not implement is a 400 naming it,
any other field is a 400 `unknown_field`. Items and content parts are read leniently: fields they
carry that we do not need (`id`, `status`, `annotations`) are ignored.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from gateways.http.base import ApiHandler
from gateways.http.completions import ChatCompletionsHandler
from gateways.http.errors import ApiError, bad_request, root_unreachable
from gateways.http.openai_schema import PASSED, Parsed, parse_chat
from gateways.http.response_objects import (ResponseOutput, ResponseShape, assistant_message,
                                            output_of, usage)
from gateways.http.sse import new_id

log = logging.getLogger("treechat.http")

# Used as they are by the chat parser (treechat's sampling extensions included)
CHAT_FIELDS = tuple(f for f in PASSED if f not in ("max_tokens", "response_format")) \
    + ("stream", "timeout", "parallel_tool_calls", "prompt_cache_key", "user")
OWN_FIELDS = {"input", "instructions", "tools", "tool_choice", "text", "max_output_tokens",
              "store", "previous_response_id", "metadata"}
IGNORED = {  # change nothing here -> what is accepted
    "safety_identifier": str, "service_tier": str,
    "truncation": str, "reasoning": dict, "stream_options": dict, "background": bool,
    "include": list, "top_logprobs": int,
}
# ignored only with these values (else the answer would differ): background runs, logprobs
HARMLESS = {"background": (False,), "top_logprobs": (0,)}
NO_LOGPROBS = "message.output_text.logprobs"
PARAMS = {"messages": "input", "max_tokens": "max_output_tokens", "response_format": "text.format"}


def translate(body: Any) -> tuple[dict, dict]:
    """(the chat-completions body, the fields the response echoes); raise ApiError(400)."""
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    body = {k: v for k, v in body.items() if v is not None}
    for name in sorted(body):
        if name in CHAT_FIELDS or name in OWN_FIELDS:
            continue
        if name not in IGNORED:
            raise bad_request(name, f"'{name}' is not supported by this server" if name in
                              ("conversation", "prompt", "max_tool_calls") else
                              f"unknown field '{name}'", code="unknown_field")
        if not isinstance(body[name], IGNORED[name]) or \
                (name in HARMLESS and body[name] not in HARMLESS[name]):
            raise bad_request(name, f"'{name}' is not supported by this server with this value")
    if NO_LOGPROBS in body.get("include", []):
        raise bad_request("include", f"'{NO_LOGPROBS}' is not supported by this server")
    chat = {k: body[k] for k in CHAT_FIELDS if k in body}
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad_request("instructions", "'instructions' must be a string")
    chat["messages"] = ([{"role": "system", "content": instructions}] if instructions else []) \
        + messages_of(body.get("input"))
    if "max_output_tokens" in body:
        chat["max_tokens"] = body["max_output_tokens"]
    if "tools" in body:
        chat["tools"] = tools_of(body["tools"])
    if "tool_choice" in body:
        chat["tool_choice"] = tool_choice_of(body["tool_choice"])
    text = body.get("text", {})
    if not isinstance(text, dict) or set(text) - {"format", "verbosity"}:
        raise bad_request("text", "'text' must be an object with 'format' (and 'verbosity')")
    fmt = text.get("format") or {"type": "text"}
    if not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        chat["response_format"] = format_of(fmt)
    metadata = body.get("metadata", {})
    if not isinstance(metadata, dict):
        raise bad_request("metadata", "'metadata' must be an object")
    store = body.get("store", True)
    if not isinstance(store, bool):
        raise bad_request("store", "'store' must be true or false")
    echo = {"instructions": instructions, "max_output_tokens": body.get("max_output_tokens"),
            "previous_response_id": body.get("previous_response_id"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "temperature": body.get("temperature"), "top_p": body.get("top_p"),
            "tools": body.get("tools", []), "tool_choice": body.get("tool_choice", "auto"),
            "text": {"format": fmt}, "store": store, "metadata": metadata,
            "truncation": body.get("truncation", "disabled"), "user": body.get("user"),
            "reasoning": {"effort": None, "summary": None}}
    return chat, echo


def messages_of(items: Any) -> list[dict]:
    """`input`: a string (one user message) or items: messages, function calls and outputs."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise bad_request("input", "'input' must be a string or a list of items")
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(where, "each input item must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            out.append({"role": item.get("role"), "content": content_of(item.get("content"),
                                                                         where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant" and \
                    (last.get("tool_calls") or last["content"] is not None):
                last.setdefault("tool_calls", []).append(call)  # one turn: text, then calls
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": item.get("call_id"),
                        "content": content_of(item.get("output"), f"{where}.output")})
        elif kind != "reasoning":  # none comes from this server; another's changes nothing
            raise bad_request(f"{where}.type", f"input items of type '{kind}' are not supported "
                              "here (messages, function_call and function_call_output are)")
    return out


def content_of(content: Any, where: str) -> Any:
    """A string, or text parts (input_text, output_text) joined; anything else is a 400."""
    if not isinstance(content, list):
        return content  # the chat parser names a wrong type
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "refusal":
            continue
        if kind not in ("input_text", "output_text", "text") or \
                not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.content[{j}]", "only text content parts are supported "
                              "(input_text, output_text): this model reads text only")
        texts.append(part["text"])
    return "\n".join(texts)


def tools_of(tools: Any) -> Any:
    if not isinstance(tools, list):
        raise bad_request("tools", "'tools' must be a list")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(f"tools[{i}].type", f"tools of type '{kind}' are not supported "
                              "here; only 'function' tools")
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                    if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out


def tool_choice_of(choice: Any) -> Any:
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise bad_request("tool_choice", "'tool_choice' must be 'auto', 'none', 'required' "
                                             "or {'type': 'function', 'name': ...}")
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def format_of(fmt: Any) -> dict:
    if not isinstance(fmt, dict) or fmt.get("type") not in ("json_object", "json_schema"):
        raise bad_request("text.format", "'text.format' must be {'type': 'text'}, "
                          "{'type': 'json_object'} or {'type': 'json_schema', 'schema': ...}")
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    schema = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
    return {"type": "json_schema", "json_schema": schema}


def parse(chat: dict) -> Parsed:
    """The chat parser's result, its errors naming this API's fields."""
    try:
        return parse_chat(chat)
    except ApiError as e:
        head, dot, rest = (e.param or "").partition(".")
        stem, bracket, index = head.partition("[")
        e.param = PARAMS.get(stem, stem) + bracket + index + dot + rest if e.param else None
        raise


async def kept(gw, op: str, key: str, value: dict | None = None) -> tuple[bool, dict | None]:
    """The root's store (`RootClient.keep`), its silence a 503."""
    if not gw.client.connected:
        raise root_unreachable()
    try:
        return await gw.client.keep(op, key, value)
    except TimeoutError:
        raise root_unreachable() from None


class ResponsesHandler(ChatCompletionsHandler):
    """POST /v1/responses."""

    choice_class = ResponseOutput

    async def post(self) -> None:
        chat, echo = translate(self.read_json())
        history: list[dict] = []
        chain = None  # the session of the chain this response continues
        previous = echo["previous_response_id"]
        if previous is not None:
            found, value = await kept(self.gw, "get", str(previous))
            if not found:
                raise ApiError(400, f"Previous response with id '{previous}' not found.",
                               code="previous_response_not_found", param="previous_response_id")
            history = value["messages"]
            chain = value.get("session", str(previous))  # kept before sessions: its own id
        system = chat["messages"][:1] if echo["instructions"] else []
        self.conversation = history + chat["messages"][len(system):]
        parsed = parse({**chat, "messages": system + self.conversation})
        self.echo = echo
        id_ = ResponseShape.ID_PREFIX + new_id()
        self.session = self.session_header() or parsed.requests[0].get("session") or chain \
            or (id_ if echo["store"] else None)
        if self.session is not None:
            parsed.requests[0]["session"] = self.session
        self.shape_class = functools.partial(ResponseShape, echo=echo, id_=id_)  # relay makes one
        await self.relay(parsed)

    async def respond(self, choices: list, parsed: Parsed) -> None:
        choice, shape = choices[0], choices[0].shape
        output = output_of(choice.whole())
        usage_ = usage(choice.prompt_tokens, choice.completion_tokens, choice.cached_tokens)
        response = shape.response("completed", output, usage_, choice.reason)
        await self.keep(response)
        self.write_json(response)

    async def ending(self, choices: list, parsed: Parsed, completed: bool) -> bytes:
        """response.completed (or .incomplete), no [DONE]; after an error, nothing more."""
        if not completed:
            return b""
        response = choices[0].final()
        await self.keep(response)
        kind = "response.completed" if response["status"] == "completed" else \
            "response.incomplete"
        return choices[0].event(kind, response=response)

    def error_event(self, error: ApiError, choices: list) -> bytes:
        return choices[0].failed({"code": error.code, "message": error.message})

    async def keep(self, response: dict) -> None:
        """Store the response (unless `store` is false). The answer goes out either way: a root
        that does not answer only costs the later `previous_response_id` its history."""
        if not self.echo["store"]:
            return
        messages = self.conversation + [assistant_message(response["output"])]
        try:
            await kept(self.gw, "put", response["id"], {"response": response,
                                                         "messages": messages,
                                                         "session": self.session})
        except ApiError as e:
            log.warning("response %s not stored: %s", response["id"], e.message)


class StoredResponseHandler(ApiHandler):
    """GET and DELETE /v1/responses/{id}: a stored response, from the root's store."""

    async def get(self, id_: str) -> None:
        found, value = await kept(self.gw, "get", id_)
        if not found:
            raise self.missing(id_)
        self.write_json(value["response"])

    async def delete(self, id_: str) -> None:
        found, _ = await kept(self.gw, "delete", id_)
        if not found:
            raise self.missing(id_)
        self.write_json({"id": id_, "object": "response", "deleted": True})

    @staticmethod
    def missing(id_: str) -> ApiError:
        return ApiError(404, f"Response with id '{id_}' not found.", code="not_found", param="id")

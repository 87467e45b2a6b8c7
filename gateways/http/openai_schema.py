"""Reading OpenAI request bodies into the tree's `Request` (no I/O; used by the API handlers).

`parse_chat(body)` and `parse_completion(body)` return a `Parsed`: the core request dict (already
validated by `broker.protocol.Request`, so a bad request never reaches the tree), whether to
stream, whether to add a usage chunk, and the per-request deadline. They raise `ApiError(400)`
naming the offending field.

Field policy (docs/http-api.md): the fields we implement are used; treechat's extensions are
`top_k`, `ignore_eos` and `timeout` (seconds); documented OpenAI fields we do not implement are
accepted only at their neutral value (`n: 1`, `logprobs: false`, `presence_penalty: 0`, `user`,
`metadata`, ...) so the official clients work unchanged, and refused otherwise; any other field
is refused. A field sent as `null` counts as absent, as in OpenAI's API.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable

from broker.protocol import BadRequest, Request
from gateways.http.errors import bad_request


@dataclass(slots=True)
class Parsed:
    request: dict  # the core request: messages | prompt, max_tokens, temperature, ...
    stream: bool
    include_usage: bool
    timeout: float | None
    model: str | None


def _always(_v: Any) -> bool:
    return True


def _is(value) -> Callable[[Any], bool]:
    return lambda v: v == value and type(v) is type(value)


def _zero(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0


# documented OpenAI fields we do not implement -> (is the value neutral?, what we accept)
NEUTRAL_COMMON: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (_is(1), "1"),
    "frequency_penalty": (_zero, "0"),
    "presence_penalty": (_zero, "0"),
    "logit_bias": (_is({}), "{}"),
    "user": (lambda v: isinstance(v, str), "any string (ignored)"),
}
NEUTRAL_CHAT = {
    **NEUTRAL_COMMON,
    "logprobs": (_is(False), "false"),
    "top_logprobs": (_zero, "0"),
    "store": (_is(False), "false"),
    "metadata": (lambda v: isinstance(v, dict), "any object (ignored)"),
    "parallel_tool_calls": (lambda v: isinstance(v, bool), "true or false (no tools here)"),
    "tools": (_is([]), "[]"),
    "tool_choice": (lambda v: v in ("none", "auto"), "'none' or 'auto'"),
    "functions": (_is([]), "[]"),
    "function_call": (lambda v: v in ("none", "auto"), "'none' or 'auto'"),
    "response_format": (_is({"type": "text"}), '{"type": "text"}'),
    "modalities": (_is(["text"]), '["text"]'),
    "service_tier": (lambda v: v in ("auto", "default"), "'auto' or 'default'"),
    "safety_identifier": (lambda v: isinstance(v, str), "any string (ignored)"),
    "prompt_cache_key": (lambda v: isinstance(v, str), "any string (ignored)"),
}
NEUTRAL_COMPLETION = {
    **NEUTRAL_COMMON,
    "best_of": (_is(1), "1"),
    "echo": (_is(False), "false"),
    "logprobs": (_zero, "0"),
    "suffix": (_is(""), '""'),
}

# OpenAI fields used as they are, plus treechat's extensions (top_k, ignore_eos)
PASSED = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "ignore_eos", "model")
CHAT_FIELDS = {"messages", "max_completion_tokens", "stream", "stream_options", "timeout", *PASSED}
COMPLETION_FIELDS = {"prompt", "stream", "stream_options", "timeout", *PASSED}
STREAM_OPTIONS = {"include_usage", "include_obfuscation"}
REQUEST_FIELDS = tuple(f.name for f in fields(Request))  # Request.to_dict's keys, in its order


def parse_chat(body: Any) -> Parsed:
    body = _object(body)
    _check_fields(body, CHAT_FIELDS, NEUTRAL_CHAT)
    core = {k: body[k] for k in PASSED if k in body}
    core["messages"] = _messages(body.get("messages"))
    limit = body.get("max_completion_tokens")
    if limit is not None:
        if "max_tokens" in core and core["max_tokens"] != limit:
            raise bad_request("max_completion_tokens",
                              "'max_tokens' and 'max_completion_tokens' disagree; send one of them")
        core["max_tokens"] = limit
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise bad_request("max_completion_tokens",
                              "'max_completion_tokens' must be a positive integer")
    return _finish(body, core)


def parse_completion(body: Any) -> Parsed:
    body = _object(body)
    _check_fields(body, COMPLETION_FIELDS, NEUTRAL_COMPLETION)
    core = {k: body[k] for k in PASSED if k in body}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a batch of one, as some clients send it
    if not isinstance(prompt, str):
        raise bad_request("prompt", "'prompt' must be a string (or a list holding one string)")
    core["prompt"] = prompt
    return _finish(body, core)


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    return {k: v for k, v in body.items() if v is not None}  # null means absent


def _check_fields(body: dict, known: set[str], neutral: dict) -> None:
    if "n" in body and body["n"] != 1:
        raise bad_request("n", "only n=1 is supported")
    for name in sorted(body):
        if name in known:
            continue
        if name in neutral:
            ok, accepted = neutral[name]
            if not ok(body[name]):
                raise bad_request(name, f"'{name}' is not supported by this server; "
                                        f"it accepts only {accepted} here")
            continue
        raise bad_request(name, f"unknown field '{name}'", code="unknown_field")


def _messages(messages: Any) -> Any:
    """Flatten OpenAI content parts ([{"type": "text", "text": ...}]) into one string."""
    if not isinstance(messages, list):
        return messages  # Request.validate names the problem
    out = []
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            texts = []
            for j, part in enumerate(m["content"]):
                if not isinstance(part, dict) or part.get("type") != "text" \
                        or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content[{j}]",
                                      "only text content parts are supported")
                texts.append(part["text"])
            m = {**m, "content": "\n".join(texts)}
        out.append(m)
    return out


def _finish(body: dict, core: dict) -> Parsed:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream", "'stream' must be true or false")
    options = body.get("stream_options", {})
    if not isinstance(options, dict):
        raise bad_request("stream_options", "'stream_options' must be an object")
    for key in options:
        if key not in STREAM_OPTIONS:
            raise bad_request(f"stream_options.{key}", f"unknown field 'stream_options.{key}'",
                              code="unknown_field")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise bad_request("stream_options.include_usage", "'include_usage' must be true or false")
    timeout = body.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= 86400):
        raise bad_request("timeout",
                          "'timeout' must be a number of seconds above 0 (at most 86400)")
    try:
        checked = Request.from_dict(core)
    except BadRequest as e:
        raise bad_request(e.param, e.message) from None
    # Request.to_dict without its deep copy (dataclasses.asdict): every value here was built
    # from this body alone, and the dict is only serialized, never changed.
    request = {name: value for name in REQUEST_FIELDS
               if (value := getattr(checked, name)) is not None}
    return Parsed(request=request, stream=stream, include_usage=stream and include_usage,
                  timeout=timeout, model=core.get("model"))

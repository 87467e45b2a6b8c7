"""Reading OpenAI request bodies into the tree's requests (no I/O; used by the API handlers).

`parse_chat(body)` and `parse_completion(body)` return a `Parsed`: one core request dict per
choice (validated by `broker.request.Request`, so a bad request never reaches the tree), and how
to answer (stream, usage chunk, deadline, echo, logprobs, tool calls). They raise `ApiError(400)`
naming the offending field.

`n` choices (and each prompt of a completions batch) are separate requests in the tree, each its
own sample: with a `seed`, choice i gets seed + i, so the whole response repeats.

`prompt_cache_key` and `user` (completions: `user`) name the conversation a request continues:
the first one given becomes each request's `session` (gateways/sessions.py; the HTTP handler's
`X-Session-Id` header outranks them).

The field policy (the table in docs/http-api.md): a field we implement is used; a documented
OpenAI field that changes nothing here (`store`, `metadata`, `service_tier`, ...) is accepted
and ignored; a documented field that would change the answer in a way we do not
implement (audio output, `suffix`, `best_of` above `n`, ...) is a 400 naming it; any other field
is a 400 `unknown_field`, at the top level and in `stream_options`. Inside messages and content
parts clients are sloppy (LiteLLM and Cline send `cache_control`, others replay an `id`): a field
no dialect defines there is dropped and counted (`Parsed.ignored`, the gateway's
`treechat:ignored_fields` metric). A field sent as `null` counts as absent, as in OpenAI's API.

`one_request(core, stream)` is how another dialect (gateways/http/anthropic.py) ends: its body
translated into one core request, validated like chat's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Callable

from broker.request import (MAX_LOGPROBS, MESSAGE_FIELDS, ROLE_FIELDS, SEED_RANGE, BadRequest,
                            Request)
from gateways import sessions
from gateways.http.errors import bad_request

MAX_CHOICES = 16  # n
MAX_REQUESTS = 64  # n x prompts in one body: each is a request in the tree


@dataclass(slots=True)
class Parsed:
    requests: list[dict]  # one core request per choice, in choice order
    stream: bool
    include_usage: bool
    timeout: float | None
    model: str | None
    n: int = 1  # choices per prompt (prompt i's choices are requests[i * n:(i + 1) * n])
    echo: list[str | None] = field(default_factory=list)  # per choice: the prompt text to echo
    logprobs: bool = False  # the answer carries logprobs
    ignored: int = 0  # fields inside messages and content parts that were dropped


def _always(_v: Any) -> bool:
    return True


def _is(*values) -> Callable[[Any], bool]:
    return lambda v: any(v == value and type(v) is type(value) for value in values)


def _string(v: Any) -> bool:
    return isinstance(v, str)


# Documented OpenAI fields that change nothing here -> (is the value harmless?, what we accept)
IGNORED_CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "store": (_always, "any value (nothing is stored)"),
    "metadata": (lambda v: isinstance(v, dict), "any object (ignored)"),
    "service_tier": (_string, "any string (one tier here)"),
    "safety_identifier": (_string, "any string (ignored)"),
    "reasoning_effort": (_string, "any string (no reasoning model here)"),
    "verbosity": (_string, "any string (ignored)"),
    "modalities": (_is(["text"]), '["text"]'),
    "prediction": (lambda v: isinstance(v, dict), "any object (a latency hint; ignored)"),
    "functions": (_is([]), "[] (use 'tools')"),
    "function_call": (_is("none", "auto"), "'none' or 'auto' (use 'tool_choice')"),
}
IGNORED_COMPLETION: dict[str, tuple[Callable[[Any], bool], str]] = {}
# The names of the conversation a request continues, the first one given winning
CHAT_SESSION = ("prompt_cache_key", "user")
COMPLETION_SESSION = ("user",)

# OpenAI fields used as they are, plus treechat's extensions (top_k, min_p, ignore_eos,
# repetition_penalty; `timeout` is the gateway's own)
PASSED = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "stop", "seed", "ignore_eos",
          "model", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias",
          "response_format")
COMMON_FIELDS = {"stream", "stream_options", "timeout", "n", *PASSED}
CHAT_FIELDS = {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools",
               "tool_choice", "parallel_tool_calls", *CHAT_SESSION, *COMMON_FIELDS}
COMPLETION_FIELDS = {"prompt", "echo", "logprobs", "best_of", "suffix", *COMPLETION_SESSION,
                     *COMMON_FIELDS}
STREAM_OPTIONS = {"include_usage", "include_obfuscation", "continuous_usage_stats"}
REQUEST_FIELDS = tuple(f.name for f in fields(Request))  # Request.to_dict's keys, in its order


def parse_chat(body: Any) -> Parsed:
    body = _object(body)
    if "audio" in body and body.get("modalities", ["text"]) == ["text"]:
        body.pop("audio")  # audio settings without audio output change nothing
    _check_fields(body, CHAT_FIELDS, IGNORED_CHAT)
    core = {k: body[k] for k in PASSED if k in body} | _session(body, CHAT_SESSION)
    core["messages"], ignored = _messages(body.get("messages"))
    limit = body.get("max_completion_tokens")
    if limit is not None:
        if "max_tokens" in core and core["max_tokens"] != limit:
            raise bad_request("max_completion_tokens",
                              "'max_tokens' and 'max_completion_tokens' disagree; send one of them")
        core["max_tokens"] = limit
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
            raise bad_request("max_completion_tokens",
                              "'max_completion_tokens' must be a positive integer")
    for name in ("tools", "tool_choice", "parallel_tool_calls"):
        if name in body:
            core[name] = body[name]
    wants = body.get("logprobs", False)
    if not isinstance(wants, bool):
        raise bad_request("logprobs", "'logprobs' must be true or false (and 'top_logprobs' "
                                      "the number of alternatives)")
    top = body.get("top_logprobs")
    if top == 0 and not wants and type(top) is int:
        top = None  # what some clients send by default: no logprobs asked
    if top is not None:
        if not wants:
            raise bad_request("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
            raise bad_request("top_logprobs", f"'top_logprobs' must be an integer from 0 to "
                                              f"{MAX_LOGPROBS}")
        core["logprobs"] = top
    elif wants:
        core["logprobs"] = 0
    n = _choices(body)
    parsed = _finish(body, [core], n, [None], wants)
    parsed.ignored = ignored
    return parsed


def one_request(core: dict, stream: bool, ignored: int = 0) -> Parsed:
    """A core request another dialect translated its body into, validated as chat's are."""
    parsed = _finish({"stream": stream}, [core], 1, [None], False)
    parsed.ignored = ignored
    return parsed


def parse_completion(body: Any) -> Parsed:
    body = _object(body)
    _check_fields(body, COMPLETION_FIELDS, IGNORED_COMPLETION)
    if body.get("suffix", "") != "":
        raise bad_request("suffix", "'suffix' (insertion) is not supported by this server")
    n = _choices(body)
    best_of = body.get("best_of", n)
    if best_of != n:
        raise bad_request("best_of", "'best_of' must equal 'n' here (each choice is its own "
                                     "sample; none is discarded)")
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise bad_request("echo", "'echo' must be true or false")
    base = {k: body[k] for k in PASSED if k in body} | _session(body, COMPLETION_SESSION)
    logprobs = body.get("logprobs")
    if logprobs is not None:
        if isinstance(logprobs, bool) or not isinstance(logprobs, int) \
                or not 0 <= logprobs <= MAX_LOGPROBS:
            raise bad_request("logprobs", f"'logprobs' must be an integer from 0 to "
                                          f"{MAX_LOGPROBS} (alternatives per token)")
        base["logprobs"] = logprobs
    cores, texts = [], []
    for prompt in _prompts(body.get("prompt")):
        core = {**base, "prompt": prompt}
        if echo and (logprobs is not None or not isinstance(prompt, str)):
            core["prompt_logprobs"] = logprobs or 0  # the prompt's tokens come back with text
        cores.append(core)
        texts.append(prompt if echo and isinstance(prompt, str) else ("" if echo else None))
    return _finish(body, cores, n, texts, logprobs is not None)


def _prompts(prompt: Any) -> list:
    """OpenAI's four prompt forms: a string, a list of strings, token ids, lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and p for p in prompt):
            return list(prompt)
    raise bad_request("prompt", "'prompt' must be a string, a list of strings, a list of token "
                                "ids or a list of such lists")


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise bad_request(None, "the request body must be a JSON object")
    return {k: v for k, v in body.items() if v is not None}  # null means absent


def _check_fields(body: dict, known: set[str], ignored: dict) -> None:
    for name in sorted(body):
        if name in known:
            continue
        if name in ignored:
            ok, accepted = ignored[name]
            if not ok(body[name]):
                raise bad_request(name, f"'{name}' is not supported by this server; "
                                        f"it accepts only {accepted} here")
            continue
        if name == "audio":
            raise bad_request(name, "audio output is not supported by this server")
        raise bad_request(name, f"unknown field '{name}'", code="unknown_field")


def _session(body: dict, names: tuple[str, ...]) -> dict:
    """{"session": ...} from the first of `names` the body gives, or {} (gateways/sessions.py)."""
    for name in names:
        if not isinstance(body.get(name, ""), str):
            raise bad_request(name, f"'{name}' must be a string")
    session = sessions.named(*(body.get(name) for name in names))
    return {"session": session} if session else {}


def _choices(body: dict) -> int:
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise bad_request("n", f"'n' must be an integer from 1 to {MAX_CHOICES}")
    return n


def _messages(messages: Any) -> tuple[Any, int]:
    """Flatten OpenAI content parts ([{"type": "text", "text": ...}]) into one string, and drop
    the fields no dialect defines in a message or a part: (messages, how many were dropped)."""
    if not isinstance(messages, list):
        return messages, 0  # Request.validate names the problem
    out, ignored = [], 0
    for i, m in enumerate(messages):
        if isinstance(m, dict) and isinstance(m.get("role"), str):
            known = MESSAGE_FIELDS | ROLE_FIELDS.get(m["role"], set())
            ignored += len(m.keys() - known)
            m = {k: v for k, v in m.items() if k in known}
        if isinstance(m, dict) and isinstance(m.get("content"), list):
            texts = []
            for j, part in enumerate(m["content"]):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "refusal" and m.get("role") == "assistant":
                    continue  # a replayed refusal changes nothing
                if kind != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content[{j}]",
                                      "only text content parts are supported")
                ignored += len(part) - 2  # cache_control, annotations, ...
                texts.append(part["text"])
            m = {**m, "content": "\n".join(texts)}
        out.append(m)
    return out, ignored


def _finish(body: dict, cores: list[dict], n: int, echo: list, logprobs: bool) -> Parsed:
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream", "'stream' must be true or false")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise bad_request("stream_options", "'stream_options' is only allowed with 'stream': true")
    options = options or {}
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
    if len(cores) * n > MAX_REQUESTS:
        raise bad_request("n", f"at most {MAX_REQUESTS} choices in all (prompts x n) per request")
    requests, texts = [], []
    for core, text in zip(cores, echo):
        checked = _checked(core)
        for i in range(n):
            request = dict(checked)
            if n > 1 and "seed" in request:
                request["seed"] = _derived_seed(request["seed"], i)
            requests.append(request)
            texts.append(text)
    return Parsed(requests=requests, stream=stream, include_usage=stream and include_usage,
                  timeout=timeout, model=cores[0].get("model"), n=n, echo=texts,
                  logprobs=logprobs)


def _checked(core: dict) -> dict:
    try:
        checked = Request.from_dict(core)
    except BadRequest as e:
        raise bad_request(e.param, e.message, code=e.kind) from None
    # Request.to_dict without its deep copy (dataclasses.asdict): every value here was built
    # from this body alone, and the dict is only serialized, never changed.
    return {name: value for name in REQUEST_FIELDS if (value := getattr(checked, name)) is not None}


def _derived_seed(seed: int, i: int) -> int:
    """Choice i's seed: seed + i, wrapped into OpenAI's signed 64-bit range."""
    lo, hi = SEED_RANGE
    return (seed + i - lo) % (hi - lo + 1) + lo

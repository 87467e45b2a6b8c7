"""`Request`: what a client asks the tree to generate, validated once at the gateway.

No I/O. Every gateway builds a `Request` from its client's fields with `Request.from_dict`, which
raises `BadRequest(param, message)` naming the offending field; the dict it forwards
(`to_dict`) rides in `broker.protocol.Submit` and `Dispatch`, and nodes rebuild it with
`strict=False` (a newer gateway may have appended fields). Fields are only ever appended.

A chat history may replay tool use as OpenAI's API sends it:

    {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}

The same rule holds at every level: a field we do not know is refused, naming it (a message's own
fields included), and a documented field that changes nothing here (a message's `name`,
`refusal`, ...) is accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

SAMPLING_LIMITS = {"temperature": (0.0, 2.0), "top_p": (0.0, 1.0), "min_p": (0.0, 1.0),
                   "presence_penalty": (-2.0, 2.0), "frequency_penalty": (-2.0, 2.0),
                   "repetition_penalty": (0.01, 10.0)}
MAX_LOGPROBS = 20
MAX_SESSION = 256  # characters of a session name
SEED_RANGE = (-2**63, 2**63 - 1)  # OpenAI's: a signed 64-bit integer
# Any role a chat template may render (ipython, function, observation, ...) passes: the node's
# template decides, and one it cannot render is a 400 from there (nodes/engine/prompt.py).
ROLE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,31}$")
# A message's fields, per role; `name`, `refusal`, `audio`, `function_call` change nothing here.
MESSAGE_FIELDS = {"role", "content", "name"}
ROLE_FIELDS = {"assistant": {"tool_calls", "refusal", "audio", "function_call", "reasoning_content"},
               "tool": {"tool_call_id"}}
FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule for function names
RESPONSE_FORMATS = ("text", "json_object", "json_schema")


class BadRequest(ValueError):
    """A request field a client must fix. `kind` is "unknown_field" for a field we do not know,
    else "invalid_value" (gateways show it as the error's code)."""

    def __init__(self, param: str | None, message: str, kind: str = "invalid_value"):
        super().__init__(message)
        self.param = param
        self.message = message
        self.kind = kind


@dataclass(slots=True)
class Request:
    """What to generate: a chat (`messages`) or a plain `prompt`, and how to sample it.

    Validated once, at the gateway, by `Request.from_dict`; nodes trust what the root forwards.
    """

    messages: list[dict] | None = None
    prompt: str | list[int] | None = None  # text, or token ids
    max_tokens: int | None = None  # None: until a stop condition or the model's context is full
    temperature: float | None = None  # None: the model's own default (see the hf engine)
    top_p: float | None = None
    top_k: int = 0  # 0: no top-k filter
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False
    model: str | None = None
    # Penalties and filters, applied per row on the device (nodes/engine/sampling.py). None means
    # "not set": no penalty, no filter.
    presence_penalty: float | None = None  # OpenAI: -2..2, once per token seen in the answer
    frequency_penalty: float | None = None  # OpenAI: -2..2, per occurrence in the answer
    repetition_penalty: float | None = None  # vLLM/HF: > 0, divides (multiplies) seen tokens' logits
    min_p: float | None = None  # 0..1: drop tokens below min_p x the top token's probability
    logit_bias: dict | None = None  # {"token id": bias in -100..100}
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the k likeliest (0..20)
    prompt_logprobs: int | None = None  # the same for every prompt token (completions' echo)
    response_format: dict | None = None  # {"type": "json_object"} or {"type": "json_schema", ...}
    tools: list | None = None  # OpenAI tool definitions, rendered by the chat template
    tool_choice: str | dict | None = None  # "auto" | "none" | "required" | {"type": "function", ...}
    parallel_tool_calls: bool | None = None  # False: at most one call (None: OpenAI's true)
    # The conversation this request continues, named by its client (OpenAI's `user` or
    # `prompt_cache_key`, an `X-Session-Id` header, a TCP or page conversation): the tree sends it
    # where the conversation's earlier turns ran, so their cached prefix is reused.
    session: str | None = None

    FIELDS: ClassVar[frozenset[str]] = frozenset(
        ["messages", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed",
         "ignore_eos", "model", "presence_penalty", "frequency_penalty", "repetition_penalty",
         "min_p", "logit_bias", "logprobs", "prompt_logprobs", "response_format", "tools",
         "tool_choice", "parallel_tool_calls", "session"])

    @classmethod
    def from_dict(cls, data: dict, *, strict: bool = True) -> "Request":
        """Build and validate a request; raise `BadRequest(param, message)` naming the field.
        `strict=False` (nodes) ignores fields it does not know, at every level."""
        if not isinstance(data, dict):
            raise BadRequest(None, "the request must be a JSON object")
        if strict:
            unknown = sorted(set(data) - cls.FIELDS)
            if unknown:
                raise BadRequest(unknown[0], f"unknown field '{unknown[0]}'", "unknown_field")
        values = {k: v for k, v in data.items() if k in cls.FIELDS and v is not None}
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        req = cls(**values)
        req.validate(strict)
        return req

    def validate(self, strict: bool = True) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise BadRequest("messages", "give exactly one of 'messages' or 'prompt'")
        if self.messages is not None:
            check_messages(self.messages, strict)
        if self.prompt is not None:
            check_prompt(self.prompt)
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise BadRequest("max_tokens", "'max_tokens' must be a positive integer")
        for name, (lo, hi) in SAMPLING_LIMITS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise BadRequest(name, f"'{name}' must be a number between {lo} and {hi}")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise BadRequest("top_k", "'top_k' must be a non-negative integer (0 turns it off)")
        if not isinstance(self.stop, list) or len(self.stop) > 16 or \
                not all(isinstance(s, str) and s for s in self.stop):
            raise BadRequest("stop", "'stop' must be a non-empty string or a list of up to 16 of them")
        if self.seed is not None and not (_is_int(self.seed)
                                          and SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]):
            raise BadRequest("seed", "'seed' must be an integer from -2**63 to 2**63-1")
        for name in ("ignore_eos", "parallel_tool_calls"):
            if not isinstance(getattr(self, name), (bool, type(None))):
                raise BadRequest(name, f"'{name}' must be true or false")
        if self.model is not None and not isinstance(self.model, str):
            raise BadRequest("model", "'model' must be a string")
        if self.session is not None and not (isinstance(self.session, str)
                                             and 0 < len(self.session) <= MAX_SESSION):
            raise BadRequest("session", f"'session' must be a string of 1 to {MAX_SESSION} "
                             "characters")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise BadRequest(name, f"'{name}' must be an integer from 0 to {MAX_LOGPROBS}")
        if self.logit_bias is not None:
            check_logit_bias(self.logit_bias)
        if self.response_format is not None:
            check_response_format(self.response_format)
        if self.tools is not None:
            check_tools(self.tools)
        if self.tool_choice is not None:
            check_tool_choice(self.tool_choice, self.tools)

    def to_dict(self) -> dict:
        """The set fields, shallow (no deep copy: the request is read, never mutated)."""
        return {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}

    def last_user_text(self) -> str:
        if self.prompt is not None:
            return self.prompt if isinstance(self.prompt, str) else " ".join(map(str, self.prompt))
        texts = [m.get("content") or "" for m in self.messages if m["role"] == "user"]
        return texts[-1] if texts else self.messages[-1].get("content") or ""

    def json_schema(self) -> dict | None:
        """The JSON schema the answer must follow (response_format), or None for free text."""
        fmt = self.response_format or {}
        if fmt.get("type") == "json_object":
            return {"type": "object"}
        if fmt.get("type") == "json_schema":
            return fmt["json_schema"].get("schema") or {"type": "object"}
        return None

    def forced_tools(self) -> list[dict] | None:
        """The functions a tool call must be made to (`tool_choice` required or named), or None
        when the model may answer in text."""
        if not self.tools or self.tool_choice in (None, "auto", "none"):
            return None
        functions = [t["function"] for t in self.tools]
        if isinstance(self.tool_choice, dict):
            name = self.tool_choice["function"]["name"]
            return [f for f in functions if f["name"] == name]
        return functions

    def tools_offered(self) -> list[dict] | None:
        """The tools the prompt should describe (none when tool_choice is "none")."""
        return None if self.tool_choice == "none" else self.tools or None


# --- the parts ----------------------------------------------------------------------------------

def check_messages(messages: Any, strict: bool) -> None:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages", "'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(where, "each message needs a string 'role' and a string 'content'")
        role = m["role"]
        if not ROLE.match(role):
            raise BadRequest(f"{where}.role", f"'{role[:40]}' is not a role name (a letter, then "
                             "up to 31 letters, digits, '_' or '-')")
        if strict:
            unknown = sorted(set(m) - MESSAGE_FIELDS - ROLE_FIELDS.get(role, set()))
            if unknown:
                raise BadRequest(f"{where}.{unknown[0]}", f"unknown field '{where}.{unknown[0]}'"
                                 f" in a {role} message", "unknown_field")
        calls = m.get("tool_calls")
        content = m.get("content")
        if role == "assistant" and calls:
            check_tool_calls(calls, f"{where}.tool_calls")
            if content is not None and not isinstance(content, str):
                raise BadRequest(f"{where}.content", "'content' must be a string or null")
        elif not isinstance(content, str):
            raise BadRequest(where, "each message needs a string 'role' and a string 'content'"
                             + (" (or 'tool_calls' with null content)" if role == "assistant"
                                else ""))
        if role == "tool" and not isinstance(m.get("tool_call_id"), str):
            raise BadRequest(f"{where}.tool_call_id",
                             "a tool message needs the string 'tool_call_id' it answers")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise BadRequest(f"{where}.name", "'name' must be a string")


def check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise BadRequest(where, "'tool_calls' must be a list")
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                or not isinstance(fn.get("arguments"), str) \
                or call.get("type", "function") != "function":
            raise BadRequest(f"{where}[{j}]", "each tool call needs 'type': 'function' and a "
                                              "'function' with a string 'name' and 'arguments'")


def check_prompt(prompt: Any) -> None:
    if isinstance(prompt, str):
        return
    if isinstance(prompt, list) and prompt and all(_is_int(t) and t >= 0 for t in prompt):
        return
    raise BadRequest("prompt", "'prompt' must be a string or a non-empty list of token ids")


def check_logit_bias(bias: Any) -> None:
    if not isinstance(bias, dict) or len(bias) > 1024:
        raise BadRequest("logit_bias", "'logit_bias' must be an object of at most 1024 token ids")
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isdigit()) or isinstance(value, bool) \
                or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise BadRequest("logit_bias", "'logit_bias' maps token ids (as strings) to numbers "
                                           "between -100 and 100")


def check_response_format(fmt: Any) -> None:
    if not isinstance(fmt, dict) or fmt.get("type") not in RESPONSE_FORMATS:
        raise BadRequest("response_format", "'response_format' must be an object whose 'type' is "
                                            "one of " + ", ".join(RESPONSE_FORMATS))
    if fmt["type"] != "json_schema":
        return
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise BadRequest("response_format.json_schema",
                         "'json_schema' must be an object with a 'name' and a 'schema'")
    if not isinstance(spec.get("schema", {}), dict):
        raise BadRequest("response_format.json_schema.schema", "'schema' must be a JSON schema "
                                                               "(an object)")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise BadRequest("response_format.json_schema.strict", "'strict' must be true or false")


def check_tools(tools: Any) -> None:
    if not isinstance(tools, list) or len(tools) > 128:
        raise BadRequest("tools", "'tools' must be a list of at most 128 tools")
    names = set()
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function":
            raise BadRequest(f"tools[{i}]", "each tool must be {\"type\": \"function\", "
                                            "\"function\": {\"name\": ..., \"parameters\": ...}}")
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.match(name):
            raise BadRequest(f"tools[{i}].function.name", "a function 'name' is 1 to 64 letters, "
                                                          "digits, '_', '.' or '-'")
        if name in names:
            raise BadRequest(f"tools[{i}].function.name", f"two tools are named '{name}'")
        names.add(name)
        if not isinstance(fn.get("parameters", {}), dict):
            raise BadRequest(f"tools[{i}].function.parameters",
                             "'parameters' must be a JSON schema (an object)")
        if not isinstance(fn.get("description", ""), str):
            raise BadRequest(f"tools[{i}].function.description", "'description' must be a string")


def check_tool_choice(choice: Any, tools: list | None) -> None:
    if choice in ("none", "auto"):
        return
    if choice == "required":
        if not tools:
            raise BadRequest("tool_choice", "tool_choice 'required' needs 'tools'")
        return
    fn = choice.get("function") if isinstance(choice, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or choice.get("type") != "function":
        raise BadRequest("tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or "
                                        "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    if name not in {t["function"]["name"] for t in tools or []}:
        raise BadRequest("tool_choice", f"tool_choice names the function '{name}', which is not "
                                        "in 'tools'")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

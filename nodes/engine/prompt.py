"""Chat prompts for the hf engine: the model's chat template, tools included.

Runs inside a node, on its event loop (`HFEngine.submit` -> `tokenize`). A template that knows
tools (it mentions `tools`, as Qwen's, Llama 3.1's, Hermes' and Mistral's do) gets them as
`apply_chat_template(tools=...)`, and a replayed assistant tool call as a `tool_calls` entry
whose `arguments` is the parsed object (what those templates expect). A template that does not
(SmolLM2's) gets the Hermes/Qwen 2.5 convention written into the messages instead:

    system:     the tools as JSON lines inside <tools></tools>, and how to call one:
                <tool_call>{"name": ..., "arguments": {...}}</tool_call>
    assistant:  its tool calls as <tool_call> blocks after its text
    tool:       a user message holding <tool_response>...</tool_response>

which `gateways/tools.py` reads back from the answer. A template that fails on the messages
(roles out of the order it wants, ...) is the client's error: `TemplateError` -> 400.
"""

from __future__ import annotations

import orjson

TOOLS_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:
<tool_call>
{{"name": <function-name>, "arguments": <args-json-object>}}
</tool_call>"""


class TemplateError(ValueError):
    """The chat template cannot render these messages."""


def render(tokenizer, template: str, messages: list[dict], tools: list | None) -> str:
    """The prompt text for `messages` (and `tools`), ending where the assistant's answer starts."""
    native = bool(tools) and "tools" in template
    if native:
        messages, kwargs = [_native(m) for m in messages], {"tools": tools}
    else:
        messages, kwargs = _written_out(messages, tools), {}
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=True, **kwargs)
    except Exception as e:  # jinja2's TemplateError, a raise_exception() in the template, ...
        raise TemplateError(f"the model's chat template cannot render these messages: {e}") \
            from None


def _native(m: dict) -> dict:
    """A message as tool-aware templates read it: call arguments as objects, content a string."""
    if not m.get("tool_calls"):
        return m
    calls = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"])}}
             for c in m["tool_calls"]]
    return {**m, "content": m.get("content") or "", "tool_calls": calls}


def _arguments(fn: dict):
    try:
        return orjson.loads(fn["arguments"])
    except orjson.JSONDecodeError:
        return fn["arguments"]  # passed on as the client wrote it


def _written_out(messages: list[dict], tools: list | None) -> list[dict]:
    """Messages for a template that knows nothing of tools: everything as plain text."""
    out = []
    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            out.append({"role": "user",
                        "content": f"<tool_response>\n{content}\n</tool_response>"})
        elif m.get("tool_calls"):
            blocks = [call_block(c["function"]["name"], _arguments(c["function"]))
                      for c in m["tool_calls"]]
            out.append({"role": role, "content": "\n".join(([content] if content else []) + blocks)})
        else:
            out.append({"role": role, "content": content})
    if tools:
        listing = "\n".join(orjson.dumps(t).decode() for t in tools)
        prompt = TOOLS_PROMPT.format(tools=listing)
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + prompt}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def call_block(name: str, arguments) -> str:
    body = orjson.dumps({"name": name, "arguments": arguments}).decode()
    return f"<tool_call>\n{body}\n</tool_call>"

"""Built-in chat templates, for models whose tokenizer carries none (many GGUF files, base models).

The hf engine uses one when there is no `--chat-template FILE` and the tokenizer has no template
of its own, as llama.cpp falls back to a family's known format. `pick` chooses by the config's
model_type and by which turn markers the vocabulary holds, in this order:

    Gemma     model_type gemma*, or <start_of_turn> and <end_of_turn> in the vocabulary:
              <start_of_turn>user ... <end_of_turn> / <start_of_turn>model, the system message
              folded into the first user turn (Gemma's own template does so)
    Llama 3   <|start_header_id|>, <|end_header_id|> and <|eot_id|> in the vocabulary
    ChatML    model_type qwen*, or <|im_start|> and <|im_end|> in the vocabulary (SmolLM, Qwen,
              Hermes, ...): <|im_start|>role ... <|im_end|>; tools in Qwen 2.5's format
    Phi-3     model_type phi3, or <|user|>, <|assistant|> and <|end|>: <|user|> ... <|end|>
    Mistral   model_type mistral / mixtral, or [INST] in the vocabulary: [INST] ... [/INST]
    Llama 2   model_type llama (none of the above): [INST] <<SYS>> ... <</SYS>> ... [/INST]

and none for anything else (the engine then asks for --chat-template, as before).

Tools (prompt.py): a template that mentions tools gets them natively, one that does not gets them
written into its messages in the Hermes `<tool_call>` convention, which the gateways read back.
ChatML renders them itself (Qwen 2.5's and Qwen 3's trained format, the same convention); the
others never name them and so take the written-out path. Every role the API accepts renders:
developer as system, tool (written out) as user.

`choose` is the engine's whole choice (a --chat-template file, else the tokenizer's own, else
`pick`'s), which the HTTP gateway's /tokenize makes too (gateways/http/tokens.py).

`end_ids` gives the end-of-turn tokens a template writes (Gemma's <end_of_turn>, ChatML's
<|im_end|>, ...): they stop generation like EOS, or a model whose EOS is another token talks on
past its turn (llama.cpp treats them the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Family:
    name: str
    template: str
    end: str  # the token that ends a turn: it must stop generation


# Jinja, as transformers renders it (apply_chat_template): `bos_token` and `eos_token` are the
# tokenizer's; the prompt is tokenized without adding special tokens, so a template writes BOS
# itself where its family wants one. `bos_token or ''`: a tokenizer may have none (Qwen).

GEMMA = Family("Gemma", r"""{{- bos_token or '' -}}
{%- if messages and messages[0].role in ('system', 'developer') -%}
  {%- set first_user_prefix = (messages[0].content or '') + '\n\n' -%}
  {%- set loop_messages = messages[1:] -%}
{%- else -%}
  {%- set first_user_prefix = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
{%- if not loop_messages and first_user_prefix -%}
  {{- '<start_of_turn>user\n' + (messages[0].content or '') | trim + '<end_of_turn>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
  {%- set role = 'model' if message.role == 'assistant' else 'user' -%}
  {{- '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') -}}
  {{- (message.content or '') | trim + '<end_of_turn>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<start_of_turn>model\n' -}}
{%- endif -%}
""", "<end_of_turn>")

CHATML = Family("ChatML", r"""{%- if tools -%}
  {{- '<|im_start|>system\n' -}}
  {%- if messages and messages[0].role in ('system', 'developer') -%}
    {{- (messages[0].content or '') + '\n\n' -}}
  {%- endif -%}
  {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' -}}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
  {%- for tool in tools -%}
    {{- '\n' + (tool | tojson) -}}
  {%- endfor -%}
  {{- '\n</tools>\n\nFor each function call, return a json object with function name and ' -}}
  {{- 'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n' -}}
  {{- '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
  {%- if loop.first and tools and message.role in ('system', 'developer') -%}
  {%- elif message.role == 'tool' -%}
    {%- if loop.first or loop.previtem.role != 'tool' -%}
      {{- '<|im_start|>user' -}}
    {%- endif -%}
    {{- '\n<tool_response>\n' + (message.content or '') + '\n</tool_response>' -}}
    {%- if loop.last or loop.nextitem.role != 'tool' -%}
      {{- '<|im_end|>\n' -}}
    {%- endif -%}
  {%- else -%}
    {%- set role = message.role if message.role in ('system', 'assistant') else
                   ('system' if message.role == 'developer' else 'user') -%}
    {{- '<|im_start|>' + role -}}
    {%- if message.content or not message.tool_calls -%}
      {{- '\n' + (message.content or '') -}}
    {%- endif -%}
    {%- for call in message.tool_calls or [] -%}
      {%- set fn = call.function if call.function is defined else call -%}
      {{- '\n<tool_call>\n{"name": "' + fn.name + '", "arguments": ' -}}
      {{- fn.arguments if fn.arguments is string else fn.arguments | tojson -}}
      {{- '}\n</tool_call>' -}}
    {%- endfor -%}
    {{- '<|im_end|>\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
""", "<|im_end|>")

LLAMA3 = Family("Llama 3", r"""{{- bos_token or '' -}}
{%- for message in messages -%}
  {%- set role = message.role if message.role in ('system', 'assistant') else
                 ('system' if message.role == 'developer' else 'user') -%}
  {{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' -}}
  {{- (message.content or '') | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- endif -%}
""", "<|eot_id|>")

PHI3 = Family("Phi-3", r"""{%- for message in messages -%}
  {%- set role = message.role if message.role in ('system', 'assistant') else
                 ('system' if message.role == 'developer' else 'user') -%}
  {{- '<|' + role + '|>\n' + (message.content or '') + '<|end|>\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|assistant|>\n' -}}
{%- endif -%}
""", "<|end|>")

# Llama 2 and Mistral: the system message joins the first user turn (Llama 2 inside <<SYS>>);
# a conversation of a system message alone is that message as the user's turn.
_SYSTEM_FIRST = r"""
{%- if messages and messages[0].role in ('system', 'developer') -%}
  {%- set system = messages[0].content or '' -%}
  {%- set loop_messages = messages[1:] or [{'role': 'user', 'content': ''}] -%}
{%- else -%}
  {%- set system = '' -%}
  {%- set loop_messages = messages -%}
{%- endif -%}
"""

LLAMA2 = Family("Llama 2", _SYSTEM_FIRST + r"""
{%- for message in loop_messages -%}
  {%- if message.role == 'assistant' -%}
    {{- ' ' + (message.content or '') | trim + ' ' + (eos_token or '') -}}
  {%- else -%}
    {%- set content = (message.content or '') | trim -%}
    {%- if loop.first and system -%}
      {%- set content = '<<SYS>>\n' + system + '\n<</SYS>>\n\n' + content -%}
    {%- endif -%}
    {{- (bos_token or '') + '[INST] ' + content + ' [/INST]' -}}
  {%- endif -%}
{%- endfor -%}
""", "</s>")

MISTRAL = Family("Mistral", "{{- bos_token or '' -}}" + _SYSTEM_FIRST + r"""
{%- for message in loop_messages -%}
  {%- if message.role == 'assistant' -%}
    {{- ' ' + (message.content or '') | trim + (eos_token or '') -}}
  {%- else -%}
    {%- set content = (message.content or '') | trim -%}
    {%- if loop.first and system -%}
      {%- set content = system + '\n\n' + content -%}
    {%- endif -%}
    {{- '[INST] ' + content + '[/INST]' -}}
  {%- endif -%}
{%- endfor -%}
""", "</s>")

FAMILIES = (GEMMA, LLAMA3, CHATML, PHI3, MISTRAL, LLAMA2)

# Turn markers that end a turn wherever a template writes them (llama.cpp's end-of-generation
# tokens): each stops generation when the vocabulary holds it.
END_MARKERS = ("<end_of_turn>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>")


def token_id(tokenizer, text: str) -> int | None:
    """The id of the single token `text`, or None when the vocabulary has no such token."""
    tid = tokenizer.convert_tokens_to_ids(text)
    if not isinstance(tid, int) or (tid == tokenizer.unk_token_id and text != tokenizer.unk_token):
        return None
    return tid


def _has(tokenizer, *texts: str) -> bool:
    return all(token_id(tokenizer, t) is not None for t in texts)


def model_types(config) -> list[str]:
    """The config's model_type, and its text model's (a multimodal Gemma 3: gemma3, gemma3_text)."""
    types = [getattr(config, "model_type", None)]
    if hasattr(config, "get_text_config"):
        types.append(getattr(config.get_text_config(), "model_type", None))
    return [t.lower() for t in types if isinstance(t, str) and t]


def pick(config, tokenizer) -> tuple[Family, str] | None:
    """(the family's template, why it was picked), or None when nothing fits."""
    types = model_types(config)
    kind = types[0] if types else "unknown"

    def typed(*prefixes: str) -> bool:
        return any(t.startswith(p) for t in types for p in prefixes)

    if typed("gemma"):
        return GEMMA, f"model_type {kind}"
    if _has(tokenizer, "<start_of_turn>", "<end_of_turn>"):
        return GEMMA, "the vocabulary has <start_of_turn> and <end_of_turn>"
    if _has(tokenizer, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
        return LLAMA3, "the vocabulary has <|start_header_id|> and <|eot_id|>"
    if typed("qwen"):
        return CHATML, f"model_type {kind}"
    if _has(tokenizer, "<|im_start|>", "<|im_end|>"):
        return CHATML, "the vocabulary has <|im_start|> and <|im_end|>"
    if typed("phi3"):
        return PHI3, f"model_type {kind}"
    if _has(tokenizer, "<|user|>", "<|assistant|>", "<|end|>"):
        return PHI3, "the vocabulary has <|user|>, <|assistant|> and <|end|>"
    if typed("mistral", "mixtral", "ministral"):
        return MISTRAL, f"model_type {kind}"
    if _has(tokenizer, "[INST]", "[/INST]"):
        return MISTRAL, "the vocabulary has [INST] and [/INST]"
    if typed("llama"):
        return LLAMA2, f"model_type {kind} without Llama 3's or ChatML's turn markers"
    return None


def choose(file: str | None, config, tokenizer) -> tuple[str | None, tuple[Family, str] | None]:
    """(the chat template a model runs with, `pick`'s (family, why) when it came from there):
    --chat-template's `file`; else None, which means the tokenizer's own; else, when the
    tokenizer has none, its family's built-in one (None still when no family fits)."""
    if file:
        return Path(file).read_text(), None
    if tokenizer.chat_template:
        return None, None
    picked = pick(config, tokenizer)
    return (picked[0].template if picked else None), picked


def end_ids(template, tokenizer) -> frozenset[int]:
    """The ids of the end-of-turn markers `template` writes (a dict: named templates)."""
    text = " ".join(template.values()) if isinstance(template, dict) else (template or "")
    ids = (token_id(tokenizer, m) for m in END_MARKERS if m in text)
    return frozenset(i for i in ids if i is not None)

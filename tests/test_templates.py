"""Built-in chat templates (nodes/engine/templates.py) and the name a model is served under.

A tokenizer without a chat template gets its family's: picked by model_type and by the turn
markers its vocabulary holds; every family renders a chat with a system message, tool calls and
tool answers; on the tiny model, a ChatML vocabulary gets ChatML and a Gemma vocabulary Gemma's
turns (the system message folded into the first user turn), and the template's end-of-turn token
stops generation. A GGUF file is named by its stem, a folder by its name.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest

from broker.protocol import Request
from nodes.engine import models, prompt, templates
from nodes.engine.base import EngineRequest
from nodes.engine.hf import HFEngine, HFEngineConfig

pytestmark = pytest.mark.timeout(120)

SYSTEM_CHAT = [{"role": "system", "content": "You answer in one word."},
               {"role": "user", "content": "Capital of France?"}]
TOOLS = [{"type": "function", "function": {
    "name": "weather", "description": "Today's weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
TOOL_CHAT = SYSTEM_CHAT + [
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": "windy"},
    {"role": "developer", "content": "Be brief."}]


class Vocab:
    """Just enough of a tokenizer for `pick`: which tokens exist."""

    unk_token, unk_token_id = "<unk>", 0

    def __init__(self, *tokens: str):
        self.ids = {t: i for i, t in enumerate(("<unk>",) + tokens)}

    def convert_tokens_to_ids(self, text: str) -> int:
        return self.ids.get(text, 0)


def config(model_type: str):
    from transformers import AutoConfig
    return AutoConfig.for_model(model_type)


@pytest.mark.parametrize("model_type, vocab, family", [
    ("gemma3_text", (), templates.GEMMA),
    ("llama", ("<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>"), templates.GEMMA),
    ("llama", ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), templates.LLAMA3),
    ("qwen3", (), templates.CHATML),
    ("qwen2", ("<|im_start|>", "<|im_end|>"), templates.CHATML),
    ("llama", ("<|im_start|>", "<|im_end|>"), templates.CHATML),  # SmolLM2: a Llama, ChatML
    ("gpt2", ("<|im_start|>", "<|im_end|>"), templates.CHATML),  # the generic fallback
    ("phi3", ("<|user|>", "<|assistant|>", "<|end|>"), templates.PHI3),
    ("mistral", (), templates.MISTRAL),
    ("llama", ("[INST]", "[/INST]"), templates.MISTRAL),  # Mistral v0.3 converted as a llama
    ("llama", ("<s>", "</s>"), templates.LLAMA2),
])
def test_the_family_is_picked_by_model_type_and_vocabulary(model_type, vocab, family):
    picked, why = templates.pick(config(model_type), Vocab(*vocab))
    assert picked is family and why


def test_nothing_fits_an_unknown_family():
    assert templates.pick(config("gpt2"), Vocab("<|endoftext|>")) is None


def test_choose_takes_the_file_then_the_tokenizers_own_then_the_familys(tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    vocab = Vocab("<|im_start|>", "<|im_end|>")
    vocab.chat_template = None
    assert templates.choose(str(template), config("llama"), vocab) == ("{{ messages }}", None)
    chosen, (family, why) = templates.choose(None, config("llama"), vocab)
    assert chosen == templates.CHATML.template and family is templates.CHATML and why
    bare = Vocab("<|endoftext|>")
    bare.chat_template = None
    assert templates.choose(None, config("gpt2"), bare) == (None, None)  # nothing fits
    vocab.chat_template = "{{ own }}"  # the tokenizer's own: None, as the engine keeps it
    assert templates.choose(None, config("llama"), vocab) == (None, None)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_no_template):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model_no_template)
    assert tok.chat_template is None
    return tok


@pytest.mark.parametrize("family", templates.FAMILIES, ids=lambda f: f.name)
def test_every_family_renders_system_tools_calls_and_answers(tokenizer, family):
    text = prompt.render(tokenizer, family.template, TOOL_CHAT, TOOLS)
    for part in ("You answer in one word.", "Capital of France?", "<tools>", '"weather"',
                 "<tool_call>", "Paris", "18 C, sunny", "windy", "Be brief."):
        assert part in text, (part, text)
    assert text.count("You answer in one word.") == 1
    assert prompt.render(tokenizer, family.template, SYSTEM_CHAT[1:], None).count(
        "Capital of France?") == 1
    alone = prompt.render(tokenizer, family.template, SYSTEM_CHAT[:1], None)
    assert "You answer in one word." in alone  # a system message alone is not lost
    if family.end != "</s>":
        assert family.end in text


def test_chatml_renders_tools_natively_in_qwens_format(tokenizer):
    assert "tools" in templates.CHATML.template  # prompt.render passes them to the template
    text = prompt.render(tokenizer, templates.CHATML.template, TOOL_CHAT, TOOLS)
    assert text.startswith("<|im_start|>system\nYou answer in one word.\n\n# Tools\n")
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": '
            '{"city": "Paris"}}\n</tool_call><|im_end|>\n') in text
    # consecutive tool answers share one user turn, as Qwen's template writes them
    assert ("<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response>\n"
            "<tool_response>\nwindy\n</tool_response><|im_end|>\n") in text
    assert text.endswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>assistant\n")
    for family in templates.FAMILIES:  # the others take prompt.py's written-out path
        assert ("tools" in family.template) == (family is templates.CHATML)


def make(path: str, **kw) -> HFEngine:
    return HFEngine(HFEngineConfig(model=path, device="cpu", dtype="float32", **kw))


def test_a_chatml_vocabulary_without_a_template_gets_chatml(tiny_model_no_template, caplog):
    with caplog.at_level(logging.INFO, logger="treechat.engine"):
        engine = make(tiny_model_no_template)
    picked = [r.getMessage() for r in caplog.records if "chat template" in r.getMessage()]
    assert len(picked) == 1 and "ChatML" in picked[0] and "<|im_start|>" in picked[0]
    text = engine.tokenizer.decode(engine.tokenize(Request(messages=SYSTEM_CHAT)))
    assert text == ("<|im_start|>system\nYou answer in one word.<|im_end|>\n"
                    "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in engine.eos_ids


@pytest.fixture(scope="module")
def tiny_gemma_vocab(tmp_path_factory, tiny_model_no_template) -> str:
    """The tiny Llama with no chat template and Gemma's turn markers (and <bos>) in its
    vocabulary, its embeddings grown to match. EOS stays the tokenizer's own (<|im_end|>)."""
    from transformers import AutoTokenizer, LlamaForCausalLM
    folder = tmp_path_factory.mktemp("tiny-gemma-vocab")
    tok = AutoTokenizer.from_pretrained(tiny_model_no_template)
    tok.add_special_tokens({"bos_token": "<bos>",
                            "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    model = LlamaForCausalLM.from_pretrained(tiny_model_no_template)
    model.resize_token_embeddings(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    shutil.copy(Path(tiny_model_no_template) / "generation_config.json", folder)
    assert "chat_template" not in json.loads((folder / "tokenizer_config.json").read_text())
    return str(folder)


def test_a_gemma_vocabulary_gets_gemmas_turns_and_end_of_turn_stops(tiny_gemma_vocab):
    engine = make(tiny_gemma_vocab)
    ids = engine.tokenize(Request(messages=SYSTEM_CHAT))
    assert engine.tokenizer.decode(ids) == (
        "<bos><start_of_turn>user\nYou answer in one word.\n\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\n")
    start, end = (engine.tokenizer.convert_tokens_to_ids(t)
                  for t in ("<start_of_turn>", "<end_of_turn>"))
    assert ids.count(start) == 2 and ids.count(end) == 1  # markers are single tokens
    assert end in engine.eos_ids

    async def main():
        done = {}

        def emit(out):
            for f in out.done:
                done[f.rid] = f

        engine.start(asyncio.get_running_loop(), emit)
        forced = dict(temperature=0.0, max_tokens=5, logit_bias={end: 100.0})
        engine.submit(EngineRequest(1, Request(messages=SYSTEM_CHAT, **forced)))
        engine.submit(EngineRequest(2, Request(messages=SYSTEM_CHAT, ignore_eos=True, **forced)))
        while len(done) < 2:
            await asyncio.sleep(0.01)
        engine.stop()
        return done

    done = asyncio.run(asyncio.wait_for(main(), 60))
    assert done[1].reason == "stop" and done[1].completion_tokens == 1
    assert done[2].reason == "length" and done[2].completion_tokens == 5


def test_chat_template_file_still_wins_and_nothing_fitting_is_the_clear_error(
        tiny_gemma_vocab, tmp_path, monkeypatch):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    engine = make(tiny_gemma_vocab, chat_template=str(template))
    text = engine.tokenizer.decode(engine.tokenize(Request(messages=SYSTEM_CHAT)))
    assert text == "[system] You answer in one word.\n[user] Capital of France?\n[assistant] "
    monkeypatch.setattr(templates, "pick", lambda config, tokenizer: None)
    engine = make(tiny_gemma_vocab)
    from nodes.engine.base import EngineError
    with pytest.raises(EngineError, match="--chat-template"):
        engine.tokenize(Request(messages=SYSTEM_CHAT))
    assert engine.tokenize(Request(prompt="Once upon a time"))  # a base model still completes


def test_the_served_name_is_a_files_stem_or_a_folders_name(tmp_path, tiny_model):
    gguf = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF")
    assert models.model_name(str(gguf)) == "gemma-3-270m-q4_k_m"
    # its cached folders are named by stem and size (two files, two folders); a folder has none
    assert models.gguf_file(str(gguf)) == (gguf, "gemma-3-270m-q4_k_m-4")
    assert models.gguf_file(tiny_model) is None
    assert models.model_name(tiny_model) == Path(tiny_model).name
    assert models.model_name(tiny_model + "/") == Path(tiny_model).name
    assert models.model_name("HuggingFaceTB/SmolLM2-135M-Instruct") == \
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.model_name(None) == models.DEFAULT_MODEL
    assert make(tiny_model).model == Path(tiny_model).name

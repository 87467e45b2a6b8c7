"""Every model family our runner serves, against transformers' own forward of the same weights.

A tiny random model of each family, built from its transformers config, is served by our runner
three ways: from its safetensors folder, from a GGUF file in F16 written as llama.cpp writes one
(Llama's permuted q/k, Gemma's shifted norms), and from GGUF files in every block type (K types
as random blocks: the reference model then gets exactly the file's weights). Each time the
logits of a prompt prefilled in two chunks and of a decode step equal transformers', on our C
kernels (a float16 KV cache) and on the torch path a GPU runs."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGMLQuantizationType as T

import gguf_files
from nodes.engine import blocks, families, weights
from nodes.engine.blocks import kernels
from nodes.engine.kvcache import RowCache
from nodes.engine.llama import Batch, Chunk, CpuModel, TorchModel

VOCAB = 512


def tiny_config(kind: str, width: int = 64, tied: bool = True):
    from transformers import (Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig,
                              Phi3Config, Qwen2Config, Qwen3Config)
    common = dict(vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, tie_word_embeddings=tied, initializer_range=0.2,
                  head_dim=width // 4)
    if kind == "gemma3":
        # a short window, so the prompt crosses it; layer 2 global with its own rotary base
        return Gemma3TextConfig(**common, sliding_window=8, query_pre_attn_scalar=24,
                                layer_types=["sliding_attention", "sliding_attention",
                                             "full_attention"])
    if kind == "gemma2":
        return Gemma2Config(**common, sliding_window=8, query_pre_attn_scalar=24,
                            attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
                            layer_types=["sliding_attention", "full_attention",
                                         "sliding_attention"])
    if kind == "phi3":  # Phi-4-mini's shape: fused q|k|v and gate|up, LongRoPE on 3/4 of a head
        rot = int(common["head_dim"] * 0.75)
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                "short_factor": [1.0 + 0.2 * i for i in range(rot // 2)],
                "long_factor": [2.0 + i for i in range(rot // 2)]}
        common = {k: v for k, v in common.items() if k != "head_dim"}
        return Phi3Config(**common, partial_rotary_factor=0.75, rope_parameters=rope,
                          original_max_position_embeddings=64, sliding_window=None,
                          pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if kind == "llama-bias":  # biases on q, k, v and o (attention_bias)
        return LlamaConfig(**common, attention_bias=True)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config,
           "qwen3": Qwen3Config}[kind]
    extra = {"sliding_window": None} if kind == "mistral" else {}
    return cls(**common, **extra)


def reference_net(config):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    net = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():  # zero-initialised biases and Gemma's norms: make them matter
        for name, p in net.named_parameters():
            if name.endswith("bias") or ("norm" in name and families.of(config).norm_shift):
                p.uniform_(-0.5, 0.5)
    return net


def serve(config, source, on_kernels: bool, monkeypatch):
    if not on_kernels:
        monkeypatch.setattr(kernels, "library", lambda: None)
    model = weights.build(config, source, mode="none", device=torch.device("cpu"),
                          dtype=torch.float32)
    assert isinstance(model, CpuModel if on_kernels else TorchModel)
    s = model.shape
    cache = RowCache(s.layers, s.kv_heads, s.head_dim, model.cache_dtype, torch.device("cpu"),
                     4096, 256, 4, zeroed=model.cache_zeroed)
    cache.reshape(2, 64, 64, 0)
    if not model.cache_zeroed:  # the kernels read no position past a row's own: NaN there
        cache.k.fill_(float("nan"))  # would spread into every logit
        cache.v.fill_(float("nan"))
    return model, cache


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_logits(net, model, cache, tol: float) -> None:
    ids = torch.randint(0, VOCAB, (2, 20))
    nxt = torch.randint(0, VOCAB, (2,))
    with torch.no_grad():
        ref = net(ids).logits
        ref_next = net(torch.cat([ids, nxt[:, None]], 1)).logits[:, -1]
        # row 0: all 20 prompt tokens in one chunk; row 1: a chunk of 12, in one forward
        b = Batch(ids=torch.cat([ids[0], ids[1, :12]]),
                  pos=torch.cat([torch.arange(20), torch.arange(12)]), decode=0,
                  chunks=[Chunk(0, 0, 20), Chunk(1, 0, 12)], logits_at=torch.tensor([19, 31]))
        first = model.forward(model.prepare(b), cache)
        # row 1's last 8 tokens continue after its cached 12
        b = Batch(ids=ids[1, 12:], pos=torch.arange(12, 20), decode=0, chunks=[Chunk(1, 12, 8)])
        second = model.forward(model.prepare(b), cache)
        # one decode token per row, both rows at once
        b = Batch(ids=nxt, pos=torch.tensor([20, 20]), decode=2)
        decoded = model.forward(model.prepare(b), cache)
    assert rel(first[0], ref[0, 19]) < tol and rel(first[1], ref[1, 11]) < tol
    assert rel(second, ref[1, 12:]) < tol
    assert rel(decoded, ref_next) < tol


FAMILIES = ["llama", "llama-bias", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
PATHS = [pytest.param(True, id="c", marks=pytest.mark.skipif(
    not kernels.buildable(), reason="no AVX2 CPU or no C compiler here")),
    pytest.param(False, id="torch")]


@pytest.mark.parametrize("on_kernels", PATHS)
@pytest.mark.parametrize("kind", FAMILIES)
def test_safetensors_folder_logits_equal_transformers(tmp_path, kind, on_kernels, monkeypatch):
    config = tiny_config(kind, tied=kind != "llama")
    net = reference_net(config)
    net.save_pretrained(tmp_path)
    source = weights.SafetensorsSource(tmp_path, families.of(config))
    model, cache = serve(config, source, on_kernels, monkeypatch)
    check_logits(net, model, cache, 3e-3 if on_kernels else 1e-4)


@pytest.mark.parametrize("on_kernels", PATHS)
@pytest.mark.parametrize("kind", FAMILIES)
def test_gguf_f16_logits_equal_transformers(tmp_path, kind, on_kernels, monkeypatch):
    config = tiny_config(kind, tied=kind != "qwen2")
    net = reference_net(config)
    gguf_files.write(net, tmp_path / "model.gguf", T.F16)
    model, cache = serve(config, weights.GGUFSource(tmp_path / "model.gguf"), on_kernels,
                         monkeypatch)
    check_logits(net, model, cache, 3e-3 if on_kernels else 1e-4)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_rows_of_different_lengths_decode_over_an_unfilled_cache(tmp_path, kind, monkeypatch):
    """A node's cache on our kernels is not zeroed when it grows (RowCache zeroed=False): two
    rows decode together, the shorter one's positions past its own length hold NaN, and both
    rows' logits are transformers' (Gemma 3: the longer row also past its sliding window)."""
    config = tiny_config(kind)
    net = reference_net(config)
    net.save_pretrained(tmp_path)
    model, cache = serve(config, weights.SafetensorsSource(tmp_path, families.of(config)), True,
                         monkeypatch)
    ids, nxt = torch.randint(0, VOCAB, (2, 20)), torch.randint(0, VOCAB, (2,))
    with torch.no_grad():
        refs = [net(torch.cat([ids[0], nxt[:1]])[None]).logits[0, -1],
                net(torch.cat([ids[1, :9], nxt[1:]])[None]).logits[0, -1]]
        b = Batch(ids=torch.cat([ids[0], ids[1, :9]]),
                  pos=torch.cat([torch.arange(20), torch.arange(9)]), decode=0,
                  chunks=[Chunk(0, 0, 20), Chunk(1, 0, 9)], logits_at=torch.tensor([19, 28]))
        model.forward(model.prepare(b), cache)
        decoded = model.forward(model.prepare(Batch(ids=nxt, pos=torch.tensor([20, 9]),
                                                    decode=2)), cache)
    assert cache.k[:, 1, :, 10:].isnan().all()  # the short row's unused positions, untouched
    assert rel(decoded[0], refs[0]) < 3e-3 and rel(decoded[1], refs[1]) < 3e-3


BLOCK_TYPES = [T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K, T.IQ4_NL,
               T.IQ4_XS, T.BF16, T.F32]


@pytest.mark.parametrize("kind", BLOCK_TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_every_block_type_in_a_file_gives_transformers_logits(tmp_path, family, kind,
                                                              monkeypatch):
    config = tiny_config(family, width=256)  # K super-blocks: rows of 256
    net = reference_net(config)
    gguf_files.write(net, tmp_path / "model.gguf", kind)
    on_kernels = kernels.library() is not None
    model, cache = serve(config, weights.GGUFSource(tmp_path / "model.gguf"), on_kernels,
                         monkeypatch)
    # our kernels round a block type's activations to 8-bit runs: about 0.5% per product on
    # random weights, which amplify it through the layers (a wrong block layout is off by ~1;
    # the kernels' exact arithmetic is test_blocks', the cost on real models bench.perplexity's)
    check_logits(net, model, cache, 0.1 if on_kernels and kind not in blocks.FLOATS else 5e-3)


def mappings() -> list[dict]:
    """This process's mappings (/proc/self/smaps): each one's range, file ('' where anonymous)
    and fields (kB counts and flags, as strings)."""
    out: list[dict] = []
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                lo, hi = (int(v, 16) for v in head[0].split("-"))
                out.append({"lo": lo, "hi": hi, "file": head[5] if len(head) > 5 else ""})
            else:
                out[-1][head[0].rstrip(":")] = head[1]
    return out


def mapped_kb(path) -> int:
    """kB of `path`'s mapping resident in this process."""
    return sum(int(m["Rss"]) for m in mappings() if m["file"] == str(path))


def mapping_of(address: int) -> dict:
    """The mapping holding `address`."""
    found = [m for m in mappings() if m["lo"] <= address < m["hi"]]
    assert found, hex(address)
    return found[0]


def huge_pages_allowed() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


@pytest.mark.skipif(kernels.library() is None, reason="no kernels: the weights go dense")
@pytest.mark.parametrize("kind", [T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_a_files_matrices_are_copied_once_into_huge_pages(tmp_path, kind, monkeypatch):
    """Every matrix the runner multiplies by is copied once into anonymous memory advised into
    2 MB pages (a decode step streams it faster), Q4_K and Q6_K repacked in panels of eight rows
    on the way where the AVX-512 kernels run, and the file's pages leave the node's memory, its
    header's too: no matrix is held twice, and no vector is read from the file (each read would
    map the pages around it back). An untied embedding, only looked up, stays in the file. The
    logits are transformers', as above."""
    config = tiny_config("llama", width=256, tied=False)
    net = reference_net(config)
    path = tmp_path / "model.gguf"
    gguf_files.write(net, path, kind)
    source = weights.GGUFSource(path)
    assert mapped_kb(path) > 0  # the header and the tensor table, read
    model, cache = serve(config, source, True, monkeypatch)
    assert mapped_kb(path) <= 4  # at most the file's last part-page
    products = [w for layer in model.layers
                for w in (*layer.qkv, layer.o, *layer.gate_up, layer.down)] + [model.lm_head]
    panels = kind in blocks.PANELS and kernels.vector_path().startswith("avx512")
    for w in products:
        assert w.kind == kind and w.panels == panels
        where = mapping_of(w.raw.data_ptr())
        assert where["file"] == "", where  # anonymous: a copy, not the file's pages
        if huge_pages_allowed():
            assert where.get("THPeligible") == "1", where
    assert mapping_of(model.embed.raw.data_ptr())["file"] == str(path)
    vectors = [v for layer in model.layers for v in (layer.attn_norm, layer.mlp_norm)]
    for v in vectors + [model.norm]:  # copies: a step reading them from the file would map
        assert mapping_of(v.data_ptr())["file"] != str(path)  # the pages around them in
    check_logits(net, model, cache, 0.1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_real_gemma_3_file_answers_from_its_own_blocks(gemma_gguf, tmp_path, monkeypatch):
    """Gemma 3 270M in Q4_K_M, as people download it: served by our runner from the file's own
    blocks (no converted copy anywhere), named by its stem, chatting through the built-in
    Gemma template, and greedily right about France."""
    import asyncio

    from broker.protocol import Request
    from nodes.engine.base import EngineRequest
    from nodes.engine.hf import HFEngine, HFEngineConfig
    engine = HFEngine(HFEngineConfig(model=gemma_gguf, device="cpu"))
    assert engine.model == "gemma-3-270m-q4_k_m"
    assert isinstance(engine.runner.model, CpuModel if kernels.library() else TorchModel)
    assert engine.quantization.startswith("gguf") and "Q4_K" in engine.quantization
    assert "<start_of_turn>" in engine.chat_template
    assert engine.max_model_len > 4096  # the model's own context (32k), not a CPU default
    from nodes.engine.paths import cache_root
    copies = [p.name for p in (cache_root() / "models").iterdir()
              if p.is_dir() and p.name.startswith("gemma-3-270m-q4_k_m")]
    assert copies and all(p.endswith("-meta") for p in copies), copies  # config, tokenizer
    answers = {}

    async def main():
        done = asyncio.Event()

        def emit(out):
            for item in out.tokens:
                answers[item[0]] = answers.get(item[0], "") + item[1]
            finished.update(f.rid for f in out.done)
            if finished >= {1, 2, 3}:
                done.set()
        engine.start(asyncio.get_running_loop(), emit)
        engine.submit(EngineRequest(1, Request(
            prompt="Question: What is the capital of France?\nAnswer:", temperature=0.0,
            max_tokens=3)))
        engine.submit(EngineRequest(2, Request(
            messages=[{"role": "user", "content": "Hello!"}], temperature=0.0, max_tokens=8)))
        engine.submit(EngineRequest(3, Request(  # a grammar over Gemma's SentencePiece tokens
            messages=[{"role": "user", "content": "A city and its country, as JSON."}],
            temperature=0.0, max_tokens=60, response_format={"type": "json_schema", "json_schema": {
                "name": "place", "schema": PLACE}})))
        await asyncio.wait_for(done.wait(), 180)
        engine.stop()

    finished: set[int] = set()
    asyncio.run(main())
    assert "Paris" in answers[1]
    assert answers[2].strip()  # the chat template renders and the model answers
    place = json.loads(answers[3])
    assert set(place) == {"city", "country"} and all(isinstance(v, str) for v in place.values())


LOAD_PEAK = """
import re, sys
from nodes.engine import models
def kb(key):
    return int(re.search(key + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1))
before = kb("VmRSS")
models.load(sys.argv[1], device="cpu", dtype="auto", load_format="auto", model_config=None)
print(before, kb("VmHWM"))
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_real_gemma_3_file_loads_without_holding_anything_twice(gemma_gguf):
    """Loading Gemma 3 270M holds nothing twice on the way: parsing its tokenizer (262k tokens,
    515k merges) takes about 190 MB more than the tokenizer keeps, given back before the weights
    come; and its embedding (178 MB of Q8_0) is copied into the arena 16 MB of rows at a time,
    each piece's file pages given back as it goes. So a warm load peaks under the file plus 300
    MB over what the process held before (about 770 MB when both were held twice: a node's
    start came close to a gigabyte)."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO
    from nodes.engine import models
    models.described(gemma_gguf)  # the config and tokenizer once into the cache: a warm start
    run = subprocess.run([sys.executable, "-c", LOAD_PEAK, gemma_gguf], cwd=REPO,
                         capture_output=True, text=True, timeout=280)
    assert run.returncode == 0, run.stderr[-2000:]
    before, peak = (int(v) << 10 for v in run.stdout.split())
    assert peak - before < Path(gemma_gguf).stat().st_size + (300 << 20)


PLACE = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
         "properties": {"city": {"type": "string", "maxLength": 20},
                        "country": {"type": "string", "maxLength": 20}}}


def test_phi_long_context_turns_by_the_long_factors(tmp_path, monkeypatch):
    """LongRoPE: a node whose context passes the original one (64 here) turns by the long
    factors, as transformers does for sequences that long (llama.cpp chooses by its context)."""
    from nodes.engine.llama import rotary
    config = tiny_config("phi3")
    short, long = rotary(config)[None], rotary(config, context=256)[None]
    assert not torch.allclose(short[0], long[0])
    net = reference_net(config)
    net.save_pretrained(tmp_path)
    model, cache = serve(config, weights.SafetensorsSource(tmp_path, families.of(config)), True,
                         monkeypatch)
    model.fit_context(config, 256)
    assert torch.equal(model.rope[None][0], long[0])
    ids = torch.randint(0, VOCAB, (1, 80))  # past the original 64: transformers' long factors
    with torch.no_grad():
        ref = net(ids).logits[0, -1]
        b = Batch(ids=ids[0], pos=torch.arange(80), decode=0, chunks=[Chunk(0, 0, 80)],
                  logits_at=torch.tensor([79]))
        cache.reshape(1, 128, 128, 0)
        got = model.forward(model.prepare(b), cache)[0]
    assert rel(got, ref) < 3e-3


def test_a_phi_files_metadata_gives_partial_rotary_and_longrope():
    """transformers' GGUF reader drops Phi's rope.dimension_count and the LongRoPE factors,
    which llama.cpp's files keep as tensors: models.with_file_values puts them back."""
    import types

    import numpy as np
    from nodes.engine.models import with_file_values
    config = tiny_config("phi3")
    config.partial_rotary_factor, config.rope_parameters = None, {"rope_theta": 10000.0}
    meta = {"general.architecture": "phi3", "phi3.rope.dimension_count": 12,
            "phi3.rope.freq_base": 10000.0, "phi3.rope.scaling.original_context_length": 64}
    factors = {f"rope_factors_{k}.weight": types.SimpleNamespace(data=np.arange(6) + v)
               for k, v in (("short", 1.0), ("long", 2.0))}
    text = with_file_values(config, meta, factors).get_text_config()
    assert text.partial_rotary_factor == 0.75
    assert text.rope_parameters["rope_type"] == "longrope"
    assert text.rope_parameters["long_factor"] == [2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
    assert text.original_max_position_embeddings == 64


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_a_files_config_is_the_one_transformers_reads(tmp_path, kind):
    """A first start reads a file's config without parsing its vocabulary (models.gguf_config,
    3 s for Gemma 3's where transformers' own reading takes 11, twice): the same config."""
    from transformers import AutoConfig

    from nodes.engine.models import gguf_config
    config = tiny_config(kind)
    config.vocab_size = 49152  # the default model's tokenizer, which the file carries
    path = tmp_path / "model.gguf"
    gguf_files.write(reference_net(config), path, T.F16, tokenizer=True)
    ours = gguf_config(path).to_dict()
    theirs = AutoConfig.from_pretrained(str(tmp_path), gguf_file=path.name).to_dict()
    for read in ours, theirs:
        read.pop("_name_or_path")  # where it was read from, not what it says
    assert ours == theirs


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_a_node_reads_a_saved_config_without_the_models_class(tmp_path, kind, monkeypatch):
    """A node reads a file's saved config into transformers' base config class: importing the
    model's own class imports transformers' model-loading code (56 MB of a node's memory).
    Every value equals what the model's class reads, and a node that loads the file imports
    no model's config code at all."""
    import subprocess
    import sys

    from transformers import AutoConfig, AutoTokenizer

    from nodes.engine import models
    monkeypatch.setenv("TREECHAT_CACHE", str(tmp_path / "cache"))
    config = tiny_config(kind)
    config.vocab_size = 49152
    path = tmp_path / "model.gguf"
    gguf_files.write(reference_net(config), path, T.F16, tokenizer=True)
    folder = models.meta_folder(*models.gguf_file(str(path)))  # what a first start writes
    ours, theirs = vars(models.saved_config(folder)), vars(AutoConfig.from_pretrained(folder))
    # where it was read from, and a flag of transformers' generate, which we do not run
    unread = {"_name_or_path", "use_cache"}
    assert {k: v for k, v in ours.items() if k not in unread} == \
        {k: v for k, v in theirs.items() if k not in unread}
    # the node reads the saved tokenizer.json with the generic class; it tokenizes as
    # transformers' reading of the GGUF file does
    tok = models.load_tokenizer(folder, saved=True)
    auto = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    text = "<|im_start|>user\nWhat is the capital of France? ünïcödé 12345<|im_end|>"
    for special in (True, False):
        ids = auto(text, add_special_tokens=special)["input_ids"]
        assert tok(text, add_special_tokens=special)["input_ids"] == ids
        assert tok.decode(ids) == auto.decode(ids)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.all_special_ids,
            tok.chat_template, tok.model_max_length, tok.get_added_vocab()) == \
        (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id, auto.all_special_ids,
         auto.chat_template, auto.model_max_length, auto.get_added_vocab())
    load = ("import sys; from nodes.engine import models; "
            f"models.load({str(path)!r}, device='cpu', dtype='auto', load_format='auto', "
            "model_config=None); print(sorted(m for m in sys.modules if m in "
            f"('transformers.models.{kind}.configuration_{kind}', "
            "'transformers.core_model_loading', 'sympy')))")
    out = subprocess.run([sys.executable, "-c", load], capture_output=True, text=True,
                         timeout=150, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr[-2000:]

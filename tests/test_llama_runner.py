"""Our runner's engine-level behaviour, its GGUF reading and its sampler, against references.

(Families' logits against transformers: tests/test_families.py; the block kernels:
tests/test_blocks.py.)
- the default GGUF model's 4-bit blocks are read where the file lies, never copied or converted,
  and the quantized default model answers the France question with Paris, greedily;
- a long prompt prefilled over several steps beside running requests gives generate()'s tokens;
- the CUDA-graph decode step's static, padded batch (scratch row included) gives the same logits
  as the plain forward (run eagerly on the CPU: the capture itself needs a GPU);
- one float model quantized by --quantization int8/int4 stays close to its float logits;
- the sampler: the exponential race draws from the softmax, top-k/top-p/min-p keep exactly the
  tokens a sort-based reference keeps, seeds do not depend on the batch, penalties and
  logit_bias move logits as defined, logprobs are log_softmax of the model's logits.
"""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch

from nodes.engine import weights
from nodes.engine.blocks import kernels
from nodes.engine.kvcache import RowCache
from nodes.engine.llama import Batch, Chunk
from nodes.engine.sampling import Row, SamplingParams, filter_mask, sample


def tiny_config(kind: str, tied: bool):
    from transformers import LlamaConfig, Qwen2Config
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[kind]
    return cls(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               tie_word_embeddings=tied, initializer_range=0.2)


def build_pair(tmp_path, kind: str, tied: bool, mode: str = "none"):
    """A tiny random model and our runner's model of its folder (torch path: kernels off)."""
    from transformers import AutoModelForCausalLM
    from nodes.engine import families
    torch.manual_seed(0)
    config = tiny_config(kind, tied)
    net = AutoModelForCausalLM.from_config(config).eval()
    net.save_pretrained(tmp_path)
    model = weights.build(config, weights.SafetensorsSource(tmp_path, families.of(config)),
                          mode=mode, device=torch.device("cpu"), dtype=torch.float32)
    return net, model


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_gguf_q4_1_blocks_are_read_where_the_file_lies():
    from gguf import GGUFReader, dequantize
    from nodes.engine import models
    from nodes.engine.blocks import Blocks
    path = models.default_gguf()
    reader = GGUFReader(str(path))
    tensor = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert tensor.tensor_type.name == "Q4_1"
    expected = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy())
    source = weights.open_gguf(path)
    blocks = source.get("blk.0.ffn_down.weight")
    assert isinstance(blocks, Blocks) and blocks.kind.name == "Q4_1"
    assert torch.equal(blocks.dequantize(), expected.reshape(blocks.n, -1))
    mapped = source.tensors["blk.0.ffn_down.weight"].data
    assert blocks.raw.data_ptr() == mapped.ctypes.data  # the file's own bytes, not a copy


def test_our_gguf_map_holds_what_gguf_reads():
    """formats.gguf.read (the runner's fast path: metadata values skipped) against the gguf
    package's reader, on the default model's file: every tensor, its type, shape and bytes."""
    from gguf import GGUFReader
    from nodes.engine import models
    from nodes.engine.formats import gguf
    path = models.default_gguf()
    reader = GGUFReader(str(path))
    meta, tensors = gguf.read(path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    assert [t.name for t in reader.tensors] == list(tensors)
    for t in reader.tensors:
        ours = tensors[t.name]
        assert ours.tensor_type == t.tensor_type and ours.data.shape == t.data.shape, t.name
        assert ours.data.tobytes() == np.asarray(t.data).tobytes(), t.name


def test_a_file_that_is_not_gguf_or_cut_short_is_refused(tmp_path):
    from nodes.engine import models
    from nodes.engine.formats import gguf
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGML" + bytes(64))
    with pytest.raises(gguf.GGUFError, match="not a GGUF file"):
        gguf.read(bad)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(models.default_gguf().read_bytes()[:4096])  # the header, cut short
    with pytest.raises(gguf.GGUFError, match="damaged or cut short"):
        gguf.read(cut)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quantized_default_model_answers_paris():
    import asyncio
    from broker.protocol import Request
    from nodes.engine.base import EngineRequest
    from nodes.engine.hf import HFEngine, HFEngineConfig
    engine = HFEngine(HFEngineConfig(device="cpu"))  # auto: the GGUF's own 4-bit blocks
    assert engine.quantization == "gguf Q4_1+Q8_0"
    req = Request(messages=[{"role": "user", "content": "What is the capital of France?"}],
                  temperature=0.0, max_tokens=24)
    text = []

    async def main():
        done = asyncio.Event()

        def emit(out):
            text.extend(item[1] for item in out.tokens)
            if out.done:
                done.set()
        engine.start(asyncio.get_running_loop(), emit)
        engine.submit(EngineRequest(1, req))
        await asyncio.wait_for(done.wait(), 120)
        engine.stop()

    asyncio.run(main())
    assert "Paris" in "".join(text)


@pytest.mark.timeout(120)
def test_long_prompt_is_prefilled_in_chunks_beside_running_requests(tiny_model):
    import asyncio
    from test_engine_hf import Run, greedy_reference, make, prompt_req
    from nodes.engine.base import EngineRequest
    engine = make(tiny_model, max_slots=4, step_tokens=24)
    long = "A long prompt about many rivers, mountains, valleys and towns " * 6
    chunks = []
    real = engine.runner.forward

    def forward(decode, planned):
        chunks.extend((seq.rid, start, n) for seq, start, n in planned)
        return real(decode, planned)

    engine.runner.forward = forward

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(1, prompt_req("Short one", max_tokens=30, ignore_eos=True)))
        await run.until(lambda: len(run.ids.get(1, [])) >= 2)  # 1 is decoding
        engine.submit(EngineRequest(2, prompt_req(long, max_tokens=10, ignore_eos=True)))
        await run.finish([1, 2])
        engine.stop()
        return run

    run = asyncio.run(main())
    pieces = [(start, n) for rid, start, n in chunks if rid == 2]
    prompt = engine.tokenizer.encode(long)
    assert len(pieces) > 2 and sum(n for _, n in pieces) == len(prompt)
    assert all(n <= 24 for _, n in pieces)
    assert run.ids[2] == greedy_reference(engine, prompt, 10)
    assert run.ids[1] == greedy_reference(engine, engine.tokenizer.encode("Short one"), 30)


def test_static_padded_decode_step_equals_the_plain_forward(tmp_path, monkeypatch):
    from nodes.engine.runner import DecodeGraphs
    monkeypatch.setattr(kernels, "library", lambda: None)  # the torch path, as on a GPU
    net, model = build_pair(tmp_path, "llama", False)
    s = model.shape
    cache = RowCache(s.layers, s.kv_heads, s.head_dim, torch.float32, torch.device("cpu"),
                     8 * 256, 256, 8 + 1, static=True)  # a GPU's static cache, scratch row last
    graphs = DecodeGraphs(model, cache, capture=False)
    ids = torch.randint(0, 512, (3, 10))
    with torch.no_grad():
        b = Batch(ids=ids.flatten(), pos=torch.arange(10).repeat(3), decode=0,
                  chunks=[Chunk(r, 0, 10) for r in range(3)])
        model.forward(model.prepare(b), cache)
        nxt = torch.randint(0, 512, (3,))
        seqs = [types.SimpleNamespace(tokens=[int(t)], length=10) for t in nxt]
        padded = graphs.run(seqs)  # bucket 4: one padding row, writing to the scratch row
        ref = net(torch.cat([ids, nxt[:, None]], 1)).logits[:, -1]
    assert graphs.bucket(3) == 4 and padded.shape == (3, 512)
    assert rel(padded, ref) < 1e-5
    assert torch.count_nonzero(cache.k[:, 3]) == 0  # the padding row wrote nowhere real


# --- the sampler -------------------------------------------------------------------------------


def draw_many(logits: torch.Tensor, params: dict, n: int = 3000) -> torch.Tensor:
    counts = torch.zeros(logits.shape[-1])
    for seed in range(n):
        ids, _ = sample(logits, [Row(SamplingParams(seed=seed, **params), [], [])])
        counts[ids[0]] += 1
    return counts / n


def test_race_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0] + [-8.0] * 400])
    freq = draw_many(logits, {"temperature": 1.0, "top_p": 1.0})
    p = torch.softmax(logits[0], -1)
    assert (freq[:5] - p[:5]).abs().max() < 0.03  # 3000 draws: a few standard errors
    hot = draw_many(logits, {"temperature": 0.5, "top_p": 1.0})
    assert hot[0] > freq[0]  # lower temperature sharpens


@pytest.mark.parametrize("params", [dict(top_k=3), dict(top_p=0.8), dict(min_p=0.3),
                                    dict(top_k=300, top_p=0.999), dict(top_p=0.5, min_p=0.1)])
def test_filters_keep_what_a_sort_keeps(params):
    torch.manual_seed(3)
    scaled = torch.randn(4, 1000) * 3
    p = SamplingParams(1.0, params.get("top_p", 1.0), params.get("top_k", 0),
                       min_p=params.get("min_p", 0.0))
    vals, idx = scaled.sort(dim=-1, descending=True)
    keep = filter_mask(vals, scaled.logsumexp(-1, keepdim=True), [p] * 4)
    probs = torch.softmax(scaled, -1).gather(1, idx)
    for r in range(4):
        ref = []
        mass = 0.0
        for rank in range(1000):  # the textbook definitions, one token at a time
            ok = (p.top_k == 0 or rank < p.top_k) and (mass < p.top_p) and \
                probs[r, rank] >= p.min_p * probs[r, 0]
            ref.append(ok or rank == 0)
            mass += probs[r, rank].item()
        assert keep[r].tolist() == ref
    drawn = {sample(scaled[:1], [Row(SamplingParams(seed=s, temperature=1.0, **{
        "top_p": 1.0, **params}), [], [])])[0][0] for s in range(200)}
    assert drawn <= set(idx[0][keep[0]].tolist())  # nothing outside the kept set is ever drawn


def test_seeded_draws_do_not_depend_on_the_batch():
    torch.manual_seed(4)
    logits = torch.randn(3, 300)
    rows = [Row(SamplingParams(0.8, 0.95, seed=42), [], [5, 6]),
            Row(SamplingParams(0.0, 1.0), [], []),
            Row(SamplingParams(1.0, 1.0, seed=7), [], [])]
    batched, _ = sample(logits, rows)
    alone = [sample(logits[i:i + 1], [rows[i]])[0][0] for i in range(3)]
    assert batched == alone
    assert batched[1] == int(logits[1].argmax())
    other = sample(logits[:1], [Row(SamplingParams(0.8, 0.95, seed=43), [], [5, 6])])[0][0]
    later = sample(logits[:1], [Row(SamplingParams(0.8, 0.95, seed=42), [], [5, 6, 7])])[0][0]
    assert len({batched[0], other, later}) >= 2  # seed and step both move the draw


def test_penalties_and_bias_move_logits_as_defined():
    from nodes.engine.sampling import bias, penalize
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 0.0]])
    rows = [Row(SamplingParams(0, 1, presence=0.5, frequency=0.25, repetition=2.0),
                prompt=[0], output=[1, 1, 2])]
    x = logits.clone()
    penalize(x, rows)
    # repetition over prompt+output {0, 1, 2}: positive /2, negative *2; then presence and
    # frequency over the answer only: token 1 seen twice, token 2 once
    expected = torch.tensor([[1.0, -2.0 - 0.5 - 0.5, 0.25 - 0.5 - 0.25, 3.0, 0.0]])
    assert torch.allclose(x, expected)
    forced = Row(SamplingParams(0, 1, bias={4: 100.0}), [], [])
    ids, _ = sample(logits, [forced])
    assert ids == [4]
    y = logits.clone()
    bias(y, [Row(SamplingParams(0, 1, bias={0: -5.0, 9999: 3.0}), [], [])])  # unknown id ignored
    assert y[0, 0] == -3.0 and torch.equal(y[0, 1:], logits[0, 1:])


def test_logprobs_are_the_models_log_softmax():
    logits = torch.tensor([[1.0, 3.0, 2.0, -1.0]])
    ids, lps = sample(logits, [Row(SamplingParams(0, 1, logprobs=2, repetition=1.5), [1], [])])
    ref = torch.log_softmax(logits[0], -1)
    chosen, alts = lps[0]
    assert math.isclose(chosen, ref[ids[0]].item(), rel_tol=1e-6)
    assert [a for a, _ in alts] == [1, 2]  # the model's own ranking, before the penalty
    assert all(math.isclose(v, ref[a].item(), rel_tol=1e-6) for a, v in alts)
    assert sum(math.exp(v) for _, v in alts) < 1.0


@pytest.mark.timeout(120)
def test_prefix_reuse_copies_exact_keys_and_values(tiny_model):
    """A shared start is copied, not computed again: from a running row (two identical prompts
    sent together: the second waits one step, then copies), from the store (the same prompt
    later; a chat's next turn), and the answers are what they are without it."""
    import asyncio
    from test_engine_hf import CHAT, Run, greedy_reference, make, prompt_req
    from broker.protocol import Request
    from nodes.engine.base import EngineRequest
    engine = make(tiny_model, max_slots=4)
    prompt = "Tell me everything about the rivers and the mountains of the valley, please."
    p = len(engine.tokenizer.encode(prompt))
    turn = Request(messages=CHAT, temperature=0.0, max_tokens=12, ignore_eos=True)

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(1, prompt_req(prompt, max_tokens=8, ignore_eos=True)))
        engine.submit(EngineRequest(2, prompt_req(prompt, max_tokens=8, ignore_eos=True)))
        await run.finish([1, 2])
        engine.submit(EngineRequest(3, prompt_req(prompt, max_tokens=8, ignore_eos=True)))
        engine.submit(EngineRequest(4, turn))
        await run.finish([3, 4])
        answer = run.text(4)
        history = CHAT + [{"role": "assistant", "content": answer},
                          {"role": "user", "content": "And then?"}]
        engine.submit(EngineRequest(5, Request(messages=history, temperature=0.0, max_tokens=6,
                                               ignore_eos=True)))
        await run.finish([5])
        engine.stop()
        return run, history

    run, history = asyncio.run(main())
    ref = greedy_reference(engine, engine.tokenizer.encode(prompt), 8)
    assert run.ids[1] == run.ids[2] == run.ids[3] == ref
    assert run.done[1].cached_tokens == 0
    assert run.done[2].cached_tokens == run.done[3].cached_tokens == p - 1
    second = engine.tokenize(Request(messages=history))
    assert run.ids[5] == greedy_reference(engine, second, 6)
    first_turn = engine.tokenize(turn) + run.ids[4][:-1]  # what row 4 held when it finished
    shared = next(i for i, (a, b) in enumerate(zip(second + [None], first_turn + [-1])) if a != b)
    assert run.done[5].cached_tokens == shared > len(engine.tokenize(turn))


@pytest.mark.skipif(not kernels.buildable(), reason="the C kernels cannot run on this machine")
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_a_float_model_quantized_at_load_stays_close(tmp_path, kind, mode):
    """--quantization int8/int4 of a float folder: Q8_0 or Q4_1 blocks (the head 8-bit), whose
    logits are transformers' for the weights those blocks hold, for a prompt chunk and a
    decode step."""
    from nodes.engine.blocks import Blocks
    net, model = build_pair(tmp_path, kind, True, mode)
    want = {"int4": "Q4_1", "int8": "Q8_0"}[mode]
    assert isinstance(model.layers[0].down, Blocks) and model.layers[0].down.kind.name == want
    assert model.lm_head.kind.name == "Q8_0"
    with torch.no_grad():  # the reference: the same model with the weights the blocks hold
        for ours, theirs in zip(model.layers, net.model.layers):
            a, m = theirs.self_attn, theirs.mlp
            for blocks, linear in zip(ours.qkv + [ours.o] + ours.gate_up + [ours.down],
                                      (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj,
                                       m.up_proj, m.down_proj)):
                linear.weight.copy_(blocks.dequantize())
        net.model.embed_tokens.weight.copy_(model.embed.dequantize())  # tied: the head too
    s = model.shape
    cache = RowCache(s.layers, s.kv_heads, s.head_dim, model.cache_dtype, torch.device("cpu"),
                     4096, 256, 4)
    cache.reshape(2, 64, 64, 0)
    ids = torch.arange(21) * 7 % 512
    with torch.no_grad():
        ref = net(ids[None]).logits[0]
        b = Batch(ids=ids[:20], pos=torch.arange(20), decode=0, chunks=[Chunk(0, 0, 20)])
        first = model.forward(model.prepare(b), cache)
        b = Batch(ids=ids[20:], pos=torch.tensor([20]), decode=1)
        second = model.forward(model.prepare(b), cache)
    # the products round activations to 8-bit runs: ~0.5% each on random weights, amplified
    assert rel(first, ref[:20]) < 5e-2 and rel(second[0], ref[20]) < 5e-2


@pytest.mark.timeout(120)
def test_fallback_runner_serves_a_tiny_gpt2_like_generate(tmp_path, tiny_model):
    """An architecture our model does not cover runs on transformers' own forward through the
    same stepper: concurrent greedy requests equal generate()."""
    import asyncio
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from test_engine_hf import Run, greedy_reference, make, prompt_req
    from nodes.engine.base import EngineRequest
    from nodes.engine.runner import HFRunner
    tok = AutoTokenizer.from_pretrained(tiny_model)
    torch.manual_seed(5)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=64, n_layer=2,
                               n_head=4, initializer_range=0.2)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = make(str(tmp_path), max_slots=3)
    assert isinstance(engine.runner, HFRunner) and engine.quantization == "none"
    prompts = ["Hello there", "A somewhat longer prompt about rivers", "Three"]

    async def main():
        run = Run(engine)
        for i, p in enumerate(prompts):
            engine.submit(EngineRequest(i, prompt_req(p, max_tokens=9, ignore_eos=True)))
        await run.finish(range(3))
        engine.stop()
        return run

    run = asyncio.run(main())
    for i, p in enumerate(prompts):
        assert run.ids[i] == greedy_reference(str(tmp_path), tok.encode(p), 9), p

"""The hf engine's API features on the tiny real model (CPU), each against a reference computed
here from the model's own logits: logprobs (and the prompt's), presence / frequency / repetition
penalties, min_p, logit_bias, grammar-constrained JSON and tool calls (also after a resume), the
empty and token-id prompts, and tools rendered into the chat prompt.

The engine is driven directly on an asyncio loop, one fresh start per test.
"""

from __future__ import annotations

import asyncio

import jsonschema
import orjson
import pytest
import torch

from broker.protocol import ErrorCode, Request
from nodes.engine import grammar
from nodes.engine.base import EngineError, EngineRequest
from nodes.engine.hf import HFEngine, HFEngineConfig

pytestmark = pytest.mark.timeout(180)

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "pet"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "pet": {"enum": ["cat", "dog", "none"]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["C", "F"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {}, "required": []}}}


def start(model: str, reference: str) -> HFEngine:
    eng = HFEngine(HFEngineConfig(model=model, device="cpu", dtype="float32"))
    from transformers import AutoModelForCausalLM
    eng.reference = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32).eval()
    return eng  # `reference`: transformers' own forward of the same weights


@pytest.fixture(scope="module", params=["llama", "qwen3-q4k-gguf"])
def engine(request, tiny_model):
    """The tiny Llama folder, and a tiny Qwen3 GGUF file quantized to Q4_K (another family, a
    K-quant file): every feature that does not lean on how one model behaves holds on both."""
    if request.param == "llama":
        return start(tiny_model, tiny_model)
    return start(*request.getfixturevalue("tiny_kquant_gguf"))


@pytest.fixture(scope="module")
def llama_engine(tiny_model):
    """The tiny Llama alone, for tests whose setup relies on its habits (it repeats a biased
    token, it closes JSON strings within the token limit, its logits have no near ties)."""
    return start(tiny_model, tiny_model)


def run(engine: HFEngine, *reqs: Request | EngineRequest) -> dict[int, dict]:
    """Run requests (numbered from 1) to their end: per request its items, text, ids, finish."""
    async def main():
        got = {i: {"items": [], "done": None, "error": None} for i in range(1, len(reqs) + 1)}
        changed = asyncio.Event()

        def emit(out):
            for item in out.tokens:
                got[item[0]]["items"].append(item)
            for f in out.done:
                got[f.rid]["done"] = f
            for rid, code, message in out.errors:
                got[rid]["error"] = (code, message)
            changed.set()

        engine.start(asyncio.get_running_loop(), emit)
        for i, r in enumerate(reqs, 1):
            engine.submit(r if isinstance(r, EngineRequest) else EngineRequest(i, r))
        while not all(g["done"] or g["error"] for g in got.values()):
            changed.clear()
            await asyncio.wait_for(changed.wait(), 60)
        engine.stop()
        return got

    got = asyncio.run(main())
    for g in got.values():
        g["ids"] = [t for item in g["items"] for t in item[2]]
        g["text"] = "".join(item[1] for item in g["items"])
    return got


def greedy(**kw) -> Request:
    return Request(**{"temperature": 0.0, **kw})


# The engine's CPU path keeps keys and values in float16: its logprobs agree with a float32
# forward to a few 1e-3 on these tiny models, whose wide random weights make large activations.
# Over a file's blocks it also rounds each product's activations to 8-bit runs (0.5% per product
# on random weights, which amplify it: 0.1 in a logprob; on real models 0.05% in perplexity,
# docs/benchmarks.md), and where the CPU has a bfloat16 GEMM a prompt's products round x, the
# weights and each output to bfloat16 (up to 0.21 in a logprob here; 0.1% in perplexity on real
# models). A wrong kernel or layout is off by far more.
def tolerance(engine: HFEngine) -> float:
    return 0.3 if engine.quantization.startswith("gguf") else 5e-3


REL = 5e-3


def logits_after(engine: HFEngine, ids: list[int]) -> torch.Tensor:
    """The model's next-token logits after `ids` (a plain forward, no engine involved)."""
    with torch.inference_mode():
        return engine.reference(input_ids=torch.tensor([ids])).logits[0, -1, :engine.vocab].float()


def reference(engine: HFEngine, prompt_ids: list[int], n: int, adjust) -> list[int]:
    """Greedy decoding by hand, with `adjust(logits, generated)` applied before each argmax."""
    out: list[int] = []
    for _ in range(n):
        logits = adjust(logits_after(engine, prompt_ids + out), out)
        out.append(int(logits.argmax()))
    return out


# --- logprobs ------------------------------------------------------------------------------------

def test_logprobs_are_the_models_log_softmax(engine):
    prompt = "The quick brown fox"
    got = run(engine, greedy(prompt=prompt, max_tokens=6, ignore_eos=True, logprobs=3))[1]
    ids = engine.tokenizer.encode(prompt)
    assert all(len(item) == 4 and len(item[3]) == 1 for item in got["items"])
    for k, item in enumerate(got["items"]):
        text, logprob, top = item[3][0]
        lp = torch.log_softmax(logits_after(engine, ids + got["ids"][:k]), dim=-1)
        tok = item[2][0]
        assert text == engine.tokenizer.decode([tok])
        assert logprob == pytest.approx(lp[tok].item(), rel=REL, abs=tolerance(engine))
        # the three likeliest, each at the model's logprob (near ties may swap order)
        want = torch.topk(lp, 3)
        assert [v for _, v in top] == pytest.approx(want.values.tolist(), rel=REL, abs=tolerance(engine))
        for text_, value in top:
            ids_ = [i for i in range(engine.vocab) if engine.tokenizer.decode([i]) == text_]
            assert any(abs(lp[i].item() - value) <= tolerance(engine) + REL * abs(value) for i in ids_)
        assert top[0][1] == pytest.approx(logprob, abs=1e-6)  # greedy: the chosen is the likeliest


def test_prompt_logprobs_cover_every_prompt_token(engine):
    prompt = "One two three four"
    got = run(engine, greedy(prompt=prompt, max_tokens=2, prompt_logprobs=1))[1]
    ids = engine.tokenizer.encode(prompt)
    first = got["items"][0]
    assert first[1] == "" and first[2] == []  # the prompt's entries, before any token
    entries = first[3]
    assert [e[0] for e in entries] == [engine.tokenizer.decode([t]) for t in ids]
    assert entries[0][1] is None
    for j in range(1, len(ids)):
        lp = torch.log_softmax(logits_after(engine, ids[:j]), dim=-1)
        assert entries[j][1] == pytest.approx(lp[ids[j]].item(), rel=REL, abs=tolerance(engine))
        assert len(entries[j][2]) == 1


# --- penalties, filters, bias --------------------------------------------------------------------

def test_presence_and_frequency_penalties_match_their_formula(llama_engine):
    engine = llama_engine
    prompt = "to be or not to be"
    ids = engine.tokenizer.encode(prompt)
    first = run(engine, greedy(prompt=prompt, max_tokens=1))[1]["ids"][0]
    # A bias on the first token makes the plain answer repeat it; penalties must fight that.
    loop = dict(prompt=prompt, max_tokens=24, ignore_eos=True, logit_bias={str(first): 5.0})
    plain = run(engine, greedy(**loop))[1]["ids"]
    assert plain.count(first) > 5

    def penalize(presence, frequency):
        def adjust(logits, out):
            logits = logits.clone()
            logits[first] += 5.0
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=engine.vocab)
            return logits - frequency * counts.float() - presence * (counts > 0).float()
        return adjust

    got = run(engine, greedy(presence_penalty=2.0, **loop), greedy(frequency_penalty=1.0, **loop))
    assert got[1]["ids"] == reference(engine, ids, 24, penalize(2.0, 0.0))
    assert got[2]["ids"] == reference(engine, ids, 24, penalize(0.0, 1.0))
    for i in (1, 2):
        assert got[i]["ids"].count(first) < plain.count(first) // 2
    negative = run(engine, greedy(prompt=prompt, max_tokens=24, ignore_eos=True,
                                  presence_penalty=-2.0))[1]["ids"]
    assert negative == reference(engine, ids, 24, lambda lg, out: penalize(-2.0, 0.0)(lg, out)
                                 - 5.0 * (torch.arange(engine.vocab) == first))


def test_repetition_penalty_equals_transformers(llama_engine):
    engine = llama_engine
    prompt = "to be or not to be"
    ids = engine.tokenizer.encode(prompt)
    first = run(engine, greedy(prompt=prompt, max_tokens=1))[1]["ids"][0]
    loop = dict(prompt=prompt, max_tokens=20, ignore_eos=True, logit_bias={str(first): 5.0})
    got = run(engine, greedy(repetition_penalty=1.8, **loop))[1]["ids"]
    t = torch.tensor([ids])
    ref = engine.reference.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=20,
                              min_new_tokens=0, do_sample=False, repetition_penalty=1.8,
                              sequence_bias={(first,): 5.0},  # applied first, as ours is
                              eos_token_id=None, pad_token_id=2)[0, len(ids):].tolist()
    plain = run(engine, greedy(**loop))[1]["ids"]
    assert got == ref
    assert got.count(first) < plain.count(first) // 2


def test_logit_bias_forces_and_forbids(engine):
    prompt = "Hello"
    plain = run(engine, greedy(prompt=prompt, max_tokens=4, ignore_eos=True))[1]["ids"]
    got = run(engine, greedy(prompt=prompt, max_tokens=4, ignore_eos=True,
                             logit_bias={"1234": 100}),
              greedy(prompt=prompt, max_tokens=4, ignore_eos=True,
                     logit_bias={str(plain[0]): -100}),
              Request(prompt=prompt, max_tokens=4, ignore_eos=True, temperature=1.5, seed=3,
                      logit_bias={"1234": 100}))
    assert got[1]["ids"] == [1234] * 4
    assert got[2]["ids"][0] != plain[0] and plain[0] not in got[2]["ids"]
    assert got[3]["ids"] == [1234] * 4  # sampled too


def test_min_p_one_keeps_only_the_top_token(engine):
    prompt = "Once upon a time"
    plain = run(engine, greedy(prompt=prompt, max_tokens=12, ignore_eos=True))[1]["ids"]
    hot = dict(prompt=prompt, max_tokens=12, ignore_eos=True, temperature=2.0, seed=11)
    got = run(engine, Request(min_p=1.0, **hot), Request(**hot))
    assert got[1]["ids"] == plain
    assert got[2]["ids"] != plain  # without min_p, temperature 2 wanders


def test_out_of_vocabulary_ids_are_bad_requests(engine):
    for req in (Request(prompt="x", logit_bias={str(engine.vocab): 5}),
                Request(prompt=[1, engine.vocab + 7])):
        with pytest.raises(EngineError) as err:
            engine.submit(EngineRequest(1, req))
        assert err.value.code == ErrorCode.BAD_REQUEST and str(engine.vocab) in err.value.message


# --- prompts -------------------------------------------------------------------------------------

def test_empty_prompt_starts_from_bos(engine):
    got = run(engine, greedy(prompt="", max_tokens=3, ignore_eos=True))[1]
    assert got["done"].prompt_tokens == 1 and got["done"].completion_tokens == 3
    bos = engine.tokenizer.bos_token_id
    assert got["ids"] == reference(engine, [bos], 3, lambda logits, out: logits)


def test_token_id_prompt_equals_its_text(engine):
    ids = engine.tokenizer.encode("The weather today")
    got = run(engine, greedy(prompt="The weather today", max_tokens=5, ignore_eos=True),
              greedy(prompt=ids, max_tokens=5, ignore_eos=True))
    assert got[1]["ids"] == got[2]["ids"] and got[2]["done"].prompt_tokens == len(ids)


# --- grammar -------------------------------------------------------------------------------------

def json_request(**kw) -> Request:
    return greedy(messages=[{"role": "user", "content": "Describe a person"}], max_tokens=60,
                  response_format={"type": "json_schema",
                                   "json_schema": {"name": "person", "schema": SCHEMA}}, **kw)


def test_json_schema_answers_validate_greedy_and_sampled(llama_engine):
    engine = llama_engine
    got = run(engine, json_request(), json_request(temperature=1.0, seed=5),
              greedy(prompt="Data:", max_tokens=40, response_format={"type": "json_object"}))
    for i in (1, 2):
        assert got[i]["done"].reason == "stop"  # the object closed: finished before max_tokens
        jsonschema.validate(orjson.loads(got[i]["text"]), SCHEMA)
    assert isinstance(orjson.loads(got[3]["text"]), dict) or got[3]["done"].reason == "length"


def test_a_resumed_answer_replays_its_tokens_through_the_grammar(engine):
    whole = run(engine, json_request())[1]
    half = whole["ids"][:len(whole["ids"]) // 2]
    resumed = run(engine, EngineRequest(1, json_request(), resume_ids=half,
                                        resume_text=engine.tokenizer.decode(half)))[1]
    assert half + resumed["ids"] == whole["ids"]
    with pytest.raises(EngineError) as err:  # tokens the grammar never allowed
        engine.submit(EngineRequest(1, json_request(),
                                    resume_ids=engine.tokenizer.encode("hello", add_special_tokens=False)))
    assert err.value.code == ErrorCode.BAD_REQUEST


def test_a_bad_schema_is_a_bad_request(engine):
    req = greedy(prompt="x", response_format={"type": "json_schema", "json_schema": {
        "name": "bad", "schema": {"type": "frobnicate"}}})
    with pytest.raises(EngineError) as err:
        engine.submit(EngineRequest(1, req))
    assert err.value.code == ErrorCode.BAD_REQUEST and "frobnicate" in err.value.message


def test_forced_tool_calls_parse_against_their_schema(llama_engine):
    engine = llama_engine
    chat = [{"role": "user", "content": "Weather in Paris?"}]
    got = run(engine,
              greedy(messages=chat, tools=[WEATHER, TIME], max_tokens=80,
                     tool_choice={"type": "function", "function": {"name": "get_weather"}}),
              greedy(messages=chat, tools=[WEATHER, TIME], max_tokens=120, tool_choice="required",
                     parallel_tool_calls=False),
              Request(messages=chat, tools=[WEATHER, TIME], max_tokens=160, tool_choice="required",
                      temperature=1.0, seed=2))
    jsonschema.validate(orjson.loads(got[1]["text"]), WEATHER["function"]["parameters"])
    for i in (2, 3):
        assert got[i]["done"].reason == "stop", got[i]["text"]
        calls = orjson.loads(got[i]["text"])
        assert calls and (i == 3 or len(calls) == 1)
        for call in calls:
            tool = {"get_weather": WEATHER, "get_time": TIME}[call["name"]]
            jsonschema.validate(call["arguments"], tool["function"]["parameters"])


def test_compiled_grammars_are_cached_per_schema(engine):
    a = grammar.compile_for(json_request(), engine.tokenizer, engine.vocab)
    compiler = grammar._compilers[engine.tokenizer]
    before = len(compiler.cache)
    b = grammar.compile_for(json_request(temperature=0.5), engine.tokenizer, engine.vocab)
    assert len(compiler.cache) == before and a is not b  # one compile, a copy per request
    assert grammar.compile_for(greedy(prompt="x"), engine.tokenizer, engine.vocab) is None


def test_llguidance_is_built_at_the_first_constrained_request(tiny_model):
    """A node never asked for a grammar does not hold llguidance's view of its tokenizer (about 60
    MB of Gemma 3's node); the first request that asks builds it and is answered as usual."""
    engine = start(tiny_model, tiny_model)
    engine.warm()
    run(engine, greedy(prompt="Hello", max_tokens=4))
    assert engine.tokenizer not in grammar._compilers
    got = run(engine, json_request())
    assert engine.tokenizer in grammar._compilers
    jsonschema.validate(orjson.loads(got[1]["text"]), SCHEMA)


def test_apply_bitmask_keeps_exactly_the_allowed_tokens():
    logits = torch.zeros(3, 70)
    bitmask = grammar.allocate_bitmask(3, 70)
    bitmask[1, 0] = 1 << 5
    bitmask[1, 2] = 1 << 3  # token 67
    grammar.apply_bitmask(logits, bitmask, [1])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == [5, 67]
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()


# --- tools in the prompt -------------------------------------------------------------------------

HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"C\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]


def test_tools_are_written_into_a_template_that_has_none(engine):
    text = engine.tokenizer.decode(engine.tokenize(Request(messages=HISTORY, tools=[WEATHER])))
    assert "<tools>" in text and '"get_weather"' in text and "<tool_call>" in text
    assert '{"name":"get_weather","arguments":{"city":"Paris","unit":"C"}}' in text
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    none = engine.tokenizer.decode(engine.tokenize(Request(messages=HISTORY[:1], tools=[WEATHER],
                                                           tool_choice="none")))
    assert "<tools>" not in none  # tool_choice "none": the tools are not offered


def test_a_tool_aware_template_gets_the_tools(tiny_model, tmp_path):
    template = tmp_path / "tools.jinja"
    template.write_text(
        "{% for t in tools or [] %}TOOL {{ t.function.name }}\n{% endfor %}"
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}"
        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }} {{ c.function.arguments.city }}"
        "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    eng = HFEngine(HFEngineConfig(model=tiny_model, device="cpu", dtype="float32",
                                  chat_template=str(template)))
    text = eng.tokenizer.decode(eng.tokenize(Request(messages=HISTORY, tools=[WEATHER, TIME])))
    assert text.startswith("TOOL get_weather\nTOOL get_time\n")
    assert "CALL get_weather Paris" in text  # arguments handed over as an object
    assert "[tool] 18 C, sunny" in text


def test_a_template_that_refuses_the_messages_is_a_bad_request(tiny_model, tmp_path):
    template = tmp_path / "strict.jinja"
    template.write_text("{% for m in messages %}{% if m.role == 'system' %}"
                        "{{ raise_exception('no system role here') }}{% endif %}{{ m.content }}"
                        "{% endfor %}")
    eng = HFEngine(HFEngineConfig(model=tiny_model, device="cpu", dtype="float32",
                                  chat_template=str(template)))
    with pytest.raises(EngineError) as err:
        eng.tokenize(Request(messages=HISTORY, tools=[WEATHER]))  # tools come as a system message
    assert err.value.code == ErrorCode.BAD_REQUEST and "no system role here" in err.value.message

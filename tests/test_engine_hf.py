"""The hf engine on CPU with the tiny random Llama (and the real SmolLM2 tokenizer).

Driven directly on an asyncio loop: greedy output equal to `model.generate` token for token for
concurrent requests of different lengths (joining at different steps), a burst prefilled
together in one packed forward, stop strings, seeds, cancel mid-stream and while waiting,
too-long prompts and max_tokens (vLLM's message), UTF-8 safety with multi-byte text and emoji,
resume after a lost node, the KV budget making requests wait, chat templates, a failing step,
and the dummy load format.

Through real root and node processes (`treechat node --engine hf`): concurrent greedy requests
equal to `model.generate`, stop strings, seeds, cancel, a too-long request, and multi-byte text
and emoji streamed whole (the parrot model). And `treechat up` with no engine flags answers
"What is the capital of France?" with Paris, on the real default model, over HTTP.
"""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from broker.protocol import ErrorCode, Request

from nodes.engine.base import EngineError, EngineRequest
from nodes.engine.detok import Detokenizer
from nodes.engine.hf import HFEngine, HFEngineConfig

CHAT = [{"role": "user", "content": "Hello there, how are you today?"}]


class Run:
    """Collects what an engine emits, per request, on the running loop."""

    def __init__(self, engine: HFEngine):
        self.engine = engine
        self.deltas: dict[int, list[str]] = {}
        self.ids: dict[int, list[int]] = {}
        self.done: dict = {}
        self.errors: dict = {}
        self.after_done: list[int] = []
        self.order: list[tuple[int, int]] = []   # (rid, step) of every token event
        self.finished_at: dict[int, int] = {}  # rid -> the step it finished in
        self.steps = 0
        self.changed = asyncio.Event()
        engine.start(asyncio.get_running_loop(), self.emit)

    def emit(self, out) -> None:
        self.steps += 1
        for rid, text, ids in out.tokens:
            if rid in self.done:
                self.after_done.append(rid)
            self.order.append((rid, self.steps))
            self.deltas.setdefault(rid, []).append(text)
            self.ids.setdefault(rid, []).extend(ids)
        for f in out.done:
            self.done[f.rid] = f
            self.finished_at[f.rid] = self.steps
        for rid, code, msg in out.errors:
            self.errors[rid] = (code, msg)
        self.changed.set()

    def text(self, rid: int) -> str:
        return "".join(self.deltas.get(rid, []))

    async def until(self, predicate, timeout: float = 60) -> None:
        async def wait():
            while not predicate():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(wait(), timeout)

    async def finish(self, rids) -> None:
        await self.until(lambda: all(r in self.done or r in self.errors for r in rids))


def make(path: str, **kw) -> HFEngine:
    return HFEngine(HFEngineConfig(model=path, device="cpu", dtype="float32", **kw))


_REFERENCES: dict[str, object] = {}


def reference_model(source):
    """transformers' own model of an engine's weights (or a model folder's), float32: what
    greedy output must equal."""
    from transformers import AutoModelForCausalLM
    from nodes.engine import models
    path = models.resolve(source.config.model if isinstance(source, HFEngine) else source)
    if path not in _REFERENCES:
        _REFERENCES[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _REFERENCES[path]


def greedy_reference(source, prompt_ids: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt_ids])
    out = reference_model(source).generate(ids, attention_mask=torch.ones_like(ids),
                                           max_new_tokens=n, min_new_tokens=0, do_sample=False,
                                           eos_token_id=None, pad_token_id=2)
    return out[0, len(prompt_ids):].tolist()


def script(engine: HFEngine, text: str) -> list[int]:
    """Make the engine's model produce exactly the tokens of `text` (then EOS): a thin wrapper
    around the runner that overrides each logits row by how many tokens its request has."""
    forced = engine.tokenizer.encode(text, add_special_tokens=False) + [2]
    real = engine.runner.forward

    def forward(decode, chunks):
        logits = real(decode, chunks)
        rows = decode + [seq for seq, start, n in chunks if start + n == len(seq.feed)]
        fake = torch.full_like(logits, -1e4)
        for i, seq in enumerate(rows):
            fake[i, forced[min(len(seq.tokens), len(forced) - 1)]] = 0
        return fake

    engine.runner.forward = forward
    return forced


def prompt_req(text: str, **kw) -> Request:
    return Request(prompt=text, **{"temperature": 0.0, **kw})


@pytest.mark.timeout(120)
def test_greedy_equals_generate_for_concurrent_requests(tiny_model):
    engine = make(tiny_model, max_slots=4)
    prompts = ["Hi", "The weather in Paris is lovely in the spring and", "One two three four five six seven eight nine ten eleven twelve",
               "Tell me a story", "A longer prompt about many things, places and people " * 3]
    lengths = [7, 19, 33, 12, 25]
    reqs = [prompt_req(p, max_tokens=n, ignore_eos=True) for p, n in zip(prompts, lengths)]

    async def main():
        run = Run(engine)
        for i in (0, 1):
            engine.submit(EngineRequest(i, reqs[i]))
        await run.until(lambda: len(run.ids.get(0, [])) >= 3)  # the rest join a running batch
        for i in (2, 3, 4):
            engine.submit(EngineRequest(i, reqs[i]))
        await run.finish(range(5))
        engine.stop()
        return run

    run = asyncio.run(main())
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        prompt_ids = engine.tokenizer.encode(p)
        assert run.ids[i] == greedy_reference(engine, prompt_ids, n), f"request {i}"
        assert run.done[i].reason == "length"
        assert (run.done[i].prompt_tokens, run.done[i].completion_tokens) == (len(prompt_ids), n)
        full = engine.tokenizer.decode(run.ids[i], skip_special_tokens=True)
        assert run.text(i) == full.rstrip("\ufffd")
    assert not run.after_done


@pytest.mark.timeout(120)
def test_a_burst_is_prefilled_together_and_still_equals_generate(tiny_model):
    """Requests arriving together share one packed prefill forward (their first tokens come
    in one step), while a full engine keeps the rest waiting; greedy output is unchanged."""
    engine = make(tiny_model, max_slots=4)
    real, packs = engine.runner.forward, []
    gate, held = threading.Event(), threading.Event()

    def forward(decode, chunks):
        packs.append(len(chunks))
        if not gate.is_set():  # hold the engine in its first forward while the burst arrives
            held.set()
            gate.wait(30)
        return real(decode, chunks)

    engine.runner.forward = forward
    prompts = ["Hi", "The weather in Paris is lovely in the spring and", "Tell me a story",
               "One two three four five six seven eight nine ten eleven twelve", "Last one"]
    lengths = [30, 9, 14, 6, 8]

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(0, prompt_req(prompts[0], max_tokens=30, ignore_eos=True)))
        await asyncio.get_running_loop().run_in_executor(None, held.wait, 30)
        for i in range(1, 5):
            engine.submit(EngineRequest(i, prompt_req(prompts[i], max_tokens=lengths[i],
                                                      ignore_eos=True)))
        gate.set()
        await run.finish(range(5))
        engine.stop()
        return run

    run = asyncio.run(main())
    engine.runner.forward = real
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        assert run.ids[i] == greedy_reference(engine, engine.tokenizer.encode(p), n), f"request {i}"
    started = {i: min(step for rid, step in run.order if rid == i) for i in range(5)}
    assert 3 in packs  # three free slots: requests 1-3 prefilled in one forward
    assert started[0] < started[1] == started[2] == started[3] < started[4]
    assert started[4] > run.finished_at[3]  # it waited for the first free slot


@pytest.mark.timeout(120)
def test_chat_request_uses_template_and_stops_at_eos(tiny_model):
    engine = make(tiny_model)
    req = Request(messages=CHAT, temperature=0.0, max_tokens=16)
    prompt_ids = engine.tokenize(req)
    rendered = engine.tokenizer.decode(prompt_ids)
    assert "<|im_start|>user" in rendered and rendered.endswith("<|im_start|>assistant\n")

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(1, req))
        await run.finish([1])
        engine.stop()
        return run

    run = asyncio.run(main())
    ref = greedy_reference(engine, prompt_ids, 16)
    if 2 in ref:
        ref = ref[:ref.index(2) + 1]
    assert run.ids[1] == ref
    assert run.done[1].completion_tokens == len(ref)
    assert run.done[1].reason == ("stop" if ref[-1] == 2 else "length")


def test_no_chat_template_is_a_clear_error_unless_given(tiny_model_no_template, tmp_path,
                                                       monkeypatch):
    from nodes.engine import templates
    # no built-in template fits either (this vocabulary's ChatML markers would: test_templates.py)
    monkeypatch.setattr(templates, "pick", lambda config, tokenizer: None)
    engine = make(tiny_model_no_template)
    with pytest.raises(EngineError) as err:
        engine.submit(EngineRequest(1, Request(messages=CHAT)))
    assert err.value.code == ErrorCode.BAD_REQUEST and "--chat-template" in err.value.message
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant] {% endif %}")
    engine = make(tiny_model_no_template, chat_template=str(template))
    ids = engine.tokenize(Request(messages=CHAT))
    assert engine.tokenizer.decode(ids).endswith("[assistant] ")


@pytest.mark.timeout(120)
def test_stop_strings_cut_and_hold_back(tiny_model):
    engine = make(tiny_model)
    prompt = "Say it"
    script(engine, "The answer is 42.\nEND of the story, truly")

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(1, prompt_req(prompt, stop=["\nEND"], max_tokens=40)))
        engine.submit(EngineRequest(2, prompt_req(prompt, stop=["42!"], max_tokens=40)))
        engine.submit(EngineRequest(3, prompt_req(prompt, stop=["story", "is 4"], max_tokens=40)))
        await run.finish([1, 2, 3])
        engine.stop()
        return run

    run = asyncio.run(main())
    assert run.text(1) == "The answer is 42." and run.done[1].reason == "stop"
    assert not any("\n" in d for d in run.deltas[1])  # the held "\n" never went out
    assert run.text(2) == "The answer is 42.\nEND of the story, truly"  # "42" held, then released
    assert run.done[2].reason == "stop"  # by EOS
    assert run.text(3) == "The answer " and run.done[3].reason == "stop"  # the earliest stop wins


@pytest.mark.timeout(120)
def test_utf8_multibyte_and_emoji_never_broken(tiny_model):
    engine = make(tiny_model)
    text = "Café déjà vu: 日本語のテキスト 🎉👍🏽 naïve — ok ✓"
    prompt = "Go"
    forced = script(engine, text)
    pieces = [engine.tokenizer.decode([t]) for t in forced]
    assert any("\ufffd" in s for s in pieces)  # the text really splits characters across tokens

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(1, prompt_req(prompt, max_tokens=100)))
        await run.finish([1])
        engine.stop()
        return run

    run = asyncio.run(main())
    assert run.text(1) == text
    assert not any("\ufffd" in d for d in run.deltas[1])
    assert run.ids[1] == forced


def test_detokenizer_holds_partial_stop_and_merged_tokens(tiny_model):
    from transformers import AutoTokenizer
    import threading
    tok = AutoTokenizer.from_pretrained(tiny_model)
    d = Detokenizer(tok, tok.encode("Q:"), ["STOP"], threading.Lock())
    got = []
    for t in tok.encode(" fine ST", add_special_tokens=False):
        d.add(t)
        d.find_stop()
        got.append(d.take())
    assert "".join(got) == " fine "  # "ST" might start "STOP": held
    for t in tok.encode("OP now", add_special_tokens=False):
        d.add(t)
        d.find_stop()
    assert d.stopped and d.take(final=True) == "" and d.text == " fine "


@pytest.mark.timeout(120)
def test_seed_gives_same_text_and_settings_stay_per_request(tiny_model):
    engine = make(tiny_model)
    sampled = dict(temperature=1.0, top_p=0.9, top_k=50, max_tokens=20, ignore_eos=True)

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(1, prompt_req("Once upon a time", seed=7, **sampled)))
        engine.submit(EngineRequest(2, prompt_req("Once upon a time", seed=7, **sampled)))
        engine.submit(EngineRequest(3, prompt_req("Once upon a time", seed=8, **sampled)))
        engine.submit(EngineRequest(4, prompt_req("Once upon a time", max_tokens=20, ignore_eos=True)))
        await run.finish([1, 2, 3, 4])
        engine.submit(EngineRequest(5, prompt_req("Once upon a time", seed=7, **sampled)))
        await run.finish([5])
        engine.stop()
        return run

    run = asyncio.run(main())
    assert run.ids[1] == run.ids[2] == run.ids[5]  # same seed, in one batch or alone later
    assert run.ids[3] != run.ids[1]
    assert run.ids[4] == greedy_reference(engine, engine.tokenizer.encode("Once upon a time"), 20)


@pytest.mark.timeout(120)
def test_cancel_mid_stream_and_while_waiting(tiny_model):
    # A budget that holds one long request at a time: the second waits inside the engine.
    engine = make(tiny_model, max_model_len=512, kv_budget=600)

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(1, prompt_req("Count with me", max_tokens=400, ignore_eos=True)))
        engine.submit(EngineRequest(2, prompt_req("Wait for me", max_tokens=400, ignore_eos=True)))
        await run.until(lambda: len(run.ids.get(1, [])) >= 5)
        assert 2 not in run.ids  # it does not fit beside 1
        engine.cancel(2)
        await run.until(lambda: 2 in run.done)
        engine.cancel(1)
        await run.finish([1])
        engine.stop()
        return run

    run = asyncio.run(main())
    assert run.done[2].reason == "cancelled" and run.done[2].completion_tokens == 0
    assert run.done[1].reason == "cancelled" and 5 <= run.done[1].completion_tokens < 400
    assert run.done[1].completion_tokens == len(run.ids[1])
    assert not run.after_done


@pytest.mark.timeout(120)
def test_kv_budget_makes_requests_wait_then_run(tiny_model):
    engine = make(tiny_model, max_model_len=256, kv_budget=100)
    peak = []

    async def main():
        run = Run(engine)
        for i in range(3):
            engine.submit(EngineRequest(i, prompt_req(f"Request number {i}", max_tokens=40,
                                                      ignore_eos=True)))
        await run.until(lambda: peak.append(engine.runner.cache.rows * engine.runner.cache.cap) or
                        all(i in run.done for i in range(3)))
        engine.stop()
        return run

    run = asyncio.run(main())
    for i in range(3):
        ids = engine.tokenizer.encode(f"Request number {i}")
        assert run.ids[i] == greedy_reference(engine, ids, 40)
    assert max(peak) <= 100  # rows x cap: the cache never held more tokens than the budget
    # Each reserves ~44 tokens (prompt + 40): two fit in 100, the third waited for a free row.
    started = {i: min(step for rid, step in run.order if rid == i) for i in range(3)}
    assert max(started[0], started[1]) < started[2]
    assert started[2] >= min(run.finished_at[0], run.finished_at[1])


def test_too_long_prompt_and_max_tokens_are_refused_with_numbers(tiny_model):
    engine = make(tiny_model, max_model_len=64)
    with pytest.raises(EngineError) as err:
        engine.submit(EngineRequest(1, prompt_req("word " * 80)))
    p = len(engine.tokenizer.encode("word " * 80))
    assert err.value.code == ErrorCode.TOO_LONG
    assert err.value.message == (
        f"This model's maximum context length is 64 tokens. However, you requested {p + 1} tokens "
        f"({p} in the messages, 1 in the completion). Please reduce the length of the messages "
        "or completion.")
    with pytest.raises(EngineError) as err:
        engine.submit(EngineRequest(2, prompt_req("short one", max_tokens=100)))
    p = len(engine.tokenizer.encode("short one"))
    assert f"you requested {p + 100} tokens ({p} in the messages, 100 in the completion)" \
        in err.value.message
    assert engine._inbox.empty()  # refused before any work


@pytest.mark.timeout(120)
def test_resume_continues_exactly_where_the_lost_node_stopped(tiny_model):
    engine = make(tiny_model)
    req = Request(messages=CHAT, temperature=0.0, max_tokens=24, ignore_eos=True)

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(1, req))
        await run.finish([1])
        k = 9
        delivered = "".join(run.deltas[1][:k])
        engine.submit(EngineRequest(2, req, resume_ids=run.ids[1][:k], resume_text=delivered))
        await run.finish([2])
        engine.stop()
        return run, k, delivered

    run, k, delivered = asyncio.run(main())
    assert run.ids[2] == run.ids[1][k:]
    assert delivered + run.text(2) == run.text(1)
    assert run.done[2].completion_tokens == run.done[1].completion_tokens == 24


@pytest.mark.timeout(120)
def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(tiny_model):
    engine = make(tiny_model)
    real, calls = engine.runner.forward, []

    def forward(decode, chunks):
        calls.append(1)
        if len(calls) == 3:  # prefill, one decode, then the second decode fails
            raise RuntimeError("boom")
        return real(decode, chunks)

    engine.runner.forward = forward

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(1, prompt_req("Fail me", max_tokens=10, ignore_eos=True)))
        await run.finish([1])
        engine.submit(EngineRequest(2, prompt_req("Not me", max_tokens=10, ignore_eos=True)))
        await run.finish([2])
        engine.stop()
        return run

    run = asyncio.run(main())
    assert run.errors[1][0] == ErrorCode.ENGINE and "boom" in run.errors[1][1]
    assert 1 not in run.done and len(run.ids[1]) == 2
    assert run.done[2].reason == "length" and run.done[2].completion_tokens == 10


def test_describe_and_config_validation(tiny_model):
    engine = make(tiny_model, max_slots=3)
    info = engine.describe()
    assert info["engine"] == "hf" and info["slots"] == 3 and info["device"] == "cpu"
    assert info["dtype"] == "float32" and info["max_model_len"] == 1024
    for bad in (dict(max_slots=0), dict(dtype="int8"), dict(load_format="dummy"),
                dict(model_config="gpt2"), dict(chat_template="/no/such/file")):
        with pytest.raises(ValueError):
            HFEngineConfig(**bad)


@pytest.mark.timeout(120)
def test_the_model_loads_and_runs_on_the_engine_thread_alone(tiny_model, monkeypatch):
    """OpenMP keeps a worker pool per thread that starts parallel work; with a second pool
    (the model loaded on one thread, stepped on another) every decode step on 2 cores took twice
    as long. Whoever constructs the engine, its load, runner and steps run on its one thread,
    and a load that fails still raises where the engine was made."""
    from nodes.engine import models
    seen: dict[str, set] = {"load": set(), "make_runner": set(), "forward": set()}

    def on_thread(name, fn):
        def wrapped(*a, **kw):
            seen[name].add(threading.current_thread())
            return fn(*a, **kw)
        return wrapped

    for name in ("load", "make_runner"):
        monkeypatch.setattr(models, name, on_thread(name, getattr(models, name)))
    made = []
    builder = threading.Thread(target=lambda: made.append(make(tiny_model, max_slots=2)))
    builder.start()
    builder.join(60)
    engine = made[0]
    engine.runner.forward = on_thread("forward", engine.runner.forward)

    async def main():
        run = Run(engine)
        for i in (1, 2):
            engine.submit(EngineRequest(i, prompt_req(f"Count to {i}", max_tokens=5,
                                                      ignore_eos=True)))
        await run.finish([1, 2])
        engine.stop()
        return run

    run = asyncio.run(main())
    assert [run.done[i].completion_tokens for i in (1, 2)] == [5, 5]
    threads = set().union(*seen.values())
    assert len(threads) == 1 and all(seen.values()), seen
    assert threads.pop() not in (builder, threading.main_thread())
    with pytest.raises(ValueError, match="--model /no/such/model: not a local folder"):
        make("/no/such/model")


@pytest.mark.timeout(120)
def test_dummy_gpt2_shape_runs(default_model_dir):
    engine = HFEngine(HFEngineConfig(load_format="dummy", model_config="gpt2", device="cpu"))
    assert engine.describe()["max_model_len"] == 1024

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(1, prompt_req("Benchmark me", max_tokens=6, ignore_eos=True)))
        engine.submit(EngineRequest(2, prompt_req("Me too", max_tokens=4, ignore_eos=True,
                                                  temperature=1.0, seed=3)))
        await run.finish([1, 2])
        engine.stop()
        return run

    run = asyncio.run(main())
    assert run.done[1].completion_tokens == 6 and run.done[2].completion_tokens == 4
    assert all(t < len(engine.tokenizer) for t in run.ids[1] + run.ids[2])


# --- through real root and node processes --------------------------------------------------------

def hf_node(cluster, model: str, *extra: str) -> str:
    root, _ = cluster.root()
    cluster.node(root, "gpu-1", None, "--model", model, "--device", "cpu", *extra, engine="hf")
    return root


@pytest.mark.timeout(180)
def test_node_serves_concurrent_greedy_requests_like_generate(cluster, tiny_model):
    from conftest import connect, run, wait_tree
    from transformers import AutoTokenizer
    root = hf_node(cluster, tiny_model, "--max-slots", "4")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = ["Hi", "The weather in Paris is lovely in the spring and", "Tell me a story",
               "One two three four five six seven eight nine ten", "Why is the sky blue?"]
    lengths = [9, 21, 14, 30, 5]

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"gpu-1"})
        streams = [client.submit({"prompt": p, "max_tokens": n, "temperature": 0,
                                  "ignore_eos": True}) for p, n in zip(prompts, lengths)]
        results = await asyncio.gather(*(s.collect() for s in streams))
        client.close()
        return results

    results = run(scenario(), timeout=120)
    for (text, final), p, n in zip(results, prompts, lengths):
        ref = greedy_reference(tiny_model, tok.encode(p), n)
        assert final.kind == "done" and final.finish_reason == "length"
        assert final.completion_tokens == n and final.prompt_tokens == len(tok.encode(p))
        assert text == tok.decode(ref, skip_special_tokens=True).rstrip("\ufffd")


@pytest.mark.timeout(180)
def test_node_stop_seed_cancel_and_too_long(cluster, tiny_model):
    from conftest import connect, run, wait_tree
    root = hf_node(cluster, tiny_model, "--max-model-len", "128")

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"gpu-1"})
        base = {"prompt": "Stop me if you can", "max_tokens": 30, "temperature": 0,
                "ignore_eos": True}
        full, _ = await client.submit(base).collect()
        stop = full[len(full) // 2:len(full) // 2 + 3]
        cut, final = await client.submit({**base, "stop": [stop]}).collect()
        assert final.finish_reason == "stop" and cut == full[:full.index(stop)]

        seeded = {**base, "temperature": 1.0, "top_k": 40, "seed": 11}
        a, b = await asyncio.gather(client.submit(seeded).collect(),
                                    client.submit(seeded).collect())
        c, _ = await client.submit({**seeded, "seed": 12}).collect()
        assert a[0] == b[0] and a[0] != c

        long = client.submit({**base, "max_tokens": 200})
        text, final = await long.collect()
        assert final.kind == "error" and final.code == "too_long"
        assert "maximum context length is 128 tokens" in final.message

        stream = client.submit({**base, "max_tokens": 90})
        async for ev in stream:
            if ev.kind == "delta":
                stream.cancel()
                break
        _, final = await stream.collect()
        assert final.finish_reason == "cancelled"
        again, final = await client.submit(base).collect()  # the node is still healthy
        assert again == full and final.finish_reason == "length"
        client.close()

    run(scenario(), timeout=120)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_default_model_batched_greedy_equals_generate(default_model_dir):
    """The real 135M model in float32: a batch of chats of different lengths, token for token."""
    engine = make(default_model_dir)
    questions = ["What is the capital of France?", "Write a haiku about autumn.",
                 "Explain gravity to a child.", "List three fruits."]
    reqs = [Request(messages=[{"role": "user", "content": q}], temperature=0.0, max_tokens=24)
            for q in questions]

    async def main():
        run = Run(engine)
        for i, r in enumerate(reqs):
            engine.submit(EngineRequest(i, r))
        await run.finish(range(len(reqs)))
        engine.stop()
        return run

    run = asyncio.run(main())
    for i, r in enumerate(reqs):
        ref = greedy_reference(engine, engine.tokenize(r), 24)
        if 2 in ref:
            ref = ref[:ref.index(2) + 1]
        assert run.ids[i] == ref, questions[i]
    assert "Paris" in run.text(0)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_treechat_up_with_the_default_model_knows_paris(cluster, default_model_dir):
    """`treechat up` with no engine flags: the default model, the HTTP gateway, a real answer."""
    import requests
    up = cluster.up(timeout=400)  # a fresh machine converts the default model first
    r = requests.post(f"{up.http}/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 40, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert "Paris" in body["choices"][0]["message"]["content"], body
    assert body["choices"][0]["finish_reason"] == "stop"


@pytest.mark.timeout(180)
def test_node_streams_multibyte_text_and_emoji_whole(cluster, parrot_model):
    from conftest import connect, run, wait_tree
    from model_fixtures import PARROT_TEXT
    root = hf_node(cluster, parrot_model)

    async def scenario():
        client = await connect(root)
        await wait_tree(client, {"gpu-1"})
        chat = {"messages": [{"role": "user", "content": "Say something"}], "temperature": 0}
        deltas, final = [], None
        async for ev in client.submit(chat):
            if ev.kind == "delta":
                deltas.append(ev.text)
            elif ev.final:
                final = ev
        cut, stopped = await client.submit({**chat, "stop": ["🚀"]}).collect()
        client.close()
        return deltas, final, cut, stopped

    deltas, final, cut, stopped = run(scenario(), timeout=120)
    assert "".join(deltas) == PARROT_TEXT and final.finish_reason == "stop"
    assert not any("\ufffd" in d for d in deltas)
    assert len([d for d in deltas if d]) > 3  # it really streamed, piece by piece
    assert cut == "naïve — 東京 " and stopped.finish_reason == "stop"


@pytest.mark.timeout(120)
def test_a_vocabulary_padded_past_the_tokenizer_never_samples_the_padding(tiny_model, tmp_path):
    """Qwen-style checkpoints pad the embedding past the tokenizer's ids. Here the padding's LM-head
    rows are made the likeliest by far: the engine must still only answer with real tokens."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    tok = AutoTokenizer.from_pretrained(tiny_model)
    net = LlamaForCausalLM.from_pretrained(tiny_model)
    real = len(tok)
    net.resize_token_embeddings(real + 64)
    with torch.no_grad():
        net.lm_head.weight[real:] = net.lm_head.weight[:real].abs().max() * 50
    net.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    engine = make(str(tmp_path), max_slots=2)

    async def main():
        run = Run(engine)
        engine.submit(EngineRequest(0, prompt_req("Hello there", max_tokens=8, ignore_eos=True)))
        await run.finish([0])
        engine.stop()
        return run

    run = asyncio.run(main())
    assert engine.vocab == real and len(run.ids[0]) == 8
    assert max(run.ids[0]) < real

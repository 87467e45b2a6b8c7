"""`treechat bench`: the metric arithmetic, runs against a fake-engine tree, failing targets, --compare."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys

import orjson
import pytest

from conftest import REPO, free_ports

from bench.metrics import Record, parse_goodput, percentile, summarize
from bench.workload import WorkloadConfig, arrival_gaps, build


def bench(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "treechat.cli", "bench", "--no-progress", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def hand_records() -> list[Record]:
    return [
        Record(0, start=0.0, ttft=0.1, itl=[0.05, 0.05, 0.1], end=0.3, prompt_tokens=10, output_tokens=4),
        Record(1, start=0.1, ttft=0.2, itl=[], end=0.3, prompt_tokens=5, output_tokens=1),
        Record(2, start=0.2, ttft=0.3, itl=[0.1], end=0.6, prompt_tokens=7, output_tokens=2),
        Record(3, start=0.3, end=0.35, prompt_tokens=100, error="http_500", error_message="boom"),
    ]


def test_summary_matches_hand_computed_vllm_definitions():
    s = summarize(hand_records(), duration=1.0)
    assert (s["completed"], s["failed"], s["errors"]) == (3, 1, {"http_500": 1})
    # the failed request's 100 prompt tokens count nowhere
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (22, 7)
    assert s["request_throughput"] == pytest.approx(3.0)
    assert s["output_throughput"] == pytest.approx(7.0)
    assert s["total_token_throughput"] == pytest.approx(29.0)
    assert s["ttft_ms"]["mean"] == pytest.approx(200)
    assert s["ttft_ms"]["median"] == pytest.approx(200)
    assert s["ttft_ms"]["p99"] == pytest.approx(298)  # linear interpolation, as numpy
    # TPOT = (latency - TTFT) / (tokens - 1), only for requests with more than one token
    assert s["tpot_ms"]["mean"] == pytest.approx((200 / 3 + 100) / 2)
    # ITL pooled over every gap of every request
    assert s["itl_ms"]["mean"] == pytest.approx(75)
    assert s["itl_ms"]["p90"] == pytest.approx(100)
    assert s["e2el_ms"]["mean"] == pytest.approx(300)
    assert s["e2el_ms"]["p99"] == pytest.approx(398)


def test_goodput_counts_requests_meeting_every_slo():
    s = summarize(hand_records(), 2.0, parse_goodput(["ttft:250", "tpot:90"]))
    assert s["good_requests"] == 2  # the one-token request counts as TPOT 0, as in vLLM
    assert s["request_goodput"] == pytest.approx(1.0)
    s = summarize(hand_records(), 2.0, parse_goodput(["ttft:250", "tpot:90", "e2el:250"]))
    assert s["good_requests"] == 1
    for bad in (["ttft"], ["speed:5"], ["ttft:fast"], ["tpot:-1"]):
        with pytest.raises(ValueError):
            parse_goodput(bad)


def test_percentile_and_empty_inputs():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([], 99) == 0.0
    s = summarize([Record(0, start=0, end=1, error="connect")], 1.0)
    assert s["completed"] == 0 and s["ttft_ms"]["p99"] == 0.0 and s["errors"] == {"connect": 1}


def test_workloads_are_seeded_and_arrivals_have_the_asked_rate():
    for dataset in ("random", "chat", "prefix", "mixed"):
        cfg = WorkloadConfig(dataset=dataset, num_requests=50, input_len=20, output_len=10,
                             range_ratio=0.5, prefix_len=30, long_output_len=99, seed=7)
        a, b = build(cfg), build(cfg)
        assert [(i.messages, i.max_tokens) for i in a] == [(i.messages, i.max_tokens) for i in b]
        assert build(WorkloadConfig(**{**cfg.__dict__, "seed": 8}))[0].messages != a[0].messages \
            or dataset == "chat"
    rnd = build(WorkloadConfig(num_requests=200, input_len=20, output_len=10, range_ratio=0.5))
    assert all(10 <= i.prompt_words <= 30 and 5 <= i.max_tokens <= 15 for i in rnd)
    mixed = build(WorkloadConfig(dataset="mixed", num_requests=200, long_fraction=0.2,
                                 output_len=4, long_output_len=400))
    assert {i.max_tokens for i in mixed} == {4, 400}
    gaps = arrival_gaps(4000, rate=50.0, burstiness=0.5, seed=1)
    assert sum(gaps) / len(gaps) == pytest.approx(1 / 50, rel=0.1)
    assert arrival_gaps(3, float("inf"), 1.0, 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        WorkloadConfig(dataset="sharegpt")


def test_bench_against_a_fake_tree_writes_json_and_png(cluster, tmp_path):
    up = cluster.up("--engine", "fake", "--nodes", "2", "--fake-delay", "0.002", "--grace", "2")
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    r = bench("--root", up.root, "--num-requests", "40", "--max-concurrency", "6",
              "--random-output-len", "8", "--ignore-eos", "--warmup", "2", "--goodput", "ttft:60000",
              "--save-result", str(out), "--plot", str(png))
    assert r.returncode == 0, r.stderr
    assert "Successful requests:" in r.stdout and "P99 TTFT (ms)" in r.stdout
    data = orjson.loads(out.read_bytes())
    s = data["summary"]
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (40, 0, 320)
    assert s["good_requests"] == 40 and s["request_throughput"] > 0
    assert data["config"]["max_concurrency"] == 6 and len(data["records"]) == 40
    rec = data["records"][0]
    assert rec["output_tokens"] == 8 and len(rec["itl"]) >= 1 and rec["finish_reason"] == "length"
    assert 0 <= rec["ttft"] <= rec["latency"] and rec["error"] is None
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not (REPO / "gateways" / "http" / "server.py").exists(),
                    reason="the HTTP gateway is not built yet")
def test_bench_over_the_http_gateway(cluster, tmp_path):
    up = cluster.up("--engine", "fake", "--nodes", "1", "--fake-delay", "0.002", "--grace", "2")
    out = tmp_path / "h.json"
    r = bench("--base-url", up.http, "--num-requests", "20", "--max-concurrency", "4",
              "--random-output-len", "6", "--ignore-eos", "--save-result", str(out))
    assert r.returncode == 0, r.stderr
    s = orjson.loads(out.read_bytes())["summary"]
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (20, 0, 120)


@pytest.mark.skipif(not (REPO / "gateways" / "tcp_mobile" / "server.py").exists(),
                    reason="the TCP gateway is not built yet")
def test_bench_over_the_tcp_gateway(cluster, tmp_path):
    up = cluster.up("--engine", "fake", "--nodes", "1", "--fake-delay", "0.002", "--grace", "2")
    out = tmp_path / "t.json"
    r = bench("--tcp", f"127.0.0.1:{up.tcp_port}", "--num-requests", "20", "--max-concurrency", "4",
              "--random-output-len", "6", "--ignore-eos", "--save-result", str(out))
    assert r.returncode == 0, r.stderr
    s = orjson.loads(out.read_bytes())["summary"]
    assert (s["completed"], s["failed"], s["total_output_tokens"]) == (20, 0, 120)


def test_a_closed_port_is_reported_as_failures(tmp_path):
    (port,) = free_ports(1)
    out = tmp_path / "closed.json"
    for target in (["--base-url", f"http://127.0.0.1:{port}"], ["--tcp", f"127.0.0.1:{port}"]):
        r = bench(*target, "--num-requests", "5", "--warmup", "0", "--save-result", str(out))
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert "Failed requests:" in r.stdout and "errors connect:" in r.stdout
        s = orjson.loads(out.read_bytes())["summary"]
        assert (s["completed"], s["failed"], s["errors"]) == (0, 5, {"connect": 5})


def test_an_overloaded_tree_is_reported_by_error_type(cluster, tmp_path):
    """One slot, no waiting room: of three requests sent at once, one runs and two are refused."""
    up = cluster.up("--engine", "fake", "--nodes", "1", "--max-slots", "1", "--max-queue", "0",
                    "--fake-delay", "0.01", "--grace", "1")
    targets = {"root": ["--root", up.root]}
    if (REPO / "gateways" / "http" / "server.py").exists():
        targets["http"] = ["--base-url", up.http]
    out = tmp_path / "over.json"
    for kind, target in targets.items():
        r = bench(*target, "--num-requests", "3", "--warmup", "0", "--random-output-len", "300",
                  "--ignore-eos", "--save-result", str(out))
        assert r.returncode == 0, r.stderr
        s = orjson.loads(out.read_bytes())["summary"]
        assert (s["completed"], s["failed"]) == (1, 2)
        assert s["errors"] == {"http_503 overloaded" if kind == "http" else "overloaded": 2}
        assert s["total_output_tokens"] == 300  # the refused requests add no tokens


def test_a_server_answering_500_is_reported_as_failures(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "bench.bare", "tornado", "--fail", "500"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = orjson.loads(line.split(" ", 1)[1])["url"]
        out = tmp_path / "500.json"
        r = bench("--base-url", url, "--num-requests", "6", "--warmup", "1", "--save-result", str(out))
        assert r.returncode == 1 and "Traceback" not in r.stderr
        data = orjson.loads(out.read_bytes())
        assert data["summary"]["errors"] == {"http_500 bare_failure": 6}
        assert all(rec["error_message"] for rec in data["records"])
    finally:
        proc.terminate()
        proc.wait(10)


def test_bare_sse_server_streams_every_token(tmp_path):
    """The HTTP client parses a real OpenAI-style stream: text, usage, [DONE]."""
    proc = subprocess.Popen([sys.executable, "-m", "bench.bare", "tornado"], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    try:
        url = orjson.loads(proc.stdout.readline().split(" ", 1)[1])["url"]
        out = tmp_path / "bare.json"
        for endpoint in ("/v1/chat/completions", "/v1/completions"):
            r = bench("--base-url", url, "--endpoint", endpoint, "--num-requests", "10",
                      "--request-rate", "200", "--random-output-len", "5", "--save-result", str(out))
            assert r.returncode == 0, r.stderr
            data = orjson.loads(out.read_bytes())
            assert data["summary"]["completed"] == 10
            assert all(rec["text"] == "tok " * 5 and len(rec["itl"]) == 4 for rec in data["records"])
    finally:
        proc.terminate()
        proc.wait(10)


def test_compare_runs_each_configuration(tmp_path):
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    r = bench("--compare", "policy=seed,least-loaded", "--up-args",
              "--engine fake --fake-delay 0.002 --heartbeat 0.2 --grace 2", "--via", "root",
              "--num-requests", "12", "--max-concurrency", "4", "--random-output-len", "4",
              "--ignore-eos", "--save-result", str(out), "--plot", str(png), timeout=110)
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0]
    assert "policy=seed" in header and "policy=least-loaded" in header
    runs = orjson.loads(out.read_bytes())["runs"]
    assert [run["label"] for run in runs] == ["policy=seed", "policy=least-loaded"]
    assert all(run["summary"]["completed"] == 12 for run in runs)
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_bad_flags_get_a_clear_error():
    r = bench("--compare", "nodes", "--via", "root")
    assert r.returncode == 2 and "FLAG=V1,V2" in r.stderr
    r = bench("--compare", "colour=red", "--via", "root")
    assert r.returncode == 2 and "not a valid command line" in r.stderr
    r = bench("--num-requests", "3")
    assert r.returncode == 2 and "give exactly one target" in r.stderr


def test_plot_without_matplotlib_fails_before_the_run(tmp_path):
    """An install without matplotlib (what `./dev.sh up` installs) gets one clear line and exit
    2 at once, not a traceback after the whole bench ran."""
    (port,) = free_ports(1)  # nothing listens: had the bench started, it would report failures
    blocker = tmp_path / "matplotlib"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('not installed in this test')\n")
    r = subprocess.run([sys.executable, "-m", "treechat.cli", "bench", "--base-url",
                        f"http://127.0.0.1:{port}", "--num-requests", "3", "--plot",
                        str(tmp_path / "x.png")], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--plot needs matplotlib" in r.stderr and "Failed requests" not in r.stdout


def test_startup_bench_stamps_every_milestone_in_order(tmp_path):
    out = tmp_path / "startup.json"
    result = subprocess.run([sys.executable, "-m", "bench.startup", "--runs", "1", "--up-args",
                             "--engine fake", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-500:]
    run = orjson.loads(out.read_bytes())["runs"][0]
    order = ["root listening", "node registered", "banner", "first token", "answer done"]
    assert [run[name] for name in order] == sorted(run[name] for name in order)
    assert {"tcp gateway listening", "http gateway listening"} <= set(run)
    assert "| banner |" in result.stdout


def test_quality_bench_counts_what_a_tree_answers(tmp_path):
    """Against the fake engine (it answers the prompt's words): every question answered, none a
    loop, and the France question does not name Paris: the counts come from the answers."""
    from bench.quality import QUESTIONS
    out = tmp_path / "quality.json"
    result = subprocess.run([sys.executable, "-m", "bench.quality", "--up-args", "--engine fake",
                             "--max-tokens", "5", "--json", str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-500:]
    report = orjson.loads(out.read_bytes())
    s = report["summary"]
    assert (s["answers"], s["errors"], s["loops"], s["france_asked"]) == (len(QUESTIONS), 0, 0, 1)
    assert s["france_names_paris"] == 0
    answers = report["answers"]
    assert [x["question"] for x in answers] == QUESTIONS
    assert s["length"] == sum(x["finish"] == "length" for x in answers) > 0  # cut at 5 tokens
    assert s["stop"] == len(QUESTIONS) - s["length"] > 0
    assert f"{len(QUESTIONS)} answers:" in result.stdout


def test_quality_bench_tells_loops_from_answers():
    from bench.quality import loops
    assert loops("L'Étoile, la Marseillaise, " + "la femme au roi, " * 5)
    assert loops("Hola in Spanish! 😊" + "🌍" * 20)
    assert loops("Hola! 🌻👩❄️💡📐🎉🏼🔬🕈😍👨\u200d♀️👸👹👶👵👷👭👮👺👽👻👾👿💖📐🌟🎁")  # a salad
    assert not loops("The capital of France is Paris. Paris is also its largest city. 🇫🇷")
    assert not loops("1. Sleep at the same time.\n2. Sleep in the dark.\n3. Sleep without a screen.")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_random_weights_of_a_shape_are_a_gguf_llama_cpp_reads(name, tmp_path):
    """bench.shapes writes what llama.cpp expects for the architecture: its tensor names and
    shapes, its metadata keys, the default model's tokenizer padded to the vocabulary; and
    llama.cpp's own quantizer (where the checkout has one) makes Q8_0 of it."""
    import gguf
    from bench.peer import file_facts
    from bench.shapes import QUANTIZE, SHAPES, Header, quantize, write_gguf
    shape = SHAPES[name]
    path = write_gguf(name, tmp_path / f"{name}-F16.gguf", seed=1)
    r = gguf.GGUFReader(path)
    a = shape.arch
    assert r.fields["general.architecture"].contents() == a
    for key, want in [("embedding_length", shape.hidden), ("block_count", shape.layers),
                      ("feed_forward_length", shape.intermediate),
                      ("attention.head_count", shape.heads),
                      ("attention.head_count_kv", shape.kv_heads),
                      ("attention.key_length", shape.head_dim),
                      ("context_length", shape.context)]:
        assert r.fields[f"{a}.{key}"].contents() == want, key
    assert r.fields[f"{a}.rope.freq_base"].contents() == shape.rope_theta
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    assert len(tokens) == shape.vocab and tokens[-1] == f"<pad_{shape.vocab - 1}>"
    assert tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == {n for n, _ in shape.tensors()}
    for n, dims in shape.tensors():
        assert tuple(tensors[n].shape) == dims[::-1], n  # ggml order: columns first
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert (tensors["blk.0.attn_norm.weight"].data == 1).all()  # Gemma's +1 already added
    w = tensors["blk.1.ffn_up.weight"].data.astype("float32")
    assert abs(w.std() - 0.02) < 0.002 and abs(w.mean()) < 0.002
    if a == "gemma3":
        assert r.fields["gemma3.attention.sliding_window"].contents() == shape.sliding_window
        assert {"blk.5.post_ffw_norm.weight", "blk.0.attn_k_norm.weight"} <= set(tensors)
    else:
        assert "output.weight" in tensors and "rope_freqs.weight" in tensors  # untied, Llama 3
    h = Header(path)  # our quick reader sees what gguf's sees
    assert [(n, d, t) for n, d, t in h.tensors] == [
        (t.name, tuple(int(x) for x in t.shape), int(t.tensor_type)) for t in r.tensors]
    assert h.tensor_bytes() == sum(int(t.n_bytes) for t in r.tensors)
    facts = file_facts(str(path))
    assert facts["parameters"] == sum(int(t.n_elements) for t in r.tensors)
    embed = int(tensors["token_embd.weight"].n_bytes)
    assert facts["decode_bytes"] == h.tensor_bytes() - (embed if a == "llama" else 0)
    if not QUANTIZE.exists():
        pytest.skip(f"no llama.cpp quantizer at {QUANTIZE}")
    q8 = quantize(path, tmp_path / f"{name}-Q8_0.gguf", "Q8_0")
    types = {n: gguf.GGMLQuantizationType(t).name for n, _, t in Header(q8).tensors}
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == "F32"


def test_peer_bench_checks_its_flags_and_tables_every_file(capsys):
    """bench.peer's own arithmetic, no server: bad flags are usage errors (after finding the
    default model's file), prompts are exact token counts, and the table of every file says
    which server failed and where the roofline column applies."""
    from bench.metrics import Record
    from bench.peer import at_rest, files_table, main, token_prompts, workload
    with pytest.raises(SystemExit) as e:
        main(["--concurrency", "1,8", "--requests", "3"])
    assert e.value.code == 2 and "one positive number per --concurrency" in capsys.readouterr().err
    items = token_prompts(3, 64, 64, seed=0)
    assert [len(i.prompt) for i in items] == [64] * 3 and items[0].text() == items[0].prompt
    assert all(1000 <= t < 10000 for i in items for t in i.prompt)
    a = argparse.Namespace(workload="completions", concurrency=[1, 8], requests=None, rounds=2,
                           warmup=2, prompt_tokens=64, max_tokens=64, seed=0)
    sent = [[str(i.prompt) for part in workload(a, c) for i in part] for c in (1, 8)]
    assert len(sent[0]) == 5 and len(sent[1]) == 10  # no level meets another level's prompt
    assert len(set(sent[0] + sent[1])) == 15
    idle = subprocess.Popen(["sleep", "30"])
    try:  # a process whose memory does not move is read at rest
        rest = asyncio.run(at_rest({"sleep": lambda: idle.pid}, every=0.05))
        assert rest["sleep"]["rss_mb"] > 0 and rest["sleep"]["peak_mb"] >= rest["sleep"]["rss_mb"]
    finally:
        idle.kill()
        idle.wait()
    recs = [Record(0, start=0.0, ttft=0.1, itl=[0.05] * 9, end=0.55, output_tokens=10)]
    summary = summarize(recs, 0.55)
    big = {"file": {"name": "big", "bytes": 8e8, "parameters": 1.2e9, "decode_bytes": 8e8},
           "levels": {1: [{"label": "llama-server", "summary": summary}]},
           "memory": {"llama-server": {"rss_mb": 1500.0, "peak_mb": 1600.0}},
           "failed": {"treechat": "did not start"}}
    rows = files_table([big], ["treechat", "llama-server"], bandwidth=40e9).splitlines()[2:]
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:4] == ["big", "0.80", "1", "failed / 18.2"]
    assert cells[6] == "– / 1500 (1600)" and cells[7] == "– / 16.0 (40%)"  # 0.8 GB / 50 ms


@pytest.mark.timeout(120)
def test_step_bench_times_decode_and_prefill_on_a_real_file(tiny_kquant_gguf):
    """bench.step loads a GGUF file as a node does and times its forward: decode steps and
    prefills, with the node's memory; a file that is not there is a clear error."""
    from nodes.engine.blocks import kernels
    path, _ = tiny_kquant_gguf

    def step(*args):
        return subprocess.run([sys.executable, "-m", "bench.step", "--model", *args],
                              cwd=REPO, capture_output=True, text=True, timeout=100)

    if kernels.library() is None:
        pytest.skip("no C kernels here: bench.step times our CPU runner only")
    decode = step(path, "--rows", "2", "--steps", "3")
    assert decode.returncode == 0, decode.stderr[-800:]
    assert "decode, 2 rows:" in decode.stdout and "ms a step" in decode.stdout
    assert "'Rss'" in decode.stdout
    prefill = step(path, "--rows", "2", "--prompt", "16", "--steps", "1")
    assert prefill.returncode == 0, prefill.stderr[-800:]
    assert "prefill 2 x 16:" in prefill.stdout
    missing = step(str(REPO / "no-such-model.gguf"))
    assert missing.returncode == 2 and "bench.step: --model" in missing.stderr

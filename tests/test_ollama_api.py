"""Ollama's API (`/api/chat`, `/api/generate`, `/api/tags`, ...) through the official clients:
the `ollama` Python client's chat (streamed and not), generate, list, show, ps and structured
`format` on the real (tiny, random) model behind a whole `treechat up`, and the npm `ollama`
client's streamed chat. On the fake engine (answers known word for word): a tool call and its
result, cancel on disconnect, 503 when the tree is full, Ollama's error shape, the probes of `/`,
and a hypothesis fuzz over chat and generate bodies: never a 5xx.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import ollama
import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from http_helpers import Person, RawStream, poll, start_up, tiny_tree
from test_http_api import metric, tree_idle
from test_http_limits import SAY, gateway

pytestmark = pytest.mark.timeout(300)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "required": ["city"],
                   "properties": {"city": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
FEW = {"num_predict": 5, "temperature": 0, "seed": 3}
NPM_OLLAMA = "ollama@0.6.4"


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_model):
    with tiny_tree(tmp_path_factory, tiny_model, "ollama") as tree:
        yield tree


@pytest.fixture(scope="module")
def client(up):
    c = ollama.Client(host=up.http, timeout=120)
    c.model = c.list().models[0].model
    return c


# --- the official Python client on the real model ------------------------------------------------

def test_chat_whole_and_streamed(client):
    whole = client.chat(model=client.model, messages=ASK, options=FEW, stream=False)
    assert whole.done and whole.done_reason in ("stop", "length")
    assert whole.message.role == "assistant" and whole.message.content
    assert 1 <= whole.eval_count <= 5 and whole.prompt_eval_count > 5
    parts = list(client.chat(model=f"{client.model}:latest", messages=ASK, options=FEW,
                             stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == whole.message.content  # temperature 0
    assert parts[-1].eval_count == whole.eval_count and parts[-1].total_duration > 0


def test_generate_plain_and_raw(client):
    done = client.generate(model=client.model, prompt="Once upon a time", system="Be brief.",
                           options=FEW)
    assert done.done and done.response and done.eval_count <= 5
    raw = client.generate(model=client.model, prompt="Once upon a time", raw=True, options=FEW)
    assert raw.response and raw.prompt_eval_count < done.prompt_eval_count  # no template
    parts = list(client.generate(model=client.model, prompt="Once upon a time", raw=True,
                                 options=FEW, stream=True))
    assert "".join(p.response for p in parts) == raw.response and parts[-1].done
    loaded = client.generate(model=client.model)  # no prompt: "load the model"
    assert loaded.done and loaded.done_reason == "load"


def test_list_show_ps(client):
    names = [m.model for m in client.list().models]
    assert names == [client.model]
    shown = client.show(client.model)
    assert "tools" in shown.capabilities and shown.modelinfo["general.context_length"] > 0
    running = client.ps().models
    assert [m.model for m in running] == [client.model] and running[0].context_length > 0
    with pytest.raises(ollama.ResponseError) as e:
        client.show("nope")
    assert e.value.status_code == 404


def test_structured_format(client):
    done = client.chat(model=client.model, messages=[{"role": "user", "content": "Who?"}],
                       format=Person.model_json_schema(), options={"temperature": 0,
                                                                   "num_predict": 80})
    assert done.done_reason == "stop"
    assert isinstance(Person.model_validate_json(done.message.content), Person)
    plain = client.chat(model=client.model, messages=ASK, format="json",
                        options={"temperature": 0, "num_predict": 40})
    assert plain.done_reason == "length" or isinstance(json.loads(plain.message.content), dict)


@pytest.fixture(scope="session")
def npm_ollama(tmp_path_factory) -> Path:
    """The npm `ollama` package, installed once into a cached folder (npm reads the registry)."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm are not installed")
    folder = Path(tempfile.gettempdir()) / "treechat-test-npm" / NPM_OLLAMA
    if not (folder / "node_modules" / "ollama").is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix",
                               str(folder), NPM_OLLAMA], capture_output=True, text=True,
                              timeout=240)
        if done.returncode != 0:
            pytest.skip(f"npm could not install {NPM_OLLAMA}: {done.stderr[-400:]}")
    return folder


def test_the_npm_client_streams_a_chat(up, client, npm_ollama):
    script = """
        import { Ollama } from 'ollama';
        const o = new Ollama({ host: process.argv[1] });
        const stream = await o.chat({ model: process.argv[2], stream: true,
            messages: [{ role: 'user', content: 'What is the weather in Paris?' }],
            options: { num_predict: 5, temperature: 0, seed: 3 } });
        let text = '', parts = 0, last;
        for await (const part of stream) { text += part.message.content; parts++; last = part; }
        console.log(JSON.stringify({ text, parts, done: last.done, count: last.eval_count }));
    """
    done = subprocess.run(["node", "--input-type=module", "-e", script, up.http, client.model],
                          cwd=npm_ollama, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NODE_PATH": str(npm_ollama / "node_modules")})
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    whole = client.chat(model=client.model, messages=ASK, options=FEW, stream=False)
    assert got["done"] and got["parts"] > 1 and got["count"] == whole.eval_count
    assert got["text"] == whole.message.content


# --- on the fake engine --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    cluster, up = start_up(tmp_path_factory, "ollama-fake", "--engine", "fake")
    yield up
    cluster.close()


def test_a_tool_call_and_its_result(fake):
    """The fake engine echoes the user's words: a Hermes tool-call block comes back as a call."""
    c = ollama.Client(host=fake.http, timeout=30)
    say = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    whole = c.chat(model="fake", messages=[{"role": "user", "content": say}], tools=[WEATHER])
    (call,) = whole.message.tool_calls
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}
    parts = list(c.chat(model="fake", messages=[{"role": "user", "content": say}],
                        tools=[WEATHER], stream=True))
    calls = [tc for p in parts for tc in p.message.tool_calls or []]
    assert [tc.function.arguments for tc in calls] == [{"city": "Paris"}]
    history = [{"role": "user", "content": "weather?"}, whole.message,
               {"role": "tool", "content": "18 C", "tool_name": "get_weather"},
               {"role": "user", "content": "thanks a lot"}]
    after = c.chat(model="fake", messages=history, tools=[WEATHER])
    assert after.message.content == "thanks a lot " and not after.message.tool_calls


def test_hang_up_cancels_the_request(fake):
    poll(lambda: tree_idle(fake))
    raw = RawStream(fake.http_port, "/api/chat", {
        "model": "fake", "messages": [{"role": "user", "content": "story " * 2000}],
        "options": {"num_predict": 1_000_000}})
    first = next(raw.lines())
    assert json.loads(first)["done"] is False
    before = metric(requests.get(f"{fake.http}/metrics", timeout=10).text,
                    "treechat:num_aborted_requests_total")
    raw.close()
    poll(lambda: tree_idle(fake))
    after = metric(requests.get(f"{fake.http}/metrics", timeout=10).text,
                   "treechat:num_aborted_requests_total")
    assert after == before + 1


def test_an_error_mid_stream_is_one_more_line(cluster):
    tree = cluster.tree(["node-1"])
    _, url, _ = gateway(cluster, tree.root, "--request-timeout", "0.5")
    r = requests.post(f"{url}/api/chat", timeout=30, json={
        "model": "fake", "messages": [{"role": "user", "content": "story " * 2000}]})
    assert r.status_code == 200
    lines = [json.loads(ln) for ln in r.text.splitlines()]
    assert lines[0]["done"] is False and set(lines[-1]) == {"error"}
    assert "deadline" in lines[-1]["error"] or "time" in lines[-1]["error"]


def test_a_full_tree_is_503(cluster):
    tree = cluster.tree(["node-1"], "--max-slots", "1", root_args=("--max-queue", "0"))
    _, url, port = gateway(cluster, tree.root)
    busy = RawStream(port, "/v1/chat/completions", SAY)
    next(ln for ln in busy.lines() if '"content":"never' in ln)  # the only slot is taken
    for path, body in (("/api/chat", {"model": "fake", "messages": ASK}),
                       ("/api/generate", {"model": "fake", "prompt": "hi", "stream": False})):
        r = requests.post(url + path, json=body, timeout=30)
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert set(r.json()) == {"error"} and "busy" in r.json()["error"]
    with pytest.raises(ollama.ResponseError) as e:
        list(ollama.Client(host=url).chat(model="fake", messages=ASK, stream=True))
    assert e.value.status_code == 503
    busy.close()


@pytest.mark.parametrize("path, body, status, words", [
    ("/api/chat", {"model": "fake", "messages": [{"role": "user", "content": "x",
                                                  "images": ["aGk="]}]}, 400, "images"),
    ("/api/generate", {"model": "fake", "prompt": "x", "images": ["aGk="]}, 400, "images"),
    ("/api/chat", {"model": "fake", "messages": ASK, "think": True}, 400, "thinking"),
    ("/api/chat", {"model": "fake", "messages": ASK, "options": {"mirostat": 2}}, 400,
     "mirostat"),
    ("/api/chat", {"model": "fake", "messages": ASK, "options": {"bogus": 1}}, 400, "bogus"),
    ("/api/chat", {"model": "fake", "messages": ASK, "options": {"num_ctx": 1 << 30}}, 400,
     "num_ctx"),
    ("/api/chat", {"messages": ASK}, 400, "model is required"),
    ("/api/chat", {"model": "nope", "messages": ASK}, 404, "nope"),
    ("/api/generate", {"model": "fake", "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/api/embed", {"model": "fake", "input": "x"}, 400, "embeddings"),
    ("/api/embeddings", {"model": "fake", "prompt": "x"}, 400, "embeddings"),
    ("/api/pull", {"model": "fake"}, 404, "not part"),
])
def test_errors_in_ollamas_shape(fake, path, body, status, words):
    r = requests.post(fake.http + path, json=body, timeout=30)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and words in r.json()["error"]


def test_options_keep_alive_and_the_probes(fake):
    r = requests.post(f"{fake.http}/api/chat", data=json.dumps({  # curl -d: a form's type
        "model": "fake", "messages": ASK, "stream": False, "keep_alive": "5m",
        "options": {"num_predict": 3, "num_ctx": 2048, "repeat_penalty": 1.1, "top_k": 40,
                    "repeat_last_n": 64, "num_thread": 2, "typical_p": 1.0, "stop": ["zzz"]}}),
        headers={"Content-Type": "application/x-www-form-urlencoded"}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"]["content"] == "What is the " and body["done_reason"] == "length"
    assert requests.head(fake.http + "/", timeout=10).status_code == 200
    page = requests.get(fake.http + "/", timeout=10)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert requests.get(f"{fake.http}/api/version", timeout=10).json()["version"]


TEXT = st.text(max_size=16)
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), TEXT, st.just([]), st.just({}))


def mostly(valid):
    return st.integers(0, 9).flatmap(lambda i: VALUES if i == 0 else valid)


MESSAGE = st.fixed_dictionaries(
    {"role": mostly(st.sampled_from(["user", "assistant", "system", "tool"])),
     "content": mostly(TEXT)},
    optional={"tool_calls": mostly(st.just([{"function": {"name": "get_weather",
                                                          "arguments": {"city": "x"}}}])),
              "tool_name": VALUES, "thinking": VALUES})
OPTIONS = st.fixed_dictionaries({"num_predict": st.one_of(st.integers(0, 3),
                                                          st.sampled_from([-1.5, "2", True]))},
                                optional={
    "temperature": mostly(st.floats(0, 2)), "top_p": mostly(st.floats(0, 1)),
    "top_k": mostly(st.integers(0, 50)), "min_p": mostly(st.floats(0, 1)),
    "seed": mostly(st.integers(-5, 2**40)), "stop": mostly(st.lists(TEXT, max_size=2)),
    "repeat_penalty": mostly(st.floats(0, 3)), "num_ctx": mostly(st.integers(-1, 1 << 20)),
    "mirostat": VALUES, "frobnicate": VALUES})
COMMON = {"model": mostly(st.just("model")), "options": OPTIONS}  # always a short answer
OPTIONAL = {"stream": mostly(st.booleans()), "keep_alive": VALUES, "think": VALUES,
            "format": mostly(st.sampled_from(["json", "", {"type": "integer"}, {"type": "nope"}])),
            "frobnicate": VALUES}
CHAT = st.fixed_dictionaries({**COMMON, "messages": mostly(st.lists(MESSAGE, max_size=3))},
                             optional={**OPTIONAL, "tools": mostly(st.just([WEATHER]))})
GENERATE = st.fixed_dictionaries({**COMMON, "prompt": mostly(TEXT)},
                                 optional={**OPTIONAL, "raw": VALUES, "system": VALUES,
                                           "suffix": VALUES, "context": VALUES})
BODIES = st.one_of(CHAT.map(lambda b: ("/api/chat", b)), GENERATE.map(lambda b: ("/api/generate",
                                                                                  b)))


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=BODIES)
def test_no_body_makes_a_5xx(up, client, case):
    path, body = case
    if body.get("model") == "model":
        body["model"] = client.model
    r = requests.post(up.http + path, data=json.dumps(body), timeout=60)
    event(f"status {r.status_code}")
    assert r.status_code < 500, (body, r.text[:300])
    lines = [json.loads(line) for line in r.text.splitlines() if line.strip()]
    if r.status_code == 200:
        assert lines[-1].get("done") is True or "error" in lines[-1]
    else:
        assert set(lines[0]) == {"error"} and isinstance(lines[0]["error"], str)

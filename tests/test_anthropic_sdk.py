"""Anthropic's official clients against the real (tiny, random) model behind a whole `treechat
up`: the Python SDK's `messages.create`, whole and streamed (`text_stream`,
`get_final_message()`), a forced tool_use whose input validates against its schema (whole and
streamed, assembled by the SDK from input_json_delta), a tool_result turn, `count_tokens`; the npm
`@anthropic-ai/sdk` streaming one message; and a hypothesis fuzz over /v1/messages bodies: never
a 5xx. (Shapes, errors and limits on the fake engine: test_anthropic_api.py.)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import anthropic
import jsonschema
import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from http_helpers import tiny_tree

pytestmark = pytest.mark.timeout(300)

NPM_SDK = "@anthropic-ai/sdk@1.17.0"
WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "input_schema": {"type": "object", "additionalProperties": False,
                            "required": ["city", "unit"],
                            "properties": {"city": {"type": "string", "maxLength": 12},
                                           "unit": {"enum": ["C", "F"]}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0}  # today's SDK has no sampling arguments; the API still takes them


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_model):
    with tiny_tree(tmp_path_factory, tiny_model, "anthropic-sdk") as tree:
        yield tree


@pytest.fixture(scope="module")
def client(up):
    c = anthropic.Anthropic(base_url=up.http, api_key="unused", max_retries=0, timeout=120)
    c.model = requests.get(f"{up.http}/v1/models", timeout=10).json()["data"][0]["id"]
    return c


def test_create_whole_and_streamed(client):
    done = client.messages.create(model=client.model, max_tokens=12, messages=ASK,
                                  system="You are terse.", extra_body=GREEDY)
    assert done.type == "message" and done.role == "assistant"
    assert done.content[0].type == "text" and done.stop_reason in ("end_turn", "max_tokens")
    assert 0 < done.usage.output_tokens <= 12 and done.usage.input_tokens > 10
    with client.messages.stream(model=client.model, max_tokens=12, messages=ASK,
                                system="You are terse.", extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == done.content[0].text  # greedy: the same answer
    assert final.usage.output_tokens == done.usage.output_tokens
    assert final.stop_reason == done.stop_reason


def test_forced_tool_use_validates_whole_and_streamed(client):
    done = client.messages.create(model=client.model, max_tokens=80, messages=ASK,
                                  tools=[WEATHER], extra_body=GREEDY,
                                  tool_choice={"type": "tool", "name": "get_weather"})
    assert done.stop_reason == "tool_use"
    (use,) = [b for b in done.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    jsonschema.validate(use.input, WEATHER["input_schema"])
    with client.messages.stream(model=client.model, max_tokens=80, messages=ASK, tools=[WEATHER],
                                tool_choice={"type": "any"},
                                extra_body={"temperature": 0.7, "top_k": 20}) as stream:
        partial = [e for e in stream if e.type == "input_json"]
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and partial
    for block in (b for b in final.content if b.type == "tool_use"):
        jsonschema.validate(block.input, WEATHER["input_schema"])


def test_structured_output_follows_its_schema(client):
    schema = WEATHER["input_schema"]
    done = client.messages.create(model=client.model, max_tokens=80, messages=ASK,
                                  output_config={"format": {"type": "json_schema",
                                                            "schema": schema}},
                                  extra_body=GREEDY)
    assert done.stop_reason == "end_turn"
    jsonschema.validate(json.loads(done.content[0].text), schema)


def test_a_tool_result_turn_and_count_tokens(client):
    turns = ASK + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                           "name": "get_weather",
                                           "input": {"city": "Paris", "unit": "C"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": "18 C, sunny"}]}]
    done = client.messages.create(model=client.model, max_tokens=6, messages=turns,
                                  tools=[WEATHER], extra_body=GREEDY)
    counted = client.messages.count_tokens(model=client.model, messages=turns, tools=[WEATHER])
    assert done.stop_reason in ("end_turn", "max_tokens", "tool_use")
    whole = done.usage.input_tokens + (done.usage.cache_read_input_tokens or 0)
    assert counted.input_tokens == whole > 40  # the tool, the call and its result are in it


def npm_sdk(folder: Path) -> Path:
    """The npm client, installed once into a cache folder; the test skips if npm cannot."""
    if not (folder / "node_modules" / "@anthropic-ai" / "sdk").is_dir():
        if shutil.which("npm") is None:
            pytest.skip("npm is not installed")
        folder.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(folder),
                            NPM_SDK], check=True, capture_output=True, text=True, timeout=240)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"npm could not install {NPM_SDK}: {getattr(e, 'stderr', '')[-300:]}")
    return folder


STREAM_JS = """
import Anthropic from "@anthropic-ai/sdk";
const client = new Anthropic({baseURL: process.env.BASE_URL, apiKey: "unused", maxRetries: 0});
const stream = client.messages.stream({model: process.env.MODEL, max_tokens: 10,
  temperature: 0, messages: [{role: "user", content: "What is the weather in Paris?"}]});
let text = "";
stream.on("text", (t) => { text += t; });
const final = await stream.finalMessage();
console.log(JSON.stringify({text, final}));
"""


def test_the_npm_client_streams_a_message(client, up):
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    folder = npm_sdk(cache / "treechat-tests" / "anthropic-sdk-npm")
    script = folder / "stream.mjs"
    script.write_text(STREAM_JS)
    out = subprocess.run(["node", str(script)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "BASE_URL": up.http, "MODEL": client.model})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout)
    assert got["text"] and got["text"] == got["final"]["content"][0]["text"]
    assert got["final"]["stop_reason"] in ("end_turn", "max_tokens")
    assert got["final"]["usage"]["output_tokens"] > 0


# --- fuzz ----------------------------------------------------------------------------------------

def mostly(strategy):
    return st.one_of(strategy, strategy, strategy, st.sampled_from([None, "x", -1, [], {}]))


TEXT = st.text(max_size=12)
BLOCK = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT},
                          optional={"cache_control": st.just({"type": "ephemeral"})}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": TEXT, "name": TEXT,
                           "input": mostly(st.just({"city": "Oslo"}))}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": TEXT,
                           "content": mostly(TEXT)}, optional={"is_error": st.booleans()}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "thinking", "nope"])}))
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "user", "system"]),
     "content": st.one_of(TEXT, st.lists(BLOCK, max_size=3), st.none())},
    optional={"id": TEXT})
BODY = st.fixed_dictionaries(
    {"max_tokens": mostly(st.integers(1, 3)),
     "messages": mostly(st.lists(MESSAGE, min_size=1, max_size=3))},
    optional={"system": mostly(st.one_of(TEXT, st.just([{"type": "text", "text": "be kind"}]))),
              "stop_sequences": mostly(st.lists(st.text(min_size=1, max_size=3), max_size=3)),
              "temperature": mostly(st.floats(0, 1)), "top_p": mostly(st.floats(0.01, 1)),
              "top_k": mostly(st.integers(0, 50)), "stream": st.booleans(),
              "metadata": mostly(st.just({"user_id": "u"})),
              "tools": mostly(st.sampled_from([[WEATHER], [{"name": "x"}], [{"type": "bash"}]])),
              "tool_choice": mostly(st.sampled_from([
                  {"type": "auto"}, {"type": "any"}, {"type": "none"},
                  {"type": "tool", "name": "get_weather"},
                  {"type": "any", "disable_parallel_tool_use": True}])),
              "thinking": mostly(st.just({"type": "enabled", "budget_tokens": 1024})),
              "frobnicate": TEXT})


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODY, counting=st.booleans())
def test_no_messages_body_makes_a_5xx(up, body, counting):
    path = "/v1/messages/count_tokens" if counting else "/v1/messages"
    r = requests.post(f"{up.http}{path}", data=json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=60)
    event(f"status {r.status_code}")
    assert r.status_code < 500, (body, r.text[:300])
    if r.status_code == 200 and body.get("stream") is True and not counting:
        assert r.text.rstrip().endswith('data: {"type":"message_stop"}')
    elif r.status_code != 200:
        assert r.json()["type"] == "error" and set(r.json()["error"]) == {"type", "message"}

"""Every API feature of issue 11 through the official `openai` client, on the real (tiny, random)
model behind a whole `treechat up`: structured answers (`.parse()` with Pydantic, streamed and
not), forced tool calls whose arguments validate, a streamed tool call assembled by the SDK,
logprobs that add up, n=3 with a seed, penalties and logit_bias changing the answer, echo and
token-id prompts, the empty prompt; and a hypothesis fuzz over request bodies: never a 5xx.
"""

from __future__ import annotations

import json
import math
from typing import Literal

import jsonschema
import orjson
import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

from http_helpers import events, openai_client, tiny_tree

pytestmark = pytest.mark.timeout(300)

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 12},
                                  "unit": {"enum": ["C", "F"]}}}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "additionalProperties": False,
                                       "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"]}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    pet: Literal["cat", "dog", "none"]


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_model):
    with tiny_tree(tmp_path_factory, tiny_model, "http-features") as tree:
        yield tree


@pytest.fixture(scope="module")
def client(up):
    return openai_client(up)


def test_pydantic_parse_whole_and_streamed(client):
    done = client.chat.completions.parse(model=client.model, messages=ASK, response_format=Person,
                                         temperature=0, max_tokens=80)
    person = done.choices[0].message.parsed
    assert isinstance(person, Person) and done.choices[0].finish_reason == "stop"
    with client.chat.completions.stream(model=client.model, messages=ASK, response_format=Person,
                                        temperature=0.8, seed=4, max_tokens=80) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)
    plain = client.chat.completions.create(model=client.model, messages=ASK, max_tokens=40,
                                           response_format={"type": "json_object"}, temperature=0)
    assert plain.choices[0].finish_reason == "length" \
        or isinstance(orjson.loads(plain.choices[0].message.content), dict)


def test_forced_tool_calls_validate_against_their_schema(client):
    named = client.chat.completions.create(
        model=client.model, messages=ASK, tools=[WEATHER, CLOCK], temperature=0, max_tokens=80,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(orjson.loads(call.function.arguments), WEATHER["function"]["parameters"])
    required = client.chat.completions.create(
        model=client.model, messages=ASK, tools=[WEATHER, CLOCK], tool_choice="required",
        temperature=1.0, seed=9, max_tokens=200)
    calls = required.choices[0].message.tool_calls
    assert calls and required.choices[0].finish_reason == "tool_calls"
    for call in calls:
        schema = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
        jsonschema.validate(orjson.loads(call.function.arguments), schema["function"]["parameters"])


def test_a_streamed_tool_call_is_assembled_by_the_sdk(client):
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        with client.chat.completions.stream(model=client.model, messages=ASK, tools=[WEATHER],
                                            tool_choice=choice, temperature=0, max_tokens=120,
                                            parallel_tool_calls=False) as stream:
            deltas = [e for e in stream if e.type == "tool_calls.function.arguments.delta"]
            final = stream.get_final_completion()
        calls = final.choices[0].message.tool_calls
        assert len(calls) == 1 and calls[0].function.name == "get_weather"
        args = orjson.loads(calls[0].function.arguments)
        jsonschema.validate(args, WEATHER["function"]["parameters"])
        assert deltas and final.choices[0].finish_reason == "tool_calls"
        if choice != "required":  # a named call's arguments stream as they are generated
            assert len(deltas) > 3


def test_a_tool_history_is_accepted(client):
    history = ASK + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    resp = client.chat.completions.create(model=client.model, messages=history, tools=[WEATHER],
                                          tool_choice="none", max_tokens=5, temperature=0)
    assert resp.choices[0].message.tool_calls is None and resp.usage.prompt_tokens > 40


def test_logprobs_add_up(client):
    resp = client.chat.completions.create(model=client.model, messages=ASK, max_tokens=8,
                                          temperature=0, logprobs=True, top_logprobs=5)
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens  # every token but the end
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        tops = [a.logprob for a in t.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True)
        assert t.logprob == pytest.approx(tops[0], abs=1e-5)  # greedy took the likeliest
        assert sum(math.exp(v) for v in tops) <= 1 + 1e-5 and t.logprob <= 0
    stream = client.completions.create(model=client.model, prompt="Once upon", max_tokens=6,
                                       temperature=0, logprobs=2, stream=True)
    tokens, offsets, text = [], [], ""
    for chunk in stream:
        lp = chunk.choices[0].logprobs
        if lp is not None:
            tokens += lp.tokens
            offsets += lp.text_offset
        text += chunk.choices[0].text
    assert "".join(tokens) == text and offsets[0] == 0 and offsets == sorted(offsets)


def test_n_choices_with_a_seed_repeat(client):
    def three():
        resp = client.chat.completions.create(model=client.model, messages=ASK, n=3, seed=42,
                                              temperature=1.0, max_tokens=12)
        return [c.message.content for c in resp.choices], resp.usage

    first, usage = three()
    again, _ = three()
    assert first == again and len(set(first)) == 3  # three samples, the same three each time
    single = client.chat.completions.create(model=client.model, messages=ASK, seed=42,
                                            temperature=1.0, max_tokens=12)
    assert single.choices[0].message.content == first[0]  # choice 0 keeps the seed as given
    assert usage.prompt_tokens == single.usage.prompt_tokens  # the prompt counted once


def test_penalties_and_logit_bias_change_the_answer(client, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompt = "to be or not to be"
    with torch.inference_mode():
        logits = AutoModelForCausalLM.from_pretrained(tiny_model)(
            input_ids=torch.tensor([tok.encode(prompt)])).logits[0, -1]
    first = int(logits.argmax())
    piece = tok.decode([first])

    def tokens(extra: dict | None = None, **kw) -> list[str]:
        resp = client.completions.create(**{"model": client.model, "prompt": prompt,
                                            "max_tokens": 24, "temperature": 0, "logprobs": 0,
                                            **kw}, extra_body={"ignore_eos": True, **(extra or {})})
        return resp.choices[0].logprobs.tokens

    # A bias on the first token makes the greedy answer repeat it; each penalty must fight that.
    # repetition_penalty 1 turns the server's repetition guard off for that request.
    loop = {str(first): 5.0}
    plain = tokens(logit_bias=loop, extra={"repetition_penalty": 1.0}).count(piece)
    assert plain > 5
    assert tokens(logit_bias=loop).count(piece) < plain  # the guard: on when no penalty is set
    assert tokens(logit_bias=loop, frequency_penalty=1.0).count(piece) < plain // 2
    assert tokens(logit_bias=loop, presence_penalty=2.0).count(piece) < plain // 2
    assert tokens(logit_bias=loop, extra={"repetition_penalty": 1.8}).count(piece) < plain // 2
    assert tokens(logit_bias={"1234": 100}) == [tok.decode([1234])] * 24  # +100 forces it
    # min_p 1 keeps only the likeliest token, whatever the temperature
    assert tokens(temperature=2.0, seed=3, extra={"min_p": 1.0}) == tokens()
    assert tokens(temperature=2.0, seed=3) != tokens()


def test_echo_and_the_empty_prompt(up, client):
    echoed = client.completions.create(model=client.model, prompt="Hello there", echo=True,
                                       max_tokens=3, temperature=0, logprobs=1)
    choice = echoed.choices[0]
    assert choice.text.startswith("Hello there")
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.tokens[0] == "Hello"
    for prompt in ("", [""]):
        for stream in (False, True):
            r = requests.post(f"{up.http}/v1/completions", timeout=60, json={
                "prompt": prompt, "max_tokens": 3, "stream": stream, "temperature": 0})
            assert r.status_code == 200, r.text
            if stream:
                assert events(r.text)[-1] == "[DONE]"
            else:
                assert r.json()["usage"]["prompt_tokens"] == 1


def test_the_end_of_the_answer_sends_no_empty_delta(up):
    """EOS (forced here by logit_bias) brings no text: nothing but the finish goes out for it."""
    r = requests.post(f"{up.http}/v1/chat/completions", timeout=60, json={
        "messages": ASK, "stream": True, "max_tokens": 5, "logit_bias": {"2": 100}})
    chunks = events(r.text)[:-1]
    assert [c["choices"][0]["delta"] for c in chunks] == [{"role": "assistant", "content": ""}, {}]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# --- fuzz ----------------------------------------------------------------------------------------

VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 30), st.floats(-3, 3),
                   st.text(max_size=8), st.lists(st.integers(-1, 60000), max_size=4),
                   st.dictionaries(st.text(max_size=5), st.integers(-2**70, 200), max_size=3))


def mostly(valid):
    """Nine times in ten a valid value, else anything: most bodies reach the engine."""
    return st.integers(0, 9).flatmap(lambda i: VALUES if i == 0 else valid)


TEXT = st.text(max_size=24)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "bot"]),
     "content": st.one_of(TEXT, st.none(), st.integers(), st.just([{"type": "text", "text": "hi"}]))},
    optional={"tool_call_id": st.text(max_size=4), "name": VALUES, "extra": VALUES})
USER = st.fixed_dictionaries({"role": st.just("user"), "content": TEXT})
SAMPLING = {
    "temperature": mostly(st.floats(0, 2)), "top_p": mostly(st.floats(0.01, 1)),
    "top_k": mostly(st.integers(0, 50)), "min_p": mostly(st.floats(0, 1)),
    "seed": mostly(st.integers(-2**63, 2**63 - 1)),
    "stop": mostly(st.lists(st.text(min_size=1, max_size=3), max_size=3)),
    "presence_penalty": mostly(st.floats(-2, 2)), "frequency_penalty": mostly(st.floats(-2, 2)),
    "repetition_penalty": mostly(st.floats(0.5, 2)),
    "logit_bias": mostly(st.dictionaries(st.integers(0, 50000).map(str), st.floats(-100, 100),
                                         max_size=3)),
    "n": mostly(st.integers(1, 3)), "stream": st.booleans(),
    "stream_options": mostly(st.just({"include_usage": True})),
    "ignore_eos": mostly(st.booleans()), "user": VALUES, "frobnicate": VALUES,
    "response_format": mostly(st.sampled_from([
        {"type": "json_object"}, {"type": "text"},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integer"}}},
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}])),
}
CHAT = st.fixed_dictionaries({"max_tokens": st.integers(1, 3),
                              "messages": mostly(st.lists(st.one_of(USER, USER, MESSAGE),
                                                          min_size=1, max_size=3))},
                             optional={**SAMPLING,
                                       "logprobs": mostly(st.booleans()),
                                       "top_logprobs": mostly(st.integers(0, 5)),
                                       "tools": mostly(st.sampled_from([[WEATHER], [CLOCK, WEATHER],
                                                                        [{"type": "function"}]])),
                                       "tool_choice": mostly(st.sampled_from([
                                           "auto", "none", "required",
                                           {"type": "function", "function": {"name": "get_weather"}}])),
                                       "parallel_tool_calls": mostly(st.booleans())})
COMPLETION = st.fixed_dictionaries({"max_tokens": st.integers(1, 3),
                                    "prompt": mostly(st.one_of(
                                        TEXT, st.lists(st.integers(0, 49151), min_size=1, max_size=4),
                                        st.lists(TEXT, min_size=1, max_size=2)))},
                                   optional={**SAMPLING, "echo": mostly(st.booleans()),
                                             "logprobs": mostly(st.integers(0, 5))})
BODIES = st.one_of(CHAT.map(lambda b: ("/v1/chat/completions", b)),
                   COMPLETION.map(lambda b: ("/v1/completions", b)))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=BODIES)
def test_no_request_body_makes_a_5xx(up, case):
    path, body = case
    r = requests.post(f"{up.http}{path}", data=json.dumps(body),  # big ints too (orjson: no)
                      headers={"Content-Type": "application/json"}, timeout=60)
    event(f"status {r.status_code}")
    assert r.status_code < 500, (body, r.text[:300])
    if r.status_code == 200 and body.get("stream") is True:
        assert events(r.text)[-1] == "[DONE]"
    elif r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_a_repeated_prompt_reports_its_cached_tokens(client):
    """The engine copies a prompt prefix it already holds; usage says how much, streamed and
    whole, and the answer is the same."""
    ask = [{"role": "user", "content": "Tell me about rivers and mountains, in one line."}]
    first = client.chat.completions.create(model=client.model, messages=ask, max_tokens=8,
                                           temperature=0)
    again = client.chat.completions.create(model=client.model, messages=ask, max_tokens=8,
                                           temperature=0)
    prompt = first.usage.prompt_tokens
    assert again.usage.prompt_tokens == prompt
    assert 0 < again.usage.prompt_tokens_details.cached_tokens < prompt  # all but the last
    assert again.choices[0].message.content == first.choices[0].message.content
    stream = client.chat.completions.create(model=client.model, messages=ask, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    usage = [c.usage for c in stream if c.usage is not None][-1]
    assert usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens

"""OpenAI's Responses API (`/v1/responses`) through the official clients: the `openai` SDK's
`responses.create` (whole, streamed), `responses.parse` with Pydantic, a function tool round trip,
stored responses with `previous_response_id`, and an `openai-agents` Agent running a function
tool to its final output, all on the real (tiny, random) model behind a whole `treechat up`.
On the fake engine (answers known word for word): `previous_response_id` across a gateway
restart and from another gateway (and a root restart with `--state-dir`), cancel on disconnect,
503 when the tree is full, the field policy, and a hypothesis fuzz over bodies: never a 5xx.
"""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from conftest import free_ports
from http_helpers import Person, RawStream, error_of, openai_client, poll, start_up, tiny_tree
from test_http_api import metric, tree_idle
from test_http_limits import SAY, gateway

pytestmark = pytest.mark.timeout(300)

WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "additionalProperties": False,
                          "required": ["city", "unit"],
                          "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["C", "F"]}}}}
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_model):
    with tiny_tree(tmp_path_factory, tiny_model, "responses") as tree:
        yield tree


@pytest.fixture(scope="module")
def client(up):
    return openai_client(up)


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


# --- the official SDK on the real model ----------------------------------------------------------

def test_create_whole_and_streamed(client):
    whole = client.responses.create(model=client.model, input=ASK, instructions="Be brief.",
                                    max_output_tokens=6, temperature=0)
    assert whole.id.startswith("resp_") and whole.object == "response"
    assert whole.status in ("completed", "incomplete") and whole.output_text
    assert whole.usage.output_tokens <= 6 and whole.usage.input_tokens > 5
    if whole.status == "incomplete":
        assert whole.incomplete_details.reason == "max_output_tokens"
    stream = client.responses.create(model=client.model, input=ASK, instructions="Be brief.",
                                     max_output_tokens=6, temperature=0, stream=True)
    evs = list(stream)
    kinds = [e.type for e in evs]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in evs] == list(range(len(evs)))
    text = "".join(e.delta for e in evs if e.type == "response.output_text.delta")
    assert text == evs[-1].response.output_text == whole.output_text  # temperature 0: the same
    assert "response.output_text.done" in kinds and "response.output_item.done" in kinds


def test_parse_with_a_pydantic_model(client):
    done = client.responses.parse(model=client.model, input="Who are you?", text_format=Person,
                                  temperature=0, max_output_tokens=80)
    assert done.status == "completed" and isinstance(done.output_parsed, Person)


def test_a_function_tool_round_trip(client):
    first = client.responses.create(model=client.model, input=ASK, tools=[WEATHER],
                                    tool_choice={"type": "function", "name": "get_weather"},
                                    temperature=0, max_output_tokens=80)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])
    history = [{"role": "user", "content": ASK}, calls[0].model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": calls[0].call_id,
                "output": "18 C, sunny"}]
    second = client.responses.create(model=client.model, input=history, tools=[WEATHER],
                                     max_output_tokens=5, temperature=0)
    assert second.output_text and second.usage.input_tokens > first.usage.input_tokens
    with client.responses.stream(model=client.model, input=ASK, tools=[WEATHER],
                                 tool_choice="required", parallel_tool_calls=False,
                                 temperature=0, max_output_tokens=120) as stream:
        deltas = [e for e in stream if e.type == "response.function_call_arguments.delta"]
        final = stream.get_final_response()
    (call,) = [item for item in final.output if item.type == "function_call"]
    assert deltas and "".join(d.delta for d in deltas) == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


def test_stored_responses_chain_and_delete(client):
    first = client.responses.create(model=client.model, input="Remember: 42.",
                                    max_output_tokens=3)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    second = client.responses.create(model=client.model, input="What was it?",
                                     previous_response_id=first.id, max_output_tokens=3)
    alone = client.responses.create(model=client.model, input="What was it?",
                                    max_output_tokens=3, store=False)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > alone.usage.input_tokens  # the history came along
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(alone.id)  # store: false
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError, match="not found"):
        client.responses.create(model=client.model, input="again", previous_response_id=first.id)


class Report(BaseModel):
    city: Literal["Paris", "Rome"]
    sunny: bool


def test_an_agent_runs_its_tool_to_the_final_output(up, client):
    """One function tool, forced on the first turn (the SDK lets the model choose after it);
    the final output is a Pydantic model, so the random model's last turn ends too."""
    agents = pytest.importorskip("agents")
    calls = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        calls.append(city)
        return "18 C, sunny"

    agents.set_tracing_disabled(True)  # traces would go to OpenAI's servers
    model = agents.OpenAIResponsesModel(model=client.model, openai_client=openai.AsyncOpenAI(
        base_url=f"{up.http}/v1", api_key="x", max_retries=0, timeout=120))
    agent = agents.Agent(name="weather", instructions="Answer with the weather.", model=model,
                         tools=[get_weather], output_type=Report,
                         model_settings=agents.ModelSettings(tool_choice="required",
                                                             max_tokens=80, temperature=0))
    result = agents.Runner.run_sync(agent, ASK, max_turns=4)
    assert calls and calls[0] in ("Paris", "Rome")  # the tool ran
    assert isinstance(result.final_output, Report)


# --- on the fake engine --------------------------------------------------------------------------

def test_previous_response_id_across_a_gateway_restart(cluster, tmp_path):
    state = tmp_path / "state"
    port = free_ports(1, span=3)[0]
    root, root_proc = cluster.root("--state-dir", str(state), port=port)
    cluster.node(root, "node-1")
    proc, url, _ = gateway(cluster, root)
    first = sdk(url).responses.create(model="fake", input="remember these words")
    assert first.output_text == "remember these words "
    proc.kill()
    _, other, _ = gateway(cluster, root, name="http-2")  # a new gateway, another port
    second = sdk(other).responses.create(model="fake", input="and then",
                                         previous_response_id=first.id)
    assert second.output_text == "and then "
    assert second.usage.input_tokens == 3 + 3 + 2  # both turns and the answer, as history
    root_proc.kill()  # the root too: its store is in --state-dir
    cluster.root("--state-dir", str(state), port=port)
    poll(lambda: requests.get(f"{other}/v1/responses/{second.id}", timeout=10).status_code
         == 200)
    assert sdk(other).responses.retrieve(first.id).output_text == "remember these words "
    assert list(state.iterdir())


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    cluster, up = start_up(tmp_path_factory, "responses-fake", "--engine", "fake")
    yield up
    cluster.close()


def test_hang_up_cancels_the_request(fake):
    poll(lambda: tree_idle(fake))
    raw = RawStream(fake.http_port, "/v1/responses",
                    {"input": "never ending story", "ignore_eos": True,
                     "max_output_tokens": 1_000_000, "stream": True})
    next(ln for ln in raw.lines() if '"delta":"never' in ln)
    assert requests.get(f"{fake.http}/v1/tree", timeout=10).json()["root"]["in_flight"] == 1
    before = metric(requests.get(f"{fake.http}/metrics", timeout=10).text,
                    "treechat:num_aborted_requests_total")
    raw.close()
    poll(lambda: tree_idle(fake))
    after = metric(requests.get(f"{fake.http}/metrics", timeout=10).text,
                   "treechat:num_aborted_requests_total")
    assert after == before + 1


def test_an_error_mid_stream_is_response_failed(fake):
    r = requests.post(f"{fake.http}/v1/responses", timeout=30, json={
        "input": "on and on", "ignore_eos": True, "max_output_tokens": 100_000, "timeout": 0.3,
        "stream": True})
    assert r.status_code == 200
    last = [json.loads(ln[len("data: "):]) for ln in r.text.splitlines()
            if ln.startswith("data: ")][-1]
    assert last["type"] == "response.failed" and last["response"]["status"] == "failed"
    assert last["response"]["error"]["code"] == "timeout"


def test_a_full_tree_is_503(cluster):
    tree = cluster.tree(["node-1"], "--max-slots", "1", root_args=("--max-queue", "0"))
    _, url, port = gateway(cluster, tree.root)
    busy = RawStream(port, "/v1/chat/completions", SAY)
    next(ln for ln in busy.lines() if '"content":"never' in ln)  # the only slot is taken
    r = requests.post(f"{url}/v1/responses", json={"input": "hi"}, timeout=30)
    assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
    assert error_of(r)["code"] == "overloaded"
    with pytest.raises(openai.InternalServerError):
        sdk(url).responses.create(model="fake", input="hi", stream=True)
    busy.close()


@pytest.mark.parametrize("body, param, code", [
    ({"input": "x", "background": True}, "background", "invalid_value"),
    ({"input": "x", "frobnicate": 1}, "frobnicate", "unknown_field"),
    ({"input": "x", "conversation": "c"}, "conversation", "unknown_field"),
    ({"input": "x", "include": ["message.output_text.logprobs"]}, "include", "invalid_value"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type", "invalid_value"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
     "input[0].content[0]", "invalid_value"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type", "invalid_value"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format", "invalid_value"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens", "invalid_value"),
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id",
     "previous_response_not_found"),
    ({}, "input", "invalid_value"),
])
def test_the_field_policy_names_the_field(fake, body, param, code):
    r = requests.post(f"{fake.http}/v1/responses", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert (err["param"], err["code"]) == (param, code), err


def test_neutral_fields_and_a_lenient_history(fake):
    r = requests.post(f"{fake.http}/v1/responses", timeout=30, json={
        "input": [{"type": "message", "role": "user", "id": "msg_1", "status": "completed",
                   "content": [{"type": "input_text", "text": "hello there"}]}],
        "store": False, "metadata": {"k": "v"}, "user": "u", "truncation": "auto",
        "reasoning": {"effort": "low"}, "include": ["reasoning.encrypted_content"],
        "text": {"verbosity": "low"}, "service_tier": "auto"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["output"][0]["content"][0]["text"] == "hello there "
    assert body["metadata"] == {"k": "v"} and body["store"] is False
    assert requests.get(f"{fake.http}/v1/responses/{body['id']}", timeout=10).status_code == 404
    r = requests.delete(f"{fake.http}/v1/responses/resp_nope", timeout=10)
    assert r.status_code == 404 and error_of(r)["code"] == "not_found"


TEXT = st.text(max_size=16)
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), TEXT, st.just([]), st.just({}))


def mostly(valid):
    return st.integers(0, 9).flatmap(lambda i: VALUES if i == 0 else valid)


ITEM = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]),
                           "content": st.one_of(TEXT, st.just([{"type": "input_text",
                                                                 "text": "hi"}]), VALUES)},
                          optional={"type": st.just("message"), "id": VALUES}),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": mostly(TEXT),
                           "name": mostly(st.just("get_weather")), "arguments": mostly(TEXT)}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": mostly(TEXT),
                           "output": mostly(TEXT)}),
    VALUES)
BODIES = st.fixed_dictionaries(
    {"input": mostly(st.one_of(TEXT, st.lists(ITEM, max_size=3))),
     "max_output_tokens": st.one_of(st.integers(1, 3), st.sampled_from([0, -1, "2", True]))},
    optional={"instructions": mostly(TEXT), "stream": mostly(st.booleans()),
              "store": mostly(st.booleans()), "temperature": mostly(st.floats(0, 2)),
              "top_p": mostly(st.floats(0.01, 1)), "tools": mostly(st.just([WEATHER])),
              "tool_choice": mostly(st.sampled_from(
                  ["auto", "none", "required", {"type": "function", "name": "get_weather"},
                   {"type": "function", "name": "nope"}])),
              "text": mostly(st.sampled_from([
                  {"format": {"type": "json_object"}}, {"format": {"type": "text"}},
                  {"format": {"type": "json_schema", "name": "x", "schema": {"type": "integer"}}},
                  {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}])),
              "previous_response_id": mostly(TEXT), "parallel_tool_calls": mostly(st.booleans()),
              "frobnicate": VALUES, "metadata": VALUES, "include": VALUES})


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES)
def test_no_body_makes_a_5xx(up, body):
    r = requests.post(f"{up.http}/v1/responses", data=json.dumps(body),
                      headers={"Content-Type": "application/json"}, timeout=60)
    event(f"status {r.status_code}")
    assert r.status_code < 500, (body, r.text[:300])
    if r.status_code == 200 and body.get("stream") is True:
        assert '"type":"response.completed"' in r.text or "response.incomplete" in r.text
    elif r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}

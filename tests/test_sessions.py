"""Each client's way of naming its conversation becomes the request's `session`, at the unit
level (no processes): OpenAI's `prompt_cache_key` and `user`, Anthropic's `metadata.user_id`, the
Responses API's fields, and the TCP protocol's `session` field. The header (`X-Session-Id`) and
the Responses chain go through a real gateway in test_many_models.py.
"""

from __future__ import annotations

import pytest

from gateways import sessions
from gateways.http.anthropic import parse_messages
from gateways.http.errors import ApiError
from gateways.http.openai_schema import parse_chat, parse_completion
from gateways.http.responses import parse, translate
from gateways.tcp_mobile.protocol import LineError, done_line, parse_submit

pytestmark = pytest.mark.timeout(30)

HI = [{"role": "user", "content": "hi"}]


def chat_sessions(**fields) -> list:
    return [r.get("session") for r in parse_chat({"messages": HI, **fields}).requests]


def test_a_plain_name_is_kept_and_any_other_is_hashed():
    assert sessions.named("conv-42") == "conv-42"
    assert sessions.named(None, "", "  ", "second") == "second"  # the first one given wins
    assert sessions.named(None, "") is None
    assert sessions.named("x" * 256) == "x" * 256
    long = sessions.named("x" * 257)
    assert long.startswith("sha256:") and len(long) == 7 + 64
    assert sessions.named("x" * 257) == long and sessions.named("y" * 257) != long
    for odd in ("alice smith", "zoë", "a\nb"):  # could not be echoed in a header as it is
        assert sessions.named(odd).startswith("sha256:")


def test_chat_prompt_cache_key_outranks_user():
    assert chat_sessions() == [None]
    assert chat_sessions(user="alice") == ["alice"]
    assert chat_sessions(user="alice", prompt_cache_key="conv-1") == ["conv-1"]
    assert chat_sessions(user="", prompt_cache_key="conv-1") == ["conv-1"]
    assert chat_sessions(user="alice", n=3) == ["alice"] * 3  # every choice, one conversation
    assert chat_sessions(user="u" * 300)[0].startswith("sha256:")  # long: hashed, not refused


@pytest.mark.parametrize("field", ["user", "prompt_cache_key"])
def test_a_name_that_is_not_a_string_is_400_naming_it(field):
    with pytest.raises(ApiError) as e:
        parse_chat({"messages": HI, field: 7})
    assert e.value.status == 400 and e.value.param == field


def test_completions_take_user_for_every_prompt():
    parsed = parse_completion({"prompt": ["a", "b"], "user": "bob"})
    assert [r["session"] for r in parsed.requests] == ["bob", "bob"]
    with pytest.raises(ApiError) as e:  # chat's field, not the legacy API's
        parse_completion({"prompt": "a", "prompt_cache_key": "k"})
    assert e.value.param == "prompt_cache_key"


def test_anthropic_metadata_user_id():
    body = {"model": "m", "max_tokens": 4, "messages": HI}
    assert "session" not in parse_messages(body).requests[0]
    assert "session" not in parse_messages({**body, "metadata": {"k": "v"}}).requests[0]
    parsed = parse_messages({**body, "metadata": {"user_id": "user-7"}})
    assert parsed.requests[0]["session"] == "user-7"
    with pytest.raises(ApiError) as e:
        parse_messages({**body, "metadata": {"user_id": 7}})
    assert e.value.param == "metadata.user_id"


def test_responses_fields_as_chat():
    chat, _ = translate({"input": "hi", "user": "alice", "prompt_cache_key": "conv-9"})
    assert parse(chat).requests[0]["session"] == "conv-9"
    chat, echo = translate({"input": "hi", "user": "alice"})
    assert parse(chat).requests[0]["session"] == "alice" and echo["user"] == "alice"


def submit(**line):
    return parse_submit({"id": "q", **line}).request


def test_tcp_explicit_session_and_model_pass_through():
    request = submit(text="hi", session="my-conv", model="tiny-b")
    assert request["session"] == "my-conv" and request["model"] == "tiny-b"
    with pytest.raises(LineError) as e:
        submit(text="hi", session="s" * 257)
    assert e.value.line["error"]["code"] == "bad_request" and \
        "session" in e.value.line["error"]["message"]


def test_tcp_requests_without_a_session_leave_it_to_the_root():
    """No default is invented: two users who open alike are still two conversations; the root
    tells them apart by their histories (broker/affinity.py)."""
    assert "session" not in submit(text="plan a trip")
    assert "session" not in submit(messages=[{"role": "user", "content": "plan a trip"}])


def test_tcp_final_line_names_the_model_asked_for():
    assert "model" not in done_line("q", "stop", "ok", 1, 1)
    assert done_line("q", "stop", "ok", 1, 1, "tiny-b")["model"] == "tiny-b"

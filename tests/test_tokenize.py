"""`/tokenize` and `/detokenize` (vLLM's shapes) on the real tiny model behind `treechat up`: the
ids are the model's tokenizer's, a chat's count is the prompt_tokens its chat completion reports,
and detokenize turns the ids back into the text."""

from __future__ import annotations

import pytest
import requests

from http_helpers import tiny_tree

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_model):
    with tiny_tree(tmp_path_factory, tiny_model, "tokenize") as tree:
        yield tree


def post(up, path: str, body: dict) -> requests.Response:
    return requests.post(f"{up.http}{path}", json=body, timeout=120)


def test_tokenize_and_detokenize_round_trip(up, tiny_model):
    from transformers import AutoTokenizer
    text = "Hello world, how are the rivers of Europe? ünïcode ✓"
    got = post(up, "/tokenize", {"prompt": text}).json()
    assert got["tokens"] == AutoTokenizer.from_pretrained(tiny_model).encode(text)
    assert got["count"] == len(got["tokens"]) > 5 and got["max_model_len"] > 100
    assert post(up, "/detokenize", {"tokens": got["tokens"]}).json() == {"prompt": text}


def test_a_chats_count_is_its_prompt_tokens(up):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Name a river.",
                                              "cache_control": {"type": "ephemeral"}}]}]
    counted = post(up, "/tokenize", {"messages": messages}).json()
    chat = post(up, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert counted["count"] == chat["usage"]["prompt_tokens"]
    text = post(up, "/detokenize", {"tokens": counted["tokens"]}).json()["prompt"]
    assert "Name a river." in text and text.count("Be brief.") == 1


@pytest.mark.parametrize("path, body, param", [
    ("/tokenize", {}, None), ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"prompt": "x", "add_special_tokens": "yes"}, "add_special_tokens"),
    ("/detokenize", {"tokens": [1, -2]}, "tokens"), ("/detokenize", {"tokens": [10**9]}, "tokens"),
])
def test_bad_bodies_are_400s(up, path, body, param):
    r = post(up, path, body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param

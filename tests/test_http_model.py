"""The HTTP gateway in front of a real (tiny, random) model: a prompt over the context is 400
`context_length_exceeded`, a normal request still answers, and the model is named by its folder's
name (a GGUF file: its stem), not its path, with --served-model-name's names beside it."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from http_helpers import error_of, start_up

pytestmark = pytest.mark.timeout(300)  # a busy 2-core machine can take a while to load a model


@pytest.fixture(scope="module")
def up(tmp_path_factory, tiny_model):
    cluster, up = start_up(tmp_path_factory, "http-model", "--engine", "hf", "--model", tiny_model,
                           "--max-model-len", "64", "--device", "cpu",
                           "--served-model-name", "my-model", timeout=240)
    yield up
    cluster.close()


def test_prompt_over_the_context_is_400(up):
    r = requests.post(f"{up.http}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "tree " * 200}], "max_tokens": 4})
    assert r.status_code == 400, r.text
    err = error_of(r)
    assert err["code"] == "context_length_exceeded"
    assert "64" in err["message"]  # vLLM's wording names the limit


def test_a_role_the_template_renders_is_passed_to_it(up):
    """Roles beyond OpenAI's (Llama 3's ipython, GLM's observation) go to the model's chat
    template, which renders them (ChatML here: any role); a malformed role is a 400."""
    r = requests.post(f"{up.http}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "ipython", "content": "42"}, {"role": "user", "content": "hi"}],
        "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = requests.post(f"{up.http}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "<|im_start|>", "content": "x"}], "max_tokens": 2})
    assert r.status_code == 400 and "role" in error_of(r)["message"], r.text


def test_short_prompt_answers_with_usage(up):
    r = requests.post(f"{up.http}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "ignore_eos": True})
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    assert usage["completion_tokens"] == 4 and usage["prompt_tokens"] > 1


def test_streamed_prompt_over_the_context_is_400_too(up):
    r = requests.post(f"{up.http}/v1/completions", timeout=60, json={
        "prompt": "tree " * 200, "max_tokens": 4, "stream": True})
    assert r.status_code == 400, r.text
    assert error_of(r)["code"] == "context_length_exceeded"


def test_the_model_is_named_by_its_folder_not_its_path(up, tiny_model):
    name = Path(tiny_model).name
    models = requests.get(f"{up.http}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == [name, "my-model"]
    for asked, shown in ((None, name), ("my-model", "my-model")):
        r = requests.post(f"{up.http}/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **({"model": asked} if asked else {})})
        assert r.status_code == 200 and r.json()["model"] == shown, r.text

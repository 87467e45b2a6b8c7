"""Two real models in one tree, through the HTTP API: a tiny random Llama (a folder) and a tiny
random Qwen3 in Q4_K (a GGUF file) on CPU, one node of the first and two of the second. Each
request runs on a node of its model; losing one of the two Qwen3 nodes mid-answer loses nothing,
losing the last one fails its requests clearly and leaves the Llama's alone; a conversation's
next turn comes back to the node that holds its first turn's cache."""

from __future__ import annotations

import threading

import pytest
import requests

from conftest import connect, run, wait_for, wait_tree
from http_helpers import error_of, events
from test_http_limits import gateway

HF = ("--device", "cpu", "--threads", "1")
NODES = ("llama-1", "qwen-1", "qwen-2")


@pytest.fixture
def two_models(cluster, tiny_model, tiny_kquant_gguf):
    root, _ = cluster.root("--model-wait", "1")
    files = {"llama-1": tiny_model, "qwen-1": tiny_kquant_gguf[0], "qwen-2": tiny_kquant_gguf[0]}
    procs = {name: cluster.node(root, name, None, "--model", path, *HF, engine="hf", wait=False)
             for name, path in files.items()}
    for proc in procs.values():
        proc.wait_ready(240)
    _, url, _ = gateway(cluster, root)
    status = run(_status(root))
    model_of = {n["name"]: n["model"] for n in status["nodes"]}
    return root, url, procs, model_of


async def _status(root: str) -> dict:
    client = await connect(root)
    try:
        return await wait_tree(client, set(NODES), timeout=60)
    finally:
        client.close()


def busy(root: str, among=NODES, idle: bool = False) -> set[str]:
    """The nodes running something, once some are; with `idle`, once none is."""
    async def ask():
        client = await connect(root)
        try:
            names = {n["name"] for n in (await client.status())["nodes"]
                     if n["running"] and n["name"] in among}
            return (not names) if idle else names or None
        finally:
            client.close()
    return run(wait_for(ask, timeout=30))


class Streamed:
    """A streamed chat completion read on a thread: its text, usage and finish reason."""

    def __init__(self, url: str, body: dict):
        self.resp = requests.post(f"{url}/v1/chat/completions", json={**body, "stream": True},
                                  stream=True, timeout=120)
        assert self.resp.status_code == 200, self.resp.text
        self.lines = self.resp.iter_lines()
        self.started = threading.Event()
        self.body = b""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for line in self.lines:
                self.body += line + b"\n\n"
                if line.startswith(b"data: {") and b'"content"' in line:
                    self.started.set()
        except (requests.RequestException, AttributeError):  # the test hung up (resp.close())
            pass
        finally:
            self.started.set()

    def result(self) -> tuple[str, list]:
        self.thread.join(120)
        chunks = [e for e in events(self.body.decode()) if isinstance(e, dict)]
        text = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in chunks if c.get("choices"))
        return text, chunks


def ask(model: str, content: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "temperature": 0, **extra}


def test_each_request_runs_on_a_node_of_its_model_and_losses_are_per_model(two_models):
    root, url, procs, model_of = two_models
    llama, qwen = model_of["llama-1"], model_of["qwen-1"]
    assert llama != qwen and model_of["qwen-2"] == qwen
    listed = {m["id"] for m in requests.get(f"{url}/v1/models", timeout=10).json()["data"]}
    assert {llama, qwen} <= listed

    for model, nodes in ((llama, {"llama-1"}), (qwen, {"qwen-1", "qwen-2"})):
        r = requests.post(f"{url}/v1/chat/completions", json=ask(model, "hi", max_tokens=4),
                          timeout=60)
        assert r.status_code == 200 and r.json()["model"] == model
        busy(root, idle=True)
        s = Streamed(url, ask(model, "a long one", max_tokens=900, ignore_eos=True))
        assert s.started.wait(60)
        ran = busy(root)
        assert ran <= nodes, f"a {model} request ran on {ran}"
        s.resp.close()

    r = requests.post(f"{url}/v1/chat/completions", json=ask("no-such-model", "hi"), timeout=10)
    assert r.status_code == 404
    message = error_of(r)["message"]
    assert llama in message and qwen in message

    # One of the two Qwen3 nodes is lost mid-answer: the other finishes it, token for token.
    busy(root, idle=True)
    body = ask(qwen, "tell me a story", max_tokens=160, ignore_eos=True)
    whole = requests.post(f"{url}/v1/chat/completions", json=body, timeout=120).json()
    beside = Streamed(url, ask(llama, "and you keep talking", max_tokens=120, ignore_eos=True))
    cut = Streamed(url, body)
    assert cut.started.wait(60)
    (holder,) = busy(root, among=("qwen-1", "qwen-2"))
    procs[holder].kill()
    text, chunks = cut.result()
    assert text == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "length"

    # Now the last Qwen3 node goes: its request fails clearly, the Llama's is untouched.
    last = next(n for n in ("qwen-1", "qwen-2") if n != holder)
    doomed = Streamed(url, ask(qwen, "never finished", max_tokens=900, ignore_eos=True))
    assert doomed.started.wait(60)
    procs[last].kill()
    _, chunks = doomed.result()
    errors = [c["error"] for c in chunks if "error" in c]
    assert errors and "node_lost" in str(errors[0]) and qwen in errors[0]["message"]
    text, chunks = beside.result()
    assert [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")][-1] == "length"
    assert text


def test_a_conversations_second_turn_reuses_its_first_turns_cache(two_models):
    """Two Qwen3 nodes: turn 2 of each conversation goes where turn 1 ran, so the node's cache
    covers turn 1's prompt and answer (`cached_tokens`), conversation after conversation."""
    root, url, _, model_of = two_models
    qwen = model_of["qwen-1"]
    for chat in range(4):
        history = [{"role": "system", "content": "You answer briefly."},
                   {"role": "user", "content": f"conversation {chat}: what is a tree?"}]
        first = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": qwen, "messages": history, "max_tokens": 12, "temperature": 0}).json()
        turn1 = first["usage"]["prompt_tokens"]
        history += [first["choices"][0]["message"],
                    {"role": "user", "content": "and a forest?"}]
        second = requests.post(f"{url}/v1/chat/completions", timeout=60, json={
            "model": qwen, "messages": history, "max_tokens": 12, "temperature": 0}).json()
        cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= turn1, (chat, cached, turn1, second["usage"])

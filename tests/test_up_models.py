"""`treechat up` with several models and with a layout file: real processes on loopback, two tiny
real models (a Llama folder and a Qwen3 GGUF file, both with the SmolLM2 tokenizer;
tests/model_fixtures.py)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from conftest import free_ports
from test_cli import treechat

START = 300  # seconds for a tree of real-model nodes to come up on a busy 2-core machine


def served_models(up) -> list[str]:
    with urllib.request.urlopen(up.http + "/v1/models", timeout=30) as resp:
        return sorted(m["id"] for m in json.load(resp)["data"])


def status_nodes(root: str) -> dict[str, dict]:
    result = treechat("status", "--root", root, "--json")
    assert result.returncode == 0, result.stderr
    return {n["name"]: n for n in json.loads(result.stdout)["nodes"]}


@pytest.mark.timeout(2 * START)
def test_up_with_two_models_starts_a_node_of_each(cluster, tiny_model, tiny_kquant_gguf):
    gguf, _ = tiny_kquant_gguf
    llama, qwen = Path(tiny_model).name, Path(gguf).stem
    up = cluster.up("--model", tiny_model, "--model", gguf, timeout=START)
    assert f"  model {llama}: node-1" in up.proc.lines
    assert f"  model {qwen}: node-2" in up.proc.lines
    status = treechat("status", "--root", up.root)
    assert status.returncode == 0, status.stderr
    rows = {line.split()[1]: line for line in status.stdout.splitlines() if "node-" in line}
    assert rows["node-1"].endswith(llama) and rows["node-2"].endswith(qwen), status.stdout
    nodes = status_nodes(up.root)
    assert {name: (n["model"], n["parent"]) for name, n in nodes.items()} == {
        "node-1": (llama, None), "node-2": (qwen, None)}
    assert served_models(up) == sorted([llama, qwen])
    assert up.proc.terminate(timeout=60) == 0


@pytest.mark.timeout(2 * START)
def test_a_layout_file_gives_each_node_its_place_model_and_slots(cluster, tiny_model,
                                                                 tiny_kquant_gguf, tmp_path):
    gguf, _ = tiny_kquant_gguf
    llama, qwen = Path(tiny_model).name, Path(gguf).stem
    layout = tmp_path / "tree.json"
    layout.write_text(json.dumps([
        {"name": "llama-b", "parent": "qwen-a"},  # a child before its parent: the order is free
        {"name": "llama-a", "parent": None, "model": tiny_model, "slots": 2,
         "aliases": ["chat"]},
        {"name": "qwen-a", "parent": "llama-a", "model": gguf},
    ]))
    up = cluster.up("--layout", str(layout), "--model", tiny_model, timeout=START)
    assert f"  model {llama}: llama-b, llama-a" in up.proc.lines
    nodes = status_nodes(up.root)
    assert {name: (n["parent"], n["model"]) for name, n in nodes.items()} == {
        "llama-a": (None, llama), "qwen-a": ("llama-a", qwen), "llama-b": ("qwen-a", llama)}
    assert nodes["llama-a"]["slots"] == 2
    assert nodes["qwen-a"]["slots"] == nodes["llama-b"]["slots"] != 2  # --max-slots' default
    assert served_models(up) == sorted([llama, qwen, "chat"])  # llama-a's other name
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    request = urllib.request.Request(up.http + "/v1/chat/completions",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert json.load(resp)["model"] == "chat"
    assert up.proc.terminate(timeout=60) == 0


BAD_LAYOUTS = [
    ('[{"name": "a"}, {"name": "a"}]', "two nodes are named 'a'"),
    ('[{"name": "a", "parent": "nobody"}]', "node 'a' hangs under 'nobody', which the file does "
                                            "not name"),
    ('[{"name": "a", "parent": "b"}, {"name": "b", "parent": "a"}]', "a -> b -> a is a cycle"),
    ('[{"name": "a", "parent": "a"}]', "node 'a' hangs under itself"),
    ('[{"name": "a", "modle": "x.gguf"}]', "node 'a': unknown key 'modle'"),
    ('[{"name": "a",}]', "not JSON (trailing comma is not allowed at line 1, column"),
    ('{"name": "a"}', "want a JSON list of nodes"),
    ('[{"name": "a", "slots": 0}]', "slots is a whole number, at least 1"),
    ('[{"name": "a", "aliases": "chat"}]', "aliases is a list of names"),
    ('[{"parent": null}]', "node 1: wants a name"),
    ('[{"name": "tcp-gateway"}]', "names treechat up gives its own processes"),
]


@pytest.mark.timeout(120)
def test_a_bad_layout_file_is_one_line_and_exit_1_before_anything_starts(tmp_path):
    port = free_ports(1, span=3)[0]
    for text, message in BAD_LAYOUTS:
        layout = tmp_path / "tree.json"
        layout.write_text(text)
        result = treechat("up", "--engine", "fake", "--layout", str(layout), "--port", str(port),
                          "--http-port", "0", "--tcp-port", "0")
        assert result.returncode == 1, (text, result.stderr)
        assert len(result.stderr.splitlines()) == 1, result.stderr
        assert result.stderr.startswith(f"treechat: --layout {layout}: ")
        assert message in result.stderr, (text, result.stderr)
        assert "treechat is up" not in result.stdout
    missing = treechat("up", "--engine", "fake", "--layout", str(tmp_path / "none.json"))
    assert missing.returncode == 1 and "cannot read it" in missing.stderr
    both = treechat("up", "--engine", "fake", "--layout", str(layout), "--nodes", "2")
    assert both.returncode != 0 and "leave out --nodes and --fanout" in both.stderr

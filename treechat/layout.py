"""The shape of the tree `treechat up` starts: each node's name, parent, model and slots.

From flags, `--model A --model B --nodes N --fanout K`: N nodes per model (default 1), named
node-1, node-2, ... and placed breadth-first (K under the root, then K under node-1, K under
node-2, ...), the models taking turns, so a subtree of two or more nodes is not all one model. A
node carries requests of any model down to its children: any model may sit under any other.

From a layout file, `--layout FILE`: a JSON list of nodes, each an object

    {"name": "chat-1", "parent": null, "model": "~/models/small.gguf", "slots": 4,
     "aliases": ["chat"]}

    name     required: letters, digits, '-', '_' or '.'; one node per name
    parent   the name of another node of the file, or null (or left out): under the root
    model    what --model takes (a .gguf file, a folder, a Hub name); left out: the --model given,
             else the default model
    slots    requests this node runs at once (its --max-slots); left out: --max-slots
    aliases  other names requests may give its model (its --alias, each)

The nodes start together, so the file's order is free; the first node's model is the HTTP
gateway's tokenizer (/tokenize). A file that is not such a list (not JSON, an unknown key, a
duplicate name, a parent it does not name, a cycle) fails with one line naming the problem,
before anything starts.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from broker import security
from treechat.process import Fatal

KEYS = ("name", "parent", "model", "slots", "aliases")
# The root's name, and the members whose keys `up` makes beside its nodes' (`Launcher.tree_keys`).
RESERVED = ("root", "cli", "http-gateway", "tcp-gateway")


@dataclass(frozen=True)
class Placement:
    name: str
    parent: str | None  # None: under the root
    model: str | None  # what --model takes; None: the default model
    slots: int | None = None  # None: --max-slots
    aliases: tuple[str, ...] = ()  # other names of its model (--alias)


def tree_layout(nodes: int, fanout: int) -> list[tuple[str, str | None]]:
    """[(name, parent)] for a breadth-first tree: node-1..node-K under the root, then K per node."""
    return [(f"node-{i}", None if i <= fanout else f"node-{(i - fanout - 1) // fanout + 1}")
            for i in range(1, nodes + 1)]


def from_flags(models: list[str | None], nodes: int, fanout: int) -> list[Placement]:
    """`nodes` nodes per model in a breadth-first tree of fan-out `fanout`, the models in turn."""
    shape = tree_layout(nodes * len(models), fanout)
    return [Placement(name, parent, models[i % len(models)])
            for i, (name, parent) in enumerate(shape)]


def placements(layout: str | None, models: list[str] | None, nodes: int | None,
               fanout: int | None) -> list[Placement]:
    """The nodes `up` starts, from its --layout, --model, --nodes and --fanout."""
    if layout is None:
        nodes, fanout = 1 if nodes is None else nodes, 2 if fanout is None else fanout
        if nodes < 1:
            raise ValueError("--nodes must be at least 1")
        if fanout < 1:
            raise ValueError("--fanout must be at least 1")
        return from_flags(models or [None], nodes, fanout)
    if nodes is not None or fanout is not None:
        raise ValueError("--layout gives the tree's shape: leave out --nodes and --fanout")
    if models and len(models) > 1:
        raise ValueError("--layout names each node's model: give at most one --model (the model "
                         "of the nodes that name none)")
    return read_layout(layout, models[0] if models else None)


def read_layout(path: str, model: str | None = None) -> list[Placement]:
    """The nodes of a layout file, checked (Fatal with one line otherwise); `model`: the model
    of nodes that name none."""
    def bad(why: str) -> Fatal:
        return Fatal(f"--layout {path}: {why}")

    try:
        with open(path, "rb") as f:
            data = orjson.loads(f.read())
    except OSError as e:
        raise bad(f"cannot read it ({e.strerror})") from None
    except orjson.JSONDecodeError as e:
        raise bad(f"not JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list) or not data:
        raise bad('want a JSON list of nodes, each {"name": ..., "parent": ..., "model": ..., '
                  '"slots": ...} (see treechat up --help)')
    nodes: dict[str, Placement] = {}
    for i, entry in enumerate(data, 1):
        node = placement(entry, model)
        if isinstance(node, str):
            what = entry.get("name") if isinstance(entry, dict) else None
            raise bad(f"node {what!r}: {node}" if isinstance(what, str) else f"node {i}: {node}")
        if node.name in nodes:
            raise bad(f"two nodes are named {node.name!r}")
        nodes[node.name] = node
    for node in nodes.values():
        if node.parent is not None and node.parent not in nodes:
            raise bad(f"node {node.name!r} hangs under {node.parent!r}, which the file does not "
                      "name (null: under the root)")
    for node in nodes.values():
        chain = [node.name]
        while (parent := nodes[chain[-1]].parent) is not None:
            if parent == node.name == chain[-1]:
                raise bad(f"node {parent!r} hangs under itself")
            if parent in chain:
                cycle = chain[chain.index(parent):] + [parent]
                raise bad(f"{' -> '.join(cycle)} is a cycle (each hangs under the next): one of "
                          "them must hang under the root (parent null)")
            chain.append(parent)
    return list(nodes.values())


def placement(entry, model: str | None) -> Placement | str:
    """One node of a layout file, or what is wrong with it."""
    if not isinstance(entry, dict):
        return f"want an object with {', '.join(KEYS)}, not {orjson.dumps(entry).decode()}"
    unknown = [k for k in entry if k not in KEYS]
    if unknown:
        return f"unknown key {unknown[0]!r} (a node has {', '.join(KEYS)})"
    name, parent, slots = entry.get("name"), entry.get("parent"), entry.get("slots")
    model = entry.get("model", model)
    if not isinstance(name, str):
        return "wants a name (a string)"
    if not security.valid_name(name):
        return "a name is letters, digits, '-', '_' or '.'"
    if name in RESERVED:
        return f"{', '.join(RESERVED)} are names treechat up gives its own processes"
    if parent is not None and not isinstance(parent, str):
        return "parent is a node's name or null"
    if model is not None and not isinstance(model, str):
        return "model is what --model takes (a string) or left out"
    if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or slots < 1):
        return "slots is a whole number, at least 1"
    aliases = entry.get("aliases", [])
    if not isinstance(aliases, list) or not all(isinstance(a, str) and a for a in aliases):
        return "aliases is a list of names (strings)"
    return Placement(name, parent, model, slots, tuple(aliases))

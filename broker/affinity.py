"""Conversations come home: the root remembers which node ran each conversation's last turn.

A chat's next turn sends the whole history again. The node that ran the last turn still holds
its keys and values (nodes/engine/prefix.py) and skips computing them again, so the root sends
the request there, unless that node is much busier than its model's other nodes.

What the root remembers, per model, is an LRU of at most `size` keys, each naming a node:

- the session a client named (`Request.session`: OpenAI's `user` or `prompt_cache_key`, an
  `X-Session-Id` header, a TCP or page conversation);
- the prompt's prefixes: for a chat, the messages up to each one (every earlier turn's whole
  prompt is such a prefix of the next turn's); for a plain prompt, its first 256, 512, ...
  characters (64, 128, ... token ids). System messages alone are not a key: every conversation
  with that system prompt shares them.

A request's home is the node of its session when the session is known, else the node of its
longest known prefix. Keys are written when a request's first token arrives: the node that runs
it is known then, and will hold its prompt and answer in its cache.

Where it lives, and what survives: the root's memory, bounded in keys. A key whose node was lost
points at a dead node and is ignored (the caller asks the registry); the conversation's next turn
goes where the policy says and writes its keys anew. A restarted root starts empty and learns
again: each conversation misses its cache once. The caches themselves stay in the nodes.

Bounded imbalance, as consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
2018) does it: a home takes a request only while it holds fewer requests than its slots and no
more than (1 + EPSILON) times its fair share of its model's requests in flight, plus MARGIN (so a
light load is not spread for nothing: a turn sent away prefills its whole history again).
Otherwise the request goes where the policy sends it, and affinity never costs throughput.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import orjson

BLOCK_CHARS = 256  # a plain prompt's prefixes: every this many characters
BLOCK_IDS = 64  # ... or token ids
EPSILON = 0.2  # a home may hold up to (1 + EPSILON) x its fair share, plus MARGIN requests
MARGIN = 2  # at a light load a home is never refused for one or two requests more than its peers
SIZE = 65536  # keys remembered (16 bytes each, plus the dictionary's own)
LEAD_ROLES = ("system", "developer")  # a prefix of these alone is shared, not a conversation's


def keys(model: str | None, request: dict) -> list[bytes]:
    """The request's keys, the most specific first: its session, then its prefixes, longest
    first."""
    base = hashlib.blake2b(orjson.dumps(model), digest_size=16)
    found = []
    session = request.get("session")
    if isinstance(session, str):
        h = base.copy()
        h.update(b"session\0" + session.encode())
        found.append(h.digest())
    prefixes = []
    h = base.copy()
    messages, prompt = request.get("messages"), request.get("prompt")
    if isinstance(messages, list):
        opened = False
        for m in messages:
            h.update(orjson.dumps(m, option=orjson.OPT_SORT_KEYS))
            opened = opened or not (isinstance(m, dict) and m.get("role") in LEAD_ROLES)
            if opened:
                prefixes.append(h.digest())
    elif isinstance(prompt, str):
        for i in range(BLOCK_CHARS, len(prompt) + 1, BLOCK_CHARS):
            h.update(prompt[i - BLOCK_CHARS:i].encode())
            prefixes.append(h.digest())
    elif isinstance(prompt, list):
        for i in range(BLOCK_IDS, len(prompt) + 1, BLOCK_IDS):
            h.update(orjson.dumps(prompt[i - BLOCK_IDS:i]))
            prefixes.append(h.digest())
    return found + prefixes[::-1]


def fits(held: int, slots: int, model_held: int, nodes: int) -> bool:
    """May a home holding `held` requests (of `slots`) take one more, when its model's `nodes`
    nodes hold `model_held` in all?"""
    return held < slots and held + 1 <= (1 + EPSILON) * (model_held + 1) / max(1, nodes) + MARGIN


class Homes:
    """key -> the node that last ran a request with that key (LRU, bounded)."""

    def __init__(self, size: int = SIZE):
        self.size = size
        self.nodes: OrderedDict[bytes, str] = OrderedDict()

    def find(self, request_keys: list[bytes], alive) -> str | None:
        """The node of the first key known whose node `alive(name)` says still serves."""
        for key in request_keys:
            node = self.nodes.get(key)
            if node is not None and alive(node):
                self.nodes.move_to_end(key)
                return node
        return None

    def note(self, request_keys: list[bytes], node: str) -> None:
        for key in request_keys:
            self.nodes[key] = node
            self.nodes.move_to_end(key)
        while len(self.nodes) > self.size:
            self.nodes.popitem(last=False)

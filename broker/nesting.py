"""How deeply nested a client's JSON may be: the limit both gateways check before any work.

orjson reads 1024 levels but writes only 254, and every message to the root wraps a request a few
levels deeper still; a body between the two parsed fine, ran, then failed to encode (a 500 after
the answer on /arranca, a dead reader on TCP). So a gateway refuses anything nested deeper than
MAX_DEPTH levels up front, with a clear error (real requests, JSON schemas included, are far
shallower).
"""

from __future__ import annotations

MAX_DEPTH = 64


def too_deep(value, limit: int = MAX_DEPTH) -> bool:
    """Is `value` (parsed JSON) nested more than `limit` levels deep? Walks containers only."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else \
            node if isinstance(node, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False

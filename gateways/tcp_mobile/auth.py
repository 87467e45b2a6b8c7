"""API keys of the TCP gateway: the `--api-key` / `--api-key-file` flags and the key check.

The same flags and file format as the HTTP gateway (`treechat up --api-key K` hands its keys to
both): one key per line, blank lines and lines starting with '#' ignored. No sockets here:
`server.py` asks `ApiKeys.check` about the key of a client's hello (or resume) line, `text.py`
about the key of a `TEXT KEY` line. docs/protocol.md ("Authentication") describes the wire side.
"""

from __future__ import annotations

import argparse
import hmac
from pathlib import Path


def add_key_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-key", action="append", default=[],
                        help="require this key before any request (repeatable)")
    parser.add_argument("--api-key-file", default=None,
                        help="a file of API keys, one per line ('#' starts a comment)")


def load_api_keys(keys: list[str] | None, key_file: str | None) -> frozenset[str]:
    """The keys given on the command line plus those of the file; ValueError names a bad one."""
    found = {k.strip() for k in keys or []}
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as e:
            raise ValueError(f"cannot read --api-key-file: {e}") from None
        found |= {ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")}
    if any(not k or any(c.isspace() for c in k) for k in found):
        raise ValueError("an API key cannot be empty or contain spaces")
    return frozenset(found)


class ApiKeys:
    """The configured keys; with none, every client is let in (as before keys existed)."""

    def __init__(self, keys: frozenset[str]):
        self.keys = [k.encode() for k in sorted(keys)]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def check(self, key) -> bool:
        if not self.keys:
            return True
        if not isinstance(key, str) or not key:
            return False
        given = key.encode()
        # compare_digest against every key, without stopping at a match: the time taken says
        # nothing about which key (or how much of one) was right.
        ok = False
        for k in self.keys:
            ok |= hmac.compare_digest(given, k)
        return ok

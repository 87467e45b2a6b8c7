"""The trees `treechat up` runs on this machine, so `treechat status` without --root finds one.

While it runs, `up` keeps a note of its tree beside the keys it makes for trees
(`broker.security.keys_base()`: $TREECHAT_KEYS, else the user's runtime folder), one file per
root address, readable by this user only:

    127.0.0.1_5550.json    {"root": "127.0.0.1:5550", "owner": "PID START", "curve": DIR or null,
                            "started": UNIX_TIME}

`owner` is `up`'s pid and start time (`security.owner_stamp`): a note whose `up` died without
removing it (kill -9) names no live process and is ignored. `curve` is the key folder `up` was
given (--curve DIR); the keys `up` makes itself are found by the root's address, as before.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson

from broker import security


def note_path(root: str) -> Path:
    host, _, port = root.rpartition(":")
    folder = security.tree_folder(host, int(port))
    return folder.with_name(folder.name + ".json")


def note(root: str, curve: str | None) -> Path:
    """Write this process's note for the tree at `root`; the caller removes it when it stops."""
    path = note_path(root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    path.write_bytes(orjson.dumps({"root": root, "owner": security.owner_stamp(os.getpid()),
                                   "curve": str(Path(curve).resolve()) if curve else None,
                                   "started": time.time()}))
    return path


def trees() -> list[dict]:
    """The notes of the trees that run now, the newest first."""
    found = []
    for path in security.keys_base().glob("*.json"):
        try:
            tree = orjson.loads(path.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            continue
        if isinstance(tree, dict) and security.is_live(str(tree.get("owner", ""))):
            found.append(tree)
    return sorted(found, key=lambda t: -float(t.get("started") or 0))

"""Where the engine keeps what it makes once (model metadata, compiled kernels): the bottom of
the engine's rooms, importing nothing of them."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("TREECHAT_CACHE") or Path.home() / ".cache" / "treechat")

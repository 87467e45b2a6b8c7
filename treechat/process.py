"""Running one treechat process: logging, signals, and the READY handshake with `treechat up`.

Every long-running process (root, node, gateway) is `serve(main)`: an asyncio loop, a `stop`
event set by SIGTERM or Ctrl-C, and a `ready(info)` callback that prints one line

    TREECHAT-READY {"root": "tcp://127.0.0.1:5550", ...}

on stdout once the process serves; the launcher waits for it before starting what depends on it.
A clean stop exits 0; a configuration error prints a readable message and exits 2.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Awaitable, Callable

import orjson

from broker.errors import Fatal  # noqa: F401  (re-exported: the CLI and launcher raise it)

READY = "TREECHAT-READY "

Main = Callable[[asyncio.Event, Callable[[dict], None]], Awaitable[None]]


def setup_logging(level: str = "INFO", name: str = "") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
        format=f"%(asctime)s {name + ' ' if name else ''}%(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S")


def ready(info: dict) -> None:
    sys.stdout.write(READY + orjson.dumps(info).decode() + "\n")
    sys.stdout.flush()


def serve(main: Main) -> int:
    """Run `main(stop, ready)` until it returns; SIGTERM and SIGINT set `stop`."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await main(stop, ready)

    try:
        asyncio.run(run())
    except Fatal as e:
        print(f"treechat: {e}", file=sys.stderr)
        return 1
    return 0


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")

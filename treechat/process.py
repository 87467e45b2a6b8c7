"""Running one treechat process: logging, signals, and the READY handshake with `treechat up`.

Every long-running process (root, node, gateway) is `serve(main)`: an asyncio loop, a `stop`
event set by SIGTERM, SIGHUP (its terminal closed) or Ctrl-C, and a `ready(info)` callback that
prints one line

    TREECHAT-READY {"root": "tcp://127.0.0.1:5550", ...}

on stdout once the process serves; the launcher waits for it before starting what depends on it.
A clean stop exits 0; a configuration error prints a readable message and exits 2; a port in use
is one line and exit 1.

A child of `treechat up` also follows it (`follow_launcher`): `up` hands each child the read end
of a pipe whose write end only `up` holds, in $TREECHAT_WATCHDOG ("FD:SECONDS"). End of file
means `up` is gone, however it died (kill -9 included): the child stops as on SIGTERM, and exits
hard if that takes longer than SECONDS, what `up` itself would have waited. A pipe rather than
Linux's parent-death signal: it works on every POSIX system, and a thread reads it, so it acts
even when the event loop is stuck.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import sys
import threading
import time
from typing import Awaitable, Callable

import orjson

from broker.errors import Fatal  # noqa: F401  (re-exported: the CLI and launcher raise it)

READY = "TREECHAT-READY "
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # each one a clean stop

Main = Callable[[asyncio.Event, Callable[[dict], None]], Awaitable[None]]


def setup_logging(level: str = "INFO", name: str = "") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
        format=f"%(asctime)s {name + ' ' if name else ''}%(levelname).1s %(name)s: %(message)s",
        datefmt="%H:%M:%S")


def ready(info: dict) -> None:
    try:
        sys.stdout.write(READY + orjson.dumps(info).decode() + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the launcher is gone (its watchdog pipe stops us): write nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def serve(main: Main) -> int:
    """Run `main(stop, ready)` until it returns; SIGTERM, SIGHUP and SIGINT set `stop`."""

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        follow_launcher(loop, stop)
        await main(stop, ready)

    try:
        asyncio.run(run())
    except Fatal as e:
        print(f"treechat: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if getattr(e, "errno", None) != errno.EADDRINUSE:  # zmq's and the OS's errors alike
            raise
        print(f"treechat: {e}", file=sys.stderr)
        return 1
    return 0


def follow_launcher(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """Stop when the `treechat up` that started this process is gone (see the module's doc)."""
    spec = os.environ.pop("TREECHAT_WATCHDOG", "")
    if not spec:
        return
    fd, _, seconds = spec.partition(":")
    fd = int(fd)
    os.set_inheritable(fd, False)

    def watch() -> None:
        try:
            while os.read(fd, 64):  # `up` never writes: this returns at end of file
                pass
        except OSError:
            pass
        try:
            loop.call_soon_threadsafe(stop.set)
        except RuntimeError:  # the loop is closed: this process is exiting anyway
            return
        time.sleep(float(seconds))
        os._exit(1)

    threading.Thread(target=watch, name="watchdog", daemon=True).start()


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")

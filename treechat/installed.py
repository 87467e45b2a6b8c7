"""Which optional parts this installation has: the gateways (a node or a root needs neither).

`treechat gateway KIND` imports its module only when asked for; `up` only checks that it exists,
and starts it as a child process.
"""

from __future__ import annotations

import importlib
import importlib.util

GATEWAYS = {"http": "gateways.http.server", "tcp": "gateways.tcp_mobile.server"}


def gateway_module(kind: str):
    name = GATEWAYS[kind]
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith(name.rsplit(".", 1)[0]):
            return None
        raise


def gateway_installed(kind: str) -> bool:
    """Whether the gateway exists, without importing it (`up` only starts it)."""
    try:
        return importlib.util.find_spec(GATEWAYS[kind]) is not None
    except ModuleNotFoundError:  # its package is missing
        return False

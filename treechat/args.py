"""The flags that several `treechat` commands share: the root's, the tree's, a node's.

`treechat.cli` builds each command's parser from these; `treechat.launch` (`up`) takes the
root's, the tree's and a node's at once and hands them on to the processes it starts.
"""

from __future__ import annotations

import argparse

from treechat.metrics import add_metrics_arg

DEFAULT_ROOT = "127.0.0.1:5550"


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))


def add_root_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=5550,
                   help="first of three ports: gateways PORT, tree PORT+1, node results PORT+2")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests the root holds when every node is busy; past that: overloaded")
    p.add_argument("--deadline", type=float, default=600.0,
                   help="seconds every request may take before it fails with `timeout`, unless "
                        "it sets its own timeout (default 600; 0: none)")
    p.add_argument("--no-affinity", dest="affinity", action="store_false",
                   help="send each request where the policy says, not to the node that ran its "
                        "conversation's earlier turns (which holds their cache)")
    p.add_argument("--model-wait", type=float, default=30.0, metavar="SECONDS",
                   help="when a model's last node is lost, its requests wait this long for one "
                        "(a restart) before they fail (default 30)")
    g = p.add_argument_group("kept responses (POST /v1/responses with store)")
    g.add_argument("--state-dir", default=None, metavar="DIR",
                   help="keep stored responses in DIR/responses-PORT.jsonl across restarts "
                        "(default: in the root's memory while it runs)")
    g.add_argument("--store-max", type=int, default=10_000,
                   help="stored responses kept at most; the oldest go first (default 10000)")
    g.add_argument("--store-max-age", type=float, default=30.0, metavar="DAYS",
                   help="days a stored response is kept (default 30)")
    g = p.add_argument_group("registry")
    g.add_argument("--registry", choices=("builtin", "ldap"), default="builtin",
                   help="builtin (in the root) or ldap (also written to an LDAP directory)")
    g.add_argument("--ldap-url", default=None, help="ldap://HOST:PORT of the directory")
    g.add_argument("--ldap-base", default="dc=treechat,dc=local",
                   help="suffix; nodes live under ou=Nodes,<base>")
    g.add_argument("--ldap-bind-dn", default=None, help="the registrar account the root binds as")
    g.add_argument("--ldap-password-file", default=None, help="file holding its password")


def add_tree_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", choices=("least-loaded", "seed"), default="least-loaded",
                   help="routing: least-loaded (default, see README) or seed (the original ring)")
    p.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    p.add_argument("--grace", type=float, default=30.0,
                   help="seconds SIGTERM waits for running requests before handing them back")
    add_curve(p)
    add_insecure(p)


def add_curve(p: argparse.ArgumentParser) -> None:
    p.add_argument("--curve", default=None, metavar="DIR",
                   help="encrypt and authenticate every ZeroMQ link with the keys of "
                        "`treechat keys DIR` (give it to every process of the tree; default: "
                        "the keys `treechat up` made for that root, if it runs here)")
    p.add_argument("--member", default=None, metavar="NAME",
                   help="whose key of --curve DIR this process shows (default: a node's --name "
                        "when DIR has that key, else 'client')")


def add_insecure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--insecure", action="store_true",
                   help="listen on a non-loopback address without keys (CurveZMQ keys; for a "
                        "gateway, API keys); `up --insecure` makes no CurveZMQ keys at all. "
                        "Anyone who reaches such a port can use it")


def add_node_args(p: argparse.ArgumentParser, *, named: bool = True) -> None:
    from nodes.engine import add_engine_args
    if named:
        p.add_argument("--name", required=True, help="unique node name (the registry key)")
        p.add_argument("--parent", default=None,
                       help="attach under this node (by name); default: directly under the root")
        p.add_argument("--root", default=DEFAULT_ROOT,
                       help="the root's HOST:PORT, or a root's and its standby's: "
                            "HOST:PORT,HOST:PORT")
        p.add_argument("--host", default="127.0.0.1", help="address this node's children connect to")
        add_metrics_arg(p)
    p.add_argument("--node-queue", type=int, default=64, help="requests a node may queue")
    add_engine_args(p)

"""`treechat`: the command line. The original launcher's verbs (log, parent, registry, server), and more.

    treechat up                      everything on one machine: root, nodes, gateways
    treechat root                    the root broker
    treechat node --name N [--parent P] --root HOST:PORT    a node, attached to its parent by name
    treechat gateway http|tcp        a gateway feeding the root
    treechat status (alias log)      the live tree with each node's load
    treechat registry                every registered node
    treechat chat                    a terminal chat client
    treechat bench                   load-test a server
    treechat keys DIR [--add|--revoke NAME]   CurveZMQ keys: a tree's folder, one per member
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys

import orjson

from treechat import running
from treechat.args import (DEFAULT_ROOT, add_common, add_curve, add_insecure, add_node_args,
                           add_root_args, add_tree_args)
from treechat.installed import gateway_module
from treechat.launch import add_up_args, cmd_up
from treechat.process import Fatal, serve, setup_logging


def cmd_root(args) -> int:
    from broker.root import Root, RootConfig
    cfg = RootConfig(host=args.host, port=args.port, policy=args.policy, max_queue=args.max_queue,
                     heartbeat=args.heartbeat, grace=args.grace, registry=args.registry,
                     ldap_url=args.ldap_url, ldap_base=args.ldap_base,
                     ldap_bind_dn=args.ldap_bind_dn, ldap_password_file=args.ldap_password_file,
                     curve=args.curve, deadline=args.deadline, insecure=args.insecure,
                     state_dir=args.state_dir, store_max=args.store_max,
                     store_max_age=args.store_max_age * 86400.0, affinity=args.affinity,
                     model_wait=args.model_wait, standby_of=args.standby_of, member=args.member)
    return serve(lambda stop, ready: Root(cfg).run(stop, ready))


def cmd_node(args) -> int:
    from nodes.engine import make_engine
    from nodes.metrics import NodeMetrics
    from nodes.node import Node, NodeConfig, RegistrationRefused
    cfg = NodeConfig(name=args.name, root=args.root, parent=args.parent, host=args.host,
                     policy=args.policy, max_queue=args.node_queue, heartbeat=args.heartbeat,
                     grace=args.grace, curve=args.curve, member=args.member,
                     insecure=args.insecure, aliases=tuple(dict.fromkeys(args.alias)))

    async def main(stop, ready):
        engine = await asyncio.to_thread(make_engine, args)  # loading a model can take a while
        metrics = NodeMetrics() if args.metrics_port else None
        node = Node(cfg, engine, metrics)
        if metrics:
            metrics.start(node, args.host, args.metrics_port)
        try:
            await node.run(stop, ready)
        except RegistrationRefused as e:
            raise Fatal(f"node {cfg.name} was refused by the root: {e}") from None
        finally:
            if metrics:
                metrics.close()

    return serve(main)


def cmd_keys(args) -> int:
    from broker import security
    folder = args.folder
    if args.list:
        print("\n".join(security.members(folder)) or f"{folder} authorizes no key")
        return 0
    if args.revoke:
        for name in args.revoke:
            security.revoke_member(folder, name)
            print(f"revoked {name}: no listening socket of the tree lets its key in again (a "
                  "connection it holds now lasts until it drops; restart that process to cut it)")
        return 0
    if args.add:
        for name in args.add:
            for path in security.add_member(folder, name):
                print(path)
        print(f"give {name}'s machine server.key, {name}.key and {name}.key_secret from {folder}, "
              f"and run it with --curve DIR --member {name}" if len(args.add) == 1 else
              "give each member server.key and its own keypair")
        return 0
    for path in security.create_keys(folder):
        print(path)
    print(f"copy {folder} to every machine of the tree and pass --curve {folder} to every "
          "treechat process; add a key per node or gateway with --add NAME, take one out with "
          "--revoke NAME")
    return 0


def cmd_gateway(args) -> int:
    return serve(lambda stop, ready: args.module.serve(args, stop, ready))


def cmd_status(args) -> int:
    from treechat.show import render_registry, render_tree
    if args.root is None:
        args.root, args.curve = find_root(args.curve)
    tree = asyncio.run(ask_root(args.root, lambda c: c.status(), args.curve, args.member))
    if args.command == "registry":
        tree = {"nodes": tree["nodes"]}
        print(orjson.dumps(tree["nodes"], option=orjson.OPT_INDENT_2).decode() if args.json
              else render_registry(tree["nodes"]))
    else:
        print(orjson.dumps(tree, option=orjson.OPT_INDENT_2).decode() if args.json
              else render_tree(tree, args.root))
    return 0


def find_root(curve: str | None) -> tuple[str, str | None]:
    """(root, key folder) when --root is left out: the tree `treechat up` runs on this machine
    (the newest, saying so, when several run), else DEFAULT_ROOT."""
    trees = running.trees()
    if not trees:
        return DEFAULT_ROOT, curve
    tree = trees[0]
    if len(trees) > 1:
        print(f"treechat: {len(trees)} trees run here ({', '.join(t['root'] for t in trees)}): "
              f"this is {tree['root']}, the newest; --root HOST:PORT asks another",
              file=sys.stderr)
    return tree["root"], curve or tree.get("curve")


async def ask_root(root: str, query, curve: str | None = None, member: str | None = None):
    from broker.client import RootClient
    client = RootClient(root, name="cli", curve=curve, member=member)
    await client.start()
    try:
        # A standby answers a status query too (it shows its state), and nothing else.
        wait = 3.0 * len(client.roots)  # a root that does not answer is left after 3 s
        if not await client.wait_connected(wait) and not client.standby_reason:
            if client.refused:
                raise Fatal(f"the root at {root} refused this query: {client.refused}")
            raise Fatal(f"no root answers at {root} (is `treechat root` or `treechat up` running?)")
        return await query(client)
    finally:
        client.close()


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    command = argv[0] if argv else None
    parser = argparse.ArgumentParser(prog="treechat", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("up", help="start root, nodes and gateways on this machine")
    add_up_args(p)
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("root", help="run the root broker")
    add_root_args(p)
    add_tree_args(p)
    p.add_argument("--standby-of", default=None, metavar="HOST:PORT",
                   help="stand by for the root at HOST:PORT, on another machine: take over when "
                        "its heartbeats stop and a member of the tree lost it (members take both "
                        "addresses: --root A:5550,B:5550)")
    p.set_defaults(func=cmd_root)

    p = sub.add_parser("node", help="run a node (attach it under --parent by name)")
    add_tree_args(p)
    add_node_args(p)
    p.add_argument("--alias", action="append", default=[], metavar="NAME",
                   help="another name requests may give this node's model (repeatable): "
                        "the tree routes it here, /v1/models lists it")
    p.set_defaults(func=cmd_node)

    for name, aliases, what in (("status", ["log"], "the live tree and each node's load"),
                                ("registry", [], "every registered node")):
        p = sub.add_parser(name, aliases=aliases, help=what)
        p.add_argument("--root", default=None,
                       help="the root's HOST:PORT, or HOST:PORT,HOST:PORT (a root and its "
                            "standby: the active one answers) (default: the tree `treechat up` "
                            f"runs on this machine, else {DEFAULT_ROOT})")
        p.add_argument("--json", action="store_true", help="print JSON")
        add_curve(p)
        p.set_defaults(func=cmd_status)

    p = sub.add_parser("keys", help="CurveZMQ keys for an authenticated, encrypted tree: create a "
                                    "folder, add or revoke a member's key")
    p.add_argument("folder", help="the key folder (then pass --curve FOLDER everywhere)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--add", action="append", metavar="NAME",
                   help="make and authorize a key for one node or gateway (repeatable)")
    g.add_argument("--revoke", action="append", metavar="NAME",
                   help="take a member's key out: it cannot connect again (repeatable)")
    g.add_argument("--list", action="store_true", help="the members the folder authorizes")
    p.set_defaults(func=cmd_keys)

    # Gateways, chat and bench import their modules only when asked for, so a node or the root
    # never depends on them.
    p = sub.add_parser("gateway", help="run a gateway (http or tcp)")
    gsub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind in ("http", "tcp"):
        g = gsub.add_parser(kind, help=f"the {kind} gateway")
        g.add_argument("--root", default=DEFAULT_ROOT,
                       help="the root's HOST:PORT, or a root's and its standby's: "
                            "HOST:PORT,HOST:PORT")
        g.add_argument("--heartbeat", type=float, default=1.0,
                       help="seconds between heartbeats to the root (match the root's)")
        add_curve(g)
        add_insecure(g)
        add_common(g)
        if command == "gateway" and kind in argv[1:2]:
            module = gateway_module(kind)
            if module is None:
                raise Fatal(f"the {kind} gateway is not installed")
            module.add_args(g)
            g.set_defaults(func=cmd_gateway, module=module)

    for name, module, what in (("chat", "gateways.tcp_mobile.chat", "chat in the terminal"),
                               ("bench", "bench.serve", "load-test a treechat or OpenAI server")):
        p = sub.add_parser(name, help=what)
        if command == name:
            mod = importlib.import_module(module)
            mod.add_args(p)
            p.set_defaults(func=mod.main)

    for p in sub.choices.values():
        if not any(a.dest == "log_level" for a in p._actions):
            add_common(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
    except Fatal as e:
        print(f"treechat: {e}", file=sys.stderr)
        return 2
    if args.command == "log":
        args.command = "status"
    setup_logging(args.log_level, getattr(args, "name", "") or "")
    try:
        return args.func(args) or 0
    except (ValueError, Fatal) as e:
        print(f"treechat: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

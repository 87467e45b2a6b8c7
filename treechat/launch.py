"""`treechat up`: a whole treechat on one machine, in one command.

Starts the root, then its nodes, then the gateways that exist, each as its own named child
process. The nodes: `--nodes N` per `--model` (one model, the default, without it; `--model A
--model B` serves both) in a tree of fan-out `--fanout K` (node-1..node-K under the root, the
next K under node-1, and so on, the models in turn), or exactly the tree of `--layout FILE`
(`treechat.layout`). Every node gets the same engine flags but its own model and slots. Each child prints one READY line when it serves (see `treechat.process`); `up`
waits for it before starting what depends on it, then prints where everything listens.

Before starting anything `up` checks its ports: a busy one is one line naming it and, where
/proc tells, the earlier treechat holding it (`treechat.ports`), and `up` exits 1.

A child that dies on its own is started again (a restarted node takes its name back; the root
re-dispatches what it held). Ctrl-C, SIGTERM or SIGHUP (the terminal closed) stops gateways, then
nodes, then the root, each with SIGTERM so they finish or hand back their work, all within one
deadline (`--grace` + 5 s, then SIGKILL), and `up` exits 0. If `up` itself dies, even by
SIGKILL, its children notice through their watchdog pipe and stop (`treechat.process`).

Keys: without `--curve` or `--insecure`, `up` makes fresh CurveZMQ keys for its own tree on every
start (one per node and gateway, readable by this user only: `broker.security.create_tree_keys`)
and gives each child its own, so no other process on the machine can join or submit;
`treechat status` and the bench find them by the root's address. While it runs, `up` keeps a note
of its root's address (`treechat.running`): `treechat status` without --root asks that tree.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from nodes.engine.names import DEFAULT_MODEL, model_name
from treechat import running
from treechat.args import add_common, add_node_args, add_root_args, add_tree_args
from treechat.installed import gateway_installed
from treechat.layout import placements
from treechat.ports import busy_message
from treechat.process import READY, STOP_SIGNALS, Fatal, setup_logging
from treechat.tls import add_server_args, server_context

log = logging.getLogger("treechat.up")

READY_TIMEOUT = 900.0  # seconds: a first start may convert the default model
MAX_RESTARTS = 5  # per child per minute, then `up` gives up
STOP_MARGIN = 5.0  # seconds past --grace before a child that has not stopped is killed
# What every child gets in its environment: unbuffered stdout (the READY line), and no download or
# loading progress bars from transformers / huggingface_hub in a service's log.
CHILD_ENV = {"PYTHONUNBUFFERED": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


def add_up_args(p: argparse.ArgumentParser) -> None:
    add_root_args(p)
    add_tree_args(p)
    p.add_argument("--http-port", type=int, default=8000, help="HTTP gateway port (0: none)")
    p.add_argument("--tcp-port", type=int, default=8001, help="TCP gateway port (0: none)")
    p.add_argument("--api-key", action="append", default=None,
                   help="require this key on the HTTP API (Bearer) and the TCP gateway (repeatable)")
    p.add_argument("--api-key-file", default=None, help="API keys, one per line")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="HTTP: seconds before a request fails with 504 (default: none)")
    p.add_argument("--served-model-name", action="append", default=None, metavar="NAME",
                   help="HTTP: another name the default model answers to (repeatable)")
    p.add_argument("--allowed-origin", action="append", default=None, metavar="ORIGIN",
                   help="HTTP: let pages of ORIGIN call the API (CORS; repeatable)")
    add_server_args(p)  # both gateways serve TLS with the same certificate
    p.add_argument("--metrics-port", type=int, default=0, metavar="BASE",
                   help="Prometheus metrics: the TCP gateway on BASE, the Nth node on BASE+N "
                        "(default 0: off; the HTTP gateway always has /metrics)")
    add_node_args(p, named=False)
    # A node serves one --model; up serves several: this --model replaces the engine's own.
    g = p.add_argument_group("models and the tree's shape", conflict_handler="resolve")
    g.add_argument("--model", action="append", default=None, metavar="MODEL",
                   help="a model to serve (hf: a .gguf file, a local folder or a Hub name; "
                        f"default: {DEFAULT_MODEL}); repeat it to serve several: --model A "
                        "--model B starts --nodes nodes for each, spread through the tree")
    g.add_argument("--nodes", type=int, default=None, metavar="N",
                   help="nodes per model (default 1)")
    g.add_argument("--fanout", type=int, default=None, metavar="K",
                   help="children per node in the tree (default 2)")
    g.add_argument("--layout", default=None, metavar="FILE",
                   help="the tree exactly: a JSON list of nodes (below), instead of --nodes and "
                        "--fanout")
    p.epilog = LAYOUT_HELP
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    add_common(p)


LAYOUT_HELP = """\
several models:
  treechat up --model A.gguf --model B.gguf             one node of each
  treechat up --model A.gguf --model B.gguf --nodes 2   two of each, in one tree

--layout FILE, a JSON list of nodes (a node carries requests of any model down
to its children, so any model may sit under any other):
  [{"name": "small-1", "parent": null,      "model": "small.gguf"},
   {"name": "coder-1", "parent": null,      "model": "coder.gguf", "slots": 4,
    "aliases": ["coder"]},
   {"name": "small-2", "parent": "coder-1", "model": "small.gguf"}]
  name    required, unique: letters, digits, '-', '_', '.'
  parent  another node's name, or null (or left out): under the root
  model   what --model takes; left out: the one --model given, else the default
  slots   requests it runs at once (its --max-slots); left out: --max-slots
  aliases other names requests may give its model (a list; its --alias each)
Every node gets the other engine flags (--quantization, --threads, ...) alike.
"""


def up_parser() -> argparse.ArgumentParser:
    """`treechat up`'s own parser (what `treechat bench --compare` checks its flags with)."""
    p = argparse.ArgumentParser(prog="treechat up")
    add_up_args(p)
    return p


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process | None = None
    info: dict = field(default_factory=dict)
    starts: list[float] = field(default_factory=list)
    watchdog: int | None = None  # the write end of its watchdog pipe, held only by `up`


class Launcher:
    def __init__(self, args: argparse.Namespace):
        self.layout = placements(args.layout, args.model, args.nodes, args.fanout)
        server_context(args.tls_cert, args.tls_key)  # unreadable files fail before anything starts
        self.args = args
        self.stopping = False
        self.root = f"{args.host}:{args.port}"
        self.children: list[Child] = []
        self.failed = asyncio.Event()

    def plan(self) -> list[list[Child]]:
        a = self.args
        py = [sys.executable, "-m", "treechat.cli"]
        keys = self.tree_keys([node.name for node in self.layout])
        curve = (["--curve", keys] if keys else []) + (["--insecure"] if a.insecure else [])
        common = ["--heartbeat", str(a.heartbeat), "--grace", str(a.grace), "--policy", a.policy,
                  "--log-level", a.log_level] + curve
        registry = ["--registry", a.registry, "--store-max", str(a.store_max),
                    "--store-max-age", str(a.store_max_age)]
        if a.state_dir is not None:
            registry += ["--state-dir", a.state_dir]
        for flag in ("ldap_url", "ldap_base", "ldap_bind_dn", "ldap_password_file"):
            if getattr(a, flag) is not None:
                registry += ["--" + flag.replace("_", "-"), getattr(a, flag)]
        root = Child("root", py + ["root", "--host", a.host, "--port", str(a.port),
                                   "--max-queue", str(a.max_queue),
                                   "--deadline", str(a.deadline), "--model-wait", str(a.model_wait)]
                     + ([] if a.affinity else ["--no-affinity"]) + registry + common)
        engine = ["--engine", a.engine, "--fake-delay", str(a.fake_delay), "--dtype", a.dtype,
                  "--device", a.device, "--load-format", a.load_format,
                  "--node-queue", str(a.node_queue), "--quantization", a.quantization,
                  "--repeat-penalty", str(a.repeat_penalty), "--repeat-last-n",
                  str(a.repeat_last_n)]
        if a.enforce_eager:
            engine.append("--enforce-eager")
        for flag in ("max_model_len", "kv_budget", "kv_cache_memory", "chat_template",
                     "model_config", "threads", "max_num_batched_tokens",
                     "max_tokens_default"):
            value = getattr(a, flag)
            if value is not None:
                engine += ["--" + flag.replace("_", "-"), str(value)]
        if a.engine == "hf" and a.threads is None and len(self.layout) > 1:
            # Several model nodes on one machine: each gets its share of the cores, or their
            # thread pools fight and every decode step slows down many times over.
            engine += ["--threads", str(max(1, (os.cpu_count() or 1) // len(self.layout)))]
        nodes = []
        for i, node in enumerate(self.layout, 1):
            argv = py + ["node", "--name", node.name, "--root", self.root, "--host", a.host]
            argv += common + engine + (["--member", node.name] if keys else [])
            slots = node.slots or a.max_slots
            for flag, value in (("--model", node.model), ("--max-slots", slots),
                                ("--parent", node.parent)):
                argv += [flag, str(value)] if value is not None else []
            for alias in node.aliases:
                argv += ["--alias", alias]
            if a.metrics_port:
                argv += ["--metrics-port", str(a.metrics_port + i)]
            nodes.append(Child(node.name, argv))
        gateways = []
        for kind, port in (("http", a.http_port), ("tcp", a.tcp_port)):
            if port and gateway_installed(kind):
                argv = py + ["gateway", kind, "--root", self.root, "--host", a.host,
                             "--port", str(port), "--log-level", a.log_level,
                             "--heartbeat", str(a.heartbeat)] + curve
                argv += ["--member", f"{kind}-gateway"] if keys else []
                for key in a.api_key or []:  # both gateways take the same keys
                    argv += ["--api-key", key]
                if a.api_key_file:
                    argv += ["--api-key-file", a.api_key_file]
                if a.tls_cert:
                    argv += ["--tls-cert", a.tls_cert, "--tls-key", a.tls_key]
                if kind == "http":
                    if a.request_timeout:
                        argv += ["--request-timeout", str(a.request_timeout)]
                    for flag in ("served_model_name", "allowed_origin"):
                        for value in getattr(a, flag) or []:
                            argv += ["--" + flag.replace("_", "-"), value]
                    argv += ["--grace", str(a.grace)]
                    if a.engine == "hf":  # /tokenize reads the nodes' tokenizer: it has one,
                        # the first node's (with several models, the first --model's)
                        argv += ["--tokenizer", self.layout[0].model or "default"]
                        if a.chat_template:
                            argv += ["--chat-template", a.chat_template]
                else:
                    argv += ["--drain", str(a.grace)]
                    if a.metrics_port:
                        argv += ["--metrics-port", str(a.metrics_port)]
                gateways.append(Child(f"{kind}-gateway", argv))
        return [[root], nodes, gateways]

    def tree_keys(self, nodes: list[str]) -> str | None:
        """The key folder the children get: --curve DIR (with a key added for each child that
        lacks one), fresh keys for this tree, or none with --insecure."""
        from broker import security
        a = self.args
        if a.insecure and not a.curve:
            return None
        names = ["cli", "http-gateway", "tcp-gateway"] + nodes
        if not a.curve:
            return str(security.create_tree_keys(a.host, a.port, names))
        if not (Path(a.curve) / "server.key").exists():
            security.create_keys(a.curve, ())
        for name in names:
            if not (Path(a.curve) / f"{name}.key_secret").exists():
                security.add_member(a.curve, name)
        return a.curve

    async def run(self) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        self.check_ports()
        stages = self.plan()
        note = running.note(self.root, self.args.curve)  # how `treechat status` finds this tree
        try:
            # Gateways last: one started beside the nodes serves a view of the tree without them
            # for its first second (an empty /v1/models right after the banner).
            for stage in stages:
                await self.start_all(stage, stop)
                if stop.is_set():
                    break
            else:
                self.announce()
                await asyncio.wait([loop.create_task(stop.wait()),
                                    loop.create_task(self.failed.wait())],
                                   return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.stopping = True
            deadline = time.monotonic() + self.args.grace + STOP_MARGIN
            for stage in reversed(stages):
                await self.stop_all(stage, deadline)
            note.unlink(missing_ok=True)
        return 1 if self.failed.is_set() else 0

    def check_ports(self) -> None:
        """Fail before starting anything when a port `up` needs is taken."""
        a = self.args
        wanted = [(a.port + i, "--port") for i in range(3)]
        wanted += [(port, flag) for kind, port, flag in (("http", a.http_port, "--http-port"),
                                                          ("tcp", a.tcp_port, "--tcp-port"))
                   if port and gateway_installed(kind)]
        message = busy_message(a.host, wanted)
        if message:
            raise Fatal(message)

    async def start_all(self, stage: list[Child], stop: asyncio.Event) -> None:
        """Start a stage's children together; return when all are ready or `stop` is set, raise
        the first failure. Starts still waiting are cancelled, so no failure goes unreported."""
        pending = {asyncio.create_task(self.start(c)) for c in stage}
        stopper = asyncio.create_task(stop.wait())
        try:
            while pending and not stop.is_set():
                done, pending = await asyncio.wait(pending | {stopper},
                                                   return_when=asyncio.FIRST_COMPLETED)
                pending.discard(stopper)
                errors = [t.exception() for t in done - {stopper}]  # every one retrieved
                if any(errors):
                    raise next(e for e in errors if e)
        finally:
            for task in pending | {stopper}:
                task.cancel()

    async def start(self, child: Child) -> None:
        self.children.append(child) if child not in self.children else None
        child.starts = [t for t in child.starts if t > time.monotonic() - 60] + [time.monotonic()]
        read_end, child.watchdog = os.pipe()
        limit = self.args.grace + STOP_MARGIN
        try:
            child.proc = await asyncio.create_subprocess_exec(
                *child.argv, stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL,
                env={**os.environ, **CHILD_ENV, "TREECHAT_WATCHDOG": f"{read_end}:{limit}"},
                pass_fds=(read_end,), start_new_session=True)
        finally:
            os.close(read_end)
        ready = asyncio.get_running_loop().create_future()
        asyncio.create_task(self.watch(child, child.proc, child.watchdog, ready))
        try:
            child.info = await asyncio.wait_for(ready, READY_TIMEOUT)
        except asyncio.TimeoutError:
            raise Fatal(f"{child.name} did not become ready in {READY_TIMEOUT:.0f}s") from None

    async def watch(self, child: Child, proc, watchdog: int, ready: asyncio.Future) -> None:
        """Relay the child's stdout, catch its READY line, and restart it if it dies."""
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(READY) and not ready.done():
                ready.set_result(orjson.loads(line[len(READY):]))
            else:
                print(line, flush=True)
        code = await proc.wait()
        os.close(watchdog)
        if not ready.done():
            ready.set_exception(Fatal(f"{child.name} exited with code {code} before it was ready"))
            return
        if self.stopping or child.proc is not proc:
            return
        if len(child.starts) >= MAX_RESTARTS:
            log.error("%s exited with code %s %d times in a minute; stopping", child.name, code,
                      len(child.starts))
            self.failed.set()
            return
        log.warning("%s exited with code %s; starting it again", child.name, code)
        try:
            await self.start(child)
        except Fatal as e:
            log.error("%s", e)
            self.failed.set()

    async def stop_all(self, stage: list[Child], deadline: float) -> None:
        procs = [c.proc for c in stage if c.proc is not None and c.proc.returncode is None]
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        if procs:
            await asyncio.wait([asyncio.create_task(p.wait()) for p in procs],
                               timeout=max(0.0, deadline - time.monotonic()))
            for proc in procs:
                if proc.returncode is None:
                    log.warning("a child (pid %d) did not stop in time; killing it", proc.pid)
                    proc.kill()
                    await proc.wait()

    def announce(self) -> None:
        a = self.args
        lines = [f"treechat is up: root {self.root} (policy {a.policy}), {len(self.layout)} "
                 f"node(s), engine {a.engine}"]
        if a.engine == "hf":  # each model by the name it is served under, with its nodes
            served: dict[str, list[str]] = {}
            for node in self.layout:
                served.setdefault(model_name(node.model), []).append(node.name)
            lines += [f"  model {name}: {', '.join(names)}" for name, names in served.items()]
        for c in self.children:
            if c.name.endswith("gateway"):
                tls = " (TLS)" if c.info.get("tls") else ""
                lines.append(f"  {c.name:<13} {c.info.get('url', '')}{tls}")
        curve = f" --curve {a.curve}" if a.curve else ""
        lines.append(f"  status:       {command_name()} status --root {self.root}{curve}")
        lines.append("  stop:         Ctrl-C")
        print("\n".join(lines), flush=True)


def command_name() -> str:
    """How the user can run treechat again: `./dev.sh` when started through it (it says so in
    $TREECHAT_COMMAND), `treechat` when that is on PATH, else this very program."""
    if os.environ.get("TREECHAT_COMMAND"):
        return os.environ["TREECHAT_COMMAND"]
    argv0 = os.path.abspath(sys.argv[0])
    on_path = shutil.which("treechat")
    if on_path and os.path.realpath(on_path) == os.path.realpath(argv0):
        return "treechat"
    if os.path.basename(argv0) == "treechat":
        return sys.argv[0]
    return f"{sys.executable} -m treechat.cli"


def cmd_up(args: argparse.Namespace) -> int:
    setup_logging(args.log_level, "up")
    try:
        return asyncio.run(Launcher(args).run())
    except Fatal as e:
        print(f"treechat: {e}", file=sys.stderr)
        return 1

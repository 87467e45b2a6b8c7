"""A treechat tree spread over network-namespace hosts, for the studies (`bench.scaling --netns`).

Runs in the bench process. `async with HostedTree(bed, nodes, fanout, engine_args) as t:` starts
`treechat root` on the bed's `root` host and `treechat node` number i on host `leaf-i`, laid out
as `treechat up` lays them (breadth first, `fanout` children per node), each bound to its host's
address, with the README's commands for several machines and the tree's keys (`--curve`); it
waits for every READY line and for the root to see every node, and stops nodes then the root
(SIGTERM) on the way out. `t.root` is HOST:PORT for a `RootClient` made inside the bed.
"""

from __future__ import annotations

import asyncio
import sys
import time

from bench.compare import tree_alive
from bench.netns import Bed
from bench.procs import Child
from treechat.layout import tree_layout

PORT = 5550


class HostedTree:
    def __init__(self, bed: Bed, nodes: int, fanout: int, engine_args: list[str], keys: str,
                 heartbeat: float = 1.0):
        self.bed, self.nodes, self.fanout = bed, nodes, fanout
        self.engine_args, self.keys, self.heartbeat = engine_args, keys, heartbeat
        self.root = f"{bed.addr('root')}:{PORT}"
        self.children: list[Child] = []

    def child(self, name: str, host: str, *args: str) -> Child:
        argv = self.bed.command(host, [sys.executable, "-m", "treechat.cli", *args,
                                       "--heartbeat", str(self.heartbeat), "--grace", "2",
                                       "--log-level", "WARNING", "--curve", self.keys])
        return Child(name, argv)

    async def __aenter__(self) -> "HostedTree":
        root = self.child("root", "root", "root", "--host", self.bed.addr("root"),
                          "--port", str(PORT))
        await root.start()
        self.children.append(root)
        try:
            for i, (name, parent) in enumerate(tree_layout(self.nodes, self.fanout), 1):
                host = f"leaf-{i}"
                node = self.child(name, host, "node", "--name", name, "--root", self.root,
                                  "--host", self.bed.addr(host), *self.engine_args,
                                  *(["--parent", parent] if parent else []))
                await node.start()
                self.children.append(node)
            deadline = time.monotonic() + 60
            while not await tree_alive(self.root, self.nodes, curve=self.keys):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the root never saw {self.nodes} nodes alive")
                await asyncio.sleep(0.2)
            return self
        except BaseException:
            await self.__aexit__()
            raise

    async def __aexit__(self, *exc) -> None:
        for child in reversed(self.children):
            await child.stop()
        self.children = []

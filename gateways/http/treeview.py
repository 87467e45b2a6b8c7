"""The gateway's cached view of the tree: models served, readiness, and per-node load.

Asks the root (`RootClient.status()`, a StatusQuery on the root's front socket) every few seconds
and on demand with a short timeout; handlers read the cached copy so a chat request does not wait
on a status round trip. Every fresh status also refreshes the per-node gauges of `Metrics`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter

from broker.client import RootClient
from gateways.http.errors import ApiError, no_node, root_unreachable
from gateways.http.metrics import Metrics

log = logging.getLogger("treechat.http.tree")


class TreeView:
    def __init__(self, client: RootClient, metrics: Metrics, every: float = 2.0):
        self.client = client
        self.metrics = metrics
        self.every = every
        self.status: dict | None = None
        self.at = 0.0  # monotonic time of `status`

    async def refresh(self, timeout: float = 1.0) -> dict | None:
        """A fresh status, or None when the root does not answer in time."""
        if not self.client.connected:
            self.status = None
            return None
        try:
            status = await self.client.status(timeout)
        except asyncio.TimeoutError:
            return None
        self.status, self.at = status, time.monotonic()
        self.metrics.update_tree(status)
        return status

    async def recent(self, max_age: float, timeout: float = 1.0) -> dict | None:
        """The cached status when younger than `max_age` seconds, else a fresh one. While the
        client fails over to the standby root, the last one seen (the models it lists still
        exist)."""
        if self.status is not None and self.client.failing_over:
            return self.status
        if self.status is not None and time.monotonic() - self.at < max_age \
                and self.client.connected:
            return self.status
        return await self.refresh(timeout)

    async def poll(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.refresh()
            except Exception:  # never let the poller die; the next round tries again
                log.exception("status refresh failed")
            try:
                await asyncio.wait_for(stop.wait(), self.every)
            except asyncio.TimeoutError:
                pass


def serving_nodes(status: dict | None) -> list[dict]:
    """Alive nodes that run an engine."""
    if not status:
        return []
    return [n for n in status.get("nodes", [])
            if n.get("state") == "alive" and n.get("engine") not in (None, "none")]


def nodes_per_model(status: dict | None) -> Counter:
    """Each model the tree serves -> how many alive nodes serve it."""
    return Counter(n.get("model") or n.get("engine") for n in serving_nodes(status))


def models_of(status: dict | None) -> list[str]:
    """The models the tree serves, in a stable order (the first is the default)."""
    return sorted(nodes_per_model(status))


def aliases_of(status: dict | None, served_names: tuple[str, ...] = ()) -> dict[str, str]:
    """Each other name a model answers to -> that model: the names nodes give their model
    (`treechat node --alias`), and the gateway's --served-model-name (the default model's)."""
    models = models_of(status)
    names: dict[str, str] = {}
    for node in serving_nodes(status):
        aliases = (node.get("info") or {}).get("aliases")
        for alias in aliases if isinstance(aliases, list) else []:
            names.setdefault(alias, node.get("model"))
    for name in served_names:
        if models:
            names.setdefault(name, models[0])
    return {alias: model for alias, model in names.items() if alias not in models}


def model_infos(status: dict | None, served_names: tuple[str, ...] = ()) -> dict[str, dict]:
    """Each model the tree serves -> the info of a node serving it (the first); each other name
    (aliases_of) -> its model's."""
    infos: dict[str, dict] = {}
    for node in serving_nodes(status):
        infos.setdefault(node.get("model") or node.get("engine"), node.get("info") or {})
    for alias, model in aliases_of(status, served_names).items():
        infos[alias] = infos[model]
    return infos


def is_ready(status: dict | None) -> bool:
    return bool(serving_nodes(status)) and bool(status.get("root", {}).get("children"))


async def resolve_model(tree: TreeView, model: str | None,
                        served: tuple[str, ...] = ()) -> tuple[str, str | None]:
    """(the name the response shows, the tree model the request must run on or None for any).

    Checked against what the tree serves right now, plus its models' other names (`aliases_of`:
    the nodes' --alias, and --served-model-name for the default model, the first by name). A
    request that names no model runs on any node while the tree serves one model, and on the
    default model's when it serves several, so the name the response shows is the model that
    answered. Raises 503 when the root or every node is
    unreachable, 404 `model_not_found` for any other name. A miss on the cached status asks the
    root again: a node may have just joined."""
    status = await tree.recent(max_age=tree.every * 1.5)
    if status is None:
        raise root_unreachable()
    models, aliases = models_of(status), aliases_of(status, served)
    if not models or (model is not None and model not in models and model not in aliases):
        status = await tree.refresh() or status
        models, aliases = models_of(status), aliases_of(status, served)
    if not models:
        raise no_node()
    if model is None:
        return models[0], models[0] if len(models) > 1 else None
    if model in models:
        return model, model
    if model in aliases:
        return model, aliases[model]
    names = models + list(aliases)
    raise ApiError(404, f"the model '{model}' does not exist here; this server serves: "
                        f"{', '.join(names)} (see GET /v1/models)",
                   code="model_not_found", param="model")

"""The small GET endpoints: the page, health, readiness, models, the live tree, metrics.

    GET /          web/index.html (sets the `_xsrf` cookie the page echoes in X-XSRFToken);
                   HEAD / 200 (Ollama's clients probe it)
    GET /healthz   200 while the process runs                               (public)
    GET /readyz    200 when the root answers and an alive node has an engine (public)
    GET /metrics   Prometheus text format                                  (public)
    GET /v1/models the models the tree's nodes serve, each with how many nodes serve it
                   (`nodes`), and --served-model-name's (API key)
    GET /v1/models/ID  one of them, or 404 model_not_found                  (API key)
    GET /v1/tree   the root's live status: root queue, every node's load     (API key)
"""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from gateways.http.base import ApiHandler, BaseHandler
from gateways.http.errors import ApiError, root_unreachable
from gateways.http.treeview import (aliases_of, is_ready, model_infos, models_of,
                                    nodes_per_model, serving_nodes)

STARTED = int(time.time())


class IndexHandler(BaseHandler):
    def get(self) -> None:
        path = Path(self.gw.cfg.web_dir or "", "index.html")
        try:
            page = path.read_bytes()
        except OSError:
            self.set_status(404)
            self.set_header("Content-Type", "text/plain; charset=utf-8")
            self.finish(f"the chat page is missing ({path}); the API works at /v1\n")
            return
        self.xsrf_token  # noqa: B018  (reading it sets the `_xsrf` cookie)
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.set_header("Cache-Control", "no-cache")
        self.finish(page)

    def head(self) -> None:
        """Ollama's clients probe a server with `HEAD /`: it is up."""
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish()


class HealthHandler(BaseHandler):
    def get(self) -> None:
        self.write_json({"status": "ok"})


class ReadyHandler(BaseHandler):
    async def get(self) -> None:
        status = await self.gw.tree.refresh(timeout=1.0)
        if status is None:
            self.write_json({"ready": False, "reason": "the root does not answer"}, 503)
        elif not is_ready(status):
            self.write_json({"ready": False, "reason": "no alive node with an engine"}, 503)
        else:
            self.write_json({"ready": True, "nodes": len(serving_nodes(status)),
                             "models": models_of(status)})


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        await self.gw.tree.recent(max_age=0.5, timeout=0.5)  # fresh node gauges if the root answers
        self.set_header("Content-Type", CONTENT_TYPE_LATEST)
        self.finish(self.gw.metrics.render())


class ModelsHandler(ApiHandler):
    async def get(self) -> None:
        self.write_json({"object": "list", "data": await self.models()})

    async def models(self) -> list[dict]:
        status = await self.gw.tree.recent(max_age=1.0)
        if status is None:
            raise root_unreachable()
        infos = model_infos(status, self.gw.cfg.served_names)
        aliases = aliases_of(status, self.gw.cfg.served_names)  # other names -> their model
        counts = nodes_per_model(status)
        models = sorted(counts)
        entries = []
        for name in models + list(aliases):
            root = aliases.get(name, name)
            entries.append({"id": name, "object": "model", "created": STARTED,
                            "owned_by": "treechat", "root": root, "nodes": counts[root],
                            "max_model_len": infos[name].get("max_model_len"),
                            "max_tokens_default": infos[name].get("max_tokens_default")})
        return entries


class ModelHandler(ModelsHandler):
    async def get(self, model: str) -> None:
        for entry in await self.models():
            if entry["id"] == model:
                return self.write_json(entry)
        raise ApiError(404, f"the model '{model}' does not exist here (see GET /v1/models)",
                       code="model_not_found", param="model")


class TreeHandler(ApiHandler):
    async def get(self) -> None:
        status = await self.gw.tree.refresh(timeout=2.0)
        if status is None:
            raise root_unreachable()
        self.set_header("Cache-Control", "no-store")
        self.write_json(status)

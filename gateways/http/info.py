"""The small GET endpoints: the page, health, readiness, models, the live tree, metrics.

    GET /          web/index.html (sets the `_xsrf` cookie the page echoes in X-XSRFToken)
    GET /healthz   200 while the process runs                               (public)
    GET /readyz    200 when the root answers and an alive node has an engine (public)
    GET /metrics   Prometheus text format                                  (public)
    GET /v1/models the models the tree's nodes serve                        (API key)
    GET /v1/tree   the root's live status: root queue, every node's load     (API key)
"""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST

from gateways.http.base import ApiHandler, BaseHandler
from gateways.http.errors import root_unreachable
from gateways.http.treeview import is_ready, models_of, serving_nodes

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
        status = await self.gw.tree.recent(max_age=1.0)
        if status is None:
            raise root_unreachable()
        infos = {}
        for node in serving_nodes(status):
            infos.setdefault(node.get("model") or node.get("engine"), node.get("info") or {})
        self.write_json({"object": "list", "data": [
            {"id": m, "object": "model", "created": STARTED, "owned_by": "treechat",
             "max_model_len": infos.get(m, {}).get("max_model_len"),
             "max_tokens_default": infos.get(m, {}).get("max_tokens_default")}
            for m in models_of(status)]})


class TreeHandler(ApiHandler):
    async def get(self) -> None:
        status = await self.gw.tree.refresh(timeout=2.0)
        if status is None:
            raise root_unreachable()
        self.set_header("Cache-Control", "no-store")
        self.write_json(status)

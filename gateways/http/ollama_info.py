"""Ollama's model endpoints, answered from the live tree (what its nodes serve right now):

    GET  /api/tags      the models served (and --served-model-name's), Ollama's list shape
    POST /api/show      one model's details, context length and capabilities; 404 if not served
    GET  /api/ps        the models loaded: every served one (nodes keep their model loaded)
    GET  /api/version   the Ollama API version this gateway speaks
    POST /api/embed, /api/embeddings   400: embeddings are not served
    *    /api/...       anything else: 404 in Ollama's error shape

Ollama describes a model by its file (size, digest, quantization); a tree serves names, so
`size` is 0 where a node does not say, and `digest` is a hash of the name: stable, and
different for every model, which is what clients use it for.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timezone

from gateways.http.base import ApiHandler, BodyHandler
from gateways.http.errors import ApiError, bad_request, root_unreachable
from gateways.http.info import STARTED
from gateways.http.ollama import ChatHandler, GenerateHandler, OllamaErrors, model_name
from gateways.http.treeview import model_infos

VERSION = "0.12.0"  # the Ollama API this gateway follows (clients compare versions for features)
CAPABILITIES = ["completion", "tools"]


class OllamaInfo(OllamaErrors, ApiHandler):
    async def served(self) -> dict[str, dict]:
        """name -> the info of a node serving it (its tree model's for a --served-model-name)."""
        status = await self.gw.tree.recent(max_age=1.0)
        if status is None:
            raise root_unreachable()
        return model_infos(status, self.gw.cfg.served_names)

    def entry(self, name: str, info: dict) -> dict:
        quant = info.get("quantization") or ""
        return {"name": name, "model": name,
                "modified_at": now_of(STARTED), "size": int(info.get("size") or 0),
                "digest": hashlib.sha256(name.encode()).hexdigest(),
                "details": {"parent_model": "", "format": "gguf" if quant else "",
                            "family": "", "families": [], "parameter_size": "",
                            "quantization_level": str(quant).upper()}}


def now_of(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


class TagsHandler(OllamaInfo):
    async def get(self) -> None:
        served = await self.served()
        self.write_json({"models": [self.entry(n, info) for n, info in served.items()]})


class PsHandler(OllamaInfo):
    async def get(self) -> None:
        served = await self.served()
        self.write_json({"models": [
            {**self.entry(n, info), "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
             "context_length": info.get("max_model_len") or 0}
            for n, info in served.items()]})


class VersionHandler(OllamaErrors, ApiHandler):
    def get(self) -> None:
        self.write_json({"version": VERSION})


class ShowHandler(OllamaInfo, BodyHandler):
    async def post(self) -> None:
        body = self.read_json()
        name = body.get("model") or body.get("name") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise bad_request("model", "model is required")
        served = await self.served()
        info = served.get(model_name(name))
        if info is None:
            raise ApiError(404, f"model '{name}' not found", code="model_not_found")
        entry = self.entry(model_name(name), info)
        self.write_json({"modelfile": "", "parameters": "", "template": "",
                         "details": entry["details"], "modified_at": entry["modified_at"],
                         "model_info": {"general.architecture": "",
                                        "general.context_length": info.get("max_model_len")},
                         "capabilities": CAPABILITIES})


class EmbedHandler(OllamaErrors, BodyHandler):
    async def post(self) -> None:
        self.read_json()  # a bad body is still a 400 of its own
        raise ApiError(400, "embeddings are not served by treechat: its models generate text "
                            "only (see docs/http-api.md)", code="not_supported")


class NotFoundHandler(OllamaErrors, ApiHandler):
    def prepare(self) -> None:
        super().prepare()
        raise ApiError(404, f"{self.request.path} is not part of this server's Ollama API "
                            "(chat, generate, tags, show, ps, version)", code="not_found")


def routes(gw_args: dict) -> list:
    """Tornado's route entries for the whole Ollama API."""
    return [(path, handler, gw_args) for path, handler in (
        (r"/api/chat", ChatHandler), (r"/api/generate", GenerateHandler),
        (r"/api/tags", TagsHandler), (r"/api/show", ShowHandler), (r"/api/ps", PsHandler),
        (r"/api/version", VersionHandler), (r"/api/embed", EmbedHandler),
        (r"/api/embeddings", EmbedHandler), (r"/api/.*", NotFoundHandler))]

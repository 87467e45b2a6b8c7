"""`POST /tokenize` and `POST /detokenize`, in vLLM's shapes, with the served model's tokenizer.

    POST /tokenize    {"prompt": "...", "add_special_tokens": true}
                      {"messages": [...], "tools": [...], "add_special_tokens": false}
                      -> {"count": N, "max_model_len": M, "tokens": [ids]}
    POST /detokenize  {"tokens": [ids]} -> {"prompt": "..."}

Tokenizing lives in the nodes, and the tree's protocol carries no prompt ids back (a request's
answer has counts and text), so the gateway reads the same tokenizer itself when told which model
the tree serves: `--tokenizer MODEL [--chat-template FILE]`, which `treechat up` passes from its
own `--model` for the hf engine. The files are found as the node finds them
(`nodes.engine.models`) and loaded on first use, in a thread, so the gateway starts and serves
everything else at once; chat messages are rendered by the node's own code (`nodes.engine.prompt`)
after the chat path's parsing, so `count` is the `prompt_tokens` a chat request gets. Without
`--tokenizer` both routes answer 501 saying so. (Anthropic's count_tokens asks a node instead:
gateways/http/anthropic.py.)
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateways.http.base import BodyHandler, Gateway
from gateways.http.errors import ApiError, bad_request
from gateways.http.openai_schema import parse_chat
from gateways.http.treeview import serving_nodes


class Tokenizer:
    """The served model's tokenizer and chat template, loaded once, on first use."""

    def __init__(self, model: str | None, chat_template: str | None):
        self.model = model
        self.chat_template = chat_template
        self.loading: asyncio.Future | None = None

    async def get(self):
        if self.loading is None:
            self.loading = asyncio.get_running_loop().run_in_executor(None, self.load)
        return await asyncio.shield(self.loading)

    def load(self) -> tuple[Any, str | None]:
        from nodes.engine import models, templates
        folder, config, gguf = models.described(self.model)  # as models.load finds it
        tok = models.load_tokenizer(folder, saved=gguf is not None)
        template, _ = templates.choose(self.chat_template, config, tok)
        return tok, template or tok.chat_template


class TokenHandler(BodyHandler):
    def initialize(self, gw: Gateway, tokenizer: Tokenizer | None) -> None:
        super().initialize(gw)
        self.tokenizer = tokenizer

    async def loaded(self):
        if self.tokenizer is None:
            raise ApiError(501, "this gateway has no tokenizer: start it with --tokenizer MODEL "
                                "(treechat up does, for the hf engine)", code="not_implemented")
        return await self.tokenizer.get()


class TokenizeHandler(TokenHandler):
    async def post(self) -> None:
        body = self.read_json()
        if not isinstance(body, dict) or ("prompt" in body) == ("messages" in body):
            raise bad_request(None, "send a 'prompt' string or chat 'messages'")
        chat = "messages" in body
        special = body.get("add_special_tokens", not chat)
        if not isinstance(special, bool):
            raise bad_request("add_special_tokens", "'add_special_tokens' must be true or false")
        tok, template = await self.loaded()
        if chat:
            from nodes.engine import prompt
            fields = {k: body[k] for k in ("messages", "tools") if k in body}
            request = parse_chat(fields).requests[0]
            if template is None:
                raise bad_request("messages", "the model has no chat template; send a 'prompt'")
            try:
                text = prompt.render(tok, template, request["messages"], request.get("tools"))
            except prompt.TemplateError as e:
                raise bad_request("messages", str(e)) from None
        elif isinstance(body["prompt"], str):
            text = body["prompt"]
        else:
            raise bad_request("prompt", "'prompt' must be a string")
        ids = tok.encode(text, add_special_tokens=special)
        self.write_json({"count": len(ids), "max_model_len": await self.context(),
                         "tokens": ids})

    async def context(self) -> int | None:
        status = await self.gw.tree.recent(max_age=1.0)
        nodes = serving_nodes(status) if status else []
        return (nodes[0].get("info") or {}).get("max_model_len") if nodes else None


class DetokenizeHandler(TokenHandler):
    async def post(self) -> None:
        body = self.read_json()
        ids = body.get("tokens") if isinstance(body, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool)
                                                and t >= 0 for t in ids):
            raise bad_request("tokens", "'tokens' must be a list of token ids")
        tok, _ = await self.loaded()
        if ids and max(ids) >= len(tok):
            raise bad_request("tokens", f"token id {max(ids)} is outside the vocabulary "
                                        f"({len(tok)} tokens)")
        self.write_json({"prompt": tok.decode(ids)})

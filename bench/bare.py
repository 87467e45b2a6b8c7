"""Bare baselines for the overhead measurement: what the cheapest possible server costs here.

Process: `python -m bench.bare tornado --port P [--fail STATUS]` or `python -m bench.bare zmq --port P`.
Each prints the READY line of `treechat.process` once listening, and stops on SIGTERM.

    tornado   a minimal Tornado app answering POST /v1/chat/completions and /v1/completions with
              the SSE stream an OpenAI server sends (one chunk per token, each flushed, a usage
              chunk, `data: [DONE]`), max_tokens chunks long, with no model and no tree behind it;
              GET /v1/models and /readyz. With --fail STATUS every POST gets that HTTP status and
              an OpenAI-style error body (the bench's tests use it).
    zmq       a ROUTER that sends every message straight back to its DEALER: [identity][cmd][body]
              in, the same out. The floor of one request/response over pyzmq on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson
import tornado.web
import zmq

from treechat.process import serve


class CompletionHandler(tornado.web.RequestHandler):
    def initialize(self, fail: int):
        self.fail = fail

    async def post(self):
        if self.fail:
            self.set_status(self.fail)
            self.finish({"error": {"message": "the bare server was told to fail", "type": "server_error",
                                   "code": "bare_failure", "param": None}})
            return
        body = orjson.loads(self.request.body or b"{}")
        n = int(body.get("max_tokens") or 16)
        chat = self.request.path.endswith("chat/completions")
        self.set_header("Content-Type", "text/event-stream")
        self.set_header("Cache-Control", "no-cache")
        base = {"id": "bare-1", "object": "chat.completion.chunk" if chat else "text_completion",
                "model": "bare", "created": 0}
        for i in range(n):
            choice = {"index": 0, "delta": {"content": "tok "}} if chat else {"index": 0, "text": "tok "}
            choice["finish_reason"] = "length" if i == n - 1 else None
            self.write(b"data: " + orjson.dumps({**base, "choices": [choice]}) + b"\n\n")
            await self.flush()
        usage = {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1}
        self.write(b"data: " + orjson.dumps({**base, "choices": [], "usage": usage}) + b"\n\n")
        self.write(b"data: [DONE]\n\n")
        self.finish()


class ModelsHandler(tornado.web.RequestHandler):
    def get(self):
        self.finish({"object": "list", "data": [{"id": "bare", "object": "model"}]})


class ReadyHandler(tornado.web.RequestHandler):
    def get(self):
        self.finish({"ready": True})


def make_app(fail: int = 0) -> tornado.web.Application:
    return tornado.web.Application([
        (r"/v1/(?:chat/)?completions", CompletionHandler, {"fail": fail}),
        (r"/v1/models", ModelsHandler),
        (r"/(?:readyz|healthz)", ReadyHandler),
    ])


async def serve_tornado(args, stop: asyncio.Event, ready) -> None:
    server = make_app(args.fail).listen(args.port, address=args.host)
    port = next(iter(server._sockets.values())).getsockname()[1]
    ready({"url": f"http://{args.host}:{port}", "port": port})
    await stop.wait()
    server.stop()


async def serve_zmq(args, stop: asyncio.Event, ready) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    if args.port:
        sock.bind(f"tcp://{args.host}:{args.port}")
        port = args.port
    else:
        port = sock.bind_to_random_port(f"tcp://{args.host}")
    loop = asyncio.get_running_loop()

    def echo() -> None:
        while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            sock.send_multipart(sock.recv_multipart(zmq.NOBLOCK))

    loop.add_reader(sock.getsockopt(zmq.FD), echo)
    ready({"url": f"tcp://{args.host}:{port}", "port": port})
    await stop.wait()
    loop.remove_reader(sock.getsockopt(zmq.FD))
    sock.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bare", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=("tornado", "zmq"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: any free port (printed in READY)")
    p.add_argument("--fail", type=int, default=0, help="tornado: answer every POST with this status")
    args = p.parse_args(argv)
    fn = serve_tornado if args.kind == "tornado" else serve_zmq
    return serve(lambda stop, ready: fn(args, stop, ready))


if __name__ == "__main__":
    sys.exit(main())

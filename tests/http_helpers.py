"""Helpers shared by the HTTP gateway tests: a module-scoped `treechat up`, SSE parsing, a raw
socket client that can hang up mid-stream."""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager

import orjson
import requests
from pydantic import BaseModel, Field

from conftest import HB, Cluster, Up, free_ports


def start_up(tmp_path_factory, name: str, *args: str, timeout: float = 60.0):
    """A whole `treechat up` for one test module: (cluster, up); close the cluster after."""
    cluster = Cluster(tmp_path_factory.mktemp(name))
    try:
        return cluster, cluster.up(*args, timeout=timeout)
    except Exception:
        cluster.close()
        raise


@contextmanager
def tiny_tree(tmp_path_factory, tiny_model: str, name: str, *args: str):
    """`treechat up` with the tiny real model on CPU, for one test module's fixture."""
    cluster, up = start_up(tmp_path_factory, name, "--engine", "hf", "--model", tiny_model,
                           "--device", "cpu", *args, timeout=240)
    try:
        yield up
    finally:
        cluster.close()


@contextmanager
def models_tree(tmp_path_factory, name: str, models: dict[str, str]):
    """A root, one node per entry of `models` (node name -> a real model's folder, on CPU: the
    tree serves every model named), and an HTTP and a TCP gateway, for one test module's
    fixture; yields an `Up` (its `proc` the HTTP gateway's)."""
    cluster = Cluster(tmp_path_factory.mktemp(name))
    try:
        root, _ = cluster.root()
        nodes = [cluster.node(root, node, None, "--model", path, "--device", "cpu",
                              engine="hf", wait=False) for node, path in models.items()]
        http_port, tcp_port = free_ports(2)
        http = cluster.start("http", "gateway", "http", "--root", root, "--port", str(http_port),
                             "--heartbeat", HB)
        tcp = cluster.start("tcp", "gateway", "tcp", "--root", root, "--port", str(tcp_port),
                            "--heartbeat", HB)
        for proc in (*nodes, http, tcp):
            proc.wait_ready(240)
        up = Up(http, root, http_port, tcp_port)
        poll(lambda: len(requests.get(f"{up.http}/v1/models", timeout=10).json()["data"])
             == len(set(models.values())), timeout=60)  # every node registered with the root
        yield up
    finally:
        cluster.close()


class Person(BaseModel):
    """A small structured answer the tiny model can fill within a few tokens."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)


def openai_client(up):
    """The openai SDK on the tree's HTTP gateway, with the served model's name as `.model`."""
    import openai
    c = openai.OpenAI(base_url=f"{up.http}/v1", api_key="x", max_retries=0, timeout=120)
    c.model = c.models.list().data[0].id
    return c


def chat(url: str, content: str = "hello there world", **fields) -> requests.Response:
    body = {"messages": [{"role": "user", "content": content}], **fields}
    return requests.post(f"{url}/v1/chat/completions", json=body, timeout=30)


def events(text: str) -> list:
    """The data payloads of an SSE body: parsed JSON objects, or the string '[DONE]'."""
    out = []
    for block in text.split("\n\n"):
        data = [ln[len("data: "):] for ln in block.split("\n") if ln.startswith("data: ")]
        if data:
            payload = "\n".join(data)
            out.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return out


def error_of(resp: requests.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


class RawStream:
    """An HTTP/1.1 POST over a plain socket, read line by line, that can hang up at any time."""

    def __init__(self, port: int, path: str, body: dict, headers: dict | None = None):
        data = orjson.dumps(body)
        head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
                "Content-Type: application/json", f"Content-Length: {len(data)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        self.file = self.sock.makefile("rb")
        self._status: int | None = None

    @property
    def status(self) -> int:
        """The response's status (reads the head, so it waits for the server to answer)."""
        if self._status is None:
            self._status = int(self.file.readline().split()[1])
            while self.file.readline() not in (b"\r\n", b""):
                pass  # headers
        return self._status

    def lines(self):
        """Body lines of the chunked response (chunk framing stripped), as they arrive."""
        assert self.status == 200
        buf = b""
        while True:
            size = self.file.readline()
            if not size:
                return
            n = int(size.strip() or b"0", 16)
            if n == 0:
                return
            buf += self.file.read(n)
            self.file.read(2)
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                yield line.decode()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def poll(predicate, timeout: float = 20.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(interval)

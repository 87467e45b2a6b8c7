"""The HTTP gateway at its limits: API keys, a full tree (queue keep-alives, 503 + Retry-After),
readiness before any node, no root at all, and SIGTERM letting open streams finish.

The gateway runs as its own process here (`treechat gateway http`) so each test can pick flags.
"""

from __future__ import annotations

import signal
import socket
import time

import openai
import orjson
import pytest
import requests

from conftest import HB, connect, free_ports, run, wait_for
from http_helpers import RawStream, chat, error_of, poll

SAY = {"messages": [{"role": "user", "content": "never ending story"}], "ignore_eos": True,
       "max_tokens": 1_000_000, "stream": True}


def gateway(cluster, root: str, *flags: str, name: str = "http"):
    port = free_ports(1)[0]
    proc = cluster.start(name, "gateway", "http", "--root", root, "--port", str(port),
                         "--heartbeat", HB, *flags)
    proc.wait_ready()
    return proc, f"http://127.0.0.1:{port}", port


def test_api_keys(cluster, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# who may call\nkey-one\n\n  key-two  \n")
    tree = cluster.tree(["node-1"])
    _, url, _ = gateway(cluster, tree.root, "--api-key-file", str(keys), "--api-key", "key-three")
    body = {"messages": [{"role": "user", "content": "secret words"}]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-one"}):
        for method, path in (("GET", "/v1/models"), ("GET", "/v1/tree"),
                             ("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            r = requests.request(method, url + path, json=body, headers=headers, timeout=10)
            assert r.status_code == 401, (path, headers)
            assert error_of(r)["code"] == "invalid_api_key"
    for key in ("key-one", "key-two", "key-three"):
        r = requests.post(f"{url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 200
        assert r.json()["choices"][0]["message"]["content"] == "secret words "
    for path in ("/healthz", "/readyz", "/metrics", "/", "/static/style.css"):
        assert requests.get(url + path, timeout=10).status_code == 200, path
    s = requests.Session()
    token = s.get(url + "/", timeout=10).cookies["_xsrf"]
    r = s.post(f"{url}/arranca", json={"text": "hi"}, headers={"X-XSRFToken": token}, timeout=10)
    assert r.status_code == 401
    r = s.post(f"{url}/arranca", json={"text": "hi"}, timeout=10,
               headers={"X-XSRFToken": token, "Authorization": "Bearer key-two"})
    assert r.status_code == 200 and r.json()["text"] == "hi "
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{url}/v1", api_key="key-one", max_retries=0)
    assert [m.id for m in good.models.list()] == ["fake"]


def test_up_passes_api_keys(cluster):
    up = cluster.up("--engine", "fake", "--api-key", "k-up")
    assert chat(up.http).status_code == 401
    r = requests.post(f"{up.http}/v1/chat/completions", headers={"Authorization": "Bearer k-up"},
                      json={"messages": [{"role": "user", "content": "ok"}]}, timeout=10)
    assert r.status_code == 200


def test_full_tree_keepalive_then_503_then_runs(cluster):
    tree = cluster.tree(["node-1"], "--max-slots", "1", root_args=("--max-queue", "1"))
    _, url, port = gateway(cluster, tree.root, "--keepalive", "0.1")
    busy = RawStream(port, "/v1/chat/completions", SAY)
    assert busy.status == 200
    next(ln for ln in busy.lines() if '"content":"never' in ln)  # the only slot is taken
    queued = RawStream(port, "/v1/chat/completions",
                       {"messages": [{"role": "user", "content": "patient words"}], "stream": True})
    assert queued.status == 200
    waiting = queued.lines()
    seen = []
    for line in waiting:  # keep-alive comments while it waits in the root's queue
        seen.append(line)
        if line.startswith(": keep-alive"):
            break
    assert not any('"content":"patient' in ln for ln in seen)
    r = chat(url)  # a slot busy, the queue full: refused at once
    assert r.status_code == 503
    assert int(r.headers["Retry-After"]) >= 1
    assert error_of(r)["code"] == "overloaded"
    busy.close()  # hang up: the slot frees, the queued request runs
    rest = list(waiting)
    text = "".join(ln.split('"content":"', 1)[1].split('"', 1)[0] for ln in rest
                   if '"content":"' in ln)
    assert text == "patient words "
    assert rest[-2] == "data: [DONE]"
    queued.close()


def test_readyz_before_and_after_the_first_node(cluster):
    root, _ = cluster.root()
    _, url, _ = gateway(cluster, root)
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    r = requests.get(f"{url}/readyz", timeout=10)
    assert r.status_code == 503 and r.json()["ready"] is False
    r = chat(url)
    assert r.status_code == 503 and "Retry-After" in r.headers
    assert error_of(r)["code"] == "no_node_available"
    cluster.node(root, "node-1")
    poll(lambda: requests.get(f"{url}/readyz", timeout=10).status_code == 200)
    assert chat(url).json()["choices"][0]["message"]["content"] == "hello there world "


def test_no_root_is_503_and_the_gateway_stays_up(cluster):
    nowhere = f"127.0.0.1:{free_ports(1, span=3)[0]}"
    _, url, _ = gateway(cluster, nowhere)
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{url}/readyz", timeout=10).status_code == 503
    r = chat(url)
    assert r.status_code == 503 and error_of(r)["code"] == "root_lost"
    assert requests.get(f"{url}/v1/tree", timeout=10).status_code == 503


def test_sigterm_lets_open_streams_finish(cluster):
    tree = cluster.tree(["node-1"], "--fake-delay", "0.05")
    proc, url, port = gateway(cluster, tree.root)
    raw = RawStream(port, "/v1/chat/completions",
                    {"messages": [{"role": "user", "content": "tick"}], "ignore_eos": True,
                     "max_tokens": 20, "stream": True})
    lines = raw.lines()
    next(ln for ln in lines if '"content":"tick' in ln)
    proc.proc.send_signal(signal.SIGTERM)
    rest = list(lines)
    assert sum('"content":"tick' in ln for ln in rest) == 19  # every token still arrives
    assert "data: [DONE]" in rest
    raw.close()
    assert proc.proc.wait(20) == 0


def test_a_slow_drip_client_is_cut_off_while_others_are_served(cluster):
    """A client dripping its request head a byte at a time is closed at --header-timeout; one
    that sends its body too slowly at --body-timeout; normal clients are served meanwhile."""
    tree = cluster.tree(["node-1"])
    _, url, port = gateway(cluster, tree.root, "--header-timeout", "1.5", "--body-timeout", "1.5")
    drips = {}
    for kind in ("head", "body"):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        if kind == "body":
            sock.sendall(b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        drips[kind] = sock
    closed = set()
    deadline = time.monotonic() + 20
    while len(closed) < 2 and time.monotonic() < deadline:
        assert chat(url).status_code == 200  # everyone else is served
        for kind, sock in drips.items():
            if kind in closed:
                continue
            try:
                sock.sendall(b"X")  # one more byte, as a slow-loris does
                sock.setblocking(False)
                if sock.recv(1024) == b"":
                    closed.add(kind)
            except BlockingIOError:
                pass
            except OSError:  # reset: closed by the server
                closed.add(kind)
            finally:
                sock.setblocking(True)
        time.sleep(0.2)
    assert closed == {"head", "body"}


def test_past_max_connections_a_new_one_gets_503_at_once(cluster):
    tree = cluster.tree(["node-1"])
    _, url, port = gateway(cluster, tree.root, "--max-connections", "3")
    held = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(3)]
    poll(lambda: _refused(port))  # the three are accepted; the fourth is refused
    r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert error_of(r)["code"] == "too_many_connections"
    for sock in held:
        sock.close()
    poll(lambda: chat(url).status_code == 200)  # room again
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    assert "treechat:http_refused_connections_total" in metrics


def _refused(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 503
    except requests.ConnectionError:
        return False


def nested(depth: int) -> bytes:
    return b"[" * depth + b"1" + b"]" * depth


@pytest.mark.parametrize("path", ["/arranca", "/v1/chat/completions"])
def test_deep_nesting_is_a_clear_400_before_anything_runs(cluster, path):
    tree = cluster.tree(["node-1"])
    _, url, _ = gateway(cluster, tree.root)
    s = requests.Session()
    token = s.get(url + "/", timeout=10).cookies["_xsrf"]
    headers = {"X-XSRFToken": token, "Content-Type": "application/json"}
    ask = b'"text": "hi"' if path == "/arranca" else \
        b'"messages": [{"role": "user", "content": "hi"}]'
    r = s.post(url + path, data=b'{%s, "extra": %s}' % (ask, nested(300)), headers=headers,
               timeout=10)
    assert r.status_code == 400
    assert "nested deeper than 64 levels" in error_of(r)["message"]
    # The gateway serves on, and the refused request never reached the tree (ids count from 1).
    r = s.post(url + "/arranca", data=b'{"text": "hi", "extra": %s}' % nested(10),
               headers=headers, timeout=10)
    assert r.status_code == 200
    assert r.json() == {"text": "hi ", "extra": orjson.loads(nested(10)), "request_id": 1}


def test_503s_are_counted_not_logged(cluster):
    root, _ = cluster.root()
    proc, url, _ = gateway(cluster, root)  # no node: every chat is a 503
    for _ in range(30):
        assert chat(url).status_code == 503
    metrics = requests.get(f"{url}/metrics", timeout=10).text
    assert 'treechat:http_responses_total{status="503"} 30.0' in metrics
    assert " 503 POST" not in proc.log.read_text()


def test_a_dead_gateway_is_noticed_at_once_and_its_work_cancelled(cluster):
    """kill -9 of a gateway with an endless answer running: the root sees the connection close
    and cancels the request, long before its heartbeats (every 2 s here) could have told it."""
    root, _ = cluster.root("--heartbeat", "2")
    cluster.node(root, "node-1", None, "--heartbeat", "2", "--fake-delay", "0.05")
    port = free_ports(1)[0]
    proc = cluster.start("http", "gateway", "http", "--root", root, "--port", str(port),
                         "--heartbeat", "2")
    proc.wait_ready()
    raw = RawStream(port, "/v1/chat/completions", SAY)
    next(ln for ln in raw.lines() if '"content":"never' in ln)

    async def scenario():
        client = await connect(root)
        await wait_for(lambda: _running(client, 1))
        proc.kill()
        await wait_for(lambda: _in_flight(client, 0), timeout=3)  # before a heartbeat could miss
        await wait_for(lambda: _running(client, 0))  # and the node let it go
        client.close()

    run(scenario())
    raw.close()


async def _running(client, n):
    st = await client.status()
    return sum(x["running"] for x in st["nodes"]) == n


async def _in_flight(client, n):
    return (await client.status())["root"]["in_flight"] == n

"""The TCP gateway over real sockets, against a whole treechat with the fake engine.

One tree for the module (`treechat up`, fake engine, 8 slots, 5 ms a token) with its default TCP
gateway, plus a second gateway on the same root with tight limits (1 s resume window and idle
timeout, 3 requests per connection, 64 KiB write buffer). Every example of docs/protocol.md is
replayed as a test.
"""

from __future__ import annotations

import re
import select
import signal
import socket
import struct
import time
from collections import defaultdict

import orjson
import pytest

from conftest import REPO, Cluster, connect, run
from gateways.tcp_mobile.text import HINT

FAKE = ("--engine", "fake", "--fake-delay", "0.005", "--max-slots", "8", "--nodes", "1")
LONG = {"ignore_eos": True, "max_tokens": 100000}  # runs until cancelled


class Line:
    """A protocol client on a blocking socket; `read()` returns the next line as a dict."""

    def __init__(self, port: int, rcvbuf: int | None = None, hello: bool = True):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(20)
        self.sock.connect(("127.0.0.1", port))
        self.buf = b""
        self.hello = self.read() if hello else None

    def send(self, line) -> None:
        self.sock.sendall(line if isinstance(line, bytes) else orjson.dumps(line) + b"\n")

    def raw_line(self) -> bytes | None:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def read(self) -> dict:
        line = self.raw_line()
        if line is None:
            raise EOFError("the gateway closed the connection")
        return orjson.loads(line)

    def collect(self, ids, texts: dict | None = None) -> dict[str, dict]:
        """Read until every id in `ids` has its final line; check offsets as a client would."""
        texts = texts if texts is not None else defaultdict(str)
        finals: dict[str, dict] = {}
        while not set(ids) <= set(finals):
            msg = self.read()
            rid = msg.get("id")
            if "delta" in msg:
                assert msg["offset"] == len(texts[rid]), "a delta skipped or repeated text"
                texts[rid] += msg["delta"]
            elif msg.get("done") or "error" in msg:
                finals[rid] = msg
        for rid, final in finals.items():
            if final.get("done"):
                assert final["text"] == texts[rid] and final["offset"] == len(texts[rid])
        return finals

    def abort(self) -> None:
        """Drop the connection abruptly (RST), like a phone losing its network."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def echo(words: str, n: int | None = None) -> str:
    """The fake engine's answer: the words echoed (cycled to n tokens with ignore_eos)."""
    w = words.split()
    return "".join(w[i % len(w)] + " " for i in range(n if n is not None else len(w)))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("tcp"))
    up = cluster.up(*FAKE)
    tight = cluster.start("tcp-tight", "gateway", "tcp", "--root", up.root, "--port", "0",
                          "--heartbeat", "0.2", "--resume-window", "1", "--idle-timeout", "1",
                          "--max-inflight", "3", "--max-write-buffer", "65536")
    up.tight, up.tight_port = tight, int(tight.wait_ready()["url"].rsplit(":", 1)[1])
    yield up
    cluster.close()


def load(root: str) -> tuple[int, int]:
    """(requests the root holds, engine slots busy on the nodes)."""
    async def ask():
        client = await connect(root)
        try:
            st = await client.status()
        finally:
            client.close()
        return st["root"]["in_flight"], sum(n["running"] for n in st["nodes"])
    return run(ask())


def wait_running(root: str, predicate, timeout: float = 20.0) -> None:
    """Poll until `predicate(requests the root holds)`; 0 also needs every engine slot free."""
    deadline = time.monotonic() + timeout
    while True:
        held, busy = load(root)
        if predicate(held) and (held or not busy):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"the tree holds {held} request(s), {busy} running")
        time.sleep(0.1)


# --- the documented examples ---------------------------------------------------------------------


def doc_blocks(kind: str) -> list[list[str]]:
    text = (REPO / "docs" / "protocol.md").read_text()
    return [b.strip("\n").splitlines() for b in re.findall(rf"```{kind}\n(.*?)```", text, re.S)]


class Tokens:
    """Maps the doc's session tokens to the live ones, both ways."""

    def __init__(self):
        self.live: dict[str, str] = {}

    def match(self, got: dict, want: dict) -> dict:
        got = dict(got)
        for key in ("session", "resumed"):
            if key in want and key in got:
                self.live.setdefault(want[key], got[key])
                if self.live[want[key]] == got[key]:
                    got[key] = want[key]
        return got

    def apply(self, client_line: str) -> str:
        for doc, live in self.live.items():
            client_line = client_line.replace(doc, live)
        return client_line


def same(got, want) -> bool:
    if want == "...":
        return True
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and \
            all(same(got[k], want[k]) for k in want)
    return got == want


def check_group(conn: Line, want_lines: list[dict], tokens: Tokens, texts: dict) -> None:
    """Read the server lines one `<` group expects. Deltas of one id may be cut differently
    than in the doc, and ids interleave by timing: compare per id, other lines in order."""
    want_text, want_final, want_other = defaultdict(str), {}, []
    for w in want_lines:
        if "delta" in w:
            want_text[w["id"]] += w["delta"]
        elif w.get("id") is not None and (w.get("done") or "error" in w):
            want_final[w["id"]] = w
        else:
            want_other.append(w)
    got_text, got_final, got_other = defaultdict(str), {}, []

    def complete():
        return len(got_other) >= len(want_other) and set(want_final) <= set(got_final) and all(
            len(got_text[i]) >= len(t) for i, t in want_text.items() if i not in want_final)

    while not complete():
        msg = conn.read()
        rid = msg.get("id")
        if "delta" in msg:
            assert msg["offset"] <= len(texts[rid]), msg
            texts[rid] = texts[rid][:msg["offset"]] + msg["delta"]
            got_text[rid] += msg["delta"]
        elif rid is not None and (msg.get("done") or "error" in msg):
            got_final[rid] = msg
        else:
            got_other.append(tokens.match(msg, want_other[len(got_other)]))
    assert got_other == want_other
    for rid, want in want_final.items():
        assert same(got_final[rid], want), (got_final[rid], want)
        if got_final[rid].get("done"):
            assert got_final[rid]["text"] == texts[rid]
            if want["text"] != "...":
                assert got_text[rid] == want_text[rid]
    for rid, want in want_text.items():
        assert got_text[rid].startswith(want), (got_text[rid], want)


@pytest.mark.parametrize("block", doc_blocks("session"), ids=lambda b: b[1][2:42])
def test_doc_example(tree, block):
    assert len(doc_blocks("session")) >= 6  # the doc shows them all; a broken fence loses some
    replay(tree.tcp_port, block)


def replay(port: int, block: list[str]) -> None:
    """Play a doc example: `>` lines are sent, each group of `<` lines must come back, `~`
    drops the connection and opens a new one."""
    tokens, texts = Tokens(), defaultdict(str)
    conn = Line(port, hello=False)
    group: list[dict] = []
    for line in block + ["> "]:
        if line.startswith("<"):
            group.append(orjson.loads(line[1:]))
            continue
        if group:
            check_group(conn, group, tokens, texts)
            group = []
        if line.startswith("~"):
            conn.abort()
            conn = Line(port, hello=False)
        elif line.strip() != ">":
            conn.send(tokens.apply(line[2:]).encode() + b"\n")
    conn.sock.close()


def test_doc_text_mode_example(tree):
    (block,) = doc_blocks("text-session")
    conn = Line(tree.tcp_port)
    for line in block:
        if line.startswith("> "):
            conn.send(line[2:].encode() + b"\n")
        elif line.startswith("<") and not line.startswith("< {"):
            assert conn.raw_line().decode().rstrip() == line[2:].rstrip()


# --- many requests, cancel -----------------------------------------------------------------------


def test_multiplexed_requests_each_get_their_exact_text(tree):
    conn = Line(tree.tcp_port)
    asks = {f"m{i}": f"word{i} " * (i + 3) for i in range(8)}
    for rid, text in asks.items():
        conn.send({"id": rid, "text": text})
    texts = defaultdict(str)
    finals = conn.collect(asks, texts)
    for rid, text in asks.items():
        assert finals[rid]["finish_reason"] == "stop"
        assert texts[rid] == echo(text)
        assert finals[rid]["usage"]["completion_tokens"] == len(text.split())


def test_cancel_ends_the_request_and_frees_the_engine(tree):
    conn = Line(tree.tcp_port)
    conn.send({"id": "c", "text": "spin", **LONG})
    first = conn.read()
    conn.send({"cancel": "c"})
    final = conn.collect(["c"], defaultdict(str, c=first["delta"]))["c"]
    assert final["finish_reason"] == "cancelled" and final["text"].startswith("spin ")
    wait_running(tree.root, lambda n: n == 0)


def test_duplicate_id_and_too_many_requests(tree):
    conn = Line(tree.tight_port)  # --max-inflight 3
    for i in range(3):
        conn.send({"id": f"d{i}", "text": "x", **LONG})
    conn.send({"id": "d0", "text": "again"})
    conn.send({"id": "d3", "text": "one more"})
    errors = {}
    while len(errors) < 2:
        msg = conn.read()
        if "error" in msg:
            errors[msg["id"]] = msg["error"]["code"]
    assert errors == {"d0": "duplicate_id", "d3": "too_many_requests"}
    for i in range(3):
        conn.send({"cancel": f"d{i}"})
    finals = conn.collect(["d0", "d1", "d2"])
    assert {f["finish_reason"] for f in finals.values()} == {"cancelled"}


# --- bad input -----------------------------------------------------------------------------------


def test_garbage_and_invalid_utf8_leave_the_connection_usable(tree):
    conn = Line(tree.tcp_port)
    conn.send({"ping": 0})
    assert conn.read() == {"pong": 0}
    for junk, code in ((b"\x00\x01garbage}{", "invalid_json"),
                       (b'{"id": "u", "text": "\xff\xfe"}', "invalid_utf8"),
                       (b"{'single': 'quotes'}", "invalid_json"),
                       (b'"just a string"', "invalid_json"),
                       (b'{"id": 7, "text": "numeric id"}', "bad_request"),
                       (b'{"cancel": "nope"}', "unknown_id"),
                       (b'{"resume": "no-such-session"}', "resume_expired")):
        conn.send(junk + b"\n")
        assert conn.read()["error"]["code"] == code, junk
    conn.send({"id": "after", "text": "still here"})
    assert conn.collect(["after"])["after"]["text"] == "still here "


def test_errors_from_the_tree_end_their_request_with_a_code(tree):
    conn = Line(tree.tcp_port)
    conn.send({"id": "slow", "text": "never ends", "timeout": 0.3, **LONG})
    conn.send({"id": "boom", "text": "please __engine_error__"})
    conn.send({"id": "ok", "text": "fine"})
    finals = conn.collect(["slow", "boom", "ok"])
    assert finals["slow"]["error"]["code"] == "timeout"
    assert finals["boom"]["error"]["code"] == "engine_error"
    assert finals["ok"]["text"] == "fine "
    wait_running(tree.root, lambda n: n == 0)


def test_a_5_mib_line_is_refused_and_skipped(tree):
    conn = Line(tree.tcp_port)
    conn.send({"ping": "before"})
    assert conn.read() == {"pong": "before"}
    huge = b'{"id": "big", "text": "' + b"a" * (5 << 20) + b'"}\n'
    conn.sock.sendall(huge + orjson.dumps({"id": "next", "text": "small one"}) + b"\n")
    err = conn.read()
    assert err["id"] is None and err["error"]["code"] == "line_too_long"
    final = conn.collect(["next"])["next"]  # the line after the huge one is served
    assert final["text"] == "small one "
    with pytest.raises(socket.timeout):  # one error for the huge line, not one per chunk
        conn.sock.settimeout(0.3)
        conn.read()


# --- slow, dropped and resumed clients -----------------------------------------------------------


def test_a_client_that_never_reads_gets_its_requests_cancelled(tree):
    conn = Line(tree.tight_port, rcvbuf=4096)  # --max-write-buffer 64 KiB
    for i in range(3):
        conn.send({"id": f"s{i}", "text": "x" * 2000 + " " + "y" * 2000, **LONG})
    deadline = time.monotonic() + 30
    while "stopped reading" not in tree.tight.tail(200):  # the gateway noticed; we never read
        assert time.monotonic() < deadline, "the gateway did not cut the client that never reads"
        time.sleep(0.1)
    conn.sock.settimeout(20)
    with pytest.raises((EOFError, ConnectionResetError)):
        while True:  # what was queued before the cut drains, then the gateway's close shows
            conn.read()
    wait_running(tree.root, lambda n: n == 0)  # cancelled: left alone they would run for minutes


def test_abrupt_disconnect_cancels_after_the_resume_window(tree):
    conn = Line(tree.tight_port)  # --resume-window 1
    token = conn.hello["session"]
    conn.send({"id": "gone", "text": "tick tock", **LONG})
    assert conn.read()["id"] == "gone"
    conn.abort()
    wait_running(tree.root, lambda n: n == 0)
    late = Line(tree.tight_port)
    late.send({"resume": token, "offsets": {"gone": 0}})
    assert late.read()["error"]["code"] == "resume_expired"


def test_abrupt_disconnect_of_unresumable_requests_cancels_at_once(tree):
    conn = Line(tree.tcp_port)  # the default 30 s window: it must not wait for it
    conn.send({"id": "r", "text": "tick", "resumable": False, **LONG})
    conn.send({"id": "keep", "text": "tock", **LONG})
    wait_running(tree.root, lambda n: n >= 2)
    token = conn.hello["session"]
    conn.abort()
    wait_running(tree.root, lambda n: n == 1, timeout=15)
    again = Line(tree.tcp_port)
    again.send({"resume": token, "offsets": {"keep": 0, "r": 0}})
    assert again.read() == {"resumed": token, "ids": ["keep", "r"]}
    again.send({"cancel": "keep"})
    finals = again.collect(["keep", "r"])
    assert finals["r"]["error"]["code"] == "unknown_id"  # it was cancelled at the drop
    assert finals["keep"]["finish_reason"] == "cancelled"
    assert finals["keep"]["text"].startswith("tock tock")  # it ran on while we were away
    wait_running(tree.root, lambda n: n == 0)


def test_resume_after_reconnect_gets_the_rest_exactly_once(tree):
    words, n = "alpha beta gamma delta", 300
    conn = Line(tree.tcp_port)
    token = conn.hello["session"]
    conn.send({"id": "story", "text": words, "ignore_eos": True, "max_tokens": n})
    have = ""
    while len(have) < 40:
        msg = conn.read()
        assert msg["offset"] == len(have)
        have += msg["delta"]
    conn.abort()
    again = Line(tree.tcp_port)
    again.send({"resume": token, "offsets": {"story": len(have)}})
    assert again.read() == {"resumed": token, "ids": ["story"]}
    texts = defaultdict(str, story=have)
    final = again.collect(["story"], texts)["story"]
    assert texts["story"] == echo(words, n) == final["text"]
    assert final["finish_reason"] == "length"
    # the resumed connection carries the old session: it can be resumed again
    again.abort()
    third = Line(tree.tcp_port)
    third.send({"resume": token, "offsets": {"story": len(final["text"])}})
    assert third.read()["resumed"] == token
    assert third.read() == final  # nothing left but the final line


def test_resume_while_the_old_connection_lives_takes_it_over(tree):
    old = Line(tree.tcp_port)
    old.send({"id": "t", "text": "moving between networks", **LONG})
    assert old.read()["id"] == "t"
    new = Line(tree.tcp_port)
    new.send({"resume": old.hello["session"], "offsets": {"t": 0}})
    assert new.read()["resumed"] == old.hello["session"]
    old.sock.settimeout(10)
    with pytest.raises((EOFError, ConnectionResetError)):
        while True:
            old.read()
    new.send({"cancel": "t"})
    final = new.collect(["t"])["t"]
    assert final["finish_reason"] == "cancelled"
    assert final["text"].startswith("moving ")


# --- text mode, idle, overload -------------------------------------------------------------------


def test_text_mode_through_a_raw_socket(tree):
    conn = Line(tree.tcp_port)
    conn.send(b"what is up\r\n")  # not JSON: text mode, and this is the first prompt
    assert conn.raw_line() == b"what is up "
    assert conn.raw_line() == b""
    conn.send(b"\xff oops\n")
    assert conn.raw_line().startswith(b"[error invalid_utf8")
    assert conn.raw_line() == b""
    conn.send("naïve café ✓\n".encode())
    assert conn.raw_line().decode() == "naïve café ✓ "
    assert conn.raw_line() == b""
    conn.send(b"\n")  # Enter alone: a hint, not silence
    assert conn.raw_line().decode() == HINT
    assert conn.raw_line() == b""


def test_a_burst_of_1000_connections_each_get_their_hello(tree):
    """1000 clients connect at once (non-blocking connects in one tight loop), and every one
    reads its hello line within 5 s: the kernel queues them all (--backlog 1024). With Tornado's
    default backlog of 128 the queue overflows, and the clients whose handshake the kernel dropped
    wait for a SYN retransmission (1 s, 3 s, 7 s ...) or forever."""
    socks = []
    try:
        for _ in range(1000):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", tree.tcp_port))
            socks.append(sock)
        waiting = {sock.fileno(): sock for sock in socks}
        got: dict[int, bytes] = {}
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        deadline = time.monotonic() + 5
        while waiting and time.monotonic() < deadline:
            for fd, _ in poller.poll(100):
                try:
                    got[fd] = got.get(fd, b"") + waiting[fd].recv(4096)
                except OSError:
                    continue
                if b"\n" in got[fd]:
                    poller.unregister(fd)
                    del waiting[fd]
        assert not waiting, f"{len(waiting)} of 1000 connections got no hello within 5 s"
        assert all(line.startswith(b'{"hello"') for line in got.values())
    finally:
        for sock in socks:
            sock.close()


def test_idle_connection_times_out(tree):
    conn = Line(tree.tight_port)  # --idle-timeout 1
    msg = conn.read()
    assert msg["error"]["code"] == "timeout" and msg["id"] is None
    with pytest.raises(EOFError):
        conn.read()


def test_overloaded_carries_a_retry_hint(tmp_path):
    cluster = Cluster(tmp_path)
    try:
        up = cluster.up("--engine", "fake", "--nodes", "1", "--max-slots", "1", "--max-queue", "0")
        conn = Line(up.tcp_port)
        conn.send({"id": "hog", "text": "busy", **LONG})
        texts = defaultdict(str, hog=conn.read()["delta"])
        conn.send({"id": "late", "text": "me too"})
        err = conn.collect(["late"], texts)["late"]["error"]
        assert err["code"] == "overloaded" and err["retry_after"] > 0
        conn.send({"cancel": "hog"})
        assert conn.collect(["hog"], texts)["hog"]["finish_reason"] == "cancelled"
    finally:
        cluster.close()


def test_sigterm_finishes_running_answers_and_refuses_new_ones(tree):
    cluster = Cluster(tree.proc.log.parent)
    gw = cluster.start("tcp-drain", "gateway", "tcp", "--root", tree.root, "--port", "0",
                       "--heartbeat", "0.2", "--drain", "60")
    port = int(gw.wait_ready()["url"].rsplit(":", 1)[1])
    try:
        conn = Line(port)
        conn.send({"id": "last", "text": "finish me please", "ignore_eos": True, "max_tokens": 300})
        texts = defaultdict(str)
        first = conn.read()
        texts["last"] = first["delta"]
        gw.proc.send_signal(signal.SIGTERM)
        wait_for_refusal(port)  # it stopped listening, and still streams to us
        conn.send({"id": "new", "text": "too late"})
        finals = conn.collect(["last", "new"], texts)
        assert finals["new"]["error"]["code"] == "shutting_down"
        assert finals["last"]["text"] == echo("finish me please", 300)
        assert gw.proc.wait(20) == 0
    finally:
        cluster.close()


def wait_for_refusal(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except ConnectionRefusedError:
            return
        time.sleep(0.05)
    raise TimeoutError("the gateway still accepts connections")


def test_deep_nesting_gets_an_error_line_and_the_connection_lives_on(tree):
    conn = Line(tree.tcp_port)
    conn.send(b'{"ping": ' + b"[" * 300 + b"1" + b"]" * 300 + b"}\n")
    err = conn.read()["error"]
    assert err["code"] == "invalid_json" and "nested deeper than 64 levels" in err["message"]
    conn.send({"id": "deep", "text": "still here", "response_format": {"type": "text"}})
    assert conn.collect(["deep"])["deep"]["text"] == "still here "
    conn.send({"ping": [[[1]]]})
    assert conn.read() == {"pong": [[[1]]]}

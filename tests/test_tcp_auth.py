"""API keys on the TCP gateway, over real sockets: `treechat up --api-key k1` with the fake engine,
plus a second TCP gateway on the same root reading its keys from a file (`--api-key-file`)."""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest

from conftest import Cluster
from test_chat_cli import Chat, Proxy
from test_tcp_gateway import Line, doc_blocks, replay

FAKE = ("--engine", "fake", "--fake-delay", "0.005", "--nodes", "1")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    where = tmp_path_factory.mktemp("tcp-auth")
    keys = where / "keys.txt"
    keys.write_text("# the team's keys\n\nfile-key-1\n  file-key-2  \n# old-key\n")
    cluster = Cluster(where)
    up = cluster.up(*FAKE, "--api-key", "k1", "--api-key", "sk-treechat-example")
    filed = cluster.start("tcp-keyfile", "gateway", "tcp", "--root", up.root, "--port", "0",
                          "--heartbeat", "0.2", "--api-key-file", str(keys))
    open_ = cluster.start("tcp-open", "gateway", "tcp", "--root", up.root, "--port", "0",
                          "--heartbeat", "0.2")
    hurried = cluster.start("tcp-hurried", "gateway", "tcp", "--root", up.root, "--port", "0",
                            "--heartbeat", "0.2", "--api-key", "k1", "--auth-timeout", "1")
    up.file_port = int(filed.wait_ready()["url"].rsplit(":", 1)[1])
    up.open_port = int(open_.wait_ready()["url"].rsplit(":", 1)[1])
    up.hurried_port = int(hurried.wait_ready()["url"].rsplit(":", 1)[1])
    yield up
    cluster.close()


@pytest.mark.parametrize("block", doc_blocks("auth-session"), ids=lambda b: b[2][2:42])
def test_doc_auth_example(keyed, block):
    """docs/protocol.md's authentication example, replayed line by line."""
    replay(keyed.tcp_port, block)


def ask(conn: Line, rid: str, text: str) -> dict:
    """Send one request and read its lines up to the final one (which is returned)."""
    conn.send({"id": rid, "text": text})
    return conn.collect([rid])[rid]


def closed(conn: Line) -> bool:
    return conn.raw_line() is None


def test_the_greeting_says_a_key_is_needed(keyed):
    assert Line(keyed.tcp_port).hello["auth"] == "api_key"


def test_no_key_is_unauthorized_and_the_connection_closes_after_three_tries(keyed):
    conn = Line(keyed.tcp_port)
    assert ask(conn, "q1", "let me in")["error"]["code"] == "unauthorized"
    conn.send({"ping": 1})
    msg = conn.read()
    assert msg["id"] is None and msg["error"]["code"] == "unauthorized"
    assert "api_key" in msg["error"]["message"]
    last = ask(conn, "q3", "please")["error"]
    assert last["code"] == "unauthorized" and "closing" in last["message"]
    assert closed(conn)


def test_a_wrong_key_is_unauthorized_and_a_right_one_then_works(keyed):
    conn = Line(keyed.tcp_port)
    conn.send({"hello": {"api_key": "k2"}})
    err = conn.read()["error"]
    assert err == {"code": "unauthorized", "message": "incorrect API key provided"}
    conn.send({"hello": {"app": "test", "api_key": "k1"}})
    assert conn.read() == {"authenticated": True}
    assert ask(conn, "q1", "now it answers")["text"] == "now it answers "


def test_a_resume_line_may_carry_the_key(keyed):
    first = Line(keyed.tcp_port)
    first.send({"hello": {"api_key": "k1"}})
    assert first.read() == {"authenticated": True}
    first.send({"id": "r1", "text": "one two three", "ignore_eos": True, "max_tokens": 40})
    have = first.read()["delta"]
    first.abort()
    stranger = Line(keyed.tcp_port)
    stranger.send({"resume": first.hello["session"], "offsets": {"r1": len(have)}})
    assert stranger.read()["error"]["code"] == "unauthorized"  # the token alone is not enough
    again = Line(keyed.tcp_port)
    again.send({"resume": first.hello["session"], "offsets": {"r1": len(have)}, "api_key": "k1"})
    assert again.read() == {"resumed": first.hello["session"], "ids": ["r1"]}
    final = again.collect(["r1"], defaultdict(str, r1=have))["r1"]
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 40


def test_keys_from_a_file(keyed):
    for key in ("file-key-1", "file-key-2"):
        conn = Line(keyed.file_port)
        conn.send({"hello": {"api_key": key}})
        assert conn.read() == {"authenticated": True}
        assert ask(conn, "q", "filed key")["text"] == "filed key "
    for key in ("# old-key", "old-key", "k1"):  # comments are not keys; --api-key is elsewhere
        conn = Line(keyed.file_port)
        conn.send({"hello": {"api_key": key}})
        assert conn.read()["error"]["code"] == "unauthorized"


def test_a_gateway_without_keys_accepts_a_client_that_sends_one(keyed):
    conn = Line(keyed.open_port)
    assert "auth" not in conn.hello
    conn.send({"hello": {"api_key": "anything"}})
    assert conn.read() == {"authenticated": True}
    assert ask(conn, "q", "open door")["text"] == "open door "
    text = Line(keyed.open_port)
    text.send(b"TEXT anything\n")
    text.send(b"plain text\n")
    assert text.raw_line() == b"plain text "


def test_text_mode_wants_text_and_the_key_first(keyed):
    conn = Line(keyed.tcp_port)
    conn.send(b"hello without a key\n")
    assert conn.raw_line().startswith(b"[error unauthorized: missing API key")
    assert conn.raw_line() == b""
    conn.send(b"TEXT wrong\n")
    assert conn.raw_line() == b"[error unauthorized: incorrect API key provided]"
    assert conn.raw_line() == b""
    conn.send(b"TEXT k1\r\n")
    conn.send(b"hello with a key\n")
    assert conn.raw_line() == b"hello with a key "
    assert conn.raw_line() == b""


def test_text_mode_closes_after_three_bad_lines(keyed):
    conn = Line(keyed.tcp_port)
    for line in (b"TEXT\n", b"TEXT nope\n", b"TEXT still-wrong\n"):
        conn.send(line)
        assert conn.raw_line().startswith(b"[error unauthorized")
        assert conn.raw_line() == b""
    assert closed(conn)


def test_chat_sends_its_key_and_resumes_with_it(keyed, monkeypatch):
    proxy = Proxy(keyed.tcp_port)
    try:
        monkeypatch.setenv("TREECHAT_API_KEY", "k1")  # the chat process inherits it
        chat = Chat("--tcp", f"127.0.0.1:{proxy.port}")
        words = " ".join(f"w{i}" for i in range(600))
        chat.say(words)
        chat.wait_output(lambda out: "w20 " in out)
        proxy.cut()  # the reconnect must authenticate again before its resume
        chat.wait_output(lambda out: out.endswith("\n"))
        assert chat.out == words + " \n"
        assert chat.finish() == 0
    finally:
        proxy.close()


def test_chat_with_the_key_on_the_command_line(keyed, monkeypatch):
    monkeypatch.delenv("TREECHAT_API_KEY", raising=False)
    chat = Chat("--tcp", f"127.0.0.1:{keyed.tcp_port}", "--api-key", "k1")
    chat.say("keyed hello")
    chat.wait_output(lambda out: out.endswith("\n"))
    assert chat.finish() == 0 and chat.out == "keyed hello \n"


@pytest.mark.parametrize("key", [None, "k2"], ids=["no-key", "wrong-key"])
def test_chat_without_the_right_key_says_so(keyed, monkeypatch, key):
    monkeypatch.delenv("TREECHAT_API_KEY", raising=False)
    chat = Chat("--tcp", f"127.0.0.1:{keyed.tcp_port}", *(["--api-key", key] if key else []))
    assert chat.finish() == 1
    assert "unauthorized" in chat.proc.stderr.read()


def test_a_connection_must_authenticate_in_time_and_empty_lines_buy_none(keyed):
    stranger = Line(keyed.hurried_port)
    member = Line(keyed.hurried_port)
    member.send({"hello": {"api_key": "k1"}})
    assert member.read() == {"authenticated": True}
    done = threading.Event()

    def keep_alive():  # a newline every 0.2 s from both, as a keep-alive would
        while not done.wait(0.2):
            for conn in (stranger, member):
                try:
                    conn.send(b"\n")
                except OSError:
                    pass
    threading.Thread(target=keep_alive, daemon=True).start()
    try:
        err = stranger.read()["error"]  # the only line it ever gets: the refusal
        assert err["code"] == "unauthorized" and "within 1 s" in err["message"]
        assert closed(stranger)
        assert ask(member, "q", "still served")["text"] == "still served "  # the member stays
    finally:
        done.set()

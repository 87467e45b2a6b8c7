"""`treechat chat` driven as a user would: a subprocess fed prompts on stdin, against a whole
treechat with the fake engine (which answers by echoing the prompt's words), over TCP and HTTP."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import socket
import subprocess
import termios
import sys
import threading
import time

import pytest

from conftest import REPO, Cluster, connect, free_ports, run


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("chat"))
    yield cluster.up("--engine", "fake", "--fake-delay", "0.005", "--nodes", "1")
    cluster.close()


class Chat:
    """A `treechat chat` process; its stdout collected by a thread. With `sigint_ignored` it
    starts as a background job of a shell without job control does: SIGINT ignored."""

    def __init__(self, *args: str, sigint_ignored: bool = False):
        argv = [sys.executable, "-m", "treechat.cli", "chat", *args]
        if sigint_ignored:
            argv = ["/bin/sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv]
        self.proc = subprocess.Popen(argv, cwd=REPO, text=True, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=1)
        self.out = ""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read(1):
            self.out += chunk

    def say(self, line: str) -> None:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def wait_output(self, predicate, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while not predicate(self.out):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                err = self.proc.stderr.read()[-300:] if self.proc.poll() is not None else ""
                raise AssertionError(f"output ends {self.out[-200:]!r} "
                                     f"({len(self.out)} chars); stderr ends {err!r}")
            time.sleep(0.02)
        return self.out

    def finish(self) -> int:
        self.proc.stdin.close()
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def chat():
    """Start `treechat chat` processes; whatever happens in the test, none outlives it."""
    started: list[Chat] = []

    def start(*args: str, **kwargs) -> Chat:
        started.append(Chat(*args, **kwargs))
        return started[-1]
    yield start
    for c in started:
        c.kill()


def endpoints(up) -> list[list[str]]:
    return [["--tcp", f"127.0.0.1:{up.tcp_port}"], ["--http", up.http]]


def in_flight(root: str) -> int:
    async def ask():
        client = await connect(root)
        try:
            return (await client.status())["root"]["in_flight"]
        finally:
            client.close()
    return run(ask())


@pytest.mark.parametrize("kind", [0, 1], ids=["tcp", "http"])
def test_chat_streams_answers_turn_after_turn(up, chat, kind):
    chat = chat(*endpoints(up)[kind])
    chat.say("hello there")
    chat.wait_output(lambda out: out.count("\n") >= 1)
    chat.say("a second question")
    chat.say("")  # blank lines are skipped
    chat.say("/reset")
    chat.say("third")
    chat.wait_output(lambda out: out.count("\n") >= 3)
    assert chat.finish() == 0
    assert chat.out.splitlines() == ["hello there ", "a second question ", "third "]
    assert "[new conversation]" in chat.proc.stderr.read()  # /reset says it did


@pytest.mark.parametrize("sigint_ignored", [False, True], ids=["sigint-default", "sigint-ignored"])
@pytest.mark.parametrize("kind", [0, 1], ids=["tcp", "http"])
def test_ctrl_c_cancels_the_answer_and_the_chat_goes_on(up, chat, kind, sigint_ignored):
    # sigint-ignored: started as a background job of a script is (the cause of this test's old
    # failures when the suite ran in the background): Ctrl-C must still cancel.
    chat = chat(*endpoints(up)[kind], sigint_ignored=sigint_ignored)
    chat.say(" ".join(f"w{i}" for i in range(20000)))  # 20000 tokens: minutes at 5 ms each
    chat.wait_output(lambda out: "w3 " in out)
    chat.proc.send_signal(signal.SIGINT)
    chat.wait_output(lambda out: "[cancelled]\n" in out)
    deadline = time.monotonic() + 20
    while in_flight(up.root):  # the cancel reached the tree: nothing left running
        assert time.monotonic() < deadline, "the cancelled answer still runs"
        time.sleep(0.1)
    chat.say("after")
    chat.wait_output(lambda out: out.endswith("after \n"))
    assert chat.finish() == 0


class Terminal:
    """`treechat chat` in a real terminal (a pty that is its controlling terminal)."""

    def __init__(self, *args: str):
        self.master, slave = os.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "treechat.cli", "chat", *args], cwd=REPO, stdin=slave,
            stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0))
        os.close(slave)
        self.out = bytearray()

    def wait_for(self, what: bytes, after: int = 0) -> int:
        deadline = time.monotonic() + 30
        while (at := self.out.find(what, after)) < 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {what!r} (exit {self.proc.poll()}); output ends "
                                     f"{bytes(self.out[-200:])!r}")
            if select.select([self.master], [], [], 0.1)[0]:
                self.out.extend(os.read(self.master, 65536))
        return at + len(what)

    def write(self, data: bytes) -> None:
        os.write(self.master, data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self.master)


def test_a_line_typed_while_an_answer_streams_survives_ctrl_c(up):
    """In a real terminal: type the next question while the answer streams, then Ctrl-C. The
    terminal driver would discard the typed-ahead line; the chat keeps it and asks it next."""
    term = Terminal("--tcp", f"127.0.0.1:{up.tcp_port}")
    try:
        prompt = term.wait_for(b"you> ")
        # 2000 tokens, about 10 s at 5 ms each; a terminal line holds at most 4095 characters.
        term.write(b"a " * 2000 + b"\r")
        echoed = term.wait_for(b"\r\n", prompt)
        term.wait_for(b"a a a ", echoed)  # the answer streams
        term.write(b"typed ahead\r")  # into the terminal's input queue
        term.write(b"\x03")  # Ctrl-C: the terminal sends SIGINT
        cancelled = term.wait_for(b"[cancelled]")
        term.wait_for(b"you> typed ahead \r\n", cancelled)  # asked next, answered by the echo
        term.write(b"\x04")  # Ctrl-D quits
        assert term.proc.wait(30) == 0
    finally:
        term.close()


@pytest.mark.parametrize("kind", [0, 1], ids=["tcp", "http"])
def test_ctrl_c_at_the_first_prompt_quits(up, kind):
    term = Terminal(*endpoints(up)[kind])
    try:
        term.wait_for(b"you> ")
        term.write(b"\x03")
        term.wait_for(b"[Ctrl-C at the prompt quits, as Ctrl-D does")  # not silently
        assert term.proc.wait(30) == 0  # not a traceback out of the Ctrl-C handler (exit 1)
    finally:
        term.close()


def test_chat_reports_an_unreachable_server(chat):
    (port,) = free_ports(1)
    chat = chat("--tcp", f"127.0.0.1:{port}")
    assert chat.finish() == 1
    assert "cannot connect" in chat.proc.stderr.read()


class Proxy:
    """A TCP relay to the gateway whose connections the test can cut, like a phone's network."""

    def __init__(self, port: int):
        self.target = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.socks: list[socket.socket] = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.target))
            self.socks += [down, up]
            for a, b in ((down, up), (up, down)):
                threading.Thread(target=self.pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def pipe(a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        for sock in self.socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self.socks = []

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_chat_resumes_an_answer_after_the_connection_drops(up, chat):
    proxy = Proxy(up.tcp_port)
    try:
        chat = chat("--tcp", f"127.0.0.1:{proxy.port}")
        words = " ".join(f"w{i}" for i in range(600))  # 600 tokens: about 3 s at 5 ms each
        chat.say(words)
        chat.wait_output(lambda out: "w20 " in out)
        proxy.cut()
        chat.wait_output(lambda out: out.endswith("\n"))
        assert chat.out == words + " \n"  # every word once, in order, across the drop
        chat.say("and after")
        chat.wait_output(lambda out: out.endswith("and after \n"))
        assert chat.finish() == 0
    finally:
        proxy.close()

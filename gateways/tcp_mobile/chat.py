"""an interactive terminal chat client (TCP line protocol or the HTTP API)

`treechat chat [--tcp HOST:PORT [--tls] | --http URL]`: type a message, the answer streams
back; Ctrl-C while an answer streams cancels it (what came so far stays in the history); Ctrl-C
or Ctrl-D at the prompt quits; `/reset` starts a new conversation. The whole conversation is sent
with every message, so follow-ups have context, with the conversation's session (a random name,
new at `/reset`: the `session` field over TCP, an `X-Session-Id` header over HTTP), so the tree
sends each turn where the earlier ones ran and their prompt is still cached.

Over TCP (docs/protocol.md) a dropped connection is resumed: the client reconnects, sends its
session token and how many characters it has, and the answer goes on where it stopped. With
`--api-key` (or $TREECHAT_API_KEY) it sends the key in a hello line on every connection; over
HTTP the key goes in an `Authorization: Bearer` header. Over HTTP
it posts to `/v1/chat/completions` with `stream: true` and reads the SSE `data:` lines up to
`data: [DONE]`; Ctrl-C closes the connection, which cancels the request on the server.

TLS (`treechat.tls`): `--tls` on TCP, an https:// URL on HTTP; the certificate is verified
against the system's CAs or `--tls-ca FILE`, or not at all with `--tls-no-verify`.

Plain blocking sockets. Ctrl-C is handled explicitly (`CtrlC`), so it works even when the chat
was started with SIGINT ignored (anything launched from a background job of a shell without job
control). At the prompt it quits (the line is read with the signal's wakeup fd watched beside
the terminal, so a Ctrl-C just after the prompt appears is never missed); while an answer
streams the handler never raises into the reader (an exception between `recv` and storing its
bytes would lose them): it wakes the TCP reader through a pipe, which then sends the cancel, or
shuts the HTTP socket, which ends the stream. In a terminal, Ctrl-C keeps what was typed ahead
(NOFLSH): a line typed while an answer streams becomes the next question.
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import os
import secrets
import select
import signal
import socket
import ssl
import sys
import time
import urllib.parse
from contextlib import contextmanager

from treechat import tls as tlsopt


class ChatError(Exception):
    """The server answered with an error (code, message) or could not be reached."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


class TcpChat:
    """The line protocol: one connection, one request at a time, resumed after a drop."""

    def __init__(self, address: str, api_key: str | None = None,
                 tls: ssl.SSLContext | None = None):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--tcp wants HOST:PORT, not '{address}'")
        self.address = (host, int(port))
        self.api_key = api_key
        self.tls = tls
        self.ids = itertools.count(1)
        self.asking: str | None = None  # the id of the answer streaming now
        self.stop_asked = False  # Ctrl-C came while it streamed
        self.wake_r, self.wake_w = socket.socketpair()  # how Ctrl-C wakes the reader
        self.wake_w.setblocking(False)
        self.connect()

    def connect(self) -> None:
        if getattr(self, "sock", None) is not None:
            self.sock.close()
        try:
            self.sock = socket.create_connection(self.address, timeout=10)
            if self.tls is not None:
                self.sock = self.tls.wrap_socket(self.sock, server_hostname=self.address[0])
        except ssl.SSLError as e:  # before OSError: a refused certificate is no network blip
            raise ChatError("tls_failed", tlsopt.describe(e)) from None
        except OSError as e:
            raise ChatError("unreachable", f"cannot connect to {self.address[0]}:"
                                           f"{self.address[1]}: {e}") from None
        self.sock.settimeout(None)
        self.buf = b""
        hello = self.read()
        self.session = hello.get("session")
        self.window = hello.get("resume_window", 0)
        self.authenticate(hello)

    def authenticate(self, greeting: dict) -> None:
        """Send the key in a hello line (once per connection); its answer comes next."""
        if not self.api_key:
            if greeting.get("auth"):
                raise ChatError("unauthorized", "the server wants an API key: pass --api-key or "
                                                "set TREECHAT_API_KEY")
            return
        self.send({"hello": {"client": "treechat chat", "api_key": self.api_key}})
        answer = self.read()
        if "error" in answer:
            raise ChatError(answer["error"]["code"], answer["error"]["message"])

    def send(self, line: dict) -> None:
        self.sock.sendall(json.dumps(line).encode() + b"\n")

    def read(self, wake: bool = False) -> dict | None:
        """The next line; with `wake`, None as soon as Ctrl-C asks for a cancel."""
        while b"\n" not in self.buf:
            # TLS may hold decrypted bytes that select cannot see: read those first
            held = isinstance(self.sock, ssl.SSLSocket) and self.sock.pending()
            if wake and not held and self.wake_r in select.select([self.sock, self.wake_r], [],
                                                                  [])[0]:
                self.wake_r.recv(64)
                return None
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionResetError("the server closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def ask(self, messages: list[dict], params: dict, show,
            session: str | None = None) -> tuple[str, str]:
        rid = str(next(self.ids))
        self.reopen_if_closed()
        named = {"session": session} if session else {}
        self.send({"id": rid, "messages": messages, **named, **params})
        self.asking, self.stop_asked = rid, False
        try:
            return self.stream(rid, show)
        finally:
            self.asking = None

    def stream(self, rid: str, show) -> tuple[str, str]:
        text, cancel_sent = "", False
        while True:
            try:
                if self.stop_asked and not cancel_sent:  # Ctrl-C: cancel, read on to the end
                    cancel_sent = True
                    self.send({"cancel": rid})
                msg = self.read(wake=True)
            except OSError:
                self.resume(rid, len(text))
                cancel_sent = False  # the cancel may not have reached the server: send it again
                continue
            if msg is None or msg.get("id") != rid:
                continue
            if "delta" in msg:
                piece = msg["delta"][len(text) - msg["offset"]:]  # never show a character twice
                text += piece
                show(piece)
            elif msg.get("done"):
                return msg["text"], msg["finish_reason"]
            elif "error" in msg:
                if self.stop_asked and msg["error"]["code"] == "unknown_id":
                    return text, "cancelled"  # it ended before a repeated cancel arrived
                raise ChatError(msg["error"]["code"], msg["error"]["message"])

    def cancel(self) -> bool:
        """Ctrl-C (called by the SIGINT handler): wake the reader, which sends the cancel.
        False when no answer streams."""
        if self.asking is None:
            return False
        self.stop_asked = True
        try:
            self.wake_w.send(b"!")
        except BlockingIOError:  # wake-ups already pending: one is enough
            pass
        return True

    def reopen_if_closed(self) -> None:
        """Between answers the server may have closed an idle connection: open a new one."""
        while select.select([self.sock], [], [], 0)[0]:
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                return self.connect()
            self.buf += data  # lines of earlier requests, or the idle notice: skipped by id

    def resume(self, rid: str, have: int) -> None:
        """Reconnect and resume the session: the rest of `rid` then arrives as usual."""
        deadline = time.monotonic() + max(self.window, 1)
        session = self.session
        for attempt in itertools.count():
            try:
                self.connect()
                self.send({"resume": session, "offsets": {rid: have}})
                msg = self.read()
                if "error" in msg:
                    raise ChatError(msg["error"]["code"], msg["error"]["message"])
                self.session = session  # the resumed session keeps its token
                return
            except (OSError, ChatError) as e:
                code = e.code if isinstance(e, ChatError) else "unreachable"
                if code != "unreachable" or time.monotonic() > deadline:
                    raise ChatError(code, f"the connection dropped and the answer could not be "
                                          f"resumed ({e})") from None
                time.sleep(min(0.2 * 2 ** attempt, 2.0))  # back off before the next attempt

    def close(self) -> None:
        for sock in (self.sock, self.wake_r, self.wake_w):
            sock.close()


class HttpChat:
    """The OpenAI-compatible HTTP API, streamed with Server-Sent Events."""

    def __init__(self, url: str, api_key: str | None, tls: ssl.SSLContext | None = None):
        parts = urllib.parse.urlsplit(url if "//" in url else "http://" + url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"--http wants a URL such as http://127.0.0.1:8000, not '{url}'")
        if tls is not None and parts.scheme != "https":
            raise ValueError(f"TLS options need an https:// URL, not '{url}'")
        self.parts = parts
        self.tls = tls or (tlsopt.client_context() if parts.scheme == "https" else None)
        self.path = parts.path.rstrip("/") + "/v1/chat/completions"
        self.headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        self.streaming, self.stop_asked, self.sock = False, False, None  # cancel() reads them

    def ask(self, messages: list[dict], params: dict, show,
            session: str | None = None) -> tuple[str, str]:
        where = (self.parts.hostname, self.parts.port)
        conn = http.client.HTTPSConnection(*where, timeout=600, context=self.tls) if self.tls \
            else http.client.HTTPConnection(*where, timeout=600)
        self.streaming, self.stop_asked, self.sock = True, False, None
        try:
            body = json.dumps({"messages": messages, "stream": True, **params})
            try:
                conn.connect()
                self.sock = conn.sock
                if self.stop_asked:
                    return "", "cancelled"
                headers = {**self.headers, "X-Session-Id": session} if session \
                    else self.headers
                conn.request("POST", self.path, body, headers)
                resp = conn.getresponse()
            except ssl.SSLError as e:
                raise ChatError("tls_failed", tlsopt.describe(e)) from None
            except OSError as e:
                if self.stop_asked:
                    return "", "cancelled"
                raise ChatError("unreachable", f"cannot reach {self.parts.netloc}: {e}") from None
            if resp.status != 200:
                raise ChatError(*self.error_of(resp))
            return self.read_events(resp, show)
        finally:
            self.streaming, self.sock = False, None
            conn.close()  # after Ctrl-C this is what cancels the request on the server

    def cancel(self) -> bool:
        """Ctrl-C (called by the SIGINT handler): shut the socket, which ends the stream here
        and cancels the request on the server. False when no answer streams."""
        if not self.streaming:
            return False
        self.stop_asked = True
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return True

    def read_events(self, resp, show) -> tuple[str, str]:
        text, reason = "", "stop"
        try:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue  # blank separators and ": keep-alive" comments
                data = line[5:].strip()
                if data == "[DONE]":
                    return text, reason
                chunk = json.loads(data)
                if "error" in chunk:
                    err = chunk["error"]
                    raise ChatError(err.get("code") or err.get("type", "error"),
                                    err.get("message", ""))
                for choice in chunk.get("choices", []):
                    piece = (choice.get("delta") or {}).get("content") or ""
                    text += piece
                    show(piece)
                    reason = choice.get("finish_reason") or reason
        except (OSError, http.client.HTTPException):
            if not self.stop_asked:
                raise ChatError("disconnected", "the connection dropped mid-answer") from None
        return text, "cancelled" if self.stop_asked else reason

    @staticmethod
    def error_of(resp) -> tuple[str, str]:
        raw = resp.read()
        try:
            err = json.loads(raw)["error"]
            return str(err.get("code") or err.get("type")), str(err.get("message"))
        except (ValueError, KeyError, TypeError):
            return f"http_{resp.status}", raw.decode(errors="replace")[:200]

    def close(self) -> None:
        pass


def add_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--tcp", metavar="HOST:PORT",
                       help="the TCP gateway (the default: 127.0.0.1:8001)")
    where.add_argument("--http", metavar="URL", help="the HTTP gateway, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=os.environ.get("TREECHAT_API_KEY") or None,
                        help="the server's API key (default: $TREECHAT_API_KEY)")
    parser.add_argument("--system", default=None, help="a system message opening the conversation")
    parser.add_argument("--max-tokens", type=int, default=None, help="longest answer, in tokens")
    parser.add_argument("--temperature", type=float, default=None, help="sampling temperature 0..2")
    parser.add_argument("--model", default=None, help="which model (when the server has several)")
    tlsopt.add_client_args(parser)


def main(args: argparse.Namespace) -> int:
    params = {k: v for k, v in (("max_tokens", args.max_tokens), ("temperature", args.temperature),
                                ("model", args.model)) if v is not None}
    start = [{"role": "system", "content": args.system}] if args.system else []
    tty = sys.stdin.isatty()
    ctrl_c = CtrlC()  # before connecting: a Ctrl-C then quits
    tls = tlsopt.client_context_of(args) if tlsopt.wants_tls(args) else None
    try:
        chat = HttpChat(args.http, args.api_key, tls) if args.http else \
            TcpChat(args.tcp or "127.0.0.1:8001", args.api_key, tls)
    except ChatError as e:
        print(f"treechat chat: {e}", file=sys.stderr)
        return 1
    ctrl_c.chat = chat
    if tty:
        print("treechat chat: type a message; Ctrl-C cancels an answer, Ctrl-D quits, /reset "
              "starts over", file=sys.stderr)
    messages = list(start)
    try:
        with typeahead_kept(tty):
            read = ctrl_c.read_line if tty and os.name == "posix" else input
            return converse(chat, messages, start, params, tty, read)
    finally:
        chat.close()


class CtrlC:
    """The SIGINT handler, installed explicitly: a process started with SIGINT ignored never gets
    Python's own. With no answer streaming it raises KeyboardInterrupt (quit at the prompt);
    while one streams it asks the chat to cancel it."""

    def __init__(self):
        self.chat: TcpChat | HttpChat | None = None
        signal.signal(signal.SIGINT, self.handle)
        # every signal also writes a byte here, at once, whatever Python is doing (read_line)
        self.wake_r, wake_w = socket.socketpair()
        for sock in (self.wake_r, wake_w):
            sock.setblocking(False)
        self._wake_w = wake_w  # kept open for the process's life
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

    def handle(self, signum, frame) -> None:
        if self.chat is None or not self.chat.cancel():
            raise KeyboardInterrupt

    def read_line(self, prompt: str) -> str:
        """The next line typed at the terminal (EOFError at Ctrl-D), in place of input(): a
        Ctrl-C that comes after input() printed its prompt and before it blocked in read() is
        not seen until the next key (the handler runs between bytecodes, and a signal that came
        before read() does not interrupt it). Here the signal's wakeup byte ends the wait."""
        sys.stdout.write(prompt)
        sys.stdout.flush()
        fd, line = sys.stdin.fileno(), b""
        while True:
            try:
                self.wake_r.recv(4096)  # earlier wake-ups: their handlers have run by now
            except BlockingIOError:
                pass
            if fd not in select.select([fd, self.wake_r], [], [])[0]:
                continue  # a signal: its handler raises before the next select
            chunk = os.read(fd, 4096)  # the terminal gives a whole line (or what Ctrl-D ends)
            if not chunk and not line:
                raise EOFError
            line += chunk
            if not chunk or line.endswith(b"\n"):
                return line.decode(errors="replace").removesuffix("\n")


@contextmanager
def typeahead_kept(tty: bool):
    """In a terminal, Ctrl-C discards what was typed ahead; with NOFLSH it stays, so a line typed
    while an answer streams is asked once the answer is cancelled."""
    try:
        import termios
    except ImportError:  # Windows
        termios = None
    if not tty or termios is None:
        yield
        return
    fd = sys.stdin.fileno()
    before = termios.tcgetattr(fd)
    termios.tcsetattr(fd, termios.TCSANOW, before[:3] + [before[3] | termios.NOFLSH] + before[4:])
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSANOW, before)


def converse(chat, messages: list[dict], start: list[dict], params: dict, tty: bool,
             read=input) -> int:
    def show(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    session = new_session()
    while True:
        try:
            line = read("you> " if tty else "")
        except (EOFError, KeyboardInterrupt) as e:
            if tty:
                print()
            if isinstance(e, KeyboardInterrupt):  # not silently: say what Ctrl-C does here
                print("[Ctrl-C at the prompt quits, as Ctrl-D does; during an answer it cancels "
                      "the answer]", file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages[:] = list(start)
            session = new_session()
            print("[new conversation]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            text, reason = chat.ask(messages, params, show, session)
        except KeyboardInterrupt:  # before the first line came back: nothing to keep
            text, reason = "", "cancelled"
        except ChatError as e:
            messages.pop()  # a failed turn leaves no trace in the conversation
            print(f"\n[error {e}]" if tty else f"[error {e}]", file=sys.stderr)
            if e.code in ("unreachable", "tls_failed"):  # retrying cannot help
                return 1
            continue
        messages.append({"role": "assistant", "content": text})
        print(" [cancelled]" if reason == "cancelled" else "")
        sys.stdout.flush()


def new_session() -> str:
    """A conversation's session name: random, so two conversations never share one."""
    return "chat-" + secrets.token_hex(8)

"""Text mode of the TCP gateway: a chat for people with `nc HOST PORT`.

Entered when a connection's first line is `TEXT` (any case), or is not JSON at all (it does not
start with "{"): that line is then the first prompt. From then on each line is a prompt in one
conversation (the connection keeps the history, so follow-ups have context, and names the
conversation's session, so the tree sends them where the earlier turns ran). The answer streams
back as plain UTF-8 text and ends with an empty line. So that an empty line can only mean "end of
answer", a blank line inside an answer is sent as a line holding one space. Errors are one line
`[error CODE: message]`, then the empty line. An empty line gets a hint (`HINT`), then the empty
line, so a person pressing Enter sees the connection is alive. Lines typed while an answer streams
wait their turn.
A dropped connection cancels the running answer at once (text mode does not resume).

API keys: a gateway with keys wants the first line to be `TEXT KEY`. Until a line like that
arrives, every line gets `[error unauthorized: ...]` and the empty line, and after a few the
connection is closed (`Connection.refuse`). Without keys, `TEXT KEY` works too: the key is ignored.
"""

from __future__ import annotations

import re
import secrets
import time

from gateways.tcp_mobile.lines import TOO_LONG
from gateways.tcp_mobile.protocol import Code

SWITCH = re.compile(rb"\s*TEXT(?:[ \t]+(\S+))?\s*", re.I)  # TEXT, or TEXT KEY
HINT = "[type a message and press Enter; close the connection (Ctrl-C, Ctrl-D) to quit]"


class TextChat:
    def __init__(self, conn):
        self.conn = conn
        self.messages: list[dict] = []
        self.session = "text-" + secrets.token_hex(8)  # the conversation's, for the routing
        self.last = "\n"  # last character written: answers start on a fresh line
        sessions = conn.gw.sessions
        sessions.drop(conn.session)  # text mode has no session to resume
        conn.session.conn = None
        self.sessions = sessions

    async def run(self, first: bytes) -> None:
        raw = await self.log_in(first)
        while True:
            if raw is TOO_LONG:
                self.end_with_error(Code.LINE_TOO_LONG,
                                    f"a line may hold at most {self.conn.cfg.max_line} bytes")
            elif raw is not None and raw.strip():
                await self.answer(raw)
            elif raw is not None:
                self.write(HINT + "\n")
                self.end()
            raw = await self.conn.reader.read_line()

    async def log_in(self, raw) -> bytes | None:
        """Read up to the `TEXT KEY` line the gateway's keys ask for; returns the first prompt
        (a first line that is not `TEXT ...` on a gateway without keys), or None."""
        while True:
            if raw is not TOO_LONG and not raw.strip():
                raw = await self.conn.reader.read_line()
                continue
            switch = SWITCH.fullmatch(raw) if raw is not TOO_LONG else None
            key = (switch.group(1) or b"").decode("utf-8", "replace") if switch else ""
            if switch and self.conn.gw.keys.check(key):
                self.conn.authed = True
                return None
            if not self.conn.gw.keys:
                return raw  # no keys, and not a TEXT line: it is the first prompt
            why = ("missing API key: the first line must be TEXT YOUR_KEY"
                   if not switch or not switch.group(1) else "incorrect API key provided")
            await self.conn.refuse(lambda closing: self.refusal(why + closing))
            raw = await self.conn.reader.read_line()

    def refusal(self, message: str) -> bytes:
        return f"[error {Code.UNAUTHORIZED}: {message}]\n\n".encode()

    async def answer(self, raw: bytes) -> None:
        try:
            prompt = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            return self.end_with_error(Code.INVALID_UTF8, f"the line is not UTF-8 (byte {e.start})")
        if self.sessions.closing:
            return self.end_with_error(Code.SHUTTING_DOWN, "the gateway is shutting down")
        messages = self.messages + [{"role": "user", "content": prompt}]
        stream = self.sessions.client.submit({"messages": messages, "session": self.session})
        parts: list[str] = []
        self.conn.busy = True
        try:
            async for ev in stream:
                if self.conn.closed or self.conn.stream.closed():
                    break  # the finally cancels it down the tree
                if ev.kind == "delta" and ev.text:
                    parts.append(ev.text)
                    self.write(ev.text)
                elif ev.kind == "done":
                    self.messages = messages + [{"role": "assistant", "content": "".join(parts)}]
                    self.end()
                elif ev.kind == "error":
                    self.end_with_error(ev.code, ev.message)
        finally:
            self.conn.busy = False
            self.conn.last_active = time.monotonic()
            if not stream.finished:
                stream.cancel()

    def write(self, text: str) -> None:
        if "\n" in text:  # keep blank lines inside the answer from reading as its end
            out = []
            for ch in text:
                if ch == "\n" and self.last == "\n":
                    out.append(" ")
                out.append(ch)
                self.last = ch
            text = "".join(out)
        elif text:
            self.last = text[-1]
        self.conn.write(text.encode("utf-8"))

    def end(self) -> None:
        self.conn.write(b"\n\n" if self.last != "\n" else b"\n")
        self.last = "\n"

    def end_with_error(self, code: str, message: str) -> None:
        if self.last != "\n":
            self.write("\n")
        self.write(f"[error {code}: {message}]\n")
        self.end()

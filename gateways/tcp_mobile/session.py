"""Sessions of the TCP gateway: the requests of one client, kept across reconnects.

Every connection starts a `Session` (its token is sent in the hello line). A session owns its
requests: each is a `Tracked` with the broker `Stream`, the text produced so far and, once
finished, its final line. One `pump` task per request moves broker events into the session:
it records the text and hands each line to the connection attached at that moment, if any.

When the connection drops, the session stays for `resume_window` seconds: requests keep running
and their text keeps accumulating. A new connection that sends `resume` with the token takes the
session over; for every id it names it gets the text from the given offset as one delta, then the
live deltas, then the final line. Everything runs on one event loop and the catch-up and the
attachment happen in the same turn, so no delta is lost or sent twice. When the window passes,
running requests are cancelled down the tree and the token is forgotten.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from broker.client import RootClient, Stream
from gateways import tools
from gateways.tcp_mobile.protocol import Code, LineError, Resume, Submit, delta_line, done_line, \
    error_line

log = logging.getLogger("treechat.tcp.session")

FINISHED_KEPT = 32  # finished requests a session keeps: a final lost in flight can be resumed


class Tracked:
    """One request of a session: where its answer stands."""

    __slots__ = ("id", "stream", "resumable", "parts", "length", "final", "task", "tools",
                 "model")

    def __init__(self, rid: str, stream: Stream, resumable: bool, request: dict | None = None):
        self.id = rid
        self.stream = stream
        self.resumable = resumable
        self.tools = tools.mode_of(request or {})  # (mode, function): how to read tool calls
        self.model = (request or {}).get("model")  # the model asked for, named in the final line
        self.parts: list[str] = []
        self.length = 0  # characters (code points) produced so far
        self.final: dict | None = None
        self.task: asyncio.Task | None = None

    def text_from(self, offset: int) -> str:
        return "".join(self.parts)[offset:]


class Session:
    def __init__(self, sessions: "Sessions"):
        self.sessions = sessions
        self.token = secrets.token_urlsafe(12)
        self.requests: dict[str, Tracked] = {}
        self.conn = None  # the attached connection (server.Connection), None while detached
        self.expiry: asyncio.TimerHandle | None = None

    @property
    def running(self) -> list[Tracked]:
        return [t for t in self.requests.values() if t.final is None]

    def deliver(self, t: Tracked, line: dict) -> None:
        """Send a request's line to the attached connection, unless the request was forgotten."""
        if self.conn is not None and self.requests.get(t.id) is t:
            self.conn.send(line)

    # --- requests -------------------------------------------------------------------------------

    def submit(self, cmd: Submit) -> None:
        old = self.requests.get(cmd.id)
        if old is not None and old.final is None:
            raise LineError(Code.DUPLICATE_ID, f"request '{cmd.id}' is still running", cmd.id)
        if len(self.running) >= self.sessions.max_inflight:
            raise LineError(Code.TOO_MANY_REQUESTS,
                            f"at most {self.sessions.max_inflight} requests may run at once on "
                            "one connection; wait for one to finish", cmd.id)
        if self.sessions.closing:
            raise LineError(Code.SHUTTING_DOWN, "the gateway is shutting down; retry elsewhere",
                            cmd.id)
        self.requests.pop(cmd.id, None)  # a finished request's id may be used again
        t = Tracked(cmd.id, self.sessions.client.submit(cmd.request, timeout=cmd.timeout),
                    cmd.resumable, cmd.request)
        self.requests[cmd.id] = t
        t.task = asyncio.get_running_loop().create_task(self.pump(t))

    def cancel(self, rid: str) -> None:
        t = self.requests.get(rid)
        if t is None or t.final is not None:
            raise LineError(Code.UNKNOWN_ID, f"no running request '{rid}'", rid)
        t.stream.cancel()  # its final line ("done", finish_reason "cancelled") comes via pump

    async def pump(self, t: Tracked) -> None:
        async for ev in t.stream:
            if ev.kind == "delta" and ev.tokens == 0 and ev.logprobs is not None:
                self.deliver(t, {"id": t.id, "prompt_logprobs": ev.logprobs})
            elif ev.kind == "delta" and (ev.text or ev.logprobs):
                offset = t.length
                t.parts.append(ev.text)
                t.length += len(ev.text)
                line = delta_line(t.id, ev.text, offset)
                if ev.logprobs:
                    line["logprobs"] = ev.logprobs
                self.deliver(t, line)
            elif ev.kind == "done":
                text = "".join(t.parts)
                line = done_line(t.id, ev.finish_reason, text, ev.prompt_tokens,
                                 ev.completion_tokens, t.model)
                mode, name = t.tools
                if mode is not None:
                    line["tool_calls"] = tools.parse(mode, name, text)[1]
                    if line["tool_calls"] and ev.finish_reason == "stop":
                        line["finish_reason"] = "tool_calls"
                self.finish(t, line)
            elif ev.kind == "error":
                self.finish(t, error_line(t.id, ev.code, ev.message, ev.retry_after))

    def finish(self, t: Tracked, final: dict) -> None:
        t.final = final
        self.deliver(t, final)
        finished = [k for k, v in self.requests.items() if v.final is not None]
        for rid in finished[:-FINISHED_KEPT]:
            del self.requests[rid]

    def forget(self, t: Tracked) -> None:
        """Stop delivering a request and cancel it down the tree if it still runs."""
        self.requests.pop(t.id, None)
        if t.final is None:
            t.stream.cancel()

    def cancel_all(self) -> None:
        for t in list(self.requests.values()):
            self.forget(t)

    # --- connections ----------------------------------------------------------------------------

    def attach(self, conn) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        self.conn = conn

    def detach(self) -> None:
        """The connection dropped: cancel what may not wait, keep the rest for the window."""
        self.conn = None
        for t in list(self.requests.values()):
            if not t.resumable:
                self.forget(t)
        window = self.sessions.resume_window
        if window <= 0 or not self.requests:
            self.cancel_all()
            self.sessions.drop(self)
            return
        self.expiry = asyncio.get_running_loop().call_later(window, self.expire)

    def expire(self) -> None:
        self.expiry = None
        if self.running:
            log.info("session %s: resume window passed; cancelling %d request(s)",
                     self.token[:6], len(self.running))
        self.cancel_all()
        self.sessions.drop(self)

    def catch_up(self, offsets: dict[str, int]) -> list[dict]:
        """The lines that bring a resumed client up to date; unnamed requests are dropped."""
        lines = []
        for t in list(self.requests.values()):
            if t.id not in offsets:
                self.forget(t)
        for rid, offset in offsets.items():
            t = self.requests.get(rid)
            if t is None:
                lines.append(error_line(rid, Code.UNKNOWN_ID,
                                        f"the session holds no request '{rid}'"))
            elif offset > t.length:
                self.forget(t)
                lines.append(error_line(rid, Code.BAD_REQUEST, f"offset {offset} is past the "
                                        f"{t.length} characters produced"))
            else:
                if offset < t.length:
                    lines.append(delta_line(rid, t.text_from(offset), offset))
                if t.final is not None:
                    lines.append(t.final)
        return lines


class Sessions:
    """Every session of the gateway, by token."""

    def __init__(self, client: RootClient, resume_window: float, max_inflight: int):
        self.client = client
        self.resume_window = resume_window
        self.max_inflight = max_inflight
        self.by_token: dict[str, Session] = {}
        self.closing = False

    def create(self) -> Session:
        session = Session(self)
        self.by_token[session.token] = session
        return session

    def drop(self, session: Session) -> None:
        if self.by_token.get(session.token) is session:
            del self.by_token[session.token]

    def resume(self, fresh: Session, cmd: Resume) -> Session:
        """The session `cmd` names, taken over from `fresh` (the connection's own, unused)."""
        if fresh.requests:
            raise LineError(Code.BAD_REQUEST, "resume must come before any request on a connection")
        session = self.by_token.get(cmd.session)
        if session is None:
            raise LineError(Code.RESUME_EXPIRED, f"no session '{cmd.session}': its resume window "
                            f"({self.resume_window:g} s) passed, or it never existed")
        if session is not fresh:
            self.drop(fresh)
        return session

    def running(self) -> int:
        return sum(len(s.running) for s in self.by_token.values())

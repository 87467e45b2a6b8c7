"""Prometheus metrics of one node process: `treechat node --metrics-port P` (on its `--host`).

Process: `treechat node`. No ZeroMQ socket of its own: it counts what passes the node's `results`
and `up` channels (`watch`: Tokens, Done and Error sent to the root; Dispatch received from the
parent), reads the node's queue and batch at scrape time, and once per heartbeat, on the node's
loop, checks when each peer was last heard from. Served by `broker.prometheus.Listener`.

    treechat:node_queued, node_running, node_slots, node_children, node_draining   gauges, now
    treechat:node_generation_tokens_total            tokens this node's engine produced
    treechat:node_tokens_per_second                  the same, over the last 10 s
    treechat:node_requests_finished_total{finished_reason}
    treechat:node_prompt_tokens_total                prompt tokens of the requests it finished
    treechat:node_cached_tokens_total                of those, reused from its prefix cache
    treechat:node_errors_total{code}                 errors this node answered for a request
                                                     (engine errors, overloaded, handed_back...)
    treechat:node_dispatches_total{kind}             requests received: new, or resumed (a
                                                     re-dispatch carrying a lost node's output)
    treechat:node_heartbeats_missed_total{peer}      root | parent | child: a heartbeat interval
                                                     passed without a word from that peer
    treechat:node_link_up{peer}                      1 while root / parent answer within 3 beats
    treechat:node_last_heard_seconds{peer}           seconds since root / parent last spoke
    treechat:node_connections_dropped_total          connections to the down socket that closed
                                                     without a goodbye: a child that exited, or
                                                     a frame over the socket's limit
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge

from broker import protocol as p
from broker.prometheus import Listener

RATE_WINDOW = 10.0  # seconds behind node_tokens_per_second


class NodeMetrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.gauges = {name: Gauge(f"treechat:node_{name}", what, registry=r) for name, what in (
            ("queued", "Requests waiting in this node's queue."),
            ("running", "Requests in this node's engine batch."),
            ("slots", "Engine slots of this node."),
            ("children", "Children attached to this node."),
            ("draining", "1 while the node drains (SIGTERM)."))}
        self.tokens = Counter("treechat:node_generation_tokens", "Tokens this node generated.",
                              registry=r)
        self.rate = Gauge("treechat:node_tokens_per_second",
                          f"Tokens generated per second over the last {RATE_WINDOW:g} s.",
                          registry=r)
        self.prompt_tokens = Counter("treechat:node_prompt_tokens",
                                     "Prompt tokens of the requests this node finished.",
                                     registry=r)
        self.cached_tokens = Counter("treechat:node_cached_tokens",
                                     "Prompt tokens reused from this node's prefix cache.",
                                     registry=r)
        self.finished = Counter("treechat:node_requests_finished",
                                "Requests this node finished, by reason.", ["finished_reason"],
                                registry=r)
        self.errors = Counter("treechat:node_errors", "Errors this node answered, by code.",
                              ["code"], registry=r)
        self.dispatches = Counter("treechat:node_dispatches",
                                  "Requests received: new, or resumed after another node's loss.",
                                  ["kind"], registry=r)
        self.missed = Counter("treechat:node_heartbeats_missed",
                              "Heartbeat intervals that passed without a word from a peer.",
                              ["peer"], registry=r)
        self.link_up = Gauge("treechat:node_link_up", "1 while the peer answers in time.",
                             ["peer"], registry=r)
        self.last_heard = Gauge("treechat:node_last_heard_seconds",
                                "Seconds since the peer last spoke.", ["peer"], registry=r)
        self.dropped = Counter("treechat:node_connections_dropped",
                               "Connections to the down socket that closed without a goodbye "
                               "(a child that exited, or a frame over the socket's limit).",
                               registry=r)
        self.dropped_seen = 0
        self.generated = 0  # tokens so far, for the rate (read on the loop only)
        self.history: deque[tuple[float, int]] = deque()  # (time, generated) once per beat
        self.listener: Listener | None = None
        self.sampler: asyncio.Task | None = None

    def start(self, node, host: str, port: int) -> None:
        """Serve on host:port (Fatal when taken) and sample `node` on the running loop."""
        self.listener = Listener(self.registry, host, port)
        self.node = node
        g = self.gauges
        g["queued"].set_function(lambda: len(node.queue))
        g["running"].set_function(lambda: len(node.running))
        g["slots"].set_function(lambda: node.engine.slots if node.engine is not None else 0)
        g["children"].set_function(lambda: len(node.children))
        g["draining"].set_function(lambda: int(node.draining))
        for peer in ("root", "parent"):
            self.last_heard.labels(peer=peer).set_function(lambda peer=peer: self.silence(peer))
            self.link_up.labels(peer=peer).set_function(
                lambda peer=peer: int(self.silence(peer) <= node.cfg.dead_after))
        self.sampler = asyncio.get_running_loop().create_task(self.sample())

    def describe(self) -> dict:
        """What the node adds to its registration (so `treechat status` can show it)."""
        return {"metrics": self.listener.url} if self.listener else {}

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.cancel()
        if self.listener is not None:
            self.listener.close()

    # --- counting --------------------------------------------------------------------------------

    def watch(self, channel) -> None:
        """Count what the node sends and receives on `channel` (its results or up channel)."""
        send, handle = channel.send, channel.on_message

        def counted_send(msg, identity=None):
            self.sent(msg)
            return send(msg, identity)

        def counted_handle(identity, msg):
            if isinstance(msg, p.Dispatch):
                resumed = bool(msg.resume_ids or msg.resume_text)
                self.dispatches.labels(kind="resumed" if resumed else "new").inc()
            return handle(identity, msg)

        channel.send, channel.on_message = counted_send, counted_handle

    def sent(self, msg) -> None:
        if isinstance(msg, p.Tokens):
            n = sum(len(item[2]) for item in msg.items)
            self.generated += n
            self.tokens.inc(n)
            for done in msg.done:  # [rid, reason, prompt_tokens, completion_tokens, cached?]
                self.finished.labels(finished_reason=done[1]).inc()
                self.prompt_tokens.inc(done[2])
                if len(done) > 4:
                    self.cached_tokens.inc(done[4])
        elif isinstance(msg, p.Done):
            self.finished.labels(finished_reason=msg.finish_reason).inc()
            self.prompt_tokens.inc(msg.prompt_tokens)
        elif isinstance(msg, p.Error):
            self.errors.labels(code=msg.code).inc()

    def silence(self, peer: str) -> float:
        seen = self.node.root_seen if peer == "root" else self.node.parent_seen
        return max(0.0, time.monotonic() - seen)

    async def sample(self) -> None:
        """Once per heartbeat: count each silent peer as one missed heartbeat; the token rate; the
        down socket's dropped connections."""
        beat = self.node.cfg.heartbeat
        while True:
            await asyncio.sleep(beat)
            now = time.monotonic()
            for peer in ("root", "parent"):
                if self.silence(peer) > 1.5 * beat:
                    self.missed.labels(peer=peer).inc()
            for child in self.node.children:
                if now - child.last_seen > 1.5 * beat:
                    self.missed.labels(peer="child").inc()
            down = getattr(self.node, "down", None)  # made once the node runs
            if down is not None:
                self.dropped.inc(down.dropped - self.dropped_seen)
                self.dropped_seen = down.dropped
            self.history.append((now, self.generated))
            while self.history and self.history[0][0] < now - RATE_WINDOW:
                self.history.popleft()
            t0, n0 = self.history[0]
            self.rate.set((self.history[-1][1] - n0) / (now - t0) if now > t0 else 0.0)

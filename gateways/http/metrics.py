"""Prometheus metrics of one HTTP gateway process, in vLLM's style with a `treechat:` prefix.

One `CollectorRegistry` per process (no module globals), rendered by `GET /metrics`. Request
metrics are measured here, at the gateway, per request (`Tracker`); the per-node gauges are copied
from the root's status (`update_tree`), refreshed on each scrape and every few seconds.

What each timing measures (the protocol has no "left the queue" event, so queue time is measured
up to the first token, like TTFT, and counts queueing plus prefill):

    time_to_first_token_seconds   submit -> first text delta
    request_queue_time_seconds    submit -> first text delta (queue + prefill, an upper bound)
    inter_token_latency_seconds   gap between deltas, divided evenly over the delta's tokens
    e2e_request_latency_seconds   submit -> final event
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 10.0, 20.0, 40.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0,
               120.0, 240.0, 480.0, 960.0, 1920.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("treechat:num_requests_running",
                             "Requests of this gateway that are producing tokens.", registry=r)
        self.waiting = Gauge("treechat:num_requests_waiting",
                             "Requests of this gateway waiting for their first token.", registry=r)
        self.ttft = Histogram("treechat:time_to_first_token_seconds",
                              "Submit to first token, seconds.", buckets=TTFT_BUCKETS, registry=r)
        self.queue_time = Histogram("treechat:request_queue_time_seconds",
                                    "Submit to first token (queue and prefill), seconds.",
                                    buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("treechat:inter_token_latency_seconds",
                             "Time between tokens, seconds.", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("treechat:e2e_request_latency_seconds",
                             "Submit to the final event, seconds.", buckets=E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("treechat:prompt_tokens",
                                     "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("treechat:generation_tokens",
                                         "Generated tokens of finished requests.", registry=r)
        self.success = Counter("treechat:request_success", "Requests that finished, by reason.",
                               ["finished_reason"], registry=r)
        self.aborted = Counter("treechat:num_aborted_requests",
                               "Requests cancelled because the client went away.", registry=r)
        self.errors = Counter("treechat:request_errors",
                              "Requests that ended in an error, by code.", ["code"], registry=r)
        self.responses = Counter("treechat:http_responses", "HTTP responses, by status code "
                                 "(refusals such as 503 are counted here, not logged).",
                                 ["status"], registry=r)
        self.ignored_fields = Counter("treechat:ignored_fields", "Fields inside messages and "
                                      "content parts that no dialect defines, dropped.",
                                      registry=r)
        self.refused_connections = Counter("treechat:http_refused_connections",
                                           "Connections closed at once: --max-connections open.",
                                           registry=r)
        self.node_running = Gauge("treechat:node_running", "Requests running on each node.",
                                  ["node"], registry=r)
        self.node_queued = Gauge("treechat:node_queued", "Requests queued on each node.",
                                 ["node"], registry=r)
        self.node_slots = Gauge("treechat:node_slots", "Slots of each node's engine.",
                                ["node"], registry=r)
        self.root_queued = Gauge("treechat:root_queued",
                                 "Requests waiting in the root's queue.", registry=r)

    def track(self) -> "Tracker":
        return Tracker(self)

    def update_tree(self, status: dict) -> None:
        """Copy the root's view of every live node; nodes gone since the last update disappear."""
        for gauge in (self.node_running, self.node_queued, self.node_slots):
            gauge.clear()
        for node in status.get("nodes", []):
            if node.get("state") == "dead":
                continue
            name = str(node.get("name"))
            self.node_running.labels(node=name).set(node.get("running") or 0)
            self.node_queued.labels(node=name).set(node.get("queued") or 0)
            self.node_slots.labels(node=name).set(node.get("slots") or 0)
        self.root_queued.set(status.get("root", {}).get("queued") or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Tracker:
    """One request's timings; keeps the running/waiting gauges balanced whatever happens."""

    __slots__ = ("m", "start", "last", "state")

    def __init__(self, metrics: Metrics):
        self.m = metrics
        self.start = self.last = time.monotonic()
        self.state = "waiting"  # waiting -> running -> over
        metrics.waiting.inc()

    def delta(self, tokens: int) -> None:
        now = time.monotonic()
        if self.state == "waiting":
            self.m.waiting.dec()
            self.m.running.inc()
            self.state = "running"
            self.m.ttft.observe(now - self.start)
            self.m.queue_time.observe(now - self.start)
        elif self.state == "running" and tokens > 0:
            gap = (now - self.last) / tokens
            for _ in range(tokens):
                self.m.itl.observe(gap)
        self.last = now

    def done(self, finish_reason: str, prompt_tokens: int, completion_tokens: int,
             client_gone: bool) -> None:
        if self.end():
            self.m.prompt_tokens.inc(prompt_tokens)
            self.m.generation_tokens.inc(completion_tokens)
            if finish_reason == "cancelled" or client_gone:
                self.m.aborted.inc()
            else:
                self.m.success.labels(finished_reason=finish_reason).inc()

    def error(self, code: str) -> None:
        if self.end():
            self.m.errors.labels(code=code).inc()

    def end(self) -> bool:
        """Close the gauges once; False when already closed."""
        if self.state == "over":
            return False
        (self.m.waiting if self.state == "waiting" else self.m.running).dec()
        self.state = "over"
        self.m.e2e.observe(time.monotonic() - self.start)
        return True

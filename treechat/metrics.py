"""`--metrics-port`: the flag of a node or a TCP gateway that serves Prometheus metrics on its own
listener (`broker.prometheus.Listener`; the HTTP gateway serves `/metrics` on its own port)."""

from __future__ import annotations

import argparse

from broker.prometheus import Listener

__all__ = ["Listener", "add_metrics_arg"]  # Listener: gateways/tcp_mobile/metrics.py takes it here


def add_metrics_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metrics-port", type=int, default=0, metavar="PORT",
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (default 0: off)")

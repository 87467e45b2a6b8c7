"""The Prometheus listener of a node or a TCP gateway (`--metrics-port`; the HTTP gateway serves
`/metrics` on its own port).

One HTTP listener per process, prometheus_client's (`GET /metrics`, in its own thread), on the
process's `--host`. Collectors it reads from that thread are either prometheus_client's own
(thread-safe) or plain reads of a length or a flag, which need no lock. It lives here, below
`nodes/` and `gateways/`, so both import it downward.
"""

from __future__ import annotations

from broker.errors import Fatal


class Listener:
    def __init__(self, registry, host: str, port: int):
        from prometheus_client import start_http_server  # only processes with --metrics-port
        if not 0 < port < 65536:
            raise ValueError(f"--metrics-port must be 1..65535, not {port}")
        try:
            self.server, self.thread = start_http_server(port, host, registry)
        except OSError as e:
            raise Fatal(f"cannot serve metrics on {host}:{port}: {e}") from None
        shown = f"[{host}]" if ":" in host else host
        self.url = f"http://{shown}:{self.server.server_port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

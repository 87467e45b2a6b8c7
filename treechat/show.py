"""Text views of the live tree for `treechat status` and `treechat registry`.

`status` shows every node under its parent with its host (the address its registry entry
advertises) and the health of its links as the root sees them:

    ok           alive, and attached where it belongs (a top-level node on the root's tree socket)
    detached     alive (heartbeats reach the root) but not on the root's tree socket yet
    parent lost  alive, but its parent is gone: it runs what it has and waits to reattach
    draining     finishing its work before it stops (SIGTERM)
    lost         missed its heartbeats: the root re-dispatched what it held
"""

from __future__ import annotations

from urllib.parse import urlsplit


def host_of(endpoint: str) -> str:
    """'tcp://10.0.0.7:40123' -> '10.0.0.7' (an IPv6 address without its brackets)."""
    return urlsplit(endpoint).hostname or endpoint


def link_health(node: dict, by_name: dict[str, dict], on_root: set[str]) -> str:
    if node["state"] == "dead":
        return "lost"
    if node["state"] == "draining":
        return "draining"
    parent = node["parent"]
    if parent is None:
        return "ok" if node["name"] in on_root else "detached"
    p = by_name.get(parent)
    return "parent lost" if p is None or p["state"] == "dead" else "ok"


def render_tree(tree: dict, root_address: str | None = None) -> str:
    root = tree["root"]
    where = f"  at {root_address}" if root_address else ""
    lines = [f"root {root['epoch']:x}{where}  policy {root['policy']}  queue {root['queued']}/"
             f"{root['max_queue']}  in flight {root['in_flight']}",
             f"gateways: {', '.join(root['gateways']) or 'none'}"]
    pair = root.get("pair") or {}
    if pair.get("peer") or pair.get("configured") == "backup":  # a root and its standby
        heard = (f"heard {pair['peer_heard']}s ago" if pair.get("peer_heard") is not None
                 else "never heard")
        lines.insert(1, f"this root is {pair['state']}; its peer {pair.get('peer') or '?'} is "
                        f"{pair.get('peer_state') or 'unknown'} ({heard})")
    dropped = {k: n for k, n in root.get("connections_dropped", {}).items() if n}
    if dropped:  # closed without a goodbye: peers that exited, or frames over a socket's limit
        lines.append("connections dropped: " + ", ".join(f"{k} {n}" for k, n in dropped.items()))
    nodes = tree["nodes"]
    by_name = {n["name"]: n for n in nodes}
    on_root = set(root.get("children", []))
    kids: dict[str | None, list[dict]] = {}
    for n in nodes:
        kids.setdefault(n["parent"], []).append(n)

    def walk(parent: str | None, prefix: str) -> None:
        children = sorted(kids.get(parent, []), key=lambda n: n["name"])
        for i, n in enumerate(children):
            last = i == len(children) - 1
            engine = n["model"] or n["engine"]
            name = f"{prefix}{'└── ' if last else '├── '}{n['name']}"
            lines.append(f"{name:<20} {host_of(n['endpoint']):<16} {n['state']:<8} "
                         f"link {link_health(n, by_name, on_root):<12} running {n['running']}/"
                         f"{n['slots']}  queued {n['queued']}  {engine}")
            walk(n["name"], prefix + ("    " if last else "│   "))

    walk(None, "")
    for n in nodes:
        if n["parent"] and n["parent"] not in by_name:
            lines.append(f"?   {n['name']} ({host_of(n['endpoint'])}) waits for its parent "
                         f"{n['parent']}")
    return "\n".join(lines)


def render_registry(nodes: list[dict]) -> str:
    metrics = any((n.get("info") or {}).get("metrics") for n in nodes)
    header = f"{'NAME':<14}{'PARENT':<14}{'STATE':<10}{'SLOTS':>6}  {'ENDPOINT':<24}MODEL"
    rows = [f"{n['name']:<14}{n['parent'] or 'root':<14}{n['state']:<10}{n['slots']:>6}  "
            f"{n['endpoint']:<24}{n['model'] or n['engine']}" for n in nodes]
    if metrics:
        width = max(len(r) for r in [header, *rows]) + 2
        header = f"{header:<{width}}METRICS"
        rows = [f"{r:<{width}}{(n.get('info') or {}).get('metrics') or '-'}"
                for r, n in zip(rows, nodes)]
    return "\n".join([header, *rows]) if rows else "no nodes registered"

"""Text views of the live tree for `treechat status` and `treechat registry`."""

from __future__ import annotations


def render_tree(tree: dict) -> str:
    root = tree["root"]
    lines = [f"root {root['epoch']:x}  policy {root['policy']}  queue {root['queued']}/"
             f"{root['max_queue']}  in flight {root['in_flight']}  gateways: "
             f"{', '.join(root['gateways']) or 'none'}"]
    nodes = tree["nodes"]
    kids: dict[str | None, list[dict]] = {}
    for n in nodes:
        kids.setdefault(n["parent"], []).append(n)

    def walk(parent: str | None, prefix: str) -> None:
        children = sorted(kids.get(parent, []), key=lambda n: n["name"])
        for i, n in enumerate(children):
            last = i == len(children) - 1
            engine = n["model"] or n["engine"]
            lines.append(f"{prefix}{'└── ' if last else '├── '}{n['name']:<12} {n['state']:<8} "
                         f"running {n['running']}/{n['slots']}  queued {n['queued']}  {engine}")
            walk(n["name"], prefix + ("    " if last else "│   "))

    walk(None, "")
    orphans = [n for n in nodes if n["parent"] and n["parent"] not in {m["name"] for m in nodes}]
    for n in orphans:
        lines.append(f"?   {n['name']} waits for its parent {n['parent']}")
    return "\n".join(lines)


def render_registry(nodes: list[dict]) -> str:
    header = f"{'NAME':<14}{'PARENT':<14}{'STATE':<10}{'SLOTS':>6}  {'ENDPOINT':<24}MODEL"
    rows = [f"{n['name']:<14}{n['parent'] or 'root':<14}{n['state']:<10}{n['slots']:>6}  "
            f"{n['endpoint']:<24}{n['model'] or n['engine']}" for n in nodes]
    return "\n".join([header, *rows]) if rows else "no nodes registered"

/**
 * tree.js: the collapsible side panel showing the node tree and each node's load.
 *
 * Polls GET /v1/tree every 2 s while the panel is open and the tab is visible; one request in
 * flight at a time. Nodes are nested under their `parent` (null = a child of the root).
 */

import { getTree } from "./api.js";

const POLL_MS = 2000;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = String(text);
  return e;
}

function loadBar(used, total, label) {
  const wrap = el("div", "load");
  const pct = total > 0 ? Math.min(100, Math.round((100 * used) / total)) : 0;
  const bar = el("div", "load-bar");
  bar.setAttribute("role", "meter");
  bar.setAttribute("aria-label", label);
  bar.setAttribute("aria-valuemin", "0");
  bar.setAttribute("aria-valuemax", String(total));
  bar.setAttribute("aria-valuenow", String(used));
  const fill = el("div", "load-fill");
  fill.style.width = `${pct}%`;
  if (pct >= 90) fill.classList.add("hot");
  else if (pct >= 60) fill.classList.add("warm");
  bar.append(fill);
  wrap.append(bar, el("span", "load-num", `${used}/${total}`));
  return wrap;
}

function nodeItem(node, children) {
  const li = el("li", `tnode state-${node.state}`);
  li.dataset.name = node.name;
  const head = el("div", "tnode-head");
  const dot = el("span", "dot");
  dot.title = node.state;
  head.append(dot, el("span", "tnode-name", node.name), el("span", "tnode-state", node.state));
  li.append(head);
  const meta = el("div", "tnode-meta", [node.engine, node.model].filter(Boolean).join(" · "));
  li.append(meta);
  if (node.slots > 0) li.append(loadBar(node.running ?? 0, node.slots, `${node.name} slots in use`));
  else li.append(el("div", "tnode-meta", `${node.running ?? 0} running (router)`));
  if (node.queued) li.append(el("div", "tnode-queue", `${node.queued} queued`));
  const kids = children.get(node.name) ?? [];
  if (kids.length) {
    const ul = el("ul", "tchildren");
    for (const k of kids) ul.append(nodeItem(k, children));
    li.append(ul);
  }
  return li;
}

export class TreePanel {
  /**
   * @param {HTMLElement} body   where the tree is drawn
   * @param {HTMLElement} status a small line for "updated"/"unreachable"
   * @param {() => string} apiKey
   */
  constructor(body, status, apiKey) {
    this.body = body;
    this.status = status;
    this.apiKey = apiKey;
    this.timer = null;
    this.busy = false;
    this.active = false;
    document.addEventListener("visibilitychange", () => {
      if (this.active && !document.hidden) this.poll();
    });
  }

  start() {
    if (this.active) return;
    this.active = true;
    this.poll();
  }

  stop() {
    this.active = false;
    clearTimeout(this.timer);
    this.timer = null;
  }

  async poll() {
    clearTimeout(this.timer);
    if (!this.active) return;
    if (!document.hidden && !this.busy) {
      this.busy = true;
      try {
        this.draw(await getTree(this.apiKey()));
        this.status.textContent = `Updated ${new Date().toLocaleTimeString()}`;
        this.status.classList.remove("bad");
      } catch (e) {
        this.status.textContent = e.kind === "network" ? "Server unreachable" : `Tree unavailable: ${e.message}`;
        this.status.classList.add("bad");
      } finally {
        this.busy = false;
      }
    }
    if (this.active) this.timer = setTimeout(() => this.poll(), POLL_MS);
  }

  draw(tree) {
    const root = tree.root ?? {};
    const nodes = tree.nodes ?? [];
    const names = new Set(nodes.map((n) => n.name));
    const children = new Map();
    for (const n of nodes) {
      const p = n.parent && names.has(n.parent) ? n.parent : null;
      if (!children.has(p)) children.set(p, []);
      children.get(p).push(n);
    }

    const frag = document.createDocumentFragment();
    const card = el("div", "troot");
    const head = el("div", "tnode-head");
    head.append(el("span", "dot root"), el("span", "tnode-name", "root"), el("span", "tnode-state", `epoch ${root.epoch ?? "?"}`));
    card.append(head);
    const stats = el("dl", "troot-stats");
    const add = (k, v) => stats.append(el("dt", null, k), el("dd", null, v));
    add("policy", root.policy ?? "?");
    add("in flight", root.in_flight ?? 0);
    add("queued", `${root.queued ?? 0} / ${root.max_queue ?? "?"}`);
    const alive = nodes.filter((n) => n.state === "alive");
    const slots = alive.reduce((s, n) => s + (n.slots ?? 0), 0);
    const running = alive.reduce((s, n) => s + (n.running ?? 0), 0);
    add("slots busy", `${running} / ${slots}`);
    card.append(stats);
    frag.append(card);

    const top = children.get(null) ?? [];
    if (top.length) {
      const ul = el("ul", "ttree");
      for (const n of top) ul.append(nodeItem(n, children));
      frag.append(ul);
    } else {
      frag.append(el("p", "muted", "No nodes registered yet."));
    }
    this.body.replaceChildren(frag);
  }
}

/**
 * app.js: the treechat chat page (entry module).
 *
 * Wires the sidebar (conversation list), the thread, the composer, the settings dialog and the
 * node-tree panel. One answer streams at a time; Stop aborts its fetch, which closes the HTTP
 * request so the gateway cancels the generation. State lives in localStorage (store.js).
 */

import { Chat } from "./chat.js";
import { ConversationList } from "./conversations.js";
import { Settings } from "./settings.js";
import { Store } from "./store.js";
import { messageView, updateStreaming } from "./thread.js";
import { TreePanel } from "./tree.js";
const HEALTH_MS = 15000;

const $ = (id) => document.getElementById(id);
const store = new Store();

const ui = {
  messages: $("messages"),
  thread: $("thread"),
  welcome: $("welcome"),
  title: $("conv-title"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
  hint: $("hint"),
  model: $("model"),
  toBottom: $("to-bottom"),
  serverState: $("server-state"),
};

/** Index of the user message being edited in the open conversation, or null. */
let editing = null;
let stickToBottom = true;

const touch = matchMedia("(pointer: coarse)").matches && !matchMedia("(pointer: fine)").matches;

// ---------------------------------------------------------------- sidebar

const convList = new ConversationList(store, {
  open: (id) => openConversation(id),
  remove: (id) => deleteConversation(id),
  renamed: () => renderSidebar(),
});

function renderSidebar() {
  convList.render();
  const cur = store.current();
  ui.title.textContent = cur ? cur.title : "";
  document.title = cur ? `${cur.title} · treechat` : "treechat";
}

function openConversation(id) {
  if (id !== store.currentId) {
    editing = null;
    store.select(id);
    stickToBottom = true;
  }
  closeSidebar();
  renderAll();
  ui.input.focus({ preventScroll: true });
}

function newChat() {
  editing = null;
  store.select(null);
  closeSidebar();
  renderAll();
  ui.input.focus();
}

function deleteConversation(id) {
  chat.forget(id);
  store.remove(id);
  renderAll();
}

// ---------------------------------------------------------------- thread

function renderThread() {
  const conv = store.current();
  const msgs = conv?.messages ?? [];
  ui.welcome.hidden = msgs.length > 0;
  const busy = chat.busy;
  const lastA = msgs.findLastIndex((m) => m.role === "assistant");
  const frag = document.createDocumentFragment();
  msgs.forEach((msg, index) => {
    frag.append(
      messageView(msg, {
        index,
        busy,
        editing: editing === index,
        isLastAssistant: index === lastA,
        onEdit: (i) => {
          editing = i;
          renderThread();
        },
        onCancelEdit: () => {
          editing = null;
          renderThread();
        },
        onSaveEdit: (text) => chat.resend(conv, index, text),
        onRegenerate: () => chat.regenerate(conv),
        errorUi: {
          retryIn: chat.retryIn(msg),
          onRetry: index === lastA && !busy ? () => chat.regenerate(conv) : null,
          onCancelRetry: () => chat.cancelRetry(),
          onSettings: () => openSettings(),
          onEdit: () => {
            const u = msgs.findLastIndex((m, i) => i < index && m.role === "user");
            if (u >= 0) {
              editing = u;
              renderThread();
            }
          },
        },
      }),
    );
  });
  ui.messages.replaceChildren(frag);
  scrollIfSticky();
}

function renderAll() {
  renderSidebar();
  renderThread();
  renderComposer();
}

function scrollIfSticky() {
  if (stickToBottom) ui.thread.scrollTop = ui.thread.scrollHeight;
  ui.toBottom.hidden = stickToBottom;
}

ui.thread.addEventListener("scroll", () => {
  const gap = ui.thread.scrollHeight - ui.thread.scrollTop - ui.thread.clientHeight;
  stickToBottom = gap < 48;
  ui.toBottom.hidden = stickToBottom;
});
ui.toBottom.addEventListener("click", () => {
  stickToBottom = true;
  ui.thread.scrollTo({ top: ui.thread.scrollHeight, behavior: "smooth" });
});

/** Re-renders only the streaming answer, at most once per animation frame. */
let frameQueued = false;
function scheduleStreamRender() {
  if (frameQueued) return;
  frameQueued = true;
  requestAnimationFrame(() => {
    frameQueued = false;
    const active = chat.active;
    if (!active || active.conv.id !== store.currentId) return;
    const idx = active.conv.messages.indexOf(active.msg);
    const art = ui.messages.querySelector(`article.msg[data-index="${idx}"]`);
    if (art) updateStreaming(art, active.msg);
    scrollIfSticky();
  });
}

// ---------------------------------------------------------------- generation

const chat = new Chat(store, {
  started: () => {
    editing = null;
    stickToBottom = true;
  },
  changed: () => renderAll(),
  delta: () => scheduleStreamRender(),
  serverState: (ok) => setServerState(ok),
  model: () => settings.model(),
});

// Counts the automatic retry down in its error card.
setInterval(() => {
  if (!chat.retry) return;
  const node = ui.messages.querySelector('[data-role="countdown"]');
  if (node) node.textContent = `Retrying automatically in ${Math.ceil(chat.retryIn(chat.retry.msg) ?? 0)} s…`;
}, 250);

function send(text) {
  if (chat.send(text)) {
    ui.input.value = "";
    autosize();
  }
}
// ---------------------------------------------------------------- composer

function renderComposer() {
  const busy = chat.busy;
  ui.stop.hidden = !busy;
  ui.send.hidden = busy;
  ui.send.disabled = !ui.input.value.trim();
}

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
  renderComposer();
}

ui.input.addEventListener("input", autosize);
ui.input.addEventListener("keydown", (e) => {
  if (e.key !== "Enter" || e.isComposing || e.keyCode === 229) return;
  if (touch || e.shiftKey) return; // a new line
  e.preventDefault();
  send(ui.input.value);
});
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  send(ui.input.value);
});
ui.stop.addEventListener("click", () => chat.stop());
if (touch) {
  ui.hint.textContent = "Tap the arrow to send";
  ui.input.setAttribute("enterkeyhint", "enter");
}

document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && chat.busy) chat.stop();
});

// ---------------------------------------------------------------- sidebar on phones

const sidebar = $("sidebar");
const scrim = $("scrim");
function openSidebar() {
  sidebar.classList.add("open");
  scrim.hidden = false;
  $("open-sidebar").setAttribute("aria-expanded", "true");
}
function closeSidebar() {
  sidebar.classList.remove("open");
  scrim.hidden = true;
  $("open-sidebar").setAttribute("aria-expanded", "false");
}
$("open-sidebar").addEventListener("click", openSidebar);
$("close-sidebar").addEventListener("click", closeSidebar);
scrim.addEventListener("click", () => {
  closeSidebar();
  setTreeOpen(false);
});
$("new-chat").addEventListener("click", newChat);
$("new-chat-top").addEventListener("click", newChat);

// ---------------------------------------------------------------- models and settings

const settings = new Settings(store, { serverState: (ok) => setServerState(ok), beforeOpen: closeSidebar });
const openSettings = () => settings.open();
$("open-settings").addEventListener("click", openSettings);
// ---------------------------------------------------------------- tree panel and server state

const treePanel = $("tree-panel");
const tree = new TreePanel($("tree-body"), $("tree-status"), () => store.settings.apiKey);
function setTreeOpen(open) {
  treePanel.hidden = !open;
  document.body.classList.toggle("tree-open", open);
  const t = $("toggle-tree");
  t.setAttribute("aria-expanded", String(open));
  t.setAttribute("aria-label", open ? "Hide node tree" : "Show node tree");
  if (open) tree.start();
  else tree.stop();
  store.saveSettings({ treeOpen: open });
}
$("toggle-tree").addEventListener("click", () => setTreeOpen(treePanel.hidden));
$("close-tree").addEventListener("click", () => setTreeOpen(false));

function setServerState(ok) {
  ui.serverState.classList.toggle("ok", ok);
  ui.serverState.classList.toggle("bad", !ok);
  ui.serverState.querySelector(".txt").textContent = ok ? "Connected" : "Server unreachable";
}

async function checkHealth() {
  if (!document.hidden) {
    try {
      const r = await fetch("/healthz", { cache: "no-store" });
      setServerState(r.ok);
      if (r.ok) settings.loadModels(); // the tree's models may have changed
    } catch {
      setServerState(false);
    }
  }
  setTimeout(checkHealth, HEALTH_MS);
}

// Another tab changed the conversations: pick the changes up.
addEventListener("storage", (e) => {
  if (e.key?.startsWith("treechat.conversations") && !chat.busy) {
    try {
      store.convs = JSON.parse(e.newValue || "{}");
    } catch {
      return;
    }
    if (store.currentId && !store.convs[store.currentId]) store.select(null);
    renderAll();
  }
});

// ---------------------------------------------------------------- start

renderAll();
setTreeOpen(!!store.settings.treeOpen && innerWidth > 900);
settings.loadModels();
setTimeout(checkHealth, HEALTH_MS);
if (!touch) ui.input.focus();
document.documentElement.dataset.ready = "1";

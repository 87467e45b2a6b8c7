/**
 * store.js: conversations and settings kept in the browser's localStorage.
 *
 * Keys: "treechat.conversations.v1" holds {id: Conversation}; "treechat.settings.v1" holds the
 * settings object; "treechat.current.v1" the id of the open conversation.
 * Conversation: {id, session, title, created, updated, messages: [{role, content, stats?, error?}]};
 * `session` is the random name its requests carry in `X-Session-Id`, so the tree sends every
 * turn where the earlier ones ran (their prompt is still cached there).
 */

const CONV_KEY = "treechat.conversations.v1";
const SETTINGS_KEY = "treechat.settings.v1";
const CURRENT_KEY = "treechat.current.v1";

export const DEFAULT_SETTINGS = Object.freeze({
  systemPrompt: "",
  temperature: null, // null: the server's default for the model (not sent)
  maxTokens: 1024,
  model: "",
  apiKey: "",
  treeOpen: false,
});

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw ? JSON.parse(raw) : fallback;
  } catch {
    return fallback;
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch {
    /* storage full or disabled: the page still works for this visit */
  }
}

export function newId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

/** A short title from the first user message. */
export function titleFrom(text) {
  // Markdown marks read badly in a list of titles: "**bold** `code`" becomes "bold code".
  const t = text.replace(/[*`~]+|^[#>\s]+/g, "").replace(/\s+/g, " ").trim();
  return t.length > 48 ? `${t.slice(0, 47)}…` : t || "New chat";
}

export class Store {
  constructor() {
    this.convs = read(CONV_KEY, {});
    this.settings = { ...DEFAULT_SETTINGS, ...read(SETTINGS_KEY, {}) };
    this.currentId = read(CURRENT_KEY, null);
    if (this.currentId && !this.convs[this.currentId]) this.currentId = null;
    // An answer that was streaming when the page went away is kept as far as it got.
    for (const conv of Object.values(this.convs)) {
      for (const m of conv.messages ?? []) {
        if (m.pending) {
          m.pending = false;
          m.stats = { ...(m.stats ?? {}), completion_tokens: m.stats?.completion_tokens ?? 0, stopped: true, counted: true };
        }
      }
    }
  }

  /** Conversations, most recently updated first. */
  list() {
    return Object.values(this.convs).sort((a, b) => b.updated - a.updated);
  }

  get(id) {
    return this.convs[id] ?? null;
  }

  current() {
    return this.currentId ? this.get(this.currentId) : null;
  }

  select(id) {
    this.currentId = id;
    write(CURRENT_KEY, id);
  }

  create(firstText) {
    const now = Date.now();
    const conv = { id: newId(), session: newId(), title: titleFrom(firstText), created: now, updated: now, messages: [] };
    this.convs[conv.id] = conv;
    this.select(conv.id);
    this.save(conv);
    return conv;
  }

  /** Persists a conversation after its messages changed. */
  save(conv, touch = true) {
    if (touch) conv.updated = Date.now();
    this.convs[conv.id] = conv;
    write(CONV_KEY, this.convs);
  }

  rename(id, title) {
    const conv = this.get(id);
    if (!conv) return;
    conv.title = title.trim() || conv.title;
    this.save(conv, false);
  }

  remove(id) {
    delete this.convs[id];
    write(CONV_KEY, this.convs);
    if (this.currentId === id) this.select(null);
  }

  saveSettings(patch) {
    Object.assign(this.settings, patch);
    write(SETTINGS_KEY, this.settings);
  }
}

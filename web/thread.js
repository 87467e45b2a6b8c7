/**
 * thread.js: draws one conversation's messages (user bubbles, assistant answers, error cards)
 * and each message's actions. It owns no state: app.js passes the conversation and callbacks.
 */

import { copyText, renderMarkdown } from "./render.js";

const ICONS = {
  copy: '<rect x="9" y="9" width="11" height="11" rx="2"/><path d="M5 15V5a2 2 0 0 1 2-2h8"/>',
  edit: '<path d="M12 20h9"/><path d="M16.5 3.5a2.1 2.1 0 0 1 3 3L7 19l-4 1 1-4z"/>',
  regen: '<path d="M21 12a9 9 0 1 1-2.6-6.4"/><path d="M21 3v6h-6"/>',
  alert: '<circle cx="12" cy="12" r="9"/><path d="M12 7v6M12 16.5v.5"/>',
};

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text != null) e.textContent = text;
  return e;
}

export function iconButton(icon, label, onClick, text) {
  const b = el("button", "act");
  b.type = "button";
  b.setAttribute("aria-label", label);
  b.title = label;
  b.innerHTML = `<svg viewBox="0 0 24 24" aria-hidden="true">${ICONS[icon]}</svg>`;
  if (text) b.append(el("span", "act-text", text));
  b.addEventListener("click", onClick);
  return b;
}

function fmt(n, digits = 1) {
  return Number.isFinite(n) ? n.toFixed(digits) : "–";
}

/** One line under an answer: the model that answered, tokens, tokens/s, prompt size, time. */
export function statsText(s) {
  if (!s) return "";
  const parts = [];
  if (s.model) parts.push(s.model);
  const approx = s.counted ? "≈" : "";
  parts.push(`${approx}${s.completion_tokens ?? 0} tokens`);
  if (Number.isFinite(s.tps) && s.tps > 0) parts.push(`${fmt(s.tps)} tok/s`);
  if (s.prompt_tokens != null) parts.push(`prompt ${s.prompt_tokens}`);
  if (Number.isFinite(s.ttft)) parts.push(`first token ${Math.round(s.ttft * 1000)} ms`);
  if (Number.isFinite(s.seconds)) parts.push(`${fmt(s.seconds)} s`);
  if (s.stopped) parts.push("stopped");
  else if (s.finish === "length") parts.push("cut at max tokens");
  return parts.join(" · ");
}

const ERROR_TITLES = {
  network: "Server unreachable",
  overloaded: "The tree is busy",
  unavailable: "Temporarily unavailable",
  too_long: "Prompt too long",
  auth: "API key needed",
  model: "Unknown model",
  timeout: "The answer timed out",
  stream: "The answer was interrupted",
  server: "Something went wrong",
};

const ERROR_HINTS = {
  network: "Check that treechat is running, then retry.",
  too_long: "Shorten your message, edit an earlier one, or start a new chat.",
  auth: "Add a valid API key in Settings.",
  model: "Pick another model in the menu above.",
};

/**
 * Draws the error card of an assistant message.
 * @param {object} err  {kind, message, code, status, retryAfter}
 * @param {object} ui   {retryIn: seconds|null, onRetry, onCancelRetry, onSettings, onEdit}
 */
function errorCard(err, ui) {
  const card = el("div", `error-card kind-${err.kind}`);
  card.setAttribute("role", "alert");
  const head = el("div", "error-head");
  const ic = el("span", "error-icon");
  ic.innerHTML = `<svg viewBox="0 0 24 24" aria-hidden="true">${ICONS.alert}</svg>`;
  head.append(ic, el("strong", null, ERROR_TITLES[err.kind] ?? ERROR_TITLES.server));
  if (err.status) head.append(el("span", "error-code", `${err.status}${err.code ? ` · ${err.code}` : ""}`));
  else if (err.code && err.kind !== "network") head.append(el("span", "error-code", err.code));
  card.append(head);
  card.append(el("p", "error-msg", err.message));
  if (ERROR_HINTS[err.kind]) card.append(el("p", "error-hint", ERROR_HINTS[err.kind]));
  if (ui.retryIn != null) {
    const wait = el("p", "error-wait", `Retrying automatically in ${Math.ceil(ui.retryIn)} s…`);
    wait.dataset.role = "countdown";
    card.append(wait);
  }
  const row = el("div", "error-actions");
  if (err.kind === "auth" && ui.onSettings) row.append(button("Open settings", ui.onSettings, "btn"));
  if (err.kind === "too_long" && ui.onEdit) row.append(button("Edit message", ui.onEdit, "btn"));
  if (err.kind !== "too_long" && ui.onRetry) row.append(button("Retry", ui.onRetry, "btn primary"));
  if (ui.retryIn != null && ui.onCancelRetry) row.append(button("Cancel retry", ui.onCancelRetry, "btn ghost"));
  card.append(row);
  return card;
}

function button(label, onClick, cls) {
  const b = el("button", cls, label);
  b.type = "button";
  b.addEventListener("click", onClick);
  return b;
}

/**
 * Builds the DOM of one message.
 * @param {object} msg    {role, content, stats?, error?, pending?}
 * @param {object} ctx    {index, isLastAssistant, busy, retryIn, handlers...}
 */
export function messageView(msg, ctx) {
  const art = el("article", `msg ${msg.role}`);
  art.dataset.index = String(ctx.index);
  art.setAttribute("aria-label", msg.role === "user" ? "Your message" : "Assistant message");

  if (msg.role === "user") {
    if (ctx.editing) {
      art.classList.add("editing");
      const ta = el("textarea", "edit-box");
      ta.value = msg.content;
      ta.setAttribute("aria-label", "Edit message text");
      ta.rows = Math.min(12, Math.max(2, msg.content.split("\n").length));
      const row = el("div", "edit-actions");
      row.append(
        button("Cancel", () => ctx.onCancelEdit(), "btn ghost"),
        button("Save & send", () => ctx.onSaveEdit(ta.value), "btn primary"),
      );
      ta.addEventListener("keydown", (e) => {
        if (e.key === "Escape") ctx.onCancelEdit();
        if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) ctx.onSaveEdit(ta.value);
      });
      art.append(ta, row);
      queueMicrotask(() => {
        ta.focus();
        ta.setSelectionRange(ta.value.length, ta.value.length);
      });
      return art;
    }
    art.append(el("div", "bubble", msg.content));
    const acts = el("div", "msg-actions");
    acts.append(iconButton("copy", "Copy message", (e) => copied(e.currentTarget, msg.content)));
    if (!ctx.busy) acts.append(iconButton("edit", "Edit message", () => ctx.onEdit(ctx.index)));
    art.append(acts);
    return art;
  }

  const avatar = el("div", "avatar");
  avatar.innerHTML =
    '<svg viewBox="0 0 32 32" aria-hidden="true"><path d="M16 6v20M16 13l-6-4M16 13l6-4M16 20l-5-3M16 20l5-3"/></svg>';
  const body = el("div", "msg-body");
  const content = el("div", "content markdown");
  if (msg.content) renderMarkdown(content, msg.content, { streaming: !!msg.pending });
  if (msg.pending) {
    art.classList.add("streaming");
    if (!msg.content) content.append(el("span", "typing", "")); // three-dot placeholder
    art.setAttribute("aria-busy", "true");
  }
  body.append(content);
  if (msg.error) body.append(errorCard(msg.error, ctx.errorUi ?? {}));
  if (!msg.pending) {
    const foot = el("div", "msg-foot");
    const acts = el("div", "msg-actions");
    if (msg.content) acts.append(iconButton("copy", "Copy answer", (e) => copied(e.currentTarget, msg.content)));
    if (ctx.isLastAssistant && !ctx.busy && !msg.error) {
      acts.append(iconButton("regen", "Regenerate", () => ctx.onRegenerate()));
    }
    foot.append(acts);
    if (msg.stats) foot.append(el("span", "stats", statsText(msg.stats)));
    body.append(foot);
  }
  art.append(avatar, body);
  return art;
}

async function copied(btn, text) {
  const ok = await copyText(text);
  btn.classList.add(ok ? "done" : "fail");
  setTimeout(() => btn.classList.remove("done", "fail"), 1200);
}

/** Updates a streaming answer in place (cheaper than rebuilding the thread). */
export function updateStreaming(art, msg) {
  const content = art.querySelector(".content");
  if (!content) return;
  renderMarkdown(content, msg.content, { streaming: true });
  // A blinking caret at the end of the last text block while tokens arrive.
  const last = content.lastElementChild;
  if (last && !last.classList.contains("code-block")) last.append(el("span", "caret"));
}

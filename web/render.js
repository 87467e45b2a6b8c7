/**
 * render.js: model output (untrusted Markdown) to safe HTML.
 *
 * marked parses, DOMPurify strips anything that could run (scripts, event handlers, javascript:
 * URLs, iframes, forms), highlight.js colours code blocks, and every block gets a copy button.
 * Nothing from the model reaches innerHTML without passing DOMPurify.
 */

import { Marked } from "/static/vendor/marked/marked.esm.js";
import DOMPurify from "/static/vendor/dompurify/purify.es.js";
import hljs from "/static/vendor/highlight/highlight.min.js";

const marked = new Marked({ gfm: true, breaks: true });

const PURIFY = {
  USE_PROFILE: { html: true },
  FORBID_TAGS: ["style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed"],
  FORBID_ATTR: ["style"],
};

// Links open in a new tab and cannot reach back to this page.
DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A" && node.hasAttribute("href")) {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

const TOOL_CALL = /<tool_call>\s*([\s\S]*?)\s*(?:<\/tool_call>|$)/g;

function pretty(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return null;
  }
}

/**
 * Makes structured answers readable before Markdown: a whole answer that is JSON (a JSON mode
 * answer) becomes a highlighted JSON block, and each <tool_call>{"name", "arguments"}</tool_call>
 * (how tool calls come back, see docs/http-api.md) a titled block of its arguments. Text still
 * streaming in is shown the same way, pretty-printed once it parses.
 */
export function readable(text) {
  const trimmed = text.trim();
  if (/^[[{]/.test(trimmed) && !trimmed.includes("<tool_call>")) {
    return "```json\n" + (pretty(trimmed) ?? trimmed) + "\n```";
  }
  return text.replace(TOOL_CALL, (_, body) => {
    let name = "";
    let args = body;
    try {
      const call = JSON.parse(body);
      name = String(call.name ?? "");
      args = JSON.stringify(call.arguments ?? call.parameters ?? {}, null, 2);
    } catch {
      name = /"name"\s*:\s*"([^"]*)"/.exec(body)?.[1] ?? "";
    }
    return `\n\n**Tool call** \`${name.replace(/`/g, "") || "…"}\`\n\n\`\`\`json\n${args}\n\`\`\`\n`;
  });
}

/** Markdown to sanitized HTML (a string safe for innerHTML). */
export function toSafeHTML(markdown) {
  let html;
  try {
    html = marked.parse(markdown);
  } catch {
    html = `<pre>${escapeHTML(markdown)}</pre>`;
  }
  return DOMPurify.sanitize(html, PURIFY);
}

export function escapeHTML(s) {
  return s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

const COPY_ICON =
  '<svg viewBox="0 0 24 24" aria-hidden="true"><rect x="9" y="9" width="11" height="11" rx="2"/><path d="M5 15V5a2 2 0 0 1 2-2h8"/></svg>';

/** Copies text to the clipboard; falls back to a hidden textarea where the API is missing. */
export async function copyText(text) {
  try {
    await navigator.clipboard.writeText(text);
    return true;
  } catch {
    const ta = document.createElement("textarea");
    ta.value = text;
    ta.setAttribute("readonly", "");
    ta.style.position = "fixed";
    ta.style.opacity = "0";
    document.body.append(ta);
    ta.select();
    let ok = false;
    try {
      ok = document.execCommand("copy");
    } catch {
      ok = false;
    }
    ta.remove();
    return ok;
  }
}

function flash(button, label) {
  const span = button.querySelector(".label");
  if (!span) return;
  const old = span.textContent;
  span.textContent = label;
  button.classList.add("done");
  setTimeout(() => {
    span.textContent = old;
    button.classList.remove("done");
  }, 1400);
}

/** Wraps each <pre><code> in a card with its language and a copy button, and highlights it. */
function decorateCode(root, highlight) {
  for (const pre of root.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    if (!code || pre.parentElement?.classList.contains("code-block")) continue;
    const lang = /language-([\w+#.-]+)/.exec(code.className)?.[1] ?? "";
    if (highlight) {
      if (lang && hljs.getLanguage(lang)) {
        code.innerHTML = hljs.highlight(code.textContent, { language: lang, ignoreIllegals: true }).value;
        code.classList.add("hljs");
      } else if (code.textContent.length < 20000) {
        code.innerHTML = hljs.highlightAuto(code.textContent).value;
        code.classList.add("hljs");
      }
    }
    const card = document.createElement("div");
    card.className = "code-block";
    const bar = document.createElement("div");
    bar.className = "code-bar";
    const name = document.createElement("span");
    name.className = "code-lang";
    name.textContent = lang || "code";
    const btn = document.createElement("button");
    btn.type = "button";
    btn.className = "code-copy";
    btn.setAttribute("aria-label", "Copy code");
    btn.innerHTML = `${COPY_ICON}<span class="label">Copy</span>`;
    btn.addEventListener("click", async () => {
      flash(btn, (await copyText(code.textContent)) ? "Copied" : "Copy failed");
    });
    bar.append(name, btn);
    pre.replaceWith(card);
    card.append(bar, pre);
  }
}

/**
 * Renders Markdown into an element. While streaming, highlighting is skipped for speed when the
 * text is long (the final render always highlights).
 */
export function renderMarkdown(el, markdown, { streaming = false } = {}) {
  el.innerHTML = toSafeHTML(readable(markdown));
  decorateCode(el, !streaming || markdown.length < 6000);
}

/**
 * chat.js: generating answers. One answer streams at a time; Stop aborts its fetch (the gateway
 * sees the closed request and cancels the generation). A 503 (overloaded, or the tree briefly
 * unavailable) is retried automatically after Retry-After, a few times, with linear backoff.
 *
 * The Chat owns no DOM: it changes the conversation objects, saves them through the Store and
 * tells app.js through callbacks (`changed()` for a full redraw, `delta()` for a streaming one).
 */

import { ApiError, streamChat } from "./api.js";
import { newId } from "./store.js";

const MAX_AUTO_RETRIES = 3;

export class Chat {
  /**
   * @param {import("./store.js").Store} store
   * @param {object} hooks {started(), changed(), delta(), serverState(ok), model() -> string}
   */
  constructor(store, hooks) {
    this.store = store;
    this.hooks = hooks;
    /** The answer being generated: {conv, msg, controller} or null. */
    this.active = null;
    /** A pending automatic retry: {conv, msg, timer, until} or null. */
    this.retry = null;
  }

  get busy() {
    return this.active !== null;
  }

  /** Seconds until `msg` is retried automatically, or null when no retry is pending for it. */
  retryIn(msg) {
    return this.retry?.msg === msg ? Math.max(0, (this.retry.until - Date.now()) / 1000) : null;
  }

  /** Starts a conversation (or continues the open one) with a user message. */
  send(text) {
    text = text.trim();
    if (!text || this.active) return false;
    const conv = this.store.current() ?? this.store.create(text);
    conv.messages.push({ role: "user", content: text });
    const msg = { role: "assistant", content: "" };
    conv.messages.push(msg);
    this.generate(conv, msg);
    return true;
  }

  /** Answers the last user message again (or for the first time, after a failure). */
  regenerate(conv) {
    if (this.active) return;
    const last = conv.messages.at(-1);
    if (last?.role === "assistant") {
      last.attempts = 0;
      this.generate(conv, last);
    } else if (last?.role === "user") {
      const msg = { role: "assistant", content: "" };
      conv.messages.push(msg);
      this.generate(conv, msg);
    }
  }

  /** Replaces user message `index` and everything after it, then answers it. */
  resend(conv, index, text) {
    text = text.trim();
    if (!text || this.active) return false;
    conv.messages.splice(index);
    conv.messages.push({ role: "user", content: text });
    const msg = { role: "assistant", content: "" };
    conv.messages.push(msg);
    this.generate(conv, msg);
    return true;
  }

  stop() {
    this.active?.controller.abort();
  }

  /** Stops whatever concerns conversation `id` (it is being deleted). */
  forget(id) {
    if (this.active?.conv.id === id) this.stop();
    if (this.retry?.conv.id === id) this.cancelRetry();
  }

  cancelRetry() {
    if (!this.retry) return;
    clearTimeout(this.retry.timer);
    this.retry = null;
    this.hooks.changed();
  }

  apiMessages(conv, upto) {
    const out = [];
    const sys = this.store.settings.systemPrompt.trim();
    if (sys) out.push({ role: "system", content: sys });
    for (const m of conv.messages.slice(0, upto)) {
      if (m.role === "assistant" && !m.content) continue; // failed answers carry no text
      out.push({ role: m.role, content: m.content });
    }
    return out;
  }

  /** Streams an answer into `msg` (the last message of `conv`). */
  async generate(conv, msg) {
    if (this.retry) {
      clearTimeout(this.retry.timer);
      this.retry = null;
    }
    const controller = new AbortController();
    this.active = { conv, msg, controller };
    conv.session ??= newId(); // a conversation kept before sessions existed gets one now
    Object.assign(msg, { content: "", pending: true, error: null, stats: null });
    this.store.save(conv);
    this.hooks.started?.();
    this.hooks.changed();

    const s = this.store.settings;
    const t0 = performance.now();
    let tFirst = null;
    let deltas = 0;
    let usage = null;
    let finish = null;
    let model = null;
    let stopped = false;
    try {
      await streamChat(
        {
          model: this.hooks.model(),
          session: conv.session,
          messages: this.apiMessages(conv, conv.messages.indexOf(msg)),
          temperature: s.temperature,
          max_tokens: s.maxTokens,
          apiKey: s.apiKey,
        },
        {
          onDelta: (text) => {
            if (tFirst == null) tFirst = performance.now();
            deltas += 1;
            msg.content += text;
            this.hooks.delta();
          },
          onFinish: (reason) => {
            finish = reason;
          },
          onUsage: (u) => {
            usage = u;
          },
          onModel: (name) => {
            model = name;
          },
        },
        controller.signal,
      );
      this.hooks.serverState(true);
    } catch (e) {
      if (e?.name === "AbortError") {
        stopped = true;
      } else {
        const err = e instanceof ApiError ? e : new ApiError(String(e?.message ?? e), { kind: "server" });
        msg.error = { kind: err.kind, message: err.message, code: err.code, status: err.status, retryAfter: err.retryAfter };
        if (err.kind === "network") this.hooks.serverState(false);
      }
    }

    const tEnd = performance.now();
    msg.pending = false;
    if (msg.content || usage) {
      const completion = usage?.completion_tokens ?? deltas;
      const genSeconds = tFirst != null ? (tEnd - tFirst) / 1000 : null;
      // Tokens after the first over the time since it arrived: the steady decode rate.
      const tps = genSeconds && completion > 1 ? (completion - 1) / genSeconds : null;
      msg.stats = {
        completion_tokens: completion,
        prompt_tokens: usage?.prompt_tokens ?? null,
        counted: !usage,
        tps,
        ttft: tFirst != null ? (tFirst - t0) / 1000 : null,
        seconds: (tEnd - t0) / 1000,
        finish,
        stopped,
        model,
      };
    }
    const retryable = msg.error?.kind === "overloaded" || msg.error?.kind === "unavailable";
    msg.attempts = retryable ? (msg.attempts ?? 0) + 1 : 0;
    this.active = null;
    this.store.save(conv);
    if (retryable && msg.attempts <= MAX_AUTO_RETRIES) this.scheduleRetry(conv, msg);
    this.hooks.changed();
  }

  scheduleRetry(conv, msg) {
    // Retry-After is the least we wait; each further attempt waits longer (linear backoff).
    const wait = Math.min(60, Math.max(1, msg.error.retryAfter ?? 2) * msg.attempts);
    const timer = setTimeout(() => {
      if (this.retry?.msg !== msg) return;
      this.retry = null;
      if (!this.active && conv.messages.at(-1) === msg && this.store.get(conv.id)) this.generate(conv, msg);
    }, wait * 1000);
    this.retry = { conv, msg, timer, until: Date.now() + wait * 1000 };
  }
}

/**
 * api.js: the page's only contact with the treechat HTTP gateway (same origin).
 *
 * Endpoints used: POST /v1/chat/completions (SSE stream), GET /v1/models, GET /v1/tree.
 * Every POST carries the `_xsrf` cookie's value in `X-XSRFToken` (the gateway sets the cookie on
 * `GET /`); an optional API key goes in `Authorization: Bearer ...`; a chat request carries its
 * conversation's session in `X-Session-Id`.
 */

/** An error the gateway (or the network) reported, normalised for the UI. */
export class ApiError extends Error {
  /**
   * @param {string} message  human-readable text (the server's own when it sent one)
   * @param {object} info     {status, code, type, retryAfter (seconds or null), kind}
   *   kind: "network" | "overloaded" | "unavailable" | "too_long" | "auth" | "model" | "timeout" |
 *         "server" | "stream"
   */
  constructor(message, info = {}) {
    super(message);
    this.name = "ApiError";
    this.status = info.status ?? 0;
    this.code = info.code ?? null;
    this.type = info.type ?? null;
    this.retryAfter = info.retryAfter ?? null;
    this.kind = info.kind ?? "server";
  }
}

function cookie(name) {
  for (const part of document.cookie.split(";")) {
    const [k, ...v] = part.trim().split("=");
    if (k === name) return decodeURIComponent(v.join("="));
  }
  return "";
}

function headers(apiKey, json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const xsrf = cookie("_xsrf");
  if (xsrf) h["X-XSRFToken"] = xsrf;
  if (apiKey) h["Authorization"] = `Bearer ${apiKey}`;
  return h;
}

function kindOf(status, code) {
  if (code === "context_length_exceeded") return "too_long";
  if (code === "overloaded") return "overloaded";
  if (status === 503) return "unavailable"; // root or nodes restarting, shutting down: retryable
  if (status === 401 || status === 403) return "auth";
  if (status === 404 || code === "model_not_found") return "model";
  if (status === 504 || code === "timeout") return "timeout";
  return "server";
}

/** Turns a non-2xx response into an ApiError, reading the OpenAI-style body when there is one. */
async function errorFrom(resp) {
  let body = null;
  try {
    body = await resp.json();
  } catch {
    /* not JSON: a proxy's page, an empty body */
  }
  const err = body?.error ?? {};
  const ra = Number.parseFloat(resp.headers.get("Retry-After") ?? "");
  const message = err.message || `${resp.status} ${resp.statusText || "error"}`;
  return new ApiError(message, {
    status: resp.status,
    code: err.code ?? null,
    type: err.type ?? null,
    retryAfter: Number.isFinite(ra) ? ra : null,
    kind: kindOf(resp.status, err.code),
  });
}

function networkError(e) {
  return new ApiError("Cannot reach the treechat server. Check that it is running.", {
    kind: "network",
    code: String(e?.message ?? ""),
  });
}

/**
 * A Server-Sent Events parser: feed it text as it arrives, get back complete events.
 * Events end at a blank line; `data:` lines of one event are joined with "\n"; lines starting
 * with ":" are comments (keep-alives). Handles \n, \r\n and \r line ends split across chunks.
 */
export class SSEParser {
  constructor() {
    this.buf = "";
    this.data = [];
  }

  /** @returns {string[]} the data payloads of the events completed by this text */
  push(text) {
    this.buf += text;
    const out = [];
    for (;;) {
      const m = /\r\n|\r|\n/.exec(this.buf);
      if (!m) break;
      // A lone "\r" at the very end may be the first half of "\r\n": wait for more text.
      if (m[0] === "\r" && m.index === this.buf.length - 1) break;
      const line = this.buf.slice(0, m.index);
      this.buf = this.buf.slice(m.index + m[0].length);
      this.line(line, out);
    }
    return out;
  }

  /** Flushes an event left without its closing blank line when the stream ends. */
  end() {
    const out = [];
    if (this.buf) this.line(this.buf, out);
    this.buf = "";
    this.line("", out);
    return out;
  }

  line(line, out) {
    if (line === "") {
      if (this.data.length) out.push(this.data.join("\n"));
      this.data = [];
      return;
    }
    if (line.startsWith(":")) return;
    const i = line.indexOf(":");
    const field = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? "" : line.slice(i + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "data") this.data.push(value);
  }
}

/**
 * Streams one chat completion.
 *
 * @param {object} req      {model, session, messages, temperature, max_tokens, apiKey}
 * @param {object} handlers {onDelta(text), onFinish(reason), onUsage(usage), onModel(name)}
 * @param {AbortSignal} signal  aborting it cancels the request (the gateway sees the close)
 * @returns {Promise<void>} resolves at `[DONE]` or end of stream; rejects with ApiError,
 *   or with a DOMException "AbortError" when stopped.
 */
export async function streamChat(req, handlers, signal) {
  const body = {
    messages: req.messages,
    stream: true,
    stream_options: { include_usage: true },
  };
  if (req.model) body.model = req.model; // none: the gateway's default model
  if (req.temperature != null) body.temperature = req.temperature;
  if (req.max_tokens != null) body.max_tokens = req.max_tokens;

  const sent = headers(req.apiKey);
  if (req.session) sent["X-Session-Id"] = req.session;
  let resp;
  try {
    resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: sent,
      body: JSON.stringify(body),
      signal,
      cache: "no-store",
    });
  } catch (e) {
    if (e?.name === "AbortError") throw e;
    throw networkError(e);
  }
  if (!resp.ok) throw await errorFrom(resp);

  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  const parser = new SSEParser();
  let openCall = false; // a streamed tool call whose text form is not closed yet
  let named = false; // the answering model was reported
  const handle = (payload) => {
    if (payload === "[DONE]") return true;
    let chunk;
    try {
      chunk = JSON.parse(payload);
    } catch {
      return false; // a garbled event is skipped, not fatal
    }
    if (chunk.error) {
      const e = chunk.error;
      throw new ApiError(e.message || "The server reported an error mid-answer.", {
        status: 0,
        code: e.code ?? null,
        type: e.type ?? null,
        kind: kindOf(0, e.code) === "server" ? "stream" : kindOf(0, e.code),
      });
    }
    if (chunk.model && !named) {
      named = true;
      handlers.onModel?.(chunk.model);
    }
    const choice = chunk.choices?.[0];
    if (choice?.delta?.content) handlers.onDelta?.(choice.delta.content);
    for (const call of choice?.delta?.tool_calls ?? []) {
      // Shown as the text form of a call (render.js draws it): the name first, then the
      // arguments as they stream; the block closes when the answer finishes.
      if (call.function?.name) {
        handlers.onDelta?.(`${openCall ? "}</tool_call>" : ""}\n<tool_call>{"name": ${JSON.stringify(call.function.name)}, "arguments": `);
        openCall = true;
      }
      if (call.function?.arguments) handlers.onDelta?.(call.function.arguments);
    }
    if (choice?.finish_reason && openCall) {
      handlers.onDelta?.("}</tool_call>");
      openCall = false;
    }
    if (choice?.finish_reason) handlers.onFinish?.(choice.finish_reason);
    if (chunk.usage) handlers.onUsage?.(chunk.usage);
    return false;
  };

  try {
    for (;;) {
      let step;
      try {
        step = await reader.read();
      } catch (e) {
        if (e?.name === "AbortError" || signal?.aborted) throw new DOMException("stopped", "AbortError");
        throw new ApiError("The connection to the server dropped mid-answer.", { kind: "network" });
      }
      const events = step.done ? parser.end() : parser.push(step.value);
      for (const ev of events) if (handle(ev)) return;
      if (step.done) return;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function getJSON(path, apiKey, signal) {
  let resp;
  try {
    resp = await fetch(path, { headers: headers(apiKey, false), signal, cache: "no-store" });
  } catch (e) {
    if (e?.name === "AbortError") throw e;
    throw networkError(e);
  }
  if (!resp.ok) throw await errorFrom(resp);
  return resp.json();
}

/** @returns {Promise<string[]>} model ids served by the tree */
export async function listModels(apiKey) {
  const body = await getJSON("/v1/models", apiKey);
  return (body.data ?? []).map((m) => m.id);
}

/** @returns {Promise<{root: object, nodes: object[]}>} */
export function getTree(apiKey, signal) {
  return getJSON("/v1/tree", apiKey, signal);
}

// Calls to this tide-vllm's own API, with the API key the user gave (kept in this tab's
// session storage), and the parsing of its server-sent events.

const KEY_ITEM = "tide-vllm.api-key";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.name = "ApiError";
    this.status = status;
  }
}

let keyRefused = () => {};

/** Called with (message, keyGiven) when a call is answered 401. */
export function onKeyRefused(listener) {
  keyRefused = listener;
}

export function apiKey() {
  return sessionStorage.getItem(KEY_ITEM) ?? "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
}

/** The Authorization header with the key, if there is one. */
export function authorization() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/**
 * fetch() of a path of this service (relative: the console may sit behind a path prefix),
 * with the key; a response that is not 2xx becomes an ApiError carrying the error's message.
 */
export async function call(path, { method = "GET", body, signal } = {}) {
  const headers = { Accept: "application/json", ...authorization() };
  const init = { method, headers, signal, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    const message = await errorMessage(response);
    if (response.status === 401) keyRefused(message, Boolean(apiKey()));
    throw new ApiError(response.status, message);
  }
  return response;
}

export async function getJSON(path, options) {
  return (await call(path, options)).json();
}

async function errorMessage(response) {
  const fallback = `HTTP ${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    const error = body?.error;
    if (typeof error === "string") return error;
    return error?.message ?? body?.detail ?? body?.status ?? fallback;
  } catch {
    return fallback;
  }
}

/**
 * The `data:` payloads of a server-sent event stream, one string per event, as they arrive.
 * UTF-8 is decoded in stream mode, so a character split across two reads stays whole.
 */
export async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      buffer = buffer.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = dataOf(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (data !== null) yield data;
      }
      if (done) {
        const data = dataOf(buffer);
        if (data !== null) yield data;
        return;
      }
    }
  } finally {
    reader.releaseLock();
  }
}

function dataOf(block) {
  const lines = block
    .split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5));
  return lines.length ? lines.join("\n") : null;
}

/** A DOM element: el("td", {class: "x"}, "text", child). Text is set as text, never as HTML. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === false || value === null || value === undefined) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.filter((child) => child !== null && child !== undefined));
  return node;
}

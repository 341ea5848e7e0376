// The chat playground: a conversation streamed through /v1/chat/completions.

import { ApiError, call, el, getJSON, sseData } from "./api.js";

const $ = (id) => document.getElementById(id);

export class Playground {
  constructor() {
    this.history = []; // the conversation so far, sent again with each new message
    this.controller = null; // the AbortController of the request under way
    this.models = $("model");
    this.system = $("system");
    this.temperature = $("temperature");
    this.maxTokens = $("max-tokens");
    this.prompt = $("prompt");
    this.messages = $("messages");
    this.send = $("send");
    this.stop = $("stop");
    this.lastStats = $("last-stats");

    $("composer").addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    this.prompt.addEventListener("keydown", (event) => {
      // Enter sends; Shift+Enter is a new line; Enter that ends an IME composition (Chinese,
      // Japanese input) only confirms the characters.
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        this.submit();
      }
    });
    this.stop.addEventListener("click", () => this.controller?.abort());
    $("clear").addEventListener("click", () => this.clear());
    this.temperature.addEventListener("input", () => {
      $("temperature-value").textContent = Number(this.temperature.value).toFixed(2);
    });
    $("temperature-value").textContent = Number(this.temperature.value).toFixed(2);
  }

  /** Fills the model list from /v1/models; throws ApiError (401 without a valid key). */
  async loadModels() {
    const listed = await getJSON("v1/models");
    const chosen = this.models.value;
    const ids = (listed.data ?? []).map((model) => model.id);
    this.models.replaceChildren(...ids.map((id) => el("option", { value: id }, id)));
    if (ids.includes(chosen)) this.models.value = chosen;
    return ids;
  }

  clear() {
    this.controller?.abort();
    this.history = [];
    this.messages.replaceChildren($("empty") ?? "");
    $("empty").hidden = false;
    this.lastStats.textContent = "–";
  }

  bubble(role, text) {
    $("empty").hidden = true;
    const body = el("div", { class: "text" }, text);
    const meta = el("div", { class: "meta" });
    const node = el(
      "div",
      { class: `message ${role}` },
      el("div", { class: "who" }, role),
      body,
      meta,
    );
    this.messages.append(node);
    this.scroll();
    return { node, body, meta };
  }

  scroll() {
    this.messages.scrollTop = this.messages.scrollHeight;
  }

  request() {
    const messages = [];
    const system = this.system.value.trim();
    if (system) messages.push({ role: "system", content: system });
    messages.push(...this.history);
    const body = {
      messages,
      temperature: Number(this.temperature.value),
      stream: true,
      stream_options: { include_usage: true },
    };
    if (this.models.value) body.model = this.models.value;
    const maxTokens = Number.parseInt(this.maxTokens.value, 10);
    if (Number.isInteger(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
    return body;
  }

  async submit() {
    const text = this.prompt.value.trim();
    if (!text || this.controller) return;
    this.prompt.value = "";
    this.bubble("user", text);
    this.history.push({ role: "user", content: text });
    const answer = this.bubble("assistant", "");
    answer.node.classList.add("streaming");
    const controller = (this.controller = new AbortController());
    this.send.disabled = true;
    this.stop.disabled = false;

    const started = performance.now();
    let firstToken = null;
    let content = "";
    let usage = null;
    let finish = null;
    let outcome = "done";
    try {
      const response = await call("v1/chat/completions", {
        method: "POST",
        body: this.request(),
        signal: controller.signal,
      });
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        const event = JSON.parse(data);
        if (event.error) throw new ApiError(event.error.code ?? 500, event.error.message);
        if (event.usage) usage = event.usage;
        const choice = event.choices?.[0];
        if (choice?.finish_reason) finish = choice.finish_reason;
        const delta = choice?.delta?.content;
        if (delta) {
          firstToken ??= performance.now();
          content += delta;
          answer.body.textContent = content;
          this.scroll();
        }
      }
    } catch (error) {
      if (controller.signal.aborted) {
        outcome = "stopped";
      } else {
        outcome = "error";
        answer.node.classList.add("error");
        answer.body.textContent = content
          ? `${content}\n\n${messageOf(error)}`
          : messageOf(error);
      }
    } finally {
      this.controller = null;
      this.send.disabled = false;
      this.stop.disabled = true;
      answer.node.classList.remove("streaming");
    }

    const elapsed = performance.now() - started;
    if (outcome === "error") {
      this.history.pop(); // the failed turn is not part of the conversation
      answer.meta.textContent = "error";
    } else {
      if (content) this.history.push({ role: "assistant", content });
      else if (outcome === "stopped") this.history.pop();
      answer.meta.textContent = summary({ usage, firstToken, started, elapsed, finish, outcome });
      answer.node.dataset.outcome = outcome;
    }
    this.lastStats.textContent = answer.meta.textContent;
    this.scroll();
    this.prompt.focus();
  }
}

function messageOf(error) {
  if (error instanceof ApiError) return `Error ${error.status}: ${error.message}`;
  return `Error: ${error?.message ?? error}`;
}

function summary({ usage, firstToken, started, elapsed, finish, outcome }) {
  const parts = [];
  if (outcome === "stopped") parts.push("stopped");
  if (firstToken !== null) parts.push(`TTFT ${Math.round(firstToken - started)} ms`);
  parts.push(`${(elapsed / 1000).toFixed(2)} s`);
  if (usage) {
    parts.push(
      `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion = ` +
        `${usage.total_tokens} tokens`,
    );
    if (firstToken !== null && usage.completion_tokens > 1) {
      const streaming = (started + elapsed - firstToken) / 1000;
      if (streaming > 0) {
        parts.push(`${((usage.completion_tokens - 1) / streaming).toFixed(1)} tokens/s`);
      }
    }
  }
  if (finish) parts.push(`finish: ${finish}`);
  return parts.join(" · ");
}

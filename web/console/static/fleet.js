// The fleet's status: each engine from /admin/engines (drain and resume buttons), and the
// chart of /admin/stats. Polled every POLL_MS while the view is shown.

import { ApiError, call, el, getJSON } from "./api.js";
import { drawChart } from "./chart.js";

const POLL_MS = 3000;
const $ = (id) => document.getElementById(id);

export class Fleet {
  constructor() {
    this.timer = null;
    this.ticker = null;
    this.running = false;
    this.stats = { interval: 5, samples: [] };
    this.rows = $("engines").tBodies[0];
    this.canvas = $("chart");
    window.addEventListener("resize", () => this.draw());
  }

  start() {
    if (this.running) return;
    this.running = true;
    this.poll();
    // The elapsed time of a starting (or restarting) engine moves between polls.
    this.ticker = setInterval(() => this.tick(), 1000);
  }

  stop() {
    this.running = false;
    clearTimeout(this.timer);
    clearInterval(this.ticker);
  }

  async poll() {
    clearTimeout(this.timer);
    await this.refresh();
    if (this.running) this.timer = setTimeout(() => this.poll(), POLL_MS);
  }

  async refresh() {
    await Promise.all([this.refreshEngines(), this.refreshStats()]);
  }

  async refreshEngines() {
    const error = $("fleet-error");
    try {
      const fleet = await getJSON("admin/engines");
      error.textContent = "";
      $("policy").textContent = fleet.policy ? `· routing: ${fleet.policy}` : "";
      this.render(fleet.engines ?? []);
      $("fleet-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (failure) {
      error.textContent =
        failure instanceof ApiError && failure.status === 404
          ? "This tide-vllm has no /admin/engines: it cannot show its engines."
          : `The engines could not be read: ${failure.message}`;
    }
  }

  async refreshStats() {
    try {
      this.stats = await getJSON("admin/stats");
    } catch {
      return; // the engines' error line says enough; the chart keeps its last data
    }
    this.draw();
  }

  draw() {
    const { samples, interval } = this.stats;
    if (this.canvas.clientWidth) drawChart(this.canvas, samples, { interval });
    const last = samples[samples.length - 1];
    $("now-rps").textContent = last ? last.requests_per_s.toFixed(2) : "–";
    $("now-ttft").textContent =
      last && last.ttft_p50_ms !== null ? `${Math.round(last.ttft_p50_ms)} ms` : "–";
  }

  render(engines) {
    const now = performance.now();
    this.rows.replaceChildren(...engines.map((engine) => this.row(engine, now)));
  }

  row(engine, now) {
    const state = engine.state ?? "unknown";
    const stateCell = el("span", { class: `state ${state}`, "data-state": state }, state);
    if (state === "starting" || state === "restarting") {
      stateCell.dataset.since = String(now - (engine.state_seconds ?? 0) * 1000);
      stateCell.textContent = `${state} · ${duration(engine.state_seconds ?? 0)}`;
    }
    const running = engine.requests_in_flight ?? 0;
    const waiting = engine.waiting;
    const load = running + (typeof waiting === "number" ? waiting : 0);
    const loadText =
      typeof waiting === "number" ? `${running} running · ${formatCount(waiting)} waiting` : `${running}`;
    const bar = el("span"); // (CSSOM, not a style attribute, which the page's policy forbids)
    bar.style.width = `${Math.min(100, load * 10)}%`;
    const action = engine.draining
      ? el("button", { class: "small ghost", onclick: () => this.act(engine.name, "resume") }, "Resume")
      : el("button", { class: "small ghost", onclick: () => this.act(engine.name, "drain") }, "Drain");
    const row = el(
      "tr",
      { "data-engine": engine.name },
      el(
        "td",
        {},
        el("div", { class: "name" }, engine.name),
        el("div", { class: "sub" }, [engine.model, engine.base_url].filter(Boolean).join(" · ")),
      ),
      el(
        "td",
        { class: "state-cell" },
        stateCell,
        engine.detail ? el("div", { class: "sub" }, engine.detail) : null,
      ),
      el(
        "td",
        { class: "load", "data-load": load },
        loadText,
        el("div", { class: "bar" }, bar),
      ),
      el(
        "td",
        { class: "in-flight" },
        `${running} ${running === 1 ? "request" : "requests"}`,
        el("div", { class: "sub" }, `${formatCount(engine.tokens_in_flight ?? 0)} tokens`),
      ),
      el("td", { class: "restarts" }, String(engine.restarts ?? 0)),
      el("td", { class: "hit-rate" }, percent(engine.prefix_cache_hit_rate)),
      el("td", { class: "kv" }, percent(engine.kv_cache_usage)),
      el("td", { class: "actions" }, action),
    );
    return row;
  }

  tick() {
    const now = performance.now();
    for (const cell of this.rows.querySelectorAll("[data-since]")) {
      const seconds = (now - Number(cell.dataset.since)) / 1000;
      cell.textContent = `${cell.dataset.state} · ${duration(seconds)}`;
    }
  }

  async act(name, action) {
    const error = $("fleet-error");
    try {
      await call(`admin/engines/${encodeURIComponent(name)}/${action}`, { method: "POST" });
      error.textContent = "";
    } catch (failure) {
      error.textContent = `${action} ${name}: ${failure.message}`;
    }
    await this.refreshEngines();
  }
}

function duration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

function percent(value) {
  return typeof value === "number" ? `${(value * 100).toFixed(1)} %` : "–";
}

function formatCount(value) {
  return Number.isInteger(value) ? value.toLocaleString("en") : value.toFixed(1);
}

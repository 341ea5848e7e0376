// A small two-series line chart on a <canvas>: requests/s (left axis) and TTFT p50 in ms
// (right axis) over the last `span` seconds. No library: a few lines of 2D drawing.

const RPS = "#1f6feb";
const TTFT = "#e36209";
const GRID = "#e3e7ee";
const LABEL = "#667085";
const FONT = '11px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif';

/** A round upper bound for an axis whose largest value is `value`. */
function niceMax(value, floor) {
  const top = Math.max(value, floor);
  const magnitude = 10 ** Math.floor(Math.log10(top));
  for (const step of [1, 2, 2.5, 5, 10]) {
    if (top <= step * magnitude) return step * magnitude;
  }
  return 10 * magnitude;
}

function formatNumber(value) {
  if (value >= 100) return value.toFixed(0);
  if (value >= 10) return value.toFixed(1).replace(/\.0$/, "");
  return value.toFixed(2).replace(/\.?0+$/, "") || "0";
}

/**
 * Draws `samples` ({t, requests_per_s, ttft_p50_ms}, oldest first, t in unix seconds) ending
 * at `now`; a gap of more than two intervals (or a null TTFT) breaks the line.
 */
export function drawChart(canvas, samples, { interval = 5, span = 600, now = Date.now() / 1000 }) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const g = canvas.getContext("2d");
  g.setTransform(ratio, 0, 0, ratio, 0, 0);
  g.clearRect(0, 0, width, height);
  g.font = FONT;

  const pad = { left: 44, right: 52, top: 10, bottom: 22 };
  const plotW = width - pad.left - pad.right;
  const plotH = height - pad.top - pad.bottom;
  const start = now - span;
  const rpsMax = niceMax(Math.max(0, ...samples.map((s) => s.requests_per_s)), 1);
  const ttfts = samples.map((s) => s.ttft_p50_ms).filter((v) => v !== null);
  const ttftMax = niceMax(Math.max(0, ...ttfts), 10);
  const x = (t) => pad.left + ((t - start) / span) * plotW;
  const yRps = (v) => pad.top + plotH - (v / rpsMax) * plotH;
  const yTtft = (v) => pad.top + plotH - (v / ttftMax) * plotH;

  // Grid and axes' labels.
  g.strokeStyle = GRID;
  g.lineWidth = 1;
  g.textBaseline = "middle";
  for (let i = 0; i <= 4; i += 1) {
    const y = Math.round(pad.top + (plotH * i) / 4) + 0.5;
    g.beginPath();
    g.moveTo(pad.left, y);
    g.lineTo(pad.left + plotW, y);
    g.stroke();
    g.fillStyle = RPS;
    g.textAlign = "right";
    g.fillText(formatNumber(rpsMax * (1 - i / 4)), pad.left - 6, y);
    g.fillStyle = TTFT;
    g.textAlign = "left";
    g.fillText(`${formatNumber(ttftMax * (1 - i / 4))} ms`, pad.left + plotW + 6, y);
  }
  g.fillStyle = LABEL;
  g.textBaseline = "top";
  for (const minutes of [10, 8, 6, 4, 2, 0]) {
    const t = now - minutes * 60;
    g.textAlign = minutes === 10 ? "left" : minutes === 0 ? "right" : "center";
    g.fillText(minutes ? `-${minutes} min` : "now", x(t), pad.top + plotH + 6);
  }

  const visible = samples.filter((s) => s.t >= start - interval && s.t <= now + interval);
  g.save();
  g.beginPath();
  g.rect(pad.left, pad.top, plotW, plotH);
  g.clip();
  // Requests/s: a line over a light area.
  for (const segment of segments(visible, (s) => s.requests_per_s, interval)) {
    g.beginPath();
    g.moveTo(x(segment[0].t), yRps(0));
    for (const s of segment) g.lineTo(x(s.t), yRps(s.requests_per_s));
    g.lineTo(x(segment[segment.length - 1].t), yRps(0));
    g.closePath();
    g.fillStyle = "rgba(31, 111, 235, 0.10)";
    g.fill();
    line(g, segment, (s) => [x(s.t), yRps(s.requests_per_s)], RPS);
  }
  for (const segment of segments(visible, (s) => s.ttft_p50_ms, interval)) {
    line(g, segment, (s) => [x(s.t), yTtft(s.ttft_p50_ms)], TTFT);
  }
  g.restore();
  canvas.dataset.samples = String(samples.length);
}

function line(g, segment, point, colour) {
  g.beginPath();
  segment.forEach((s, i) => {
    const [px, py] = point(s);
    if (i === 0) g.moveTo(px, py);
    else g.lineTo(px, py);
  });
  if (segment.length === 1) {
    const [px, py] = point(segment[0]);
    g.moveTo(px - 2, py);
    g.lineTo(px + 2, py);
  }
  g.strokeStyle = colour;
  g.lineWidth = 2;
  g.lineJoin = "round";
  g.stroke();
}

/** Runs of consecutive samples with a value, split where a value is missing or time skips. */
function segments(samples, value, interval) {
  const runs = [];
  let run = [];
  let last = null;
  for (const s of samples) {
    const v = value(s);
    if (v === null || v === undefined || (last !== null && s.t - last > 2.5 * interval)) {
      if (run.length) runs.push(run);
      run = [];
    }
    if (v !== null && v !== undefined) run.push(s);
    last = s.t;
  }
  if (run.length) runs.push(run);
  return runs;
}

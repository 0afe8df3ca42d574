// Line charts as inline SVG (no chart library: nothing to download, nothing to build).

const NS = "http://www.w3.org/2000/svg";
const COLORS = ["#2563eb", "#db2777", "#059669", "#d97706", "#7c3aed", "#0891b2"];

function svg(tag, attrs, text) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

// Round tick values between lo and hi, and a formatter with as many decimals as their spacing needs.
function ticks(lo, hi, n = 4, integer = false) {
  if (!(hi > lo)) return { values: [lo], fmt: (v) => String(+v.toPrecision(4)) };
  const raw = (hi - lo) / n, mag = 10 ** Math.floor(Math.log10(raw));
  let step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  if (integer) step = Math.max(1, Math.round(step));
  const values = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) values.push(+v.toPrecision(12));
  const decimals = Math.max(0, -Math.floor(Math.log10(step) + 1e-9));
  const big = Math.max(...values.map(Math.abs)) >= 1e5;
  return { values, fmt: (v) => (big || decimals > 5 ? v.toExponential(1) : v.toFixed(decimals)) };
}

// series: [{name, points: [[x, y], ...]}]; opts: {title, threshold, yMin, yMax, xLabel, height}
export function lineChart(series, opts = {}) {
  const W = opts.width || 560, H = opts.height || 230, L = 56, R = 14, T = opts.legend === false ? 26 : 40, B = 30;
  const pts = series.flatMap((s) => s.points).filter(([x, y]) => isFinite(x) && isFinite(y));
  const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": opts.title || "chart" });
  root.append(svg("text", { x: L, y: 16, class: "chart-title" }, opts.title || ""));
  if (!pts.length) {
    root.append(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "chart-empty" }, opts.empty || "no data yet"));
    return root;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let ys = pts.map((p) => p[1]);
  if (opts.threshold !== undefined && opts.threshold !== null) ys = ys.concat([opts.threshold]);
  let y0 = opts.yMin ?? Math.min(...ys), y1 = opts.yMax ?? Math.max(...ys);
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.05 || 0.5; y1 += Math.abs(y1) * 0.05 || 0.5; }
  const pad = (y1 - y0) * 0.06; y0 -= pad; y1 += pad;
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const yt = ticks(y0, y1), xt = ticks(x0, x1, 5, opts.xInteger);
  for (const v of yt.values) {
    root.append(svg("line", { x1: L, x2: W - R, y1: sy(v), y2: sy(v), class: "grid" }));
    root.append(svg("text", { x: L - 6, y: sy(v) + 4, "text-anchor": "end", class: "tick" }, yt.fmt(v)));
  }
  for (const v of xt.values) {
    root.append(svg("text", { x: sx(v), y: H - 10, "text-anchor": "middle", class: "tick" }, xt.fmt(v)));
  }
  root.append(svg("text", { x: L - 6, y: H - 10, "text-anchor": "end", class: "tick axis" }, opts.xLabel || "step"));
  if (opts.threshold !== undefined && opts.threshold !== null) {
    root.append(svg("line", { x1: L, x2: W - R, y1: sy(opts.threshold), y2: sy(opts.threshold), class: "threshold" }));
    root.append(svg("text", { x: W - R - 4, y: sy(opts.threshold) - 4, "text-anchor": "end", class: "tick alarm" },
      `alarm < ${opts.threshold}`));
  }
  series.forEach((s, i) => {
    const good = s.points.filter(([x, y]) => isFinite(x) && isFinite(y));
    if (!good.length) return;
    const color = s.color || COLORS[i % COLORS.length];
    const d = good.map(([x, y], j) => `${j ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    root.append(svg("path", { d, fill: "none", stroke: color, "stroke-width": s.width || 1.6, class: "series" }));
    if (good.length < 40) {
      for (const [x, y] of good) root.append(svg("circle", { cx: sx(x), cy: sy(y), r: 2.6, fill: color }));
    }
    if (opts.legend === false) return;
    const lx = L + i * 96;
    root.append(svg("rect", { x: lx, y: 26, width: 12, height: 3, fill: color }));
    root.append(svg("text", { x: lx + 16, y: 31, class: "legend" }, s.name));
  });
  return root;
}

// Few-step health and its parts, each on a small chart of its own: on one shared axis the lines (scores near 1 on
// different scales) overlap and hide each other. The health chart carries the alarm threshold.
const HEALTH_PARTS = [
  ["health", "few-step health (1 = as the starting model)"],
  ["sharpness", "sharpness vs start (two-sided)"],
  ["gap", "few-step vs many-step gap score"],
  ["quality", "decoded quality vs start"],
  ["structure", "image-scale structure vs start"],
];

export function healthCharts(health) {
  const recs = (health && health.records) || [];
  const present = HEALTH_PARTS.filter(([k]) => recs.some((r) => typeof r[k] === "number"));
  const box = document.createElement("div");
  box.className = "charts-small";
  if (!present.length) {
    box.append(lineChart([], { title: HEALTH_PARTS[0][1], empty: "measured at each sampling interval" }));
    return box;
  }
  present.forEach(([key, title], i) => {
    const main = key === "health";
    const chart = lineChart([{ name: key, points: recs.map((r) => [r.step, r[key]]), color: COLORS[i % COLORS.length], width: 2 }], {
      title, width: main ? 560 : 300, height: main ? 200 : 170, xInteger: true,
      threshold: main ? health.threshold : undefined, legend: false,
    });
    chart.dataset.measure = key;
    if (main) chart.classList.add("chart-wide");
    box.append(chart);
  });
  return box;
}

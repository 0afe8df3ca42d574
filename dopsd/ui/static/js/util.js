// Small helpers shared by every page: DOM building (text is always inserted as text, never as HTML),
// the API client, notifications, formatting and parts of a page that only re-render when their data changed.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (["value", "checked", "disabled", "selected", "multiple", "open"].includes(k)) el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const c of [children].flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export async function api(path, { method = "GET", body, form } = {}) {
  const opts = { method, headers: { "X-Dopsd-Request": "1" }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  if (form) opts.body = form;
  const response = await fetch(path, opts);
  // The secret is per launch: after a restart the old cookie opens nothing; the page at / asks for the new one.
  if (response.status === 401) window.location.assign("/");
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const err = new Error(data.error || `${response.status} ${response.statusText}`);
    err.data = data;
    err.status = response.status;
    throw err;
  }
  return data;
}

export function notify(message, kind = "info") {
  const box = document.getElementById("notices");
  const item = h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, message);
  item.addEventListener("click", () => item.remove());
  box.append(item);
  setTimeout(() => item.remove(), kind === "error" ? 12000 : 5000);
}

// Run an action from a button: disable it meanwhile, report errors as notices.
export async function act(button, fn) {
  if (button) button.disabled = true;
  try {
    return await fn();
  } catch (err) {
    notify(err.message, "error");
    return undefined;
  } finally {
    if (button) button.disabled = false;
  }
}

export function fmtTime(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  seconds = Math.round(seconds);
  if (seconds < 60) return `${seconds} s`;
  const m = Math.floor(seconds / 60), s = seconds % 60;
  if (m < 60) return `${m} min ${String(s).padStart(2, "0")} s`;
  return `${Math.floor(m / 60)} h ${String(m % 60).padStart(2, "0")} min`;
}

export function fmtDate(t) {
  if (!t) return "–";
  const d = new Date(t * 1000);
  return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function fmtNum(v, digits = 4) {
  if (v === null || v === undefined) return "–";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return String(v);
  return Math.abs(v) >= 1000 || Math.abs(v) < 0.001 ? v.toExponential(2) : v.toPrecision(digits);
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

const STATUS_KIND = {
  ok: "good", succeeded: "good", carries: "good", running: "busy", starting: "busy", stopping: "busy",
  queued: "wait", weak: "warn", unhealthy: "warn", stopped: "warn", cancelled: "muted", empty: "muted",
  failed: "bad", aborted: "bad", lost: "bad", fails: "bad",
};

export function badge(status) {
  return h("span", { class: `badge ${STATUS_KIND[status] || "muted"}`, "data-status": status }, status || "–");
}

export function progressBar(step, max) {
  const frac = max ? Math.min(1, (step || 0) / max) : 0;
  return h("div", { class: "progress", title: `${step || 0} / ${max || "?"}` },
    h("div", { class: "bar", style: `width:${(frac * 100).toFixed(1)}%` }));
}

// Parts of a page that keep their DOM (images, open <details>, caret) while polling returns the same data.
export class Parts {
  // order: keys whose places on the page are fixed up front (a part that appears later still lands in its place)
  constructor(root, order = []) {
    this.root = root;
    this.parts = new Map();
    for (const key of order) this.parts.set(key, { json: undefined, el: root.appendChild(h("div", { class: "part", "data-part": key })) });
  }
  set(key, data, render) {
    const json = JSON.stringify(data);
    let part = this.parts.get(key);
    if (!part) {
      part = { json: null, el: h("div", { class: "part", "data-part": key }) };
      this.parts.set(key, part);
      this.root.append(part.el);
    }
    if (part.json !== json) {
      part.json = json;
      const open = new Set([...part.el.querySelectorAll("details[open]")].map((d) => d.dataset.key));
      clear(part.el);
      append(part.el, render(data));
      part.el.querySelectorAll("details").forEach((d) => { if (open.has(d.dataset.key)) d.open = true; });
    }
    return part.el;
  }
}

export function field(label, input, help) {
  return h("label", { class: "field" }, h("span", { class: "label" }, label), input,
    help ? h("span", { class: "help" }, help) : null);
}

export function card(title, ...children) {
  return h("section", { class: "card" }, title ? h("h2", {}, title) : null, ...children);
}

export function details(key, summary, ...children) {
  return h("details", { dataset: { key } }, h("summary", {}, summary), ...children);
}

export function logBox(text) {
  return h("pre", { class: "log" }, text || "(no output yet)");
}

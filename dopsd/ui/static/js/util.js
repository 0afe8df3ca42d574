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
  const item = h("div", { class: `notice ${kind}`, role: kind === "error" ? "alert" : "status" }, h("span", {}, message),
    h("button", { class: "notice-close", "aria-label": "dismiss this message", onclick: () => item.remove() }, "×"));
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

let fieldIds = 0;

// A labelled control. A group of controls (radios) gets a group named by its label instead of a <label>: a label
// around several inputs would activate the first one when its text is clicked.
export function field(label, input, help) {
  const helpEl = help ? h("span", { class: "help" }, help) : null;
  if (input instanceof Element && input.getAttribute("role") === "radiogroup") {
    const id = `field-label-${++fieldIds}`;
    input.setAttribute("aria-labelledby", id);
    return h("div", { class: "field", role: "group" }, h("span", { class: "label", id }, label), input, helpEl);
  }
  return h("label", { class: "field" }, h("span", { class: "label" }, label), input, helpEl);
}

// A <form>: Enter in any of its inputs submits it (the browser's own behaviour), and submitting runs `onSubmit`
// instead of loading a page. Its submit button is the one with type "submit" (the default for a <button>).
export function form(attrs, onSubmit, ...children) {
  const el = h("form", { ...attrs, novalidate: true }, ...children);
  el.addEventListener("submit", (e) => {
    e.preventDefault();
    onSubmit(e.submitter || el.querySelector("button[type=submit], button:not([type])"));
  });
  return el;
}

// --- values with their units: summaries and plans read as numbers people use, not raw floats --------------------
const SI = [[1e12, "T"], [1e9, "B"], [1e6, "M"], [1e3, "k"]];

function round(v, digits = 3) {
  if (Number.isInteger(v)) return Math.abs(v) >= 1e4 ? v.toLocaleString("en-US") : String(v);
  if (v === 0) return "0";
  if (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e6) return v.toExponential(2);
  return String(Number(v.toPrecision(digits)));
}

export function fmtValue(key, v) {
  if (v === null || v === undefined) return "–";
  if (typeof v === "boolean") return v ? "yes" : "no";
  if (Array.isArray(v)) {
    if (!v.every((x) => x === null || typeof x !== "object")) return JSON.stringify(v);
    return v.map((x) => fmtValue(key, x)).join(/resolution|size|shape/.test(key) ? " × " : ", ");
  }
  if (typeof v !== "number") return String(v);
  const k = key.split(".").pop().toLowerCase();
  if (/(^|_)gi?b$/.test(k)) return `${v.toFixed(v < 10 ? 2 : 1)} ${k.endsWith("gib") ? "GiB" : "GB"}`;
  if (/(^|_)mi?b$/.test(k)) return `${v.toFixed(v < 10 ? 1 : 0)} ${k.endsWith("mib") ? "MiB" : "MB"}`;
  if (/bytes$/.test(k)) return fmtBytes(v);
  if (/(^|_)(seconds|secs|s|time|elapsed|duration)$|^seconds_/.test(k)) return fmtTime(v);
  if (/(^|_)ms$/.test(k)) return `${round(v)} ms`;
  if (/tflops/.test(k)) return `${round(v)} TFLOP`;
  if (/^(lr|learning_rate)$|(_|^)lr$/.test(k)) return v.toExponential(1);
  if (/(^|_)(frac|fraction|rate|share)$/.test(k) && v >= 0 && v <= 1) return `${round(100 * v, 3)} %`;
  if (Number.isInteger(v) && Math.abs(v) >= 1e6) {
    const [div, unit] = SI.find(([d]) => Math.abs(v) >= d);
    return `${Number((v / div).toPrecision(3))} ${unit}`;
  }
  return round(v);
}

// A nested object as a two-column table: nested objects become headed sections, values carry their units; a
// dictionary of yes/no answers (e.g. "fits" per GPU size) reads as one line.
export function kvTable(obj, { id } = {}) {
  const rows = [];
  const walk = (o, prefix, depth) => {
    for (const [k, v] of Object.entries(o || {})) {
      const name = `${prefix}${k}`;
      if (v && typeof v === "object" && !Array.isArray(v)) {
        const values = Object.values(v);
        if (values.length && values.every((x) => typeof x === "boolean")) {
          rows.push(h("tr", {}, h("th", {}, name),
            h("td", {}, Object.entries(v).map(([kk, x]) => `${kk}${/^\d+$/.test(kk) ? " GB" : ""} ${x ? "✓" : "✗"}`).join(" · "))));
        } else if (depth === 0) {
          rows.push(h("tr", { class: "kv-section" }, h("th", { colspan: 2 }, name)));
          walk(v, "", depth + 1);
        } else {
          walk(v, `${name}.`, depth + 1);
        }
      } else {
        rows.push(h("tr", {}, h("th", {}, name), h("td", { title: typeof v === "number" ? String(v) : null }, fmtValue(name, v))));
      }
    }
  };
  walk(obj, "", 0);
  return h("table", { class: "table kv", id }, h("tbody", {}, rows));
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

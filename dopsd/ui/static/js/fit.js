// "Will it fit?" on the New-run form: one line per card size for the chosen method (fits / does not, and the
// fewest changes that would make it fit, from the planner's search), the breakdown behind a disclosure.
//
// One request at a time: each ask() supersedes the one before (the server kills the plan process of a
// superseded request); answers are matched to the latest request's id, so a late answer for older settings is
// never shown. The same settings again are answered at once from the server's kept answers.

import { api, clear, details, h } from "./util.js";

// Sizes in GB (2^30 bytes, as cards are sized), one decimal; the miniature's few MB in MB.
export function fmtGB(gb) {
  if (gb === null || gb === undefined || !isFinite(gb)) return "–";
  if (gb < 1) {
    const mb = Math.max(0.1, gb * 1024);
    return `${mb.toFixed(mb < 10 ? 1 : 0)} MB`;
  }
  return `${gb >= 100 ? gb.toFixed(0) : Number(gb.toFixed(1))} GB`;
}

function cardLine(c, run, context) {
  const li = (fits, ...rest) => h("li", { "data-card": c.card, "data-fits": fits }, h("strong", {}, `${c.card} GB`), ": ", ...rest);
  const needs = `${fmtGB(run)} + ${fmtGB(context)} CUDA context`;
  if (c.fits) return li("yes", `fits (run peak ${needs})`);
  if (c.changes === undefined) return li("no", `does not fit as set (${needs}); looking for a setting that fits…`);
  if (c.changes && c.auto) return li("with-changes", `fits: gradient checkpointing (auto) turns on here (${fmtGB(c.peak_gb)})`);
  if (c.changes) {
    return li("with-changes", `does not fit as set (${needs}); fits with `, h("code", { class: "fit-change" }, c.changes.join(" ")),
      ` (${fmtGB(c.peak_gb)})`);
  }
  return li("no", `does not fit (${needs}); ${c.reason || "no setting found"}`);
}

function render(r) {
  const a = r.answer;
  const state = r.status === "running" ? "running" : r.status;
  const box = h("div", { id: "fit", "data-request": r.id, "data-state": state });
  if (r.status === "error") return add(box, h("pre", { class: "log small", id: "fit-error" }, r.error));
  if (!a) {
    return add(box, h("p", { class: "muted" }, `planning on fake tensors (no weights needed)… ${Math.round(r.elapsed || 0)} s`));
  }
  const run = a.peaks_gb.run;
  const cards = Object.values(a.cards).sort((x, y) => x.card - y.card);
  add(box,
    h("p", { class: "fit-head" }, h("strong", {}, a.model), ` · ${a.method}`,
      a.planned_as !== a.method ? ` (planned as ${a.planned_as})` : "", ` · ${a.settings}`),
    h("ul", { class: "fit-cards", id: "fit-cards" }, cards.map((c) => cardLine(c, run, a.context_gb))),
    details("fit-breakdown", "Where the memory goes",
      h("table", { class: "table kv", id: "fit-breakdown" }, h("tbody", {},
        a.breakdown_gb.map(([label, v]) => h("tr", {}, h("th", {}, label), h("td", {}, fmtGB(v)))),
        h("tr", {}, h("th", {}, "training peak"), h("td", {}, fmtGB(a.peaks_gb.training))),
        h("tr", {}, h("th", {}, "feature caching peak (before training)"), h("td", {}, fmtGB(a.peaks_gb.caching))),
        h("tr", {}, h("th", {}, "sampling peak (grids, health)"), h("td", {}, fmtGB(a.peaks_gb.sampling))),
        h("tr", {}, h("th", {}, "run peak (the largest)"), h("td", {}, fmtGB(run))))),
      h("p", { class: "muted small" }, `Predicted on this CPU with fake tensors (dopsd plan), for one GPU; a card fits when the run peak plus ${fmtGB(a.context_gb)} for the CUDA context does. GB = 2³⁰ bytes.`)),
    r.status === "running" ? h("p", { class: "muted small" }, "searching for settings that fit…")
      : h("p", { class: "muted small" }, r.cached ? "(kept answer for these settings)" : `(${a.seconds ?? "?"} s)`));
  return box;
}

function add(el, ...children) {
  for (const c of children.flat()) if (c) el.append(c);
  return el;
}

// The panel in `box`. ask(body) with the form's request; hold(text) when no estimate can be asked for.
export function fitPanel(box, app) {
  let seq = 0;
  let latest = null;
  const generation = app.generation;
  const show = (r) => clear(box).append(render(r));

  async function poll(id, mine) {
    while (mine === seq) {
      await new Promise((resolve) => setTimeout(resolve, 1000));
      if (mine !== seq) return;
      if (app.generation !== generation) {  // the page changed: its plan is for nobody
        api("/api/fit/cancel", { method: "POST", body: { id } }).catch(() => {});
        return;
      }
      let r;
      try {
        r = await api(`/api/fit/${encodeURIComponent(id)}`);
      } catch (err) {
        if (mine === seq) clear(box).append(h("p", { class: "muted" }, err.message));
        return;
      }
      if (mine !== seq || r.id !== latest) return;
      show(r);
      if (r.status !== "running") return;
    }
  }

  return {
    async ask(body) {
      const mine = ++seq;
      let r;
      try {
        r = await api("/api/fit", { method: "POST", body });
      } catch (err) {
        if (mine === seq) clear(box).append(h("p", { class: "muted", id: "fit-error" }, err.message));
        return;
      }
      if (mine !== seq || !r.available) return;  // a newer request was made meanwhile
      latest = r.id;
      show(r);
      if (r.status === "running") poll(r.id, mine);
    },
    hold(text) {
      seq++;
      latest = null;
      clear(box).append(h("p", { class: "muted" }, text));
    },
  };
}

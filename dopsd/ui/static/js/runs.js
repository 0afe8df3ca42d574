// Runs: the list, and one run live — progress and ETA, the loss curve, few-step health with its alarm, the done
// signal, the latest sample grids at few and many steps, stop / resume, exports, summary, the command's output.

import { healthCharts, lineChart } from "./charts.js";
import { samplesCard } from "./gallery.js";
import { checkpointsCard, failureCard, runActions } from "./runstate.js";
import { runButtons } from "./queue.js";
import { act, api, badge, card, details, fmtBytes, fmtDate, fmtNum, fmtTime, h, kvTable, logBox, Parts, progressBar } from "./util.js";

const LIVE = ["running", "starting", "queued", "stopping"];

export async function runsPage(main, _params, app) {
  const parts = new Parts(main);
  const selected = new Set();
  const compare = h("button", { id: "compare-selected", disabled: true, onclick: () => {
    location.hash = `#/compare?runs=${[...selected].map(encodeURIComponent).join(",")}`;
  } }, "Compare selected");
  main.prepend(h("div", { class: "page-head" }, h("h1", {}, "Runs"),
    h("div", { class: "row" }, compare, h("a", { class: "button primary", href: "#/new" }, "New run"))));
  async function load() {
    const data = await api("/api/runs");
    parts.set("list", data.runs, (list) => list.length ? h("table", { class: "table", id: "runs-table" },
      h("thead", {}, h("tr", {}, ["", "run", "status", "method", "model", "progress", "loss", "changed", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, list.map((r) => h("tr", { "data-run": r.name },
        h("td", {}, r.has_lora ? h("input", { type: "checkbox", "aria-label": `compare ${r.name}`, checked: selected.has(r.name), onchange: (e) => {
          if (e.target.checked) selected.add(r.name); else selected.delete(r.name);
          compare.disabled = !selected.size;
        } }) : null),
        h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(r.name)}` }, r.name)), h("td", {}, badge(r.status)),
        h("td", {}, r.method || "–"), h("td", {}, r.family || "–"),
        h("td", { class: "progress-cell" }, progressBar(r.step, r.max_steps), h("span", { class: "muted" }, ` ${r.step ?? 0}/${r.max_steps ?? "?"}`)),
        h("td", {}, fmtNum(r.loss)), h("td", {}, fmtDate(r.modified)),
        h("td", { class: "row-actions" }, runButtons(r.name, r.actions, load, { small: true }))))))
      : h("p", {}, "No runs yet. ", h("a", { href: "#/datasets" }, "Try the miniature"), " or start a ", h("a", { href: "#/new" }, "new run"), "."));
  }
  await load();
  app.every(2000, load);
}

export async function runPage(main, params, app) {
  const name = params.name;
  const parts = new Parts(main, ["head", "manage", "failure", "alarm", "progress", "charts", "done", "samples", "exports", "checkpoints", "summary", "log", "config"]);
  async function load() {
    const r = await api(`/api/runs/${encodeURIComponent(name)}`);
    parts.set("head", [r.status, r.resumable, r.files, r.job && r.job.status, r.config && r.config.method], () => head(r));
    parts.set("failure", [r.failure, r.status, r.resumable], () => failureCard(r));
    const can = await api(`/api/runs/${encodeURIComponent(name)}/actions`);  // retry, delete, clone (queue.js)
    parts.set("manage", can, (a) => h("div", { class: "row run-manage" }, runButtons(name, a, async (deleted) => {
      if (deleted) location.hash = "#/runs"; else await load();
    }, { cancelButton: false })));
    parts.set("checkpoints", [r.checkpoint_files, r.status, r.resumable], () => checkpointsCard(name, r));
    if (r.progress) parts.set("progress", [r.status, r.progress], () => progressCard(r));
    if (r.health) parts.set("alarm", r.health.warning, (w) => w ? h("div", { class: "alarm", id: "health-alarm", role: "alert" },
      h("strong", {}, `Few-step health alarm at step ${w.step}: `), w.message) : null);
    if (r.losses) {
      parts.set("charts", [r.losses, r.health], () => h("div", { class: "grid2" },
        card("Loss", lossChart(r.losses)), card("Few-step health", healthChart(r.health))));
    }
    parts.set("done", r.done, (d) => d ? doneCard(d) : null);
    if (r.samples) parts.set("samples", r.samples, (s) => samplesCard(name, s));
    parts.set("exports", [r.exports, r.files && r.files["lora.safetensors"], r.status], () => exportsCard(name, r));
    if (r.summary) parts.set("summary", r.summary, (s) => card("summary.json", summaryTable(s)));
    parts.set("log", r.job && [r.job.id, r.job.status, r.job.log], () => r.job ? card(null, details("log", `Output of ${r.job.title} (${r.job.status})`,
      h("p", { class: "muted" }, h("code", {}, r.job.command)), logBox(r.job.log))) : null);
    if (r.config_yaml) parts.set("config", r.config_yaml, (y) => card(null, details("config", "config.yaml", h("pre", { class: "code" }, y))));
    return r;
  }
  const first = await load();
  app.every(LIVE.includes(first.status) ? 1500 : 5000, load);

  function head(r) {
    const cfg = r.config || {};
    return h("div", { class: "page-head" },
      h("div", {}, h("h1", {}, name, " ", badge(r.status)),
        h("p", { class: "muted" }, [cfg.method && cfg.method.name, cfg.model && cfg.model.family,
          cfg.model && cfg.model.pretrained, cfg.data && cfg.data.path].filter(Boolean).join(" · "))),
      h("div", { class: "row" }, runActions(name, r, load)));
  }
}

function progressCard(r) {
  const p = r.progress;
  const pct = p.max_steps ? Math.round(100 * (p.step || 0) / p.max_steps) : 0;
  return card(null, h("div", { class: "progress-line" },
    h("strong", { id: "run-step" }, `step ${p.step ?? 0} / ${p.max_steps ?? "?"}`), h("span", {}, ` ${pct}%`),
    LIVE.includes(r.status) ? h("span", { class: "muted" }, ` · ETA ${fmtTime(p.eta_seconds)}`) : null),
  progressBar(p.step, p.max_steps));
}

function lossChart(losses) {
  const terms = new Set();
  for (const r of losses) for (const k of Object.keys(r)) {
    if (!["step", "loss", "lr", "grad_norm", "skipped"].includes(k) && typeof r[k] === "number") terms.add(k);
  }
  const series = [{ name: "loss", points: losses.filter((r) => !r.skipped).map((r) => [r.step, r.loss]) }];
  if (terms.size > 1) for (const t of terms) series.push({ name: t, points: losses.map((r) => [r.step, r[t]]), width: 1 });
  return lineChart(series, { title: "loss per optimizer step", xInteger: true });
}

function healthChart(health) {
  return [healthCharts(health), health.note ? h("p", { class: "muted small" }, health.note) : null];
}

// The done signal (done.jsonl): the samples' distance to the training images at each sampling, its lowest step and
// the earliest step as good as it (docs/done-signal.md).
function doneCard(done) {
  const chart = lineChart([{ name: "distance", points: done.records.map((r) => [r.step, r.distance]), width: 2 }], {
    title: `distance of the samples to the training images (${done.features})`, xInteger: true, legend: false,
  });
  chart.dataset.measure = "done";
  const earlier = done.as_good_step !== null && done.as_good_step !== done.best_step;
  return card("Done signal", chart,
    h("p", { id: "done-reading" }, `Lowest at step ${done.best_step}`, earlier ? `; as good from step ${done.as_good_step}` : "", "."),
    h("p", { class: "muted small" }, "It falls while the run learns the data and rises once training goes past it. "
      + "Checkpointing at the sampling interval keeps the weights of those steps."));
}

function exportsCard(name, r) {
  const exp = (fmt) => h("button", { id: `export-${fmt}`, onclick: (e) => act(e.target, async () => {
    await api(`/api/runs/${encodeURIComponent(name)}/export`, { method: "POST", body: { format: fmt } });
  }) }, `Export ${fmt}`);
  const lora = r.files && (r.files["lora.safetensors"] || r.files["model.safetensors"]);
  return card("Weights and exports",
    lora ? h("div", { class: "row" }, (r.export_formats || []).map(exp),
      r.export_formats && !r.export_formats.length ? h("span", { class: "muted", id: "no-export" },
        "No diffusers/ComfyUI export: this model loads only in dopsd.") : null,
      h("a", { class: "button ghost", href: `${lora}?download=1`, id: "download-lora" }, "Download the run's LoRA"),
      r.files["pytorch_lora_weights.safetensors"] ? h("a", { class: "button ghost", href: `${r.files["pytorch_lora_weights.safetensors"]}?download=1` },
        "Download pytorch_lora_weights.safetensors") : null)
      : h("p", { class: "muted" }, "The weights are written when the run ends."),
    r.exports.length ? h("ul", { class: "exports" }, r.exports.map((e) => h("li", {},
      badge(e.job.status), ` ${e.format} `,
      e.file ? h("a", { href: `${e.file}?download=1`, class: "export-file" }, `${e.file.split("/").pop()}`) : null,
      e.size ? h("span", { class: "muted" }, ` ${fmtBytes(e.size)}`) : null,
      e.message ? h("pre", { class: "log small export-error" }, e.message) : null))) : null);
}

export function summaryTable(s) {
  return kvTable(s, { id: "summary-table" });
}

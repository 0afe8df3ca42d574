// Probes, comparisons, reports (benchmark and demo) and the job queue.

import { openLightbox } from "./lightbox.js";
import { act, api, append, badge, card, details, field, fmtDate, fmtNum, fmtTime, form, h, logBox, Parts } from "./util.js";
import { summaryTable } from "./runs.js";
import { jobTitle } from "./queue.js";

// A picture that enlarges (click, Enter or Space) in the lightbox.
function zoomable(attrs, title) {
  return h("button", { type: "button", class: "zoom", "aria-label": `enlarge ${title}`,
    onclick: (e) => openLightbox([{ src: attrs.src, title }], 0, e.currentTarget) }, h("img", attrs));
}

// --- probes -----------------------------------------------------------------------------------------------------
export async function probesPage(main, _params, app) {
  const parts = new Parts(main);
  main.prepend(h("div", { class: "page-head" }, h("h1", {}, "Teacher probes"),
    h("a", { class: "button primary", href: "#/new?probe=1" }, "New probe")));
  async function load() {
    const data = await api("/api/probes");
    parts.set("list", data.probes, (list) => list.length ? h("table", { class: "table" },
      h("thead", {}, h("tr", {}, ["probe", "status", "carries", "weak", "fails"].map((t) => h("th", {}, t)))),
      h("tbody", {}, list.map((p) => h("tr", {},
        h("td", {}, h("a", { href: `#/probes/${encodeURIComponent(p.name)}` }, p.name)),
        h("td", {}, badge(p.job ? p.job.status : p.counts ? "succeeded" : "–")),
        ["carries", "weak", "fails"].map((k) => h("td", {}, p.counts ? p.counts[k] : "–"))))))
      : h("p", {}, "No probes yet: open a dataset and choose ", h("em", {}, "Probe the teacher first"), "."));
  }
  await load();
  app.every(3000, load);
}

export async function probePage(main, params, app) {
  const parts = new Parts(main, ["head", "advice", "pairs", "log"]);
  async function load() {
    const r = await api(`/api/probes/${encodeURIComponent(params.name)}`);
    const p = r.probe;
    parts.set("head", [p && p.counts, r.job && r.job.status], () => h("div", { class: "page-head" },
      h("h1", {}, `Probe ${params.name} `, badge(p ? (p.passed ? "carries" : "fails") : r.job ? r.job.status : "–")),
      p ? h("p", { class: "muted" }, `${p.pairs.length} pairs × ${p.seeds.length} seeds at ${p.steps} steps · metric ${p.metric} · teacher context ${p.teacher_context}`) : null));
    if (p) {
      parts.set("advice", p.recommendations, (recs) => card("Verdict and advice",
        h("p", {}, `${p.counts.carries} carry, ${p.counts.weak} weak, ${p.counts.fails} fail`),
        h("ul", { class: "advice" }, recs.map((x) => h("li", {}, x)))));
      parts.set("pairs", [p.pairs, r.targets], () => card("Per pair: target | student (caption only) | teacher (caption + image)",
        h("table", { class: "table", id: "probe-pairs" },
          h("thead", {}, h("tr", {}, ["#", "target", "caption", "verdict", "relative gain", "teacher closer", "concept hit student → teacher"].map((t) => h("th", {}, t)))),
          h("tbody", {}, p.pairs.map((x) => h("tr", {},
            h("td", {}, x.index),
            h("td", {}, r.targets[x.name] ? h("img", { src: r.targets[x.name], class: "thumb small", alt: x.name }) : x.name),
            h("td", {}, x.caption), h("td", {}, badge(x.verdict)), h("td", {}, fmtNum(x.relative_gain, 3)),
            h("td", {}, `${Math.round(100 * x.win_rate)}%`),
            h("td", {}, x.teacher_hit === null ? "–" : `${fmtNum(x.student_hit, 2)} → ${fmtNum(x.teacher_hit, 2)}`))))),
        r.grid ? h("figure", {}, zoomable({ src: r.grid, class: "grid-img", alt: "probe grid", id: "probe-grid" }, "probe grid"),
          h("figcaption", {}, "each row: target | student sample | teacher sample (seed 0), labelled #pair verdict")) : null));
    }
    parts.set("log", r.job && [r.job.status, r.job.log], () => r.job ? card(null, details("log", `Output (${r.job.status})`, logBox(r.job.log))) : null);
    return r;
  }
  await load();
  app.every(2000, load);
}

// --- compare ----------------------------------------------------------------------------------------------------
export async function comparePage(main, params, app) {
  const [runs, past] = await Promise.all([api("/api/runs"), api("/api/compare")]);
  const chosen = new Set((params.runs || "").split(",").filter(Boolean));
  const done = runs.runs.filter((r) => r.has_lora);
  const boxes = done.map((r) => h("label", { class: "check-label" },
    h("input", { type: "checkbox", name: "run", value: r.name, checked: chosen.has(r.name) }), ` ${r.name} (${r.method || "?"})`));
  const base = h("input", { type: "checkbox", name: "base", checked: true });
  const prompts = h("textarea", { name: "prompts", rows: 4, placeholder: "one prompt per line" });
  prompts.value = "a photo of sks\nan unrelated prompt";
  const firstDone = done.find((r) => chosen.has(r.name)) || done[0];
  if (firstDone && firstDone.family === "mini") prompts.value = "a sks circle on a gray background\na sks square\na red circle\na blue square on a gray background";
  const seeds = h("input", { name: "seeds", value: "0 1 2 3" });
  const steps = h("input", { name: "steps", type: "number", min: 1, placeholder: "the model's few-step setting" });
  append(main, [h("div", { class: "page-head" }, h("h1", {}, "Compare runs")),
    card("Side by side on the same prompts and noise", form({ id: "compare-form" }, (button) => act(button, async () => {
      const body = {
        runs: boxes.map((b) => b.querySelector("input")).filter((i) => i.checked).map((i) => i.value),
        base: base.checked, prompts: prompts.value.split("\n").map((s) => s.trim()).filter(Boolean),
        seeds: seeds.value.split(/[\s,]+/).filter(Boolean).map(Number),
        steps: steps.value ? Number(steps.value) : null,
      };
      const r = await api("/api/compare", { method: "POST", body });
      location.hash = `#/compare/${encodeURIComponent(r.id)}`;
    }),
      h("p", { class: "muted" }, "Runs ", h("code", {}, "dopsd sample"), " for each run and for the base model (",
        h("code", {}, "--no-lora"), ") with the same prompts and seeds: the same seed is the same noise in every grid."),
      done.length ? h("div", { class: "checks" }, boxes) : h("p", {}, "No finished runs yet."),
      h("label", { class: "check-label" }, base, " include the base model (before)"),
      h("div", { class: "grid2" }, field("prompts", prompts), h("div", {}, field("seeds", seeds), field("steps", steps))),
      h("button", { type: "submit", class: "primary", id: "start-compare" }, "Compare"))),
    past.comparisons.length ? card("Earlier comparisons", h("ul", {}, past.comparisons.map((c) => h("li", {},
      h("a", { href: `#/compare/${encodeURIComponent(c.id)}` }, c.id), ` — ${c.runs.join(", ")}`)))) : null]);
}

export async function comparisonPage(main, params, app) {
  const parts = new Parts(main);
  async function load() {
    const c = await api(`/api/compare/${encodeURIComponent(params.id)}`);
    parts.set("head", null, () => h("div", { class: "page-head" }, h("h1", {}, `Comparison ${c.id}`),
      h("p", { class: "muted" }, `seeds ${c.seeds.join(", ")} · ${c.steps ? `${c.steps} steps` : "each model's few-step setting"}`)));
    parts.set("grid", c.entries, (entries) => h("div", { class: "compare", id: "compare-grid" },
      h("div", { class: "compare-prompts" }, h("div", { class: "compare-label" }, "prompt"),
        h("div", { class: "compare-rows" }, c.prompts.map((p) => h("div", { class: "compare-prompt" }, p)))),
      entries.map((e) => h("div", { class: "compare-col", "data-entry": e.label },
        h("div", { class: "compare-label" }, e.label, " ", badge(e.status)),
        e.url ? zoomable({ src: e.url, alt: e.label, class: "grid-img" }, `${e.label}: ${c.prompts.join(" / ")}`)
          : e.error ? h("pre", { class: "log small" }, e.error) : h("p", { class: "muted" }, "sampling…")))));
    return c;
  }
  await load();
  app.every(1500, load);
}

// --- reports: benchmark and demo ----------------------------------------------------------------------------------
export async function reportsPage(main, _params, app) {
  const parts = new Parts(main);
  const size = h("select", { name: "bench-size" }, ["quick", "tiny", "full"].map((s) => h("option", { value: s }, s)));
  const demoSteps = h("input", { name: "demo-steps", type: "number", min: 1, placeholder: "200" });
  main.prepend(h("div", { class: "page-head" }, h("h1", {}, "Benchmark and demo")),
    card(null, h("div", { class: "grid2" },
      h("div", {}, h("h3", {}, "Benchmark (dopsd bench)"),
        h("p", { class: "muted" }, "D-OPSD against the SFT baselines on the miniature, with the paper's claims checked (quick: < 10 min on a CPU)."),
        form({ class: "row" }, (button) => act(button, async () => {
          const r = await api("/api/reports", { method: "POST", body: { kind: "bench", size: size.value } });
          location.hash = `#/reports/${encodeURIComponent(r.name)}`;
        }), field("size", size), h("button", { type: "submit", id: "start-bench" }, "Start benchmark"))),
      h("div", {}, h("h3", {}, "Demo (dopsd demo)"),
        h("p", { class: "muted" }, "before | SFT | D-OPSD on the miniature: concept fidelity, few-step quality, unrelated accuracy, drift."),
        form({ class: "row" }, (button) => act(button, async () => {
          const body = { kind: "demo" };
          if (demoSteps.value) body.steps = Number(demoSteps.value);
          const r = await api("/api/reports", { method: "POST", body });
          location.hash = `#/reports/${encodeURIComponent(r.name)}`;
        }), field("steps", demoSteps), h("button", { type: "submit", id: "start-demo" }, "Start demo"))))));
  async function load() {
    const data = await api("/api/reports");
    parts.set("list", data.reports, (list) => card(`Report folders in ${app.info.home}/reports`, list.length ? h("table", { class: "table" },
      h("tbody", {}, list.map((r) => h("tr", {}, h("td", {}, h("a", { href: `#/reports/${encodeURIComponent(r.name)}` }, r.name)),
        h("td", {}, r.kind || "–"), h("td", {}, r.job ? badge(r.job.status) : "")))))
      : h("p", { class: "muted" }, "None yet. Folders written by `dopsd bench --out` or `dopsd demo --out` under this folder show up here.")));
  }
  await load();
  app.every(3000, load);
}

export async function reportPage(main, params, app) {
  const parts = new Parts(main, ["head", "bench", "demo", "log"]);
  async function load() {
    const r = await api(`/api/reports/${encodeURIComponent(params.name)}`);
    parts.set("head", [r.kind, r.job && r.job.status], () => h("div", { class: "page-head" },
      h("h1", {}, params.name, " ", r.job ? badge(r.job.status) : null), h("p", { class: "muted" }, r.kind || "")));
    if (r.kind === "bench") {
      parts.set("bench", [r.html, r.files], () => card(null,
        h("div", { class: "row" }, Object.entries(r.files).map(([f, url]) => h("a", { class: "button ghost", href: url, target: "_blank" }, f))),
        r.html ? h("iframe", { src: r.html, class: "report", sandbox: "allow-scripts", title: "benchmark report" }) : null));
    } else if (r.kind === "demo") {
      parts.set("demo", [r.summary, r.image], () => h("div", { class: "grid2" },
        card("before | SFT | D-OPSD", r.image ? zoomable({ src: r.image, class: "grid-img", alt: "demo grid", id: "demo-image" }, "before | SFT | D-OPSD") : null),
        card("summary.json", r.summary ? summaryTable(r.summary) : null)));
    }
    parts.set("log", [r.job && r.job.status, r.log], () => r.log ? card(null, details("log", "Output", logBox(r.log))) : null);
  }
  await load();
  app.every(2000, load);
}

// --- jobs -------------------------------------------------------------------------------------------------------
export async function jobsPage(main, _params, app) {
  const parts = new Parts(main);
  const max = h("input", { type: "number", min: 1, max: 16, name: "max-running", value: app.info.max_running });
  main.prepend(h("div", { class: "page-head" }, h("h1", {}, "Jobs"),
    form({ class: "row" }, (button) => act(button, async () => {
      const r = await api("/api/settings", { method: "PUT", body: { max_running: Number(max.value) } });
      app.info.max_running = r.max_running;
    }), field("jobs at a time", max), h("button", { type: "submit", id: "set-max-running" }, "Set"))));
  async function load() {
    const data = await api("/api/jobs");
    parts.set("list", data.jobs, (jobs) => jobs.length ? h("table", { class: "table", id: "jobs-table" },
      h("thead", {}, h("tr", {}, ["job", "status", "started", "took", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, jobs.map((j) => h("tr", { "data-job": j.id },
        h("td", {}, details(j.id, jobTitle(j), h("p", {}, h("code", {}, j.command)), h("p", { class: "muted" }, j.message || ""),
          h("div", { "data-log": j.id }, h("button", { class: "small", onclick: async (e) => {
            const full = await api(`/api/jobs/${encodeURIComponent(j.id)}`);
            e.target.replaceWith(logBox(full.log));
          } }, "Show output")))),
        h("td", {}, badge(j.status)), h("td", {}, fmtDate(j.started)),
        h("td", {}, j.started ? fmtTime((j.ended || Date.now() / 1000) - j.started) : "–"),
        h("td", {}, ["queued", "running"].includes(j.status) ? h("button", { class: "small danger", onclick: (e) => act(e.target, async () => {
          await api(`/api/jobs/${encodeURIComponent(j.id)}/stop`, { method: "POST", body: {} });
          await load();
        }) }, j.status === "queued" ? "Cancel" : "Stop") : null)))))
      : h("p", {}, "No jobs yet."));
  }
  await load();
  app.every(2000, load);
}

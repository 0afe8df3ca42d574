// New run: preset, model folder, dataset, method and the settings that matter; the resolved YAML (editable);
// `dopsd plan`'s estimate where this dopsd has the command; start the run, or probe the teacher first.

import { act, api, append, card, clear, details, field, h, notify } from "./util.js";

const NUMBER_KEYS = ["train.max_steps", "optim.lr", "lora.rank", "lora.alpha", "method.prior_weight", "sample.every",
  "sample.control_steps", "train.checkpoint_every"];

export async function newRunPage(main, params, app) {
  const [list] = await Promise.all([api("/api/datasets")]);
  const presets = app.presets.presets;
  const help = app.presets.help;
  const inputs = {};
  let yamlMode = false;

  const preset = h("select", { name: "preset" }, presets.map((p) => h("option", { value: p.name }, p.name)));
  const dataset = h("select", { name: "dataset" }, h("option", { value: "" }, "— choose —"),
    list.datasets.map((d) => h("option", { value: d.name, selected: d.name === params.dataset }, `${d.name} (${d.images})`)));
  const runName = h("input", { name: "name", placeholder: "(automatic)" });
  const method = h("div", { class: "segmented", role: "radiogroup" }, app.presets.methods.map((m, i) =>
    h("label", {}, h("input", { type: "radio", name: "method", value: m, checked: i === 0 }), m)));
  for (const key of NUMBER_KEYS) inputs[key] = h("input", { name: key, type: "number", step: "any" });
  inputs["model.pretrained"] = h("input", { name: "model.pretrained", placeholder: "/models/Z-Image-Turbo" });
  inputs["data.trigger_word"] = h("input", { name: "data.trigger_word", placeholder: "sks" });
  inputs["method.prior_prompts"] = h("textarea", { name: "method.prior_prompts", rows: 3,
    placeholder: "one unrelated prompt per line (empty = off)" });
  const presetNote = h("p", { class: "muted" });
  const yamlBox = h("textarea", { name: "yaml", rows: 24, class: "code", spellcheck: false });
  const yamlNote = h("p", { class: "muted" });
  const planBox = h("div", { id: "plan" });

  function fillFromPreset() {
    const p = presets.find((x) => x.name === preset.value);
    presetNote.textContent = p.description;
    for (const [key, value] of Object.entries(p.form)) {
      if (!inputs[key]) continue;
      inputs[key].value = Array.isArray(value) ? value.join("\n") : (value ?? "");
    }
    method.querySelector(`input[value="${p.form["method.name"]}"]`).checked = true;
    const d = list.datasets.find((x) => x.name === dataset.value);
    if (d && d.trigger_word) inputs["data.trigger_word"].value = d.trigger_word;
  }

  function values() {
    const v = { "method.name": method.querySelector("input:checked").value };
    for (const key of NUMBER_KEYS) if (inputs[key].value !== "") v[key] = Number(inputs[key].value);
    for (const key of ["train.max_steps", "lora.rank", "sample.every", "sample.control_steps", "train.checkpoint_every"]) {
      if (key in v) v[key] = Math.round(v[key]);
    }
    v["model.pretrained"] = inputs["model.pretrained"].value.trim() || null;
    v["data.trigger_word"] = inputs["data.trigger_word"].value.trim() || null;
    const prior = inputs["method.prior_prompts"].value.split("\n").map((s) => s.trim()).filter(Boolean);
    v["method.prior_prompts"] = prior;
    if (prior.length && !(v["method.prior_weight"] > 0)) v["method.prior_weight"] = 1.0;
    return v;
  }

  function request() {
    const body = { preset: preset.value, dataset: dataset.value || null, name: runName.value.trim() || null };
    if (yamlMode) body.yaml = yamlBox.value;
    else body.values = values();
    return body;
  }

  async function showYaml() {
    const r = await api("/api/config", { method: "POST", body: { ...request(), yaml: undefined, values: values() } });
    yamlBox.value = r.yaml;
  }

  let planTimer = null;
  function refreshPlan() {
    if (!app.info.plan_available) return;
    clearTimeout(planTimer);
    planTimer = setTimeout(async () => {
      clear(planBox).append(h("p", { class: "muted" }, "estimating…"));
      try {
        const r = await api("/api/plan", { method: "POST", body: request() });
        clear(planBox).append(r.error ? h("pre", { class: "log" }, r.error) : planTable(r.plan));
      } catch (err) {
        clear(planBox).append(h("p", { class: "muted" }, err.message));
      }
    }, 400);
  }

  preset.addEventListener("change", () => { fillFromPreset(); refreshPlan(); });
  dataset.addEventListener("change", () => { fillFromPreset(); refreshPlan(); });
  const yamlDetails = details("yaml", "Advanced: the resolved config (YAML, editable)",
    yamlNote, yamlBox,
    h("div", { class: "row" },
      h("button", { class: "small", onclick: (e) => act(e.target, showYaml) }, "Reset from the form"),
      h("label", { class: "check-label" }, h("input", { type: "checkbox", name: "use-yaml", onchange: (e) => {
        yamlMode = e.target.checked;
        yamlNote.textContent = yamlMode ? "Starting from this YAML (the form is ignored; the app sets train.output_dir)." : "";
        refreshPlan();
      } }), " start from this YAML instead of the form")));
  yamlDetails.addEventListener("toggle", () => { if (yamlDetails.open && !yamlBox.value) act(null, showYaml); });
  yamlBox.addEventListener("input", refreshPlan);

  const start = h("button", { class: "primary", id: "start-run", onclick: (e) => act(e.target, async () => {
    const r = await api("/api/runs", { method: "POST", body: request() });
    notify(`run ${r.name} queued`, "good");
    location.hash = `#/runs/${encodeURIComponent(r.name)}`;
  }) }, "Start run");
  const probe = h("button", { id: "start-probe", onclick: (e) => act(e.target, async () => {
    const r = await api("/api/probes", { method: "POST", body: request() });
    location.hash = `#/probes/${encodeURIComponent(r.name)}`;
  }) }, "Probe the teacher first");

  const fieldFor = (key, label) => field(label, inputs[key], help[key]);
  append(main, [
    h("div", { class: "page-head" }, h("h1", {}, "New run"), h("div", { class: "row" }, probe, start)),
    params.probe ? h("p", { class: "check warn" }, "Probe first: ", h("code", {}, "dopsd probe"),
      " samples every pair with the student's context (caption) and the teacher's (caption + image): pairs the teacher does not carry, D-OPSD cannot learn.") : null,
    h("div", { class: "grid2" },
      card("What to train",
        field("preset", preset, presetNote), field("dataset", dataset), field("run name", runName),
        fieldFor("model.pretrained", "model folder"), field("method", method, help["method.name"]),
        fieldFor("data.trigger_word", "trigger word")),
      card("Settings that matter",
        h("div", { class: "grid2 tight" }, fieldFor("train.max_steps", "steps"), fieldFor("optim.lr", "learning rate"),
          fieldFor("lora.rank", "LoRA rank"), fieldFor("lora.alpha", "LoRA alpha"),
          fieldFor("sample.every", "sample every (steps)"), fieldFor("sample.control_steps", "many-step control"),
          fieldFor("train.checkpoint_every", "checkpoint every")),
        fieldFor("method.prior_prompts", "prior preservation prompts"), fieldFor("method.prior_weight", "prior weight"))),
    app.info.plan_available ? card("Memory and compute estimate (dopsd plan)", planBox) : null,
    card(null, yamlDetails)]);
  fillFromPreset();
  for (const el of Object.values(inputs)) el.addEventListener("change", refreshPlan);
  method.addEventListener("change", refreshPlan);
  refreshPlan();
}

function planTable(plan) {
  const rows = [];
  const walk = (obj, prefix) => {
    for (const [k, v] of Object.entries(obj || {})) {
      if (v && typeof v === "object" && !Array.isArray(v)) walk(v, `${prefix}${k}.`);
      else rows.push([`${prefix}${k}`, Array.isArray(v) ? v.join(", ") : String(v)]);
    }
  };
  walk(plan, "");
  return h("table", { class: "table kv" }, h("tbody", {}, rows.map(([k, v]) => h("tr", {}, h("th", {}, k), h("td", {}, v)))));
}

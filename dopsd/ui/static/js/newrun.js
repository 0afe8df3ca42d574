// New run: preset, model folder, dataset, method and the settings that matter; the resolved YAML (editable);
// `dopsd plan`'s estimate where this dopsd has the command; start the run, or probe the teacher first.
//
// Every value is checked here with the config's own rule (type and range, served as app.presets.rules from
// dopsd.config's declarations) as it is typed; the server then runs the checks `dopsd train` runs before it
// starts (dataset, model folder, prompts) and answers {fields: {key: message}}: each message is shown at its
// field, nothing is queued and the form stays as it was.

import { fitPanel } from "./fit.js";
import { prefillClone } from "./queue.js";
import { act, api, append, card, clear, details, field, form, h, notify } from "./util.js";

const NUMBER_KEYS = ["train.max_steps", "optim.lr", "lora.rank", "lora.alpha", "method.prior_weight", "sample.every",
  "sample.control_steps", "train.checkpoint_every"];
const GENERAL = "_";

export async function newRunPage(main, params, app) {
  const [list] = await Promise.all([api("/api/datasets")]);
  const presets = app.presets.presets;
  const help = app.presets.help;
  const rules = app.presets.rules || {};
  const inputs = {};
  const errors = {};
  let yamlMode = false;

  const preset = h("select", { name: "preset" }, presets.map((p) => h("option", { value: p.name }, p.name)));
  const dataset = h("select", { name: "dataset" }, h("option", { value: "" }, "— choose —"),
    list.datasets.map((d) => h("option", { value: d.name, selected: d.name === params.dataset }, `${d.name} (${d.images})`)));
  const nameRule = rules.name || {};
  const runName = h("input", { name: "name", placeholder: "(automatic)", pattern: nameRule.pattern, maxlength: 64,
    autocomplete: "off", title: nameRule.rule });
  const method = h("div", { class: "segmented", role: "radiogroup" }, app.presets.methods.map((m, i) =>
    h("label", {}, h("input", { type: "radio", name: "method", value: m, checked: i === 0 }), m)));
  // Text boxes, not <input type=number>: a number box hides what was typed when it is not a number (its value
  // is then ""), so "abc" would silently fall back to the preset's value.
  for (const key of NUMBER_KEYS) {
    const whole = (rules[key] || {}).type === "int";
    inputs[key] = h("input", { name: key, inputmode: whole ? "numeric" : "decimal", autocomplete: "off", spellcheck: false });
  }
  inputs["model.pretrained"] = h("input", { name: "model.pretrained", placeholder: "/models/Z-Image-Turbo" });
  inputs["data.trigger_word"] = h("input", { name: "data.trigger_word", placeholder: "sks" });
  inputs["method.prior_prompts"] = h("textarea", { name: "method.prior_prompts", rows: 3,
    placeholder: "one unrelated prompt per line (empty = off)" });
  const controls = { ...inputs, preset, dataset, name: runName, "method.name": method };
  const general = h("div", { id: "form-errors", class: "check bad", role: "alert", hidden: true });
  const presetNote = h("p", { class: "muted" });
  const yamlBox = h("textarea", { name: "yaml", rows: 24, class: "code", spellcheck: false, "aria-label": "the resolved config (YAML)" });
  const yamlNote = h("p", { class: "muted" });
  const planBox = h("div", { id: "plan" });

  // --- messages at their fields --------------------------------------------------------------------------------
  function showError(key, message) {
    // From the YAML view the form's settings are not used: their messages go above the form, with their key.
    const target = errors[key] && !(yamlMode && message && !["preset", "dataset", "name"].includes(key)) ? key : GENERAL;
    if (target === GENERAL) {
      if (!message) return;
      general.hidden = false;
      general.append(h("p", {}, key === GENERAL ? "" : h("code", {}, key), key === GENERAL ? "" : ": ", message));
      return;
    }
    errors[key].textContent = message || "";
    errors[key].hidden = !message;
    const control = controls[key];
    if (control) {
      if (message) control.setAttribute("aria-invalid", "true"); else control.removeAttribute("aria-invalid");
    }
  }

  function clearErrors() {
    for (const key of Object.keys(errors)) showError(key, "");
    clear(general).hidden = true;
  }

  function showProblems(fields) {
    for (const [key, message] of Object.entries(fields)) showError(key, message);
    const first = Object.keys(fields).map((k) => (errors[k] ? controls[k] : general)).find(Boolean);
    if (first) {
      first.scrollIntoView({ block: "center" });
      if (first.focus) first.focus({ preventScroll: true });
    }
  }

  // --- the browser's check: the config's own types and ranges --------------------------------------------------
  function parseNumber(key, text) {
    const rule = rules[key] || {};
    const t = text.trim();
    if (t === "") return { error: "enter a value (the preset's is filled in when you pick a preset)" };
    if (!/^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/.test(t)) {
      return { error: `${JSON.stringify(t)} is not a number${rule.type === "int" ? " (a whole number, e.g. 500)" : " (e.g. 0.0001 or 1e-4)"}` };
    }
    const v = Number(t);
    if (!Number.isFinite(v)) return { error: "not a finite number" };
    if (rule.type === "int" && !Number.isInteger(v)) return { error: `${t}: a whole number is needed (nothing is rounded)` };
    if ("ge" in rule && v < rule.ge) return { error: `must be at least ${rule.ge}` };
    if ("gt" in rule && v <= rule.gt) return { error: `must be greater than ${rule.gt}` };
    if ("lt" in rule && v >= rule.lt) return { error: `must be less than ${rule.lt}` };
    if ("le" in rule && v > rule.le) return { error: rule.why ? `${t} is too many: ${rule.why}` : `must be at most ${rule.le}` };
    return { value: v };
  }

  function checkField(key) {
    if (yamlMode && key !== "name") return null;
    let message = null;
    if (key === "name") {
      const t = runName.value.trim();
      if (t && nameRule.pattern && !new RegExp(`^(?:${nameRule.pattern})$`, "u").test(t)) message = `${t}: ${nameRule.rule}`;
    } else if (NUMBER_KEYS.includes(key)) {
      message = parseNumber(key, inputs[key].value).error || null;
    }
    showError(key, message);
    return message;
  }

  function checkAll() {
    const found = {};
    for (const key of ["name", ...NUMBER_KEYS]) {
      const message = checkField(key);
      if (message) found[key] = message;
    }
    return found;
  }

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
    for (const key of NUMBER_KEYS) checkField(key);
  }

  function values() {
    const v = { "method.name": method.querySelector("input:checked").value };
    for (const key of NUMBER_KEYS) {
      const parsed = parseNumber(key, inputs[key].value);
      // an invalid value goes as typed: the server refuses it by name instead of using the preset's silently
      v[key] = "value" in parsed ? parsed.value : inputs[key].value.trim();
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
  const fit = fitPanel(planBox, app);
  function refreshPlan() {
    if (!app.info.plan_available) return;
    clearTimeout(planTimer);
    planTimer = setTimeout(async () => {
      if (Object.keys(yamlMode ? {} : checkAll()).length) {
        fit.hold("fix the marked fields for an estimate");
        return;
      }
      fit.ask(request());  // fit.js: one plan at a time, stale answers dropped, same settings answered at once
    }, 400);
  }

  // Start or probe: the browser's check first (nothing is sent while a field is wrong), then the server's.
  async function submit(button, path, what, go) {
    clearErrors();
    const found = checkAll();
    if (Object.keys(found).length) {
      showProblems(found);
      notify(`${what}: fix the marked field${Object.keys(found).length > 1 ? "s" : ""} first`, "error");
      return;
    }
    await act(button, async () => {
      try {
        go(await api(path, { method: "POST", body: request() }));
      } catch (err) {
        const fields = err.data && err.data.fields;
        if (!fields) throw err;
        showProblems(fields);
        notify(`${what}: ${Object.keys(fields).length} problem(s), shown at the fields; nothing was queued`, "error");
      }
    });
  }

  preset.addEventListener("change", () => { showError("preset", ""); fillFromPreset(); refreshPlan(); });
  dataset.addEventListener("change", () => { showError("dataset", ""); fillFromPreset(); refreshPlan(); });
  const yamlDetails = details("yaml", "Advanced: the resolved config (YAML, editable)",
    yamlNote, yamlBox,
    h("div", { class: "row" },
      h("button", { type: "button", class: "small", onclick: (e) => act(e.target, showYaml) }, "Reset from the form"),
      h("label", { class: "check-label" }, h("input", { type: "checkbox", name: "use-yaml", onchange: (e) => {
        yamlMode = e.target.checked;
        yamlNote.textContent = yamlMode ? "Starting from this YAML (the form is ignored; the app sets train.output_dir; the form's step limit does not apply)." : "";
        clearErrors();
        refreshPlan();
      } }), " start from this YAML instead of the form")));
  yamlDetails.addEventListener("toggle", () => { if (yamlDetails.open && !yamlBox.value) act(null, showYaml); });
  yamlBox.addEventListener("input", refreshPlan);

  const start = h("button", { type: "submit", class: "primary", id: "start-run" }, "Start run");
  const probe = h("button", { type: "button", id: "start-probe", onclick: (e) => submit(e.target, "/api/probes",
    "the probe cannot start", (r) => { location.hash = `#/probes/${encodeURIComponent(r.name)}`; }) }, "Probe the teacher first");
  const startRun = (button) => submit(button, "/api/runs", "the run cannot start", (r) => {
    notify(`run ${r.name} queued`, "good");
    location.hash = `#/runs/${encodeURIComponent(r.name)}`;
  });

  // A field with the place for its message (under the control; tests and screen readers find it by id).
  const withError = (key, label, control, helpText) => {
    errors[key] = h("span", { class: "field-error", id: `error-${key}`, role: "alert", hidden: true });
    if (control instanceof Element) control.setAttribute("aria-describedby", `error-${key}`);
    return append(field(label, control, helpText), [errors[key]]);
  };
  const fieldFor = (key, label) => withError(key, label, inputs[key], help[key]);
  append(main, form({ id: "new-run", class: "new-run" }, startRun,
    h("div", { class: "page-head" }, h("h1", {}, "New run"), h("div", { class: "row" }, probe, start)),
    params.probe ? h("p", { class: "check warn" }, "Probe first: ", h("code", {}, "dopsd probe"),
      " samples every pair with the student's context (caption) and the teacher's (caption + image): pairs the teacher does not carry, D-OPSD cannot learn.") : null,
    general,
    h("div", { class: "grid2" },
      card("What to train",
        withError("preset", "preset", preset, presetNote), withError("dataset", "dataset", dataset),
        withError("name", "run name", runName),
        fieldFor("model.pretrained", "model folder"), withError("method.name", "method", method, help["method.name"]),
        fieldFor("data.trigger_word", "trigger word")),
      card("Settings that matter",
        h("div", { class: "grid2 tight" }, fieldFor("train.max_steps", "steps"), fieldFor("optim.lr", "learning rate"),
          fieldFor("lora.rank", "LoRA rank"), fieldFor("lora.alpha", "LoRA alpha"),
          fieldFor("sample.every", "sample every (steps)"), fieldFor("sample.control_steps", "many-step control"),
          fieldFor("train.checkpoint_every", "checkpoint every")),
        fieldFor("method.prior_prompts", "prior preservation prompts"), fieldFor("method.prior_weight", "prior weight"))),
    app.info.plan_available ? card("Will it fit? (dopsd plan, for the chosen method)", planBox) : null,
    card(null, yamlDetails)));
  fillFromPreset();
  for (const [key, el] of Object.entries(inputs)) {
    el.addEventListener("input", () => { if (NUMBER_KEYS.includes(key)) checkField(key); else showError(key, ""); });
    el.addEventListener("change", refreshPlan);
  }
  runName.addEventListener("input", () => checkField("name"));
  method.addEventListener("change", () => { showError("method.name", ""); refreshPlan(); });
  if (params.clone) await prefillClone(main, params.clone);  // queue.js: "Clone with changes"
  refreshPlan();
}


// What can be done with a run besides watching it (dopsd/ui/queue.py): Cancel a queued one, Retry a failed one,
// Delete one the app created (after a confirmation that says what goes), and "Clone with changes" (the New-run
// form, filled in with the run's config). Also: a job's title as a link to what it works on.

import { act, api, h, notify } from "./util.js";

const enc = encodeURIComponent;

// A job's title, linking to its run's (or probe's) page when it has one.
export function jobTitle(j) {
  const t = j.target || {};
  if (t.run) return h("a", { href: `#/runs/${enc(t.run)}`, class: "job-target" }, j.title);
  if (t.probe) return h("a", { href: `#/probes/${enc(t.probe)}`, class: "job-target" }, j.title);
  return j.title;
}

async function cancel(name, done) {
  if (!window.confirm(`Cancel run ${name}? It has not started: it leaves the queue and nothing is written.`)) return;
  await api(`/api/runs/${enc(name)}/stop`, { method: "POST", body: {} });
  notify(`run ${name} cancelled`, "good");
  await done();
}

async function retry(name, done) {
  const r = await api(`/api/runs/${enc(name)}/retry`, { method: "POST", body: {} });
  notify(r.moved_aside ? `run ${name} queued again; the failed attempt's folder is kept as ${name}.replaced-…` : `run ${name} queued again`, "good");
  await done();
}

async function remove(name, done) {
  const plan = await api(`/api/runs/${enc(name)}/delete`);
  if (!plan.deletable) {
    notify(plan.why, "error");
    return;
  }
  const mb = (b) => (b >= 1024 * 1024 ? `${(b / 1024 / 1024).toFixed(1)} MB` : `${Math.max(1, Math.round(b / 1024))} KB`);
  const lines = plan.items.map((i) => `  ${i.path}  (${i.files} file${i.files === 1 ? "" : "s"}, ${mb(i.bytes)})`);
  const question = `Delete run ${name}? This deletes, for good:\n${lines.join("\n")}\n\nKept: ${plan.kept}.`;
  if (!window.confirm(question)) return;
  const r = await api(`/api/runs/${enc(name)}/delete`, { method: "POST", body: { confirm: name } });
  notify(`deleted ${r.deleted.map((i) => i.path).join(", ")}`, "good");
  await done(true);
}

// Buttons for the allowed actions (`a`: /api/runs/NAME/actions, or a run-list row's `actions`). `done(deleted)`
// runs after an action.
export function runButtons(name, a, done, { small = false, cancelButton = true } = {}) {
  if (!a) return [];
  const cls = (extra) => [small ? "small" : "", extra].filter(Boolean).join(" ") || null;
  const button = (id, label, fn, extra) => h("button", { type: "button", class: cls(extra), "data-action": id,
    id: small ? null : `${id}-run`, onclick: (e) => act(e.target, () => fn(name, done)) }, label);
  return [
    cancelButton && a.cancel ? button("cancel", "Cancel", cancel, "danger") : null,
    a.retry ? button("retry", "Retry", retry) : null,
    a.clone ? h("a", { class: `button ${small ? "small ghost" : "ghost"}`, "data-action": "clone", id: small ? null : "clone-run",
      href: `#/new?clone=${enc(name)}` }, "Clone with changes") : null,
    a.delete ? button("delete", "Delete", remove, "danger ghost") : null,
  ];
}

// The New-run form (newrun.js) filled in with run `name`'s config, through the form's own controls (so its own
// checks and estimate follow): the form's values when they reproduce the config, else its YAML.
export async function prefillClone(main, name) {
  const c = await api(`/api/runs/${enc(name)}/clone`);
  const q = (selector) => main.querySelector(selector);
  const fire = (el, type) => el.dispatchEvent(new Event(type, { bubbles: true }));
  const set = (el, value) => {
    if (!el) return;
    el.value = value;
    fire(el, "input");
    fire(el, "change");
  };
  if (c.preset) set(q("select[name=preset]"), c.preset);
  if (c.dataset) set(q("select[name=dataset]"), c.dataset);
  if (c.form) {
    for (const [key, value] of Object.entries(c.values)) {
      if (key === "method.name") {
        const radio = q(`input[name=method][value="${value}"]`);
        if (radio) { radio.checked = true; fire(radio, "change"); }
        continue;
      }
      set(q(`[name="${key}"]`), Array.isArray(value) ? value.join("\n") : (value ?? ""));
    }
  } else {
    const box = q("textarea[name=yaml]");
    set(box, c.yaml);
    const yaml = box && box.closest("details");
    if (yaml) yaml.open = true;
    const use = q("input[name=use-yaml]");
    if (use && !use.checked) { use.checked = true; fire(use, "change"); }
  }
  set(q("input[name=name]"), c.name);
  const note = h("p", { class: "check good", id: "clone-note" }, `Cloned from run ${c.source}`,
    c.form ? ": change what you want, then start it." : ": its config is in the YAML below (it sets more than the form shows); edit it, then start.");
  const head = q(".page-head");
  if (head) head.after(note); else main.prepend(note);
}

// A run's state on its page, when it is not simply running: Stop (confirmed) or Cancel for a queued run, Resume
// with the reason when a resume (or the start) failed, and the checkpoints a stopped run kept, as downloads.

import { act, api, card, fmtBytes, h, notify } from "./util.js";

// Stop / Cancel and Resume for the page head. `load` re-reads the run after an action.
export function runActions(name, r, load) {
  const url = (what) => `/api/runs/${encodeURIComponent(name)}/${what}`;
  const queued = r.status === "queued";
  const stop = h("button", { type: "button", class: "danger", id: queued ? "cancel-run" : "stop-run", onclick: (e) => {
    const question = queued
      ? `Cancel run ${name}? It has not started: it leaves the queue and nothing is written.`
      : `Stop run ${name}? It finishes the current step and writes a checkpoint; Resume continues from there.`;
    if (!window.confirm(question)) return;
    act(e.target, async () => {
      await api(url("stop"), { method: "POST", body: {} });
      notify(queued ? `run ${name} cancelled` : `stopping run ${name}…`, "good");
      await load();
    });
  } }, queued ? "Cancel" : "Stop");
  // A refused resume (its checks failed before anything started) says why here, until the page changes.
  const refusal = h("div", { class: "check bad", id: "resume-refused", role: "alert", hidden: true });
  const resume = h("button", { type: "button", id: "resume-run", onclick: (e) => act(e.target, async () => {
    refusal.hidden = true;
    try {
      await api(url("resume"), { method: "POST", body: {} });
    } catch (err) {
      refusal.textContent = err.message;
      refusal.hidden = false;
      return;
    }
    await load();
  }) }, "Resume");
  const live = ["running", "starting", "queued", "stopping"].includes(r.status);
  return [
    ["running", "starting", "queued"].includes(r.status) ? stop : null,
    r.resumable && !live ? resume : null,
    r.resumable && !live ? refusal : null,
  ];
}

// Why the last start or resume failed, in the command's own words (not folded away in the log).
export function failureCard(r) {
  const f = r.failure;
  if (!f || ["running", "starting", "queued", "stopping"].includes(r.status)) return null;
  const what = f.kind === "resume" ? "The last resume failed" : "The run failed";
  return h("div", { class: "check bad", id: "run-failure", role: "alert" },
    h("strong", {}, `${what}: `), h("pre", { class: "log small failure-reason" }, f.reason),
    r.resumable ? h("p", { class: "muted small" }, "Fix what it names, then Resume: the checkpoints below are kept.") : null);
}

// Every checkpoint, newest first, with its files as downloads (trainable.safetensors: the weights at that step).
export function checkpointsCard(name, r) {
  const list = r.checkpoint_files || [];
  if (!list.length || r.status === "ok") return null;
  return card(`Checkpoints (${list.length})`,
    h("p", { class: "muted small" }, r.resumable
      ? "Resume continues from the newest. Each holds the trained weights so far (trainable.safetensors) and the optimizer state."
      : "Each holds the trained weights at its step (trainable.safetensors) and the optimizer state."),
    h("ul", { class: "checkpoint-list", id: "checkpoints" }, list.map((c) => h("li", { "data-checkpoint": c.name },
      h("strong", {}, c.step !== null ? `step ${c.step}` : c.name), " ",
      c.files.map((f) => h("a", { href: `${f.url}?download=1`, class: "checkpoint-file" }, `${f.name} (${fmtBytes(f.size)})`))))));
}

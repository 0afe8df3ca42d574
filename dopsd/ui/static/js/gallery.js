// The run's sample grids as a gallery: the grids at one step (a slider over the steps; it follows the newest grid
// until moved), each labelled with its prompts (rows) and seeds (columns); below, every prompt over the steps
// (rows: prompts, columns: steps, each cell that prompt's row of the grid). Every picture enlarges on click, Enter
// or Space (lightbox.js). The prompts and seeds come from the run's samples/grid.json (written with the grids);
// a run without it shows its grids unlabelled.

import { labelledGrid, openLightbox } from "./lightbox.js";
import { clear, h } from "./util.js";

const layouts = new Map(); // run name → {prompts, seeds} | null (none) | a Promise (being read)
const chosen = new Map(); // run name → index into the few-step grids, or undefined = follow the newest

function layoutOf(name, onReady) {
  const known = layouts.get(name);
  if (known !== undefined && !(known instanceof Promise)) return known;
  if (!known) {
    const url = `/files/runs/${encodeURIComponent(name)}/samples/grid.json`;
    const reading = fetch(url, { credentials: "same-origin" })
      .then((r) => (r.ok ? r.json() : null))
      .then((j) => (j && Array.isArray(j.prompts) && Array.isArray(j.seeds) ? j : null))
      .catch(() => null)
      .then((j) => {
        // no file yet while the first grids are written: ask again with the next grids
        if (j) layouts.set(name, j); else layouts.delete(name);
        if (j) onReady();
      });
    layouts.set(name, reading);
  }
  return null;
}

export function samplesCard(name, s) {
  const box = h("section", { class: "card", id: "samples" }, h("h2", {}, "Samples"));
  const fill = () => {
    clear(box).append(h("h2", {}, "Samples"));
    if (!s.grids.length) {
      box.append(h("p", { class: "muted" }, "The first grids appear before the first step."));
      return;
    }
    const layout = layoutOf(name, () => { if (box.isConnected) fill(); });
    box.append(...gallery(name, s, layout || {}));
  };
  fill();
  return box;
}

function gallery(name, s, layout) {
  const url = (g) => `/files/runs/${encodeURIComponent(name)}/samples/${encodeURIComponent(g.file)}`;
  const when = (g) => (g.step === null ? "final" : `step ${g.step}`);
  const title = (g) => g.steps === s.few_steps ? `${g.steps} steps (few-step)` : `${g.steps} steps (many-step control)`;
  const item = (g) => ({ src: url(g), title: `${title(g)} · ${when(g)}`, prompts: layout.prompts, seeds: layout.seeds });
  const few = s.grids.filter((g) => g.steps === s.few_steps);
  const many = s.many_steps ? s.grids.filter((g) => g.steps === s.many_steps) : [];
  const fewItems = few.map(item);

  const zoom = (items, i, label, inner) => h("button", { type: "button", class: "zoom", "aria-label": `enlarge ${label}`,
    onclick: (e) => openLightbox(items, i, e.currentTarget) }, inner);
  const figure = (g, items, i) => h("figure", { "data-steps": g.steps },
    labelledGrid(item(g), zoom(items, i, item(g).title, h("img", { src: url(g), alt: item(g).title, class: "grid-img" }))),
    h("figcaption", {}, item(g).title));

  const latest = h("div", { class: "grid2", id: "latest-samples" });
  const stepText = h("span", { class: "gallery-step", id: "gallery-step", "aria-live": "polite" });
  const show = (i) => {
    const g = few[i];
    stepText.textContent = when(g) + (chosen.has(name) ? "" : " (newest)");
    const control = many.find((m) => m.step === g.step);
    clear(latest).append(figure(g, fewItems, i),
      control ? figure(control, many.map(item), many.indexOf(control)) : h("p", { class: "muted" }, "no many-step control at this step"));
  };
  const last = few.length - 1;
  const start = chosen.has(name) ? Math.min(chosen.get(name), last) : last;
  const slider = h("input", { type: "range", id: "gallery-slider", min: 0, max: Math.max(last, 0), step: 1, value: start,
    "aria-label": "training step of the grids shown", "aria-valuetext": few.length ? when(few[start]) : "" });
  slider.addEventListener("input", () => {
    const i = Number(slider.value);
    if (i === last) chosen.delete(name); else chosen.set(name, i);
    slider.setAttribute("aria-valuetext", when(few[i]));
    show(i);
  });
  if (few.length) show(start);

  const overSteps = layout.prompts && layout.prompts.length && few.length > 1 ? h("div", { class: "over-steps" },
    h("h3", {}, `Each prompt over the steps (${s.few_steps} steps, seeds ${layout.seeds.join(", ")})`),
    h("table", { id: "over-steps" },
      h("thead", {}, h("tr", {}, h("th", {}, "prompt"), few.map((g) => h("th", {}, when(g))))),
      h("tbody", {}, layout.prompts.map((p, row) => h("tr", {},
        h("th", { class: "prompt-label", scope: "row" }, p),
        few.map((g, i) => h("td", {}, zoom(fewItems, i, `${p}, ${when(g)}`, crop(url(g), row, layout))))))))) : null;

  return [
    h("div", { class: "gallery-head" },
      few.length > 1 ? [h("label", { for: "gallery-slider" }, "Step"), slider] : null, stepText,
      h("span", { class: "muted small" }, "click a picture (or Enter) to enlarge it; ← → step through in the enlarged view")),
    latest,
    overSteps,
  ];
}

// One row of a grid (a prompt at every seed), cut out with CSS: the grid as a background R rows tall.
function crop(src, row, layout) {
  const rows = layout.prompts.length, cols = layout.seeds.length;
  const y = rows > 1 ? (100 * row) / (rows - 1) : 0;
  return h("span", { class: "crop", "aria-hidden": "true",
    style: `background-image: url("${src}"); background-size: 100% ${rows * 100}%; background-position: 0 ${y}%; aspect-ratio: ${cols} / 1` });
}

// Pictures enlarged: a modal <dialog> (the browser keeps the focus inside it, Esc closes it), with previous / next
// (buttons or the arrow keys) through a list of pictures; closing it gives the focus back to the picture opened.
// Also the labelled sample grid (prompts on its rows, seeds over its columns) that the gallery and the dialog show.

import { clear, h } from "./util.js";

// item: {src, title, prompts?: [..], seeds?: [..]}; the image's rows are the prompts, its columns the seeds.
export function labelledGrid(item, picture) {
  const rows = item.prompts || [], cols = item.seeds || [];
  if (!rows.length) return picture;
  return h("div", { class: "labelled" },
    cols.length ? h("div", { class: "seeds", style: `grid-template-columns: repeat(${cols.length}, 1fr)` },
      cols.map((s) => h("span", {}, `seed ${s}`))) : null,
    h("div", { class: "prompts", style: `grid-template-rows: repeat(${rows.length}, 1fr)` },
      rows.map((p) => h("div", { class: "prompt", title: p }, p))),
    picture);
}

let dialog = null;
const state = { items: [], index: 0, opener: null };

function build() {
  const title = h("span", { class: "title", id: "lightbox-title" });
  const prev = h("button", { type: "button", class: "small", id: "lightbox-prev", "aria-label": "previous picture", onclick: () => show(state.index - 1) }, "‹ Previous");
  const next = h("button", { type: "button", class: "small", id: "lightbox-next", "aria-label": "next picture", onclick: () => show(state.index + 1) }, "Next ›");
  const close = h("button", { type: "button", class: "small", id: "lightbox-close", "aria-label": "close", onclick: () => dialog.close() }, "Close (Esc)");
  const body = h("div", { class: "lightbox-body" });
  dialog = h("dialog", { class: "lightbox", id: "lightbox", "aria-labelledby": "lightbox-title" },
    h("div", { class: "lightbox-bar" }, title, prev, next, close), body);
  dialog.parts = { title, prev, next, close, body };
  dialog.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft" && state.index > 0) { e.preventDefault(); show(state.index - 1); }
    if (e.key === "ArrowRight" && state.index < state.items.length - 1) { e.preventDefault(); show(state.index + 1); }
  });
  // a click on the backdrop (outside the dialog's box) closes it
  dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });
  dialog.addEventListener("close", () => {
    if (state.opener && state.opener.isConnected) state.opener.focus();
  });
  document.body.append(dialog);
  // another page (a link, Back): the enlarged picture belongs to the page left
  window.addEventListener("hashchange", () => { if (dialog.open) dialog.close(); });
}

function show(index) {
  const { title, prev, next, body } = dialog.parts;
  state.index = Math.max(0, Math.min(state.items.length - 1, index));
  const item = state.items[state.index];
  title.textContent = state.items.length > 1 ? `${item.title} (${state.index + 1} / ${state.items.length})` : item.title;
  prev.hidden = next.hidden = state.items.length < 2;
  prev.disabled = state.index === 0;
  next.disabled = state.index === state.items.length - 1;
  clear(body).append(labelledGrid(item, h("img", { src: item.src, alt: item.title, class: "plain", id: "lightbox-image" })));
}

export function openLightbox(items, index, opener) {
  if (!dialog) build();
  state.items = items;
  state.opener = opener || document.activeElement;
  show(index);
  if (!dialog.open) dialog.showModal();
  dialog.parts.close.focus();
}

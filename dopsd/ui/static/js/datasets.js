// Datasets: the list (with the one-click miniature run), and one dataset: upload / drop images, edit captions,
// the dataset check's problems per file. Caption edits not yet saved are drafts: kept in the browser's storage
// across re-renders (a preset or trigger word change reloads the page's data), in-app navigation and reloads, and
// leaving the page with drafts asks first.

import { openLightbox } from "./lightbox.js";
import { act, api, badge, card, clear, field, form, h, notify } from "./util.js";

// --- drafts: unsaved caption edits per dataset, {image file name: text}, in localStorage (per app home) ---------
const draftKey = (app, name) => `dopsd-drafts:${app.info.home}:${name}`;

function readDrafts(app, name) {
  try {
    const d = JSON.parse(localStorage.getItem(draftKey(app, name)) || "{}");
    return d && typeof d === "object" ? d : {};
  } catch {
    return {};
  }
}

function writeDrafts(app, name, drafts) {
  try {
    if (Object.keys(drafts).length) localStorage.setItem(draftKey(app, name), JSON.stringify(drafts));
    else localStorage.removeItem(draftKey(app, name));
  } catch {
    // storage full or off: the drafts still live while the page is open, and leaving it still asks
  }
}

// Closing or reloading the tab with an unsaved caption on screen asks first (the browser's own dialog).
window.addEventListener("beforeunload", (e) => {
  if (document.querySelector(".file.unsaved")) {
    e.preventDefault();
    e.returnValue = "";
  }
});

export async function datasetsPage(main, _params, app) {
  const list = await api("/api/datasets");
  const name = h("input", { name: "dataset-name", placeholder: "my_concept", pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}" });
  const steps = h("input", { name: "tryit-steps", type: "number", min: 1, max: 2000, value: 100 });
  const tryit = (button) => act(button, async () => {
    const r = await api("/api/tryit", { method: "POST", body: { steps: Number(steps.value) } });
    location.hash = `#/runs/${encodeURIComponent(r.name)}`;
  });
  const createDataset = (button) => act(button, async () => {
    await api("/api/datasets", { method: "POST", body: { name: name.value.trim() } });
    location.hash = `#/datasets/${encodeURIComponent(name.value.trim())}`;
  });
  main.append(
    h("div", { class: "hero" },
      h("div", {},
        h("h1", {}, "Try it on the built-in miniature"),
        h("p", {}, "No GPU needed: a 4-step miniature turbo learns a new colour bound to the word ",
          h("code", {}, "sks"), " with D-OPSD on the CPU (100 steps: about a minute or two). Watch its loss, few-step health and sample grids live.")),
      form({ class: "row", id: "tryit-form" }, tryit, field("steps", steps),
        h("button", { class: "primary", id: "tryit", type: "submit" }, "▶ Try it"))),
    card("Datasets",
      h("p", { class: "muted" }, "Folders of images with same-name .txt captions under ",
        h("code", {}, `${app.info.home}/datasets`), " — the same folders `dopsd train data.path=…` reads."),
      list.datasets.length ? h("table", { class: "table" },
        h("thead", {}, h("tr", {}, h("th", {}, "name"), h("th", {}, "images"), h("th", {}, "trigger word"), h("th", {}, "preset"))),
        h("tbody", {}, list.datasets.map((d) => h("tr", { class: "link", onclick: () => { location.hash = `#/datasets/${encodeURIComponent(d.name)}`; } },
          h("td", {}, h("a", { href: `#/datasets/${encodeURIComponent(d.name)}` }, d.name),
            Object.keys(readDrafts(app, d.name)).length ? h("span", { class: "unsaved-note" }, " · unsaved caption edits") : null),
          h("td", {}, d.images),
          h("td", {}, d.trigger_word || "–"), h("td", {}, d.preset))))) : h("p", {}, "No datasets yet."),
      form({ class: "row spaced", id: "create-form" }, createDataset, field("new dataset", name),
        h("button", { id: "create-dataset", type: "submit" }, "Create"),
        h("button", { type: "button", id: "create-mini-dataset", onclick: (e) => act(e.target, async () => {
          const r = await api("/api/datasets", { method: "POST", body: { mini: true } });
          location.hash = `#/datasets/${encodeURIComponent(r.name)}`;
        }) }, "Create the miniature's concept dataset"))));
}

export async function datasetPage(main, params, app) {
  const name = params.name;
  const view = h("div");
  main.append(view);
  let data;
  const drafts = readDrafts(app, name);
  const keep = () => writeDrafts(app, name, drafts);
  const draftBar = h("div", { class: "drafts", id: "drafts" });
  // Navigating elsewhere in the app keeps the drafts (they come back with the page); say so once.
  window.addEventListener("hashchange", () => {
    const n = Object.keys(drafts).length;
    if (n) notify(`${n} unsaved caption edit(s) in ${name} are kept as drafts: open the dataset again to save them.`);
  }, { once: true });

  async function load() {
    data = await api(`/api/datasets/${encodeURIComponent(name)}`);
    render();
  }

  function render() {
    clear(view);
    for (const image of Object.keys(drafts)) if (!data.files.some((f) => f.name === image)) delete drafts[image];
    const preset = h("select", { name: "preset" }, app.presets.presets.map((p) =>
      h("option", { value: p.name, selected: p.name === data.preset }, p.name)));
    const trigger = h("input", { name: "trigger", value: data.trigger_word || "", placeholder: "sks" });
    const saveSettings = () => act(null, async () => {
      await api(`/api/datasets/${encodeURIComponent(name)}/settings`, { method: "PUT",
        body: { preset: preset.value, trigger_word: trigger.value } });
      await load();
    });
    preset.addEventListener("change", saveSettings);
    trigger.addEventListener("change", saveSettings);
    const total = data.problem_count;
    view.append(
      h("div", { class: "page-head" },
        h("h1", {}, data.name, " ", total ? badge("fails") : badge("ok")),
        h("div", { class: "row" },
          h("a", { class: "button", href: `#/new?dataset=${encodeURIComponent(name)}` }, "New run with this dataset"),
          h("a", { class: "button", href: `#/new?dataset=${encodeURIComponent(name)}&probe=1` }, "Probe the teacher first"))),
      card(null,
        h("div", { class: "row" },
          field("preset (sets the size check)", preset),
          field("trigger word", trigger, h("span", {}, "replaces ", h("code", {}, "[V]"), " in captions, or is put in front"))),
        h("div", { id: "check", class: total ? "check bad" : "check good" },
          total ? `The dataset check found ${total} problem(s); training would not start until they are fixed.`
            : `The dataset check passes: ${data.files.length} image(s), every one readable, captioned and large enough.`,
          data.problems.length ? h("ul", {}, data.problems.map((p) => h("li", {}, p))) : null),
        data.notices.length ? h("div", { class: "check warn" }, h("ul", {}, data.notices.map((n) => h("li", {}, n)))) : null),
      draftBar,
      dropZone(),
      h("div", { class: "files" }, data.files.map(fileCard)));
    keep();
    showDrafts();
  }

  function showDrafts() {
    const n = Object.keys(drafts).length;
    clear(draftBar);
    if (!n) return;
    draftBar.append(h("div", { class: "check warn row", role: "status" },
      h("span", {}, `${n} caption edit(s) not saved yet (kept in this browser until you save or discard them).`),
      h("button", { class: "small", id: "save-all-captions", onclick: (e) => act(e.target, async () => {
        for (const [image, text] of Object.entries({ ...drafts })) {
          await api(`/api/datasets/${encodeURIComponent(name)}/captions`, { method: "PUT", body: { image, text } });
          delete drafts[image];
          keep();
        }
        notify("saved every caption edit", "good");
        await load();
      }) }, "Save all")));
  }

  function dropZone() {
    const input = h("input", { type: "file", multiple: true, id: "upload-input", "aria-label": "choose images (and .txt captions) to upload",
      accept: "image/png,image/jpeg,image/webp,image/bmp,.txt", onchange: () => upload(input.files) });
    if (data.layout === "metadata") {
      return card(null, h("p", {}, "This dataset lists its images in metadata.jsonl: add images and captions there."));
    }
    const zone = h("div", { class: "drop", id: "drop" },
      h("p", {}, h("strong", {}, "Drop images here"), " (png, jpg, webp, bmp; .txt captions with the same name come along) or ",
        h("label", { class: "link-like" }, "choose files", input)));
    zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (e) => { e.preventDefault(); zone.classList.remove("over"); upload(e.dataTransfer.files); });
    return zone;
  }

  async function upload(files) {
    if (!files || !files.length) return;
    const form = new FormData();
    form.append("preset", data.preset);
    for (const f of files) form.append("files", f, f.name);
    try {
      const r = await api(`/api/datasets/${encodeURIComponent(name)}/files`, { method: "POST", form });
      const n = r.counts || { images: r.saved.length, captions: 0 };  // counted by the server: images and captions apart
      if (r.saved.length) notify(`added ${n.images} image${n.images === 1 ? "" : "s"}, ${n.captions} caption${n.captions === 1 ? "" : "s"}`, "good");
      for (const bad of r.refused) notify(`${bad.file} refused: ${bad.problems.join("; ")}`, "error");
    } catch (err) {
      for (const bad of (err.data && err.data.refused) || []) notify(`${bad.file} refused: ${bad.problems.join("; ")}`, "error");
      if (!err.data || !err.data.refused) notify(err.message, "error");
    }
    await load();
  }

  function fileCard(f) {
    const saved = f.caption || "";
    if (drafts[f.name] === saved) delete drafts[f.name];
    const text = h("textarea", { rows: Math.max(2, (drafts[f.name] ?? saved).trim().split("\n").length + 1), "data-file": f.name,
      disabled: data.layout !== "folder", "aria-label": `caption of ${f.name}`,
      placeholder: "caption (one per line; [V] = the trigger word)" });
    text.value = drafts[f.name] ?? saved;
    const note = h("span", { class: "unsaved-note" });
    const discard = h("button", { type: "button", class: "small ghost", onclick: () => {
      delete drafts[f.name];
      keep();
      text.value = saved;
      mark();
    } }, "Discard edit");
    const mark = () => {
      const dirty = f.name in drafts;
      cardEl.classList.toggle("unsaved", dirty);
      note.textContent = dirty ? "unsaved edit" : "";
      discard.hidden = !dirty;
      showDrafts();
    };
    text.addEventListener("input", () => {
      if (text.value === saved) delete drafts[f.name];
      else drafts[f.name] = text.value;
      keep();
      mark();
    });
    const save = h("button", { class: "small", "aria-label": `save the caption of ${f.name}`, onclick: (e) => act(e.target, async () => {
      await api(`/api/datasets/${encodeURIComponent(name)}/captions`, { method: "PUT", body: { image: f.name, text: text.value } });
      delete drafts[f.name];
      keep();
      notify(`saved ${f.caption_file}`, "good");
      await load();
    }) }, "Save");
    const remove = h("button", { class: "small ghost", title: "move the image and its caption to the trash folder",
      "aria-label": `remove ${f.name} (to the trash folder)`,
      onclick: (e) => act(e.target, async () => {
        await api(`/api/datasets/${encodeURIComponent(name)}/remove`, { method: "POST", body: { image: f.name } });
        delete drafts[f.name];
        keep();
        await load();
      }) }, "Remove");
    const cardEl = h("div", { class: `file ${f.problems.length ? "has-problem" : ""}`, "data-name": f.name },
      // a link to the image (not a button: the card's buttons are its actions), enlarged in place
      h("a", { class: "zoom", href: f.url, "aria-label": `enlarge ${f.name}`,
        onclick: (e) => { e.preventDefault(); openLightbox([{ src: f.url, title: f.name }], 0, e.currentTarget); } },
      h("img", { src: f.url, alt: "", class: "thumb", loading: "lazy", title: f.name,
        onerror: (e) => e.target.classList.add("unreadable") })),
      h("div", { class: "file-body" },
        h("div", { class: "file-name" }, f.name, f.size ? h("span", { class: "muted" }, ` ${f.size[0]}×${f.size[1]}`) : null),
        text,
        f.trained_as.length ? h("div", { class: "trained-as" }, "trained as: ",
          f.trained_as.map((c, i) => [i ? " · " : "", highlight(c, data.trigger_word)])) : null,
        f.problems.length ? h("ul", { class: "problems" }, f.problems.map((p) => h("li", {}, p))) : null,
        data.layout === "folder" ? h("div", { class: "row" }, save, discard, remove, note) : null));
    mark();
    return cardEl;
  }

  await load();
}

function highlight(caption, word) {
  if (!word) return caption;
  const parts = caption.split(word);
  return parts.map((p, i) => [i ? h("mark", {}, word) : null, p]);
}

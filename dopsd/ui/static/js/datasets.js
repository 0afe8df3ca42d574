// Datasets: the list (with the one-click miniature run), and one dataset: upload / drop images, edit captions,
// the dataset check's problems per file.

import { act, api, badge, card, clear, field, h, notify } from "./util.js";

export async function datasetsPage(main, _params, app) {
  const list = await api("/api/datasets");
  const name = h("input", { name: "dataset-name", placeholder: "my_concept", pattern: "[A-Za-z0-9][A-Za-z0-9._-]*" });
  const steps = h("input", { name: "tryit-steps", type: "number", min: 1, max: 2000, value: 100 });
  main.append(
    h("div", { class: "hero" },
      h("div", {},
        h("h1", {}, "Try it on the built-in miniature"),
        h("p", {}, "No GPU needed: a 4-step miniature turbo learns a new colour bound to the word ",
          h("code", {}, "sks"), " with D-OPSD on the CPU (100 steps: about a minute or two). Watch its loss, few-step health and sample grids live.")),
      h("div", { class: "row" }, field("steps", steps),
        h("button", { class: "primary", id: "tryit", onclick: (e) => act(e.target, async () => {
          const r = await api("/api/tryit", { method: "POST", body: { steps: Number(steps.value) } });
          location.hash = `#/runs/${encodeURIComponent(r.name)}`;
        }) }, "▶ Try it"))),
    card("Datasets",
      h("p", { class: "muted" }, "Folders of images with same-name .txt captions under ",
        h("code", {}, `${app.info.home}/datasets`), " — the same folders `dopsd train data.path=…` reads."),
      list.datasets.length ? h("table", { class: "table" },
        h("thead", {}, h("tr", {}, h("th", {}, "name"), h("th", {}, "images"), h("th", {}, "trigger word"), h("th", {}, "preset"))),
        h("tbody", {}, list.datasets.map((d) => h("tr", { class: "link", onclick: () => { location.hash = `#/datasets/${encodeURIComponent(d.name)}`; } },
          h("td", {}, h("a", { href: `#/datasets/${encodeURIComponent(d.name)}` }, d.name)), h("td", {}, d.images),
          h("td", {}, d.trigger_word || "–"), h("td", {}, d.preset))))) : h("p", {}, "No datasets yet."),
      h("div", { class: "row spaced" }, field("new dataset", name),
        h("button", { id: "create-dataset", onclick: (e) => act(e.target, async () => {
          await api("/api/datasets", { method: "POST", body: { name: name.value.trim() } });
          location.hash = `#/datasets/${encodeURIComponent(name.value.trim())}`;
        }) }, "Create"),
        h("button", { onclick: (e) => act(e.target, async () => {
          const r = await api("/api/datasets", { method: "POST", body: { mini: true } });
          location.hash = `#/datasets/${encodeURIComponent(r.name)}`;
        }) }, "Create the miniature's concept dataset"))));
}

export async function datasetPage(main, params, app) {
  const name = params.name;
  const view = h("div");
  main.append(view);
  let data;

  async function load() {
    data = await api(`/api/datasets/${encodeURIComponent(name)}`);
    render();
  }

  function render() {
    clear(view);
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
      dropZone(),
      h("div", { class: "files" }, data.files.map(fileCard)));
  }

  function dropZone() {
    const input = h("input", { type: "file", multiple: true, id: "upload-input",
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
      if (r.saved.length) notify(`added ${r.saved.length} file(s)`, "good");
      for (const bad of r.refused) notify(`${bad.file} refused: ${bad.problems.join("; ")}`, "error");
    } catch (err) {
      for (const bad of (err.data && err.data.refused) || []) notify(`${bad.file} refused: ${bad.problems.join("; ")}`, "error");
      if (!err.data || !err.data.refused) notify(err.message, "error");
    }
    await load();
  }

  function fileCard(f) {
    const text = h("textarea", { rows: Math.max(2, (f.caption || "").trim().split("\n").length + 1), "data-file": f.name, disabled: data.layout !== "folder",
      placeholder: "caption (one per line; [V] = the trigger word)" }, f.caption || "");
    text.value = f.caption || "";
    const save = h("button", { class: "small", onclick: (e) => act(e.target, async () => {
      await api(`/api/datasets/${encodeURIComponent(name)}/captions`, { method: "PUT", body: { image: f.name, text: text.value } });
      notify(`saved ${f.caption_file}`, "good");
      await load();
    }) }, "Save");
    const remove = h("button", { class: "small ghost", title: "move the image and its caption to the trash folder",
      onclick: (e) => act(e.target, async () => {
        await api(`/api/datasets/${encodeURIComponent(name)}/remove`, { method: "POST", body: { image: f.name } });
        await load();
      }) }, "Remove");
    return h("div", { class: `file ${f.problems.length ? "has-problem" : ""}`, "data-name": f.name },
      h("img", { src: f.url, alt: "", class: "thumb", loading: "lazy", title: f.name,
        onerror: (e) => e.target.classList.add("unreadable") }),
      h("div", { class: "file-body" },
        h("div", { class: "file-name" }, f.name, f.size ? h("span", { class: "muted" }, ` ${f.size[0]}×${f.size[1]}`) : null),
        text,
        f.trained_as.length ? h("div", { class: "trained-as" }, "trained as: ",
          f.trained_as.map((c, i) => [i ? " · " : "", highlight(c, data.trigger_word)])) : null,
        f.problems.length ? h("ul", { class: "problems" }, f.problems.map((p) => h("li", {}, p))) : null,
        data.layout === "folder" ? h("div", { class: "row" }, save, remove) : null));
  }

  await load();
}

function highlight(caption, word) {
  if (!word) return caption;
  const parts = caption.split(word);
  return parts.map((p, i) => [i ? h("mark", {}, word) : null, p]);
}

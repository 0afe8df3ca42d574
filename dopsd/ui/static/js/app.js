// The app shell: hash routes → pages; each page may poll (app.every), stopped when the route changes.

import { datasetPage, datasetsPage } from "./datasets.js";
import { newRunPage } from "./newrun.js";
import { runPage, runsPage } from "./runs.js";
import { comparePage, comparisonPage, jobsPage, probePage, probesPage, reportPage, reportsPage } from "./results.js";
import { api, clear, h, notify } from "./util.js";

const ROUTES = [
  [/^\/?$/, datasetsPage, "datasets"],
  [/^\/datasets$/, datasetsPage, "datasets"],
  [/^\/datasets\/(?<name>[^/]+)$/, datasetPage, "datasets"],
  [/^\/new$/, newRunPage, "new"],
  [/^\/runs$/, runsPage, "runs"],
  [/^\/runs\/(?<name>[^/]+)$/, runPage, "runs"],
  [/^\/probes$/, probesPage, "probes"],
  [/^\/probes\/(?<name>[^/]+)$/, probePage, "probes"],
  [/^\/compare$/, comparePage, "compare"],
  [/^\/compare\/(?<id>[^/]+)$/, comparisonPage, "compare"],
  [/^\/reports$/, reportsPage, "reports"],
  [/^\/reports\/(?<name>[^/]+)$/, reportPage, "reports"],
  [/^\/jobs$/, jobsPage, "jobs"],
];

const app = { info: null, presets: null, timers: [], generation: 0 };

app.every = (ms, fn) => {
  const generation = app.generation;
  let busy = false;
  const id = setInterval(async () => {
    if (busy || generation !== app.generation || document.hidden) return;
    busy = true;
    try { await fn(); } catch (err) { console.warn(err); } finally { busy = false; }
  }, ms);
  app.timers.push(id);
};

async function route() {
  app.generation += 1;
  app.timers.forEach(clearInterval);
  app.timers = [];
  const [path, query] = location.hash.replace(/^#/, "").split("?");
  const params = Object.fromEntries(new URLSearchParams(query || ""));
  const main = clear(document.getElementById("main"));
  for (const [pattern, page, tab] of ROUTES) {
    const m = pattern.exec(path || "/");
    if (!m) continue;
    Object.assign(params, Object.fromEntries(Object.entries(m.groups || {}).map(([k, v]) => [k, decodeURIComponent(v)])));
    document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.tab === tab));
    const generation = app.generation;
    try {
      await page(main, params, app);
    } catch (err) {
      if (generation === app.generation) main.append(h("div", { class: "check bad", role: "alert" }, err.message));
    }
    return;
  }
  main.append(h("p", {}, "No such page. ", h("a", { href: "#/" }, "Back to the start")));
}

async function queueStatus() {
  try {
    const data = await api("/api/jobs");
    const running = data.jobs.filter((j) => j.status === "running" || j.status === "stopping").length;
    const queued = data.jobs.filter((j) => j.status === "queued").length;
    document.getElementById("queue").textContent = running || queued ? `${running} running · ${queued} queued` : "idle";
  } catch (err) {
    document.getElementById("queue").textContent = "app not reachable";
  }
}

async function start() {
  try {
    [app.info, app.presets] = await Promise.all([api("/api/info"), api("/api/presets")]);
  } catch (err) {
    notify(err.message, "error");
    return;
  }
  document.getElementById("home").textContent = app.info.home;
  window.addEventListener("hashchange", route);
  await route();
  queueStatus();
  setInterval(queueStatus, 3000);
}

start();

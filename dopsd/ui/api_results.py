"""API: results — side-by-side comparisons (`dopsd sample`), exports (`dopsd export`), and the benchmark report and
demo folders (`dopsd bench --out`, `dopsd demo --out`), viewed or started as jobs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from dopsd.lora.layout import has_interchange
from dopsd.ui import adapter, runs
from dopsd.ui.home import check_name
from dopsd.ui.http import Context, HTTPError, endpoint, job_public
from dopsd.ui.jobs import dopsd_command

EXPORT_FORMATS = ("diffusers", "comfyui")
MAX_PROMPTS, MAX_SEEDS = 8, 8


def _int_list(value: Any, what: str, limit: int) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or len(value) > limit
        or not all(isinstance(v, int) and 0 <= v < 2**31 for v in value)
    ):
        raise HTTPError(400, f"{what}: a list of 1–{limit} whole numbers ≥ 0")
    return value


# --- compare --------------------------------------------------------------------------------------------------
def compare_list(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    if request.method == "POST":
        return start_compare(ctx, body)
    out = []
    for folder in sorted(ctx.home.area("compare").iterdir(), key=lambda p: p.name, reverse=True):
        data = runs.read_json(folder / "compare.json")
        if isinstance(data, dict):
            out.append(
                {
                    "id": folder.name,
                    "runs": data.get("runs"),
                    "prompts": data.get("prompts"),
                    "created": data.get("created"),
                }
            )
    return {"comparisons": out}


def start_compare(ctx: Context, body: dict) -> dict[str, Any]:
    """`dopsd sample RUN --prompt … --seeds …` per run, and the base (`--no-lora`) of the first run: the same
    prompts and seeds give the same noise, so the grids compare sample by sample."""
    names = body.get("runs")
    if not isinstance(names, list) or not names or len(names) > 8:
        raise HTTPError(400, "runs: a list of 1–8 run names")
    folders = []
    for name in names:
        folder = ctx.home.item("runs", check_name(str(name), "run name"), "run name")
        if not (folder / "lora.safetensors").is_file() and not (folder / "model.safetensors").is_file():
            raise HTTPError(400, f"run {name!r} has no trained weights yet (lora.safetensors); let it finish first")
        folders.append(folder)
    prompts = body.get("prompts")
    if (
        not isinstance(prompts, list)
        or not prompts
        or len(prompts) > MAX_PROMPTS
        or not all(isinstance(p, str) and p.strip() and len(p) < 500 and "\n" not in p for p in prompts)
    ):
        raise HTTPError(400, f"prompts: 1–{MAX_PROMPTS} one-line prompts")
    seeds = _int_list(body.get("seeds", [0, 1, 2, 3]), "seeds", MAX_SEEDS)
    steps = body.get("steps")
    if steps is not None and (not isinstance(steps, int) or not 1 <= steps <= 200):
        raise HTTPError(400, "steps: a whole number from 1 to 200, or empty for each model's few-step setting")
    with ctx.names:
        cid = ctx.home.fresh_name("compare", time.strftime("cmp-%Y%m%d-%H%M%S"))
        out = ctx.home.item("compare", cid)
        out.mkdir()
    common = [a for p in prompts for a in ("--prompt", p.strip())] + ["--seeds", *map(str, seeds)]
    common += ["--steps", str(steps)] if steps else []
    entries = []
    if body.get("base", True):
        entries.append(("before", folders[0], ["--no-lora"]))
    entries += [(f.name, f, []) for f in folders]
    records = []
    for i, (label, folder, extra) in enumerate(entries):
        target = out / f"{i:02d}-{label}.png"
        argv = dopsd_command("sample", str(folder), *extra, *common, "--out", str(target))
        job = ctx.jobs.submit("sample", argv, f"sample {label} ({cid})", {"compare": cid, "entry": label})
        records.append({"label": label, "run": folder.name, "file": target.name, "job": job.id})
    data = {
        "id": cid,
        "created": time.time(),
        "runs": [f.name for f in folders],
        "base": bool(body.get("base", True)),
        "prompts": [p.strip() for p in prompts],
        "seeds": seeds,
        "steps": steps,
        "entries": records,
    }
    adapter.atomic_write_json(out / "compare.json", data)
    return data


def compare_view(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    cid = request.path_params["id"]
    folder = ctx.home.item("compare", cid)
    data = runs.read_json(folder / "compare.json")
    if not isinstance(data, dict):
        raise FileNotFoundError(f"no comparison {cid!r}")
    for entry in data["entries"]:
        job = ctx.jobs.get(entry["job"])
        entry["status"] = job.status if job else None
        entry["error"] = (
            ctx.jobs.log_tail(job, 2000).strip()[-600:] if job and job.status in ("failed", "lost") else None
        )
        path = folder / entry["file"]
        entry["url"] = f"/files/compare/{cid}/{entry['file']}" if path.is_file() else None
    return data


# --- export ---------------------------------------------------------------------------------------------------
def run_family(folder: Path) -> str | None:
    """The model family a run trained: its LoRA's own record (lora_config.json), else its config.yaml."""
    meta = runs.read_json(folder / "lora_config.json")
    if isinstance(meta, dict) and meta.get("family"):
        return str(meta["family"])
    return (runs.read_config(folder).get("model") or {}).get("family") or None


def export_formats(folder: Path) -> list[str]:
    """The formats `dopsd export` can write for this run: a LoRA of a family that other tools have a model for
    (the family registry says which: the miniature's LoRA loads only in dopsd); [] otherwise."""
    if not (folder / "lora.safetensors").is_file():
        return []  # no LoRA yet, or a full fine-tune (model.safetensors): nothing export converts
    family = run_family(folder)
    return list(EXPORT_FORMATS) if family and has_interchange(family) else []


def start_export(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    name = request.path_params["name"]
    folder = ctx.home.item("runs", name, "run name")
    if not folder.is_dir():
        raise FileNotFoundError(f"no run {name!r}")
    fmt = body.get("format")
    if fmt not in EXPORT_FORMATS:
        raise HTTPError(400, f"format: one of {', '.join(EXPORT_FORMATS)}")
    if fmt not in export_formats(folder):
        family = run_family(folder) or "unknown"
        raise HTTPError(
            400,
            f"run {name!r} has no {fmt} export: "
            + (
                "it has no LoRA yet (lora.safetensors is written when the run ends)"
                if not (folder / "lora.safetensors").is_file()
                else f"its model family ({family}) loads only in dopsd, which has no {fmt} model for it"
            ),
        )
    out_dir = ctx.home.area("exports") / name
    out_dir.mkdir(exist_ok=True)
    with ctx.names:
        claimed = {j.target.get("file") for j in ctx.jobs.list() if j.status in ("queued", "running", "stopping")}
        stem, n = f"{name}_{fmt}", 1
        while (out_dir / f"{stem}.safetensors").exists() or f"exports/{name}/{stem}.safetensors" in claimed:
            n += 1  # earlier exports, and ones being written now, are kept
            stem = f"{name}_{fmt}-{n}"
        target = out_dir / f"{stem}.safetensors"
        argv = dopsd_command("export", str(folder), "--format", fmt, "--out", str(target))
        job = ctx.jobs.submit(
            "export",
            argv,
            f"export {name} ({fmt})",
            {"export": name, "file": f"exports/{name}/{target.name}"},
            queued=False,
        )
    return {"job": job_public(ctx, job), "file": f"/files/exports/{name}/{target.name}"}


def exports_of(ctx: Context, run: str) -> list[dict[str, Any]]:
    """The run's export jobs, newest first, with the produced file (when it exists) or the command's message."""
    out = []
    for job in ctx.jobs.list():
        if job.target.get("export") != run:
            continue
        path = ctx.home.root / job.target.get("file", "")
        done = path.is_file() and job.status == "succeeded"
        out.append(
            {
                "job": job_public(ctx, job),
                "format": job.argv[job.argv.index("--format") + 1],
                "file": f"/files/{job.target['file']}" if done else None,
                "size": path.stat().st_size if done else None,
                "message": ctx.jobs.log_tail(job, 2000).strip()[-600:] if job.status in ("failed", "lost") else None,
            }
        )
    return out


# --- reports: benchmark and demo folders ----------------------------------------------------------------------
def _kind(folder: Path) -> str | None:
    if (folder / "report.html").is_file() or (folder / "results.json").is_file():
        return "bench"
    if (folder / "demo.png").is_file() or (folder / "summary.json").is_file():
        return "demo"
    return None


def report_list(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    if request.method == "POST":
        return start_report(ctx, body)
    out = []
    for folder in sorted(ctx.home.area("reports").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if folder.is_dir() and not folder.name.startswith("."):
            job = ctx.jobs.active_for("report", folder.name) or ctx.jobs.last_for("report", folder.name)
            out.append({"name": folder.name, "kind": _kind(folder), "job": job_public(ctx, job)})
    for job in ctx.jobs.list():  # started but the command has not created its folder yet
        name = job.target.get("report")
        if name and job.status in ("queued", "running") and not (ctx.home.area("reports") / name).exists():
            out.insert(0, {"name": name, "kind": None, "job": job_public(ctx, job)})
    return {"reports": out}


def report_view(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    name = request.path_params["name"]
    folder = ctx.home.item("reports", name)
    job = ctx.jobs.active_for("report", name) or ctx.jobs.last_for("report", name)
    if not folder.is_dir():
        if job is None:
            raise FileNotFoundError(f"no report {name!r}")
        return {"name": name, "kind": None, "job": job_public(ctx, job), "log": ctx.jobs.log_tail(job)}
    kind = _kind(folder)
    base = f"/files/reports/{name}"
    out: dict[str, Any] = {
        "name": name,
        "kind": kind,
        "job": job_public(ctx, job),
        "log": ctx.jobs.log_tail(job) if job else None,
    }
    if kind == "bench":
        out["html"] = f"{base}/report.html" if (folder / "report.html").is_file() else None
        out["files"] = {
            f: f"{base}/{f}" for f in ("report.md", "results.json", "claims.json") if (folder / f).is_file()
        }
        out["claims"] = runs.read_json(folder / "claims.json")
    elif kind == "demo":
        out["summary"] = runs.read_json(folder / "summary.json")
        out["image"] = f"{base}/demo.png" if (folder / "demo.png").is_file() else None
    return out


def start_report(ctx: Context, body: dict) -> dict[str, Any]:
    with ctx.names:
        return _start_report(ctx, body)


def _start_report(ctx: Context, body: dict) -> dict[str, Any]:
    """`dopsd bench --out HOME/reports/NAME …` or `dopsd demo --out HOME/reports/NAME …` as a job."""
    kind = body.get("kind")
    if kind not in ("bench", "demo"):
        raise HTTPError(400, "kind: bench or demo")
    if body.get("name"):
        name = check_name(str(body["name"]), "report name")
        if (ctx.home.area("reports") / name).exists() or ctx.jobs.active_for("report", name):
            raise FileExistsError(f"reports/{name} already exists; choose another name")
    else:
        base = time.strftime(f"{kind}-%Y%m%d-%H%M%S")
        name, n = base, 1
        while (ctx.home.area("reports") / name).exists() or ctx.jobs.active_for("report", name):
            n += 1  # a started job may not have created its folder yet
            name = f"{base}-{n}"
    out = str(ctx.home.area("reports") / name)
    if kind == "bench":
        size = body.get("size", "quick")
        if size not in ("tiny", "quick", "full"):
            raise HTTPError(400, "size: tiny, quick or full")
        args = ["bench", "--out", out] + ([f"--{size}"] if size != "full" else [])
        for key in ("seeds", "steps", "threads"):
            if body.get(key) is not None:
                args += [f"--{key}", str(_bounded(body[key], key, 1, 100_000))]
        for key in ("settings", "methods"):
            if body.get(key):
                values = body[key]
                if not isinstance(values, list) or not all(isinstance(v, str) and check_name(v) for v in values):
                    raise HTTPError(400, f"{key}: a list of names")
                args += [f"--{key}", *values]
    else:
        args = ["demo", "--out", out]
        for key in ("steps", "samples", "seed"):
            if body.get(key) is not None:
                args += [f"--{key}", str(_bounded(body[key], key, 0 if key == "seed" else 1, 100_000))]
    job = ctx.jobs.submit(kind, dopsd_command(*args), f"{kind} {name}", {"report": name})
    return {"name": name, "job": job_public(ctx, job)}


def _bounded(value: Any, key: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise HTTPError(400, f"{key}: a whole number from {low} to {high}")
    return value


def routes() -> list[Route]:
    return [
        Route("/api/compare", endpoint(compare_list), methods=["GET", "POST"]),
        Route("/api/compare/{id}", endpoint(compare_view)),
        Route("/api/runs/{name}/export", endpoint(start_export), methods=["POST"]),
        Route("/api/reports", endpoint(report_list), methods=["GET", "POST"]),
        Route("/api/reports/{name}", endpoint(report_view)),
    ]

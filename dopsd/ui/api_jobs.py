"""API: runs (start, watch, stop, resume), the one-click miniature run, probes, and the job queue."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from dopsd.ui import adapter, api_results, datasets, preflight, queue, runs
from dopsd.ui.api_data import build_config, write_mini_dataset
from dopsd.ui.home import PathRefused, check_name, inside
from dopsd.ui.http import Context, HTTPError, endpoint, job_public
from dopsd.ui.jobs import Job, dopsd_command


def _new_name(ctx: Context, body: dict, area: str, default: str) -> str:
    """The name the user chose (refused if taken: nothing is overwritten) or a fresh one from `default`."""
    if body.get("name"):
        name = check_name(str(body["name"]), "name")
        if (ctx.home.area(area) / name).exists() or (ctx.home.area("configs") / f"{area}-{name}.yaml").exists():
            raise FileExistsError(f"{area}/{name} already exists; choose another name")
        return name
    return ctx.home.fresh_name(area, check_name(default, "name"))


# --- runs -----------------------------------------------------------------------------------------------------
def run_list(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    if request.method == "POST":
        return start_run(ctx, body)
    out = []
    for folder in sorted(ctx.home.area("runs").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if folder.is_dir() and not folder.name.startswith("."):
            job = ctx.jobs.active_for("run", folder.name)
            item = runs.summarize(folder, running=job is not None and job.status != "queued")
            item["job"] = job_public(ctx, job or ctx.jobs.last_for("run", folder.name))
            if job is not None and job.status == "queued":
                item["status"] = "queued"
            out.append(item)
    return {"runs": queue.complete(ctx, out)}  # + the runs without a folder yet (queued, refused, cancelled)


def refused(problems: dict[str, str], what: str = "the run cannot start", status: int = 400) -> HTTPError:
    """A start refused before anything is written or queued: {"error", "fields": {field: message}}."""
    first = next(iter(problems.values()))
    more = f" (and {len(problems) - 1} more problem(s), shown at their fields)" if len(problems) > 1 else ""
    return HTTPError(status, f"{what}: {first}{more}", fields=problems)


def _checked_name(ctx: Context, body: dict, area: str, default: str) -> str:
    try:
        return _new_name(ctx, body, area, default)
    except (FileExistsError, PathRefused) as err:  # 409: the name is taken (nothing is overwritten)
        raise refused({"name": str(err)}, status=409 if isinstance(err, FileExistsError) else 400) from None


def start_run(ctx: Context, body: dict) -> dict[str, Any]:
    """Queue `dopsd train` after the checks it runs first (dopsd.ui.preflight): a run that cannot start is
    refused here, its reasons by field, and nothing is written or queued."""
    default = f"{body.get('dataset') or 'run'}-{(body.get('values') or {}).get('method.name') or 'dopsd'}"
    chosen = _checked_name(ctx, body, "runs", default)  # claimed below, under the lock
    cfg = build_config(ctx, body, ctx.home.area("runs") / chosen)
    problems = preflight.check_start(cfg)
    if problems:
        raise refused(problems)
    with ctx.names:
        return _start_run(ctx, body, cfg, default)


def _start_run(ctx: Context, body: dict, cfg: adapter.Config, default: str) -> dict[str, Any]:
    name = _checked_name(ctx, body, "runs", default)
    folder = ctx.home.item("runs", name, "run name")
    adapter.set_key(cfg, "train.output_dir", str(folder))
    config_file = ctx.home.area("configs") / f"runs-{name}.yaml"
    adapter.atomic_write_text(config_file, adapter.to_yaml(cfg))
    job = ctx.jobs.submit("train", dopsd_command("train", str(config_file)), f"train {name}", {"run": name})
    return {"name": name, "config": ctx.home.relative(config_file), "job": job_public(ctx, job)}


def run_view(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    name = request.path_params["name"]
    folder = ctx.home.item("runs", name, "run name")
    active = ctx.jobs.active_for("run", name)
    job = active or ctx.jobs.last_for("run", name)
    if not folder.is_dir():
        if job is None:
            raise FileNotFoundError(f"no run {name!r}")
        # the command has not created the folder (yet): starting, queued, or refused before anything started
        status = {"queued": "queued", "running": "starting", "stopping": "starting"}.get(job.status, job.status)
        return {
            "name": name,
            "status": status,
            "job": job_public(ctx, job, log=True),
            "failure": _failure(ctx, job),
            "exports": [],
        }
    running = active is not None and active.status != "queued"
    cfg = runs.read_config(folder)
    loss_records = runs.losses(folder)
    log = ctx.jobs.log_tail(job, 200_000) if job else ""
    seen = ctx.seen.setdefault(active.id, {}) if running and active else None
    status = "queued" if active is not None and active.status == "queued" else runs.status(folder, running)
    summary = runs.read_json(folder / "summary.json")
    return {
        "name": name,
        "status": status,
        "config": cfg,
        "config_yaml": _text(folder / "config.yaml"),
        "progress": runs.progress(folder, cfg, loss_records, seen),
        "losses": runs.thin(loss_records),
        "health": runs.health(folder, ctx.health, log),
        "done": runs.done_signal(folder),
        "samples": runs.samples(folder),
        "summary": summary,
        "checkpoints": runs.checkpoints(folder),
        "resumable": runs.resumable(folder, running),
        "files": {
            f: f"/files/runs/{name}/{f}"
            for f in (
                "lora.safetensors",
                "lora_config.json",
                "model.safetensors",
                "pytorch_lora_weights.safetensors",
                "summary.json",
                "config.yaml",
                "losses.jsonl",
            )
            if (folder / f).is_file()
        },
        "job": job_public(ctx, job, log=True),
        "failure": _failure(ctx, job),
        "checkpoint_files": _checkpoint_files(folder, name),
        "export_formats": api_results.export_formats(folder),
        "exports": api_results.exports_of(ctx, name),
    }


def _failure(ctx: Context, job: Job | None) -> dict[str, Any] | None:
    """Why the run's last job (a start or a resume) failed, in the command's own words; None if it did not."""
    if job is None or job.status not in ("failed", "lost"):
        return None
    return {"title": job.title, "kind": job.kind, "reason": ctx.jobs.failure_reason(job), "ended": job.ended}


def _checkpoint_files(folder: Path, name: str) -> list[dict[str, Any]]:
    """Each checkpoint (newest first) with its files as downloads: a stopped run's weights so far are in them."""
    out = []
    for ckpt in reversed(runs.checkpoints(folder)):
        files = sorted(p for p in (folder / "checkpoints" / ckpt).iterdir() if p.is_file())
        out.append(
            {
                "name": ckpt,
                "step": int(ckpt.split("-", 1)[1]) if ckpt.split("-", 1)[1].isdigit() else None,
                "files": [
                    {"name": p.name, "url": f"/files/runs/{name}/checkpoints/{ckpt}/{p.name}", "size": p.stat().st_size}
                    for p in files
                ],
            }
        )
    return out


def _text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None


def run_stop(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    name = request.path_params["name"]
    job = ctx.jobs.active_for("run", name)
    if job is None:
        raise HTTPError(409, f"run {name!r} has no queued or running job")
    return {"job": job_public(ctx, ctx.jobs.stop(job.id))}


def run_resume(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    """`dopsd train RUN/config.yaml train.output_dir=RUN --resume` (the run folder stays where the app found it)."""
    name = request.path_params["name"]
    folder = ctx.home.item("runs", name, "run name")
    if not (folder / "config.yaml").is_file():
        raise FileNotFoundError(f"{name} is not a run folder (no config.yaml)")
    if ctx.jobs.active_for("run", name):
        raise HTTPError(409, f"run {name!r} already has a queued or running job")
    try:
        cfg = adapter.config_from_yaml((folder / "config.yaml").read_text(encoding="utf-8"))
    except (adapter.ConfigError, OSError) as err:
        raise refused(preflight.config_problem(err), "the run cannot resume") from None
    adapter.set_key(cfg, "train.output_dir", str(folder))
    problems = preflight.check_start(cfg, resume=True)
    if problems:
        raise refused(problems, "the run cannot resume")
    argv = dopsd_command("train", str(folder / "config.yaml"), f"train.output_dir={folder}", "--resume")
    job = ctx.jobs.submit("resume", argv, f"resume {name}", {"run": name})
    return {"job": job_public(ctx, job)}


def tryit(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    """One click: the miniature's concept dataset (written once) and a short D-OPSD run on the CPU (~1 minute)."""
    steps = body.get("steps", 100)
    if not isinstance(steps, int) or not 1 <= steps <= 2000:
        raise HTTPError(400, "steps: a whole number from 1 to 2000")
    dataset = "mini-concept"
    if not datasets.folder(ctx.home, dataset, must_exist=False).is_dir():
        write_mini_dataset(ctx, dataset)
    values = {
        "method.name": body.get("method") or "dopsd",
        "data.trigger_word": "sks",
        "train.max_steps": steps,
        "sample.every": max(1, steps // 4),
        "train.checkpoint_every": max(1, steps // 2),
    }
    return start_run(ctx, {"preset": "mini", "dataset": dataset, "values": values, "name": body.get("name") or None})


# --- probes ---------------------------------------------------------------------------------------------------
def probe_list(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    if request.method == "POST":
        return start_probe(ctx, body)
    out = []
    for folder in sorted(ctx.home.area("probes").iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if folder.is_dir() and not folder.name.startswith("."):
            data = runs.read_json(folder / "probe.json") or {}
            job = ctx.jobs.last_for("probe", folder.name)
            out.append(
                {
                    "name": folder.name,
                    "counts": data.get("counts"),
                    "passed": data.get("passed"),
                    "job": job_public(ctx, job),
                }
            )
    return {"probes": out}


def start_probe(ctx: Context, body: dict) -> dict[str, Any]:
    with ctx.names:
        return _start_probe(ctx, body)


def _start_probe(ctx: Context, body: dict) -> dict[str, Any]:
    name = _checked_name(ctx, body, "probes", f"{body.get('dataset') or 'probe'}-probe")
    out = ctx.home.item("probes", name, "probe name")
    cfg = build_config(ctx, body, out / "unused-run")  # probe writes to --out; output_dir is not used
    problems = {k: v for k, v in preflight.check_start(cfg).items() if k != "name"}  # no run folder is made
    if problems:
        raise refused(problems, "the probe cannot start")
    config_file = ctx.home.area("configs") / f"probes-{name}.yaml"
    adapter.atomic_write_text(config_file, adapter.to_yaml(cfg))
    seeds = body.get("seeds", 3)
    if not isinstance(seeds, int) or not 1 <= seeds <= 16:
        raise HTTPError(400, "seeds: a whole number from 1 to 16")
    out.mkdir()
    argv = dopsd_command("probe", str(config_file), "--out", str(out), "--seeds", str(seeds))
    job = ctx.jobs.submit("probe", argv, f"probe {name}", {"probe": name})
    return {"name": name, "job": job_public(ctx, job)}


def probe_view(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    name = request.path_params["name"]
    folder = ctx.home.item("probes", name, "probe name")
    if not folder.is_dir():
        raise FileNotFoundError(f"no probe {name!r}")
    data = runs.read_json(folder / "probe.json")
    config = _probe_config(ctx, name)
    targets = {}
    if config:
        data_path = Path(str((config.get("data") or {}).get("path", "")))
        for pair in (data or {}).get("pairs", []):
            image = data_path / str(pair.get("name", ""))
            if image.is_file() and inside(ctx.home.area("datasets"), image):
                targets[pair["name"]] = "/files/" + ctx.home.relative(image)
    job = ctx.jobs.active_for("probe", name) or ctx.jobs.last_for("probe", name)
    return {
        "name": name,
        "probe": data,
        "targets": targets,
        "grid": f"/files/probes/{name}/probe_grid.png" if (folder / "probe_grid.png").is_file() else None,
        "job": job_public(ctx, job, log=True),
    }


def _probe_config(ctx: Context, name: str) -> dict[str, Any] | None:
    import yaml

    try:
        data = yaml.safe_load((ctx.home.area("configs") / f"probes-{name}.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


# --- jobs -----------------------------------------------------------------------------------------------------
def job_list(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    return {"jobs": [job_public(ctx, j) for j in ctx.jobs.list()], "max_running": ctx.jobs.max_running}


def _job(ctx: Context, request: Request) -> Job:
    job = ctx.jobs.get(request.path_params["id"])
    if job is None:
        raise FileNotFoundError(f"no job {request.path_params['id']!r}")
    return job


def job_view(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    return job_public(ctx, _job(ctx, request), log=True) or {}


def job_stop(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    return job_public(ctx, ctx.jobs.stop(_job(ctx, request).id)) or {}


def routes() -> list[Route]:
    return [
        Route("/api/runs", endpoint(run_list), methods=["GET", "POST"]),
        Route("/api/runs/{name}", endpoint(run_view)),
        Route("/api/runs/{name}/stop", endpoint(run_stop), methods=["POST"]),
        Route("/api/runs/{name}/resume", endpoint(run_resume), methods=["POST"]),
        Route("/api/tryit", endpoint(tryit), methods=["POST"]),
        Route("/api/probes", endpoint(probe_list), methods=["GET", "POST"]),
        Route("/api/probes/{name}", endpoint(probe_view)),
        Route("/api/jobs", endpoint(job_list)),
        Route("/api/jobs/{id}", endpoint(job_view)),
        Route("/api/jobs/{id}/stop", endpoint(job_stop), methods=["POST"]),
    ] + api_results.routes()

"""Runs as the app manages them: the ones without a folder yet (queued, starting, refused at the start, cancelled),
what can be done with each (cancel, retry, delete, clone), and those actions.

A run the app created has its config file HOME/configs/runs-NAME.yaml (written before its job is queued) whose
train.output_dir is HOME/runs/NAME. Only such runs are ever deleted, only when nothing runs in them, only on a
request that names the run (the page asks first and says what goes: the run folder, with its file count and
size, and the config file); job logs and exports stay. A folder copied into the home is never deleted here.
Retry queues the failed command again; a folder its first attempt left is moved aside by `dopsd train
--overwrite` (NAME.replaced-DATE, kept), never deleted. Clone answers the run's config as the New-run form takes
it: the form's values when they reproduce the config, else the YAML.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from dopsd.ui import adapter, runs
from dopsd.ui.home import inside
from dopsd.ui.http import Context, HTTPError, endpoint, job_public
from dopsd.ui.jobs import Job

LIVE = ("queued", "running", "starting", "stopping")
FAILED = ("failed", "lost")
PENDING = {"queued": "queued", "running": "starting", "stopping": "starting"}  # a job's status, no folder yet


def config_file(ctx: Context, name: str) -> Path:
    return ctx.home.area("configs") / f"runs-{name}.yaml"


def app_config(ctx: Context, name: str) -> dict[str, Any] | None:
    """The config the app wrote for run `name`, when it did (its output_dir is the run's folder)."""
    path = config_file(ctx, name)
    if not path.is_file():
        return None
    data = runs.read_config_file(path)
    out = str((data.get("train") or {}).get("output_dir") or "")
    folder = ctx.home.item("runs", name, "run name")
    if not out or os.path.realpath(out) != os.path.realpath(folder):
        return None
    return data


def _status(ctx: Context, name: str, folder: Path, job: Job | None) -> str:
    active = ctx.jobs.active_for("run", name)
    if folder.is_dir():
        if active is not None and active.status == "queued":
            return "queued"
        status = runs.status(folder, active is not None)
        if status in ("stopped", "empty") and job is not None and job.status in FAILED:
            return "failed"
        return status
    if job is None:
        return "empty"
    return PENDING.get(job.status, "failed" if job.status in FAILED else job.status)


def actions(ctx: Context, name: str) -> dict[str, Any]:
    """What the run's page and row offer: cancel (queued), retry (its last job failed), delete (an app-created run
    that is over), clone (any run with a config)."""
    folder = ctx.home.item("runs", name, "run name")
    job = ctx.jobs.active_for("run", name) or ctx.jobs.last_for("run", name)
    status = _status(ctx, name, folder, job)
    created = app_config(ctx, name) is not None
    live = status in LIVE + ("running",)
    return {
        "status": status,
        "created_by_app": created,
        "cancel": status == "queued",
        "retry": not live and job is not None and job.status in FAILED and bool(job.argv),
        "delete": created and not live and not folder.is_symlink(),
        "clone": (folder / "config.yaml").is_file() or config_file(ctx, name).is_file(),
    }


def complete(ctx: Context, listed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run list: the folders' rows (`listed`) with their actions, and the app's runs that have no folder yet
    (queued, starting, refused, cancelled), newest first."""
    names = {r["name"] for r in listed}
    for row in listed:
        row["actions"] = actions(ctx, row["name"])
        if row["actions"]["status"] == "failed":
            row["status"] = "failed"
    latest: dict[str, Job] = {}
    for job in ctx.jobs.list():  # newest first
        name = job.target.get("run")
        if isinstance(name, str) and name not in names and name not in latest:
            latest[name] = job
    for name, job in latest.items():
        try:
            cfg = app_config(ctx, name)
        except ValueError:  # a record with a name the app would not make
            continue
        if cfg is None or job.status == "succeeded":
            continue
        row = {
            "name": name,
            "status": _status(ctx, name, ctx.home.item("runs", name), job),
            "method": (cfg.get("method") or {}).get("name"),
            "family": (cfg.get("model") or {}).get("family"),
            "preset": cfg.get("preset"),
            "step": 0,
            "max_steps": (cfg.get("train") or {}).get("max_steps"),
            "loss": None,
            "modified": job.created,
            "has_lora": False,
            "resumable": False,
            "job": job_public(ctx, job),
            "actions": actions(ctx, name),
        }
        listed.append(row)
    listed.sort(key=lambda r: r.get("modified") or 0, reverse=True)
    return listed


# --- delete ---------------------------------------------------------------------------------------------------
def _size(path: Path) -> tuple[int, int]:
    files = size = 0
    for root, _dirs, names in os.walk(path):
        for n in names:
            try:
                size += os.lstat(os.path.join(root, n)).st_size
                files += 1
            except OSError:
                pass
    return files, size


def delete_plan(ctx: Context, name: str) -> dict[str, Any]:
    """What deleting run `name` removes, or why it may not be deleted."""
    act = actions(ctx, name)
    folder = ctx.home.item("runs", name, "run name")
    items = []
    if folder.is_dir() and not folder.is_symlink():
        files, size = _size(folder)
        items.append({"path": f"runs/{name}/", "files": files, "bytes": size})
    if config_file(ctx, name).is_file():
        items.append({"path": f"configs/runs-{name}.yaml", "files": 1, "bytes": config_file(ctx, name).stat().st_size})
    why = None
    if not act["created_by_app"]:
        why = f"run {name!r} was not created by this app (no configs/runs-{name}.yaml for it): it is never deleted here"
    elif not act["delete"]:
        why = f"run {name!r} is {act['status']}: stop or cancel it first"
    return {"name": name, "deletable": why is None, "why": why, "items": items, "kept": "job logs and exports"}


def run_delete(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    name = request.path_params["name"]
    plan = delete_plan(ctx, name)
    if request.method == "GET":
        return plan
    if body.get("confirm") != name:
        raise HTTPError(400, f'deleting needs {{"confirm": "{name}"}}: the run\'s name, as the page asks for it')
    if not plan["deletable"]:
        raise HTTPError(409, plan["why"])
    folder = ctx.home.item("runs", name, "run name")
    with ctx.names:  # no start claims the name meanwhile
        if folder.is_dir():
            # out of the list at once (one rename), then removed; a hidden name the run list skips
            doomed = folder.with_name(f".deleting-{name}-{uuid.uuid4().hex[:8]}")
            os.rename(folder, doomed)
            if not inside(ctx.home.area("runs"), doomed):
                raise HTTPError(409, f"runs/{name} points outside the app's home; nothing was deleted")
            shutil.rmtree(doomed)
        config_file(ctx, name).unlink(missing_ok=True)
    return {"deleted": plan["items"], "kept": plan["kept"]}


# --- retry, clone ---------------------------------------------------------------------------------------------
def run_retry(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    """The failed command again, under the same name; a folder its attempt left is moved aside, not deleted."""
    name = request.path_params["name"]
    act = actions(ctx, name)
    if not act["retry"]:
        raise HTTPError(409, f"run {name!r} is {act['status']}: only a run whose last job failed is retried")
    job = ctx.jobs.last_for("run", name)
    assert job is not None
    argv = list(job.argv)
    folder = ctx.home.item("runs", name, "run name")
    left = folder.is_dir() and any(folder.iterdir())
    if left and "--resume" not in argv and "--overwrite" not in argv:
        argv.append("--overwrite")  # dopsd moves the failed attempt's folder aside (NAME.replaced-DATE)
    new = ctx.jobs.submit(job.kind, argv, f"retry {name}", {"run": name})
    return {"job": job_public(ctx, new), "moved_aside": bool(left and "--resume" not in argv)}


def run_actions(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    return actions(ctx, request.path_params["name"])


def run_clone(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    """The run's config for the New-run form: preset, dataset, the form's values, and whether they reproduce it."""
    name = request.path_params["name"]
    folder = ctx.home.item("runs", name, "run name")
    # what the user chose (the app's config file: `auto` values stay `auto`), else what the run folder holds
    source = config_file(ctx, name) if app_config(ctx, name) is not None else folder / "config.yaml"
    if not source.is_file():
        raise FileNotFoundError(f"run {name!r} has no config to clone")
    cfg = adapter.config_from_yaml(source.read_text(encoding="utf-8"))
    adapter.set_key(cfg, "train.output_dir", "")
    data_path = str(adapter.get(cfg, "data.path") or "")
    dataset = None
    datasets = ctx.home.area("datasets")
    if data_path and inside(datasets, Path(data_path)):
        rel = Path(os.path.realpath(data_path)).relative_to(os.path.realpath(datasets)).parts
        dataset = rel[0] if len(rel) == 1 else None
    values = {k: adapter.get(cfg, k) for k in adapter.FORM_KEYS}
    preset = cfg.preset if cfg.preset in {p["name"] for p in adapter.presets()} else None
    form = False
    if preset is not None and (dataset is not None or not data_path):
        try:
            again = adapter.resolve(preset, {k: v for k, v in values.items() if v is not None and v != ""})
            adapter.set_key(again, "data.path", data_path)
            adapter.set_key(again, "train.output_dir", "")
            form = again.to_dict() == cfg.to_dict()
        except (adapter.DopsdError, ValueError, KeyError, TypeError):
            form = False
    base = name if not name.endswith(("-clone", "-retry")) else name.rsplit("-", 1)[0]
    return {
        "source": name,
        "name": ctx.home.fresh_name("runs", f"{base[:56]}-clone"),
        "preset": preset,
        "dataset": dataset,
        "values": values,
        "form": form,
        "yaml": adapter.to_yaml(cfg),
    }


def routes() -> list[Route]:
    return [
        Route("/api/runs/{name}/actions", endpoint(run_actions)),
        Route("/api/runs/{name}/delete", endpoint(run_delete), methods=["GET", "POST"]),
        Route("/api/runs/{name}/retry", endpoint(run_retry), methods=["POST"]),
        Route("/api/runs/{name}/clone", endpoint(run_clone)),
    ]

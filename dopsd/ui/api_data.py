"""API: app info and settings, presets and configs (form → YAML → `dopsd plan`), datasets."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from dopsd.ui import adapter, datasets, preflight, rules
from dopsd.ui.home import PathRefused, check_name
from dopsd.ui.http import Context, HTTPError, endpoint, error_response
from dopsd.ui.jobs import dopsd_command
from dopsd.version import __version__

MAX_FILES_PER_UPLOAD = 500


# --- info, settings, presets --------------------------------------------------------------------------------
def info(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    return {
        "version": __version__,
        "home": str(ctx.home.root),
        "python": sys.executable,
        "plan_available": adapter.has_command("plan"),
        "methods": adapter.methods(),
        "form_keys": list(adapter.FORM_KEYS),
        "max_running": ctx.jobs.max_running,
        "max_upload": ctx.max_upload,
    }


def presets(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    return {
        "presets": adapter.presets(),
        "help": adapter.key_help(),
        "methods": adapter.methods(),
        "rules": rules.form_rules(adapter.FORM_KEYS),
    }


def settings(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    if request.method == "PUT":
        n = body.get("max_running")
        if not isinstance(n, int) or not 1 <= n <= 16:
            raise HTTPError(400, "max_running: a whole number from 1 to 16 (jobs that run at the same time)")
        ctx.jobs.set_max_running(n)
        adapter.atomic_write_json(ctx.home.state / "settings.json", {"max_running": n})
    return {"max_running": ctx.jobs.max_running}


# --- configs --------------------------------------------------------------------------------------------------
def build_config(ctx: Context, body: dict[str, Any], output_dir: Path) -> adapter.Config:
    """The config for a run or probe: the edited YAML when given, else the preset with the form's typed values
    (only the form's keys); the dataset chosen in the app sets data.path; the app owns train.output_dir.

    A value the config refuses is answered with {"fields": {key: message}} so the form shows it at its field."""
    try:
        return _build_config(ctx, body, output_dir)
    except (adapter.ConfigError, TypeError) as err:
        problems = preflight.config_problem(err)
        raise HTTPError(400, next(iter(problems.values())), fields=problems) from None
    except (FileNotFoundError, PathRefused) as err:  # the dataset chosen is gone or its name is not one
        message = str(err).strip("'\"")
        raise HTTPError(
            404 if isinstance(err, FileNotFoundError) else 400, message, fields={"dataset": message}
        ) from None


def _build_config(ctx: Context, body: dict[str, Any], output_dir: Path) -> adapter.Config:
    dataset = body.get("dataset")
    if isinstance(body.get("yaml"), str) and body["yaml"].strip():
        cfg = adapter.config_from_yaml(body["yaml"])
        if dataset and not adapter.get(cfg, "data.path"):
            adapter.set_key(cfg, "data.path", str(datasets.folder(ctx.home, dataset)))
    else:
        values = body.get("values") or {}
        if not isinstance(values, dict):
            raise HTTPError(400, "values: an object of section.key → value")
        unknown = [k for k in values if k not in adapter.FORM_KEYS]
        if unknown:
            raise HTTPError(400, f"the form does not set {', '.join(unknown)}; edit them in the YAML view")
        values = {k: v for k, v in values.items() if v is not None and v != ""}
        limits = rules.form_limit_problem(values)
        if limits:
            raise HTTPError(400, next(iter(limits.values())), fields=limits)
        if dataset:
            values["data.path"] = str(datasets.folder(ctx.home, dataset))
        cfg = adapter.resolve(str(body.get("preset") or "mini"), values)
    adapter.set_key(cfg, "train.output_dir", str(output_dir))
    return cfg


def config(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    """The resolved config (YAML) for the form's values, or the edited YAML checked; nothing is written."""
    name = body.get("name") or "NAME"
    cfg = build_config(ctx, body, ctx.home.area("runs") / name)
    return {"yaml": adapter.to_yaml(cfg), "config": cfg.to_dict()}


def plan(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    """`dopsd plan CONFIG --json` for the config the form describes (hidden in the app where dopsd has no plan)."""
    if not adapter.has_command("plan"):
        return {"available": False}
    cfg = build_config(ctx, body, ctx.home.area("runs") / (body.get("name") or "NAME"))
    tmp = ctx.home.state / f"plan-{uuid.uuid4().hex}.yaml"
    adapter.atomic_write_text(tmp, adapter.to_yaml(cfg))
    try:
        done = subprocess.run(
            dopsd_command("plan", str(tmp), "--json"),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(ctx.home.root),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return {"available": True, "error": "dopsd plan did not answer within 120 s"}
    finally:
        tmp.unlink(missing_ok=True)  # the app's own temporary file
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip()[-2000:]
        return {"available": True, "error": said.replace(str(tmp), "the form's config")}  # not the app's temp file
    try:
        return {"available": True, "plan": json.loads(done.stdout)}
    except ValueError:
        return {"available": True, "error": "dopsd plan --json printed no JSON", "output": done.stdout[-2000:]}


# --- datasets -------------------------------------------------------------------------------------------------
def dataset_list(ctx: Context, request: Request, body: dict) -> Any:
    if request.method == "POST":
        if body.get("mini"):
            return dataset_mini(ctx, body)
        name = check_name(str(body.get("name", "")), "dataset name")
        datasets.create(ctx.home, name)
        return {"name": name}
    return {"datasets": datasets.listing(ctx.home)}


def dataset_mini(ctx: Context, body: dict) -> dict[str, Any]:
    """The miniature's concept dataset (8 pairs of a colour bound to `sks`), for a run without a GPU."""
    name = ctx.home.fresh_name("datasets", check_name(str(body.get("name") or "mini-concept"), "dataset name"))
    write_mini_dataset(ctx, name)
    return {"name": name}


def write_mini_dataset(ctx: Context, name: str) -> None:
    target = datasets.folder(ctx.home, name, must_exist=False)
    done = subprocess.run(
        [sys.executable, "-m", "dopsd.ui.adapter", "mini-dataset", str(target)],
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if done.returncode != 0:
        raise HTTPError(500, f"writing the miniature dataset failed: {done.stderr.strip()[-1000:]}")
    datasets.set_meta(ctx.home, name, "sks", "mini")


def dataset_view(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    q = request.query_params
    return datasets.view(ctx.home, request.path_params["name"], q.get("preset") or None, q.get("trigger_word"))


def dataset_settings(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    name = request.path_params["name"]
    datasets.folder(ctx.home, name)
    preset = str(body.get("preset") or "mini")
    if preset not in [p["name"] for p in adapter.presets()]:
        raise HTTPError(400, f"unknown preset {preset!r}")
    trigger = body.get("trigger_word")
    if trigger is not None and (not isinstance(trigger, str) or len(trigger) > 100 or "\n" in trigger):
        raise HTTPError(400, "trigger_word: one line of text")
    return datasets.set_meta(ctx.home, name, (trigger or "").strip() or None, preset)


def caption(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    image, text = body.get("image"), body.get("text")
    if not isinstance(image, str) or not isinstance(text, str):
        raise HTTPError(400, "send {image: NAME, text: CAPTION}")
    return datasets.save_caption(ctx.home, request.path_params["name"], image, text)


def remove(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    return datasets.remove(ctx.home, request.path_params["name"], str(body.get("image", "")))


async def upload(request: Request) -> Response:
    """multipart/form-data: files (images, and .txt captions named like them), preset (for the size check), and
    on_exists: what to do with an image whose name the dataset already has — "refuse" (the default: the answer
    says so, nothing is overwritten) or "keep" (keep both: the new one gets a free name, name-2.png)."""
    ctx: Context = request.app.state.ctx
    name = request.path_params["name"]
    try:
        async with request.form(
            max_files=MAX_FILES_PER_UPLOAD, max_fields=20, max_part_size=ctx.max_upload + 1
        ) as form:
            preset = str(form.get("preset") or "mini")
            on_exists = str(form.get("on_exists") or "refuse")
            items = []
            for part in form.getlist("files"):
                if isinstance(part, str):
                    continue
                data = await part.read(ctx.max_upload + 1)
                items.append((part.filename or "upload", data))
    except Exception as err:  # noqa: BLE001 - a malformed or oversized form is the client's problem
        return JSONResponse({"error": f"could not read the upload: {plain(str(err))}"}, status_code=400)
    if on_exists not in ("refuse", "keep"):
        return JSONResponse({"error": "on_exists: refuse or keep"}, status_code=400)
    try:
        result = await run_in_threadpool(_save_uploads, ctx, name, items, preset, on_exists)
    except Exception as err:  # noqa: BLE001
        return error_response(err)
    return JSONResponse(result, status_code=200 if result["saved"] or not result["refused"] else 400)


# A problem found in the check's temporary copy names that copy and the library's exception class; the user
# uploaded a file name and needs only what is wrong with it.
_TEMP_PATH = re.compile(r"""['"]?/[^\s'"]*dopsd-ui-upload-[^/\s'"]*/([^'"\s)]+)['"]?""")
_EXCEPTION = re.compile(r"\b[A-Z][A-Za-z]*(?:Error|Exception|Warning): ")


def plain(message: str) -> str:
    """A message without server temporary paths (the file's own name instead) or Python exception names."""
    return _EXCEPTION.sub("", _TEMP_PATH.sub(r"\1", message))


def _refusal(raw: str, problems: list[str]) -> dict[str, Any]:
    return {"file": raw, "problems": [plain(p) for p in problems]}


def _save_uploads(
    ctx: Context, name: str, items: list[tuple[str, bytes]], preset: str, on_exists: str = "refuse"
) -> dict[str, Any]:
    folder = datasets.folder(ctx.home, name)
    if preset not in [p["name"] for p in adapter.presets()]:
        raise HTTPError(400, f"unknown preset {preset!r}")
    captions, refused, saved = {}, [], []
    for raw, data in items:
        if raw.lower().endswith(".txt"):
            try:
                stem, text = datasets.read_caption_upload(raw, data)
                captions[stem] = text
            except datasets.UploadRefused as err:
                refused.append(_refusal(raw, err.problems))
    used: set[str] = set()
    duplicates: set[str] = set()
    for raw, data in items:
        if raw.lower().endswith(".txt"):
            continue
        same = _same_name(folder, raw) if on_exists == "refuse" else None
        if same:
            duplicates.add(datasets.upload_stem(raw))
            refused.append(
                _refusal(
                    raw,
                    [
                        f"the dataset already has {same}: nothing was replaced; remove it first to replace it, or "
                        "rename the file to keep both"
                    ],
                )
            )
            continue
        try:
            saved.append(datasets.save_upload(ctx.home, name, raw, data, preset, ctx.max_upload, captions))
            used.add(datasets.upload_stem(raw))
        except datasets.UploadRefused as err:
            refused.append(_refusal(raw, err.problems))
    for stem, text in captions.items():  # captions for images already in the dataset
        if stem in duplicates:  # never attached to the image already there: it came with the refused one
            refused.append(_refusal(f"{stem}.txt", ["not kept: it came with an image the dataset already has"]))
        elif stem not in used:
            try:
                saved.append(datasets.save_caption_for(ctx.home, name, stem, text))
            except datasets.UploadRefused as err:
                refused.append(_refusal(f"{stem}.txt", err.problems))
    images = sum(1 for s in saved if not s["saved"].lower().endswith(".txt"))
    caption_files = sum(1 for s in saved if s.get("caption"))
    return {"saved": saved, "refused": refused, "counts": {"images": images, "captions": caption_files}}


def _same_name(folder: Path, raw: str) -> str | None:
    """The image in the dataset that an upload named `raw` would share its caption file with (same stem)."""
    stem = Path(datasets.safe_filename(raw)).stem.lower()
    for p in folder.iterdir():
        if p.is_file() and p.stem.lower() == stem and datasets.is_image(p.name):
            return p.name
    return None


def routes() -> list[Route]:
    return [
        Route("/api/info", endpoint(info)),
        Route("/api/presets", endpoint(presets)),
        Route("/api/settings", endpoint(settings), methods=["GET", "PUT"]),
        Route("/api/config", endpoint(config), methods=["POST"]),
        Route("/api/plan", endpoint(plan), methods=["POST"]),
        Route("/api/datasets", endpoint(dataset_list), methods=["GET", "POST"]),
        Route("/api/datasets/{name}", endpoint(dataset_view)),
        Route("/api/datasets/{name}/settings", endpoint(dataset_settings), methods=["PUT"]),
        Route("/api/datasets/{name}/files", upload, methods=["POST"]),
        Route("/api/datasets/{name}/captions", endpoint(caption), methods=["PUT"]),
        Route("/api/datasets/{name}/remove", endpoint(remove), methods=["POST"]),
    ]

"""Running the bench: the data, every (setting, target, method, seed) job in worker processes, `--resume` from the
saved job results, then aggregation, the cost measurement and the report. The configuration is bench/settings.py.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from dopsd.bench import continual
from dopsd.bench.aggregate import aggregate
from dopsd.bench.costrun import measure_setting_costs
from dopsd.bench.document import build_report
from dopsd.bench.jobs import REFERENCE_ROW, Job, train_dedistill
from dopsd.bench.jobs import run_job as run_one_setting
from dopsd.bench.settings import BenchConfig
from dopsd.mini import world


def run_job(job: Job) -> dict[str, Any]:
    """One job: a continual job is a sequence of rounds, each its own run (dopsd.bench.continual); any other, one
    run and its evaluation (dopsd.bench.jobs)."""
    return continual.run_continual(job) if job.setting == "continual" else run_one_setting(job)


def _data_folders(cfg: BenchConfig, out: Path) -> dict[str, str]:
    """Dataset folders (same data for every method and seed): {'setting/target': folder, 'dedistill': folder}."""
    folders = {f"{s.name}/{t}": str(out / "data" / s.name / t) for s in cfg.settings for t in s.targets}
    if "sft_adapter" in cfg.methods:  # ordinary in-domain data for the de-distillation adapter
        folders["dedistill"] = str(out / "data" / "dedistill")
    return folders


def _write_data(cfg: BenchConfig, out: Path) -> dict[str, str]:
    folders = _data_folders(cfg, out)
    for s in cfg.settings:
        for target in s.targets:
            folder = folders[f"{s.name}/{target}"]
            if target == "domain":
                world.write_domain_dataset(folder, n=s.pairs)
            else:
                world.write_concept_dataset(folder, target, n=s.pairs)
    if cfg.continual:
        continual.write_data(cfg.continual, out)
    if "dedistill" in folders:
        g = torch.Generator().manual_seed(40_000)
        world.write_pairs(folders["dedistill"], [world.random_scene(g) for _ in range(cfg.dedistill_pairs)])
    return folders


def _jobs(cfg: BenchConfig, folders: dict[str, str], out: Path, dedistill: str | None) -> list[Job]:
    jobs = []
    ablations = {
        "dopsd_base_teacher",
        "dopsd_live_teacher",
        "dopsd_velocity",
        "dopsd_prior",
        "pso",
        "dreambooth",
        "offpolicy",
        "sft_teacher",
    }
    for s in cfg.settings:
        suite = {
            "n_train": cfg.n_train,
            "n_unseen": cfg.n_unseen,
            "n_unrelated": cfg.n_unrelated,
            "many_steps": cfg.many_steps,
            "n_many": cfg.n_many,
        }
        rows = [m for m in cfg.methods if s.runs(m)] + ([REFERENCE_ROW] if cfg.reference_row else [])
        for method in rows:
            n_seeds = (
                1
                if method in ("base", REFERENCE_ROW)
                else (cfg.ablation_seeds if (method in ablations and cfg.ablation_seeds) else cfg.seeds)
            )
            for ti, target in enumerate(s.targets):
                for seed in range(n_seeds):
                    jobs.append(
                        Job(
                            setting=s.name,
                            target=target,
                            method=method,
                            seed=seed,
                            data_dir=folders[f"{s.name}/{target}"],
                            work_dir=str(out / "work" / s.name / f"{target}-{method}-{seed}"),
                            overrides=s.overrides_for(method),
                            steps=s.steps,
                            curve_every=s.curve_every,
                            curve_n=cfg.curve_n,
                            budgets=list(s.budgets),
                            suite=suite,
                            model=cfg.model,
                            dedistill=dedistill if method == "sft_adapter" else None,
                            keep_images=(ti == 0 and seed == 0),
                        )
                    )
    return jobs


def _all_jobs(cfg: BenchConfig, out: Path) -> tuple[list[Job], Job | None]:
    """Every evaluation job, and the de-distillation adapter's training job (None without `sft_adapter`)."""
    folders = _data_folders(cfg, out)
    dedistill_file = str(out / "work" / "dedistill_delta.safetensors") if "sft_adapter" in cfg.methods else None
    pre = None
    if dedistill_file:
        pre = Job(
            setting="dedistill",
            target="indomain",
            method="sft",
            seed=0,
            data_dir=folders["dedistill"],
            work_dir=str(out / "work" / "dedistill"),
            overrides=cfg.dedistill_overrides,
            steps=cfg.dedistill_steps,
            curve_every=cfg.dedistill_steps,
            curve_n=0,
            suite={},
            model=cfg.model,
            extra={"file": dedistill_file},
        )
    found = _jobs(cfg, folders, out, dedistill_file)
    if cfg.continual:
        found += continual.jobs(
            cfg.continual,
            out,
            cfg.model,
            {"n_train": cfg.n_train, "n_unseen": 4, "n_unrelated": cfg.n_unrelated, "many_steps": 4, "n_many": 1},
        )
    return found, pre


class ResumeMismatch(ValueError):
    """A saved job result that was made with other settings than `--resume` asks for."""


_PATH_FIELDS = ("data_dir", "work_dir", "dedistill", "extra")  # where, not what: --out may be spelled differently


def saved_results(jobs: list[Job]) -> dict[str, dict[str, Any]]:
    """The saved results of finished jobs ({work_dir: result}), for `--resume`. A result made with other
    settings than its job now has is an error (before anything runs): mixing them would corrupt the report."""
    done = {}
    for job in jobs:
        path = Path(job.work_dir + ".result.pt")
        if not path.is_file():
            continue
        result = torch.load(path, weights_only=True)
        mine = {k: v for k, v in job.__dict__.items() if k not in _PATH_FIELDS}
        theirs = {k: v for k, v in result["job"].items() if k not in _PATH_FIELDS}
        if mine != theirs:
            keys = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            raise ResumeMismatch(
                f"bench --resume: {path} was made with other settings ({', '.join(keys)}); "
                "resume with the options of the interrupted run, or choose a new --out"
            )
        if job.extra.get("file") and not Path(job.extra["file"]).is_file():
            continue  # the de-distillation adapter's weights are gone: train it again
        done[job.work_dir] = result
    return done


def _execute(
    cfg: BenchConfig, out: Path, log: Any, done: dict[str, dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Run the de-distillation adapter and every job (in `cfg.workers` processes); adapter jobs wait for it.
    done: saved results of finished jobs ({work_dir: result}, `--resume`); those jobs are not run again."""
    jobs, pre = _all_jobs(cfg, out)
    results: list[dict[str, Any]] = [done[j.work_dir] for j in jobs if j.work_dir in done]
    dedistill_info: dict[str, Any] | None = done.get(pre.work_dir) if pre else None
    if done:
        log(f"resuming: {len(done)} finished job(s) kept from {out / 'work'}")
    jobs = [j for j in jobs if j.work_dir not in done]
    if dedistill_info is not None:
        pre = None
    dedistill_file = pre.extra["file"] if pre else None
    waiting = [j for j in jobs if j.method == "sft_adapter"] if pre else []
    ready = [j for j in jobs if j not in waiting]
    total = len(jobs) + (pre is not None)
    if cfg.workers <= 1:
        if pre is not None:
            dedistill_info = _dedistilled(pre, train_dedistill(pre, dedistill_file))  # type: ignore[arg-type]
        for i, job in enumerate(ready + waiting):
            results.append(run_job(job))
            _save_result(job, results[-1])
            log(
                f"[{i + 1 + (pre is not None)}/{total}] {job.setting} {job.target} {job.method} seed {job.seed}: "
                f"{results[-1]['seconds']:.1f} s"
            )
        return results, dedistill_info
    import multiprocessing

    # Big jobs first so the two workers finish together; the adapter first of all (others wait on it).
    ready.sort(key=lambda j: 0 if j.setting == "continual" else 1 if j.method.startswith("dopsd") else 2)
    with ProcessPoolExecutor(max_workers=cfg.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        pending: dict[Future, Job | None] = {}
        if pre is not None:
            pending[pool.submit(train_dedistill, pre, dedistill_file)] = None
        for job in ready:
            pending[pool.submit(run_job, job)] = job
        done_count = 0
        while pending:
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                job = pending.pop(fut)
                done_count += 1
                if job is None:
                    dedistill_info = _dedistilled(pre, fut.result())  # type: ignore[arg-type]
                    log(f"[{done_count}/{total}] de-distillation adapter: {dedistill_info['seconds']:.1f} s")
                    for w in waiting:
                        pending[pool.submit(run_job, w)] = w
                    continue
                results.append(fut.result())
                _save_result(job, results[-1])
                log(
                    f"[{done_count}/{total}] {job.setting} {job.target} {job.method} seed {job.seed}: "
                    f"{results[-1]['seconds']:.1f} s"
                )
    return results, dedistill_info


def _dedistilled(pre: Job, info: dict[str, Any]) -> dict[str, Any]:
    info = {"job": pre.__dict__.copy(), **info}
    _save_result(pre, info)
    return info


def _save_result(job: Job, result: dict[str, Any]) -> None:
    """Each finished job's result, written atomically beside its work folder (`<work_dir>.result.pt`)."""
    path = Path(job.work_dir + ".result.pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(result, tmp)
    tmp.replace(path)


def machine_note() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, Python "
        f"{sys.version.split()[0]}; load average at the end {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"
    )


def run_bench(cfg: BenchConfig, out: Path, log: Any = print, resume: bool = False) -> dict[str, Any]:
    """Everything `dopsd bench` does; returns {'seconds', 'results'} and writes the report folder.
    resume: keep the saved results of an interrupted run in `out` (same options) and run only the rest."""
    started, cpu_started = time.perf_counter(), time.process_time()
    done = {}
    if resume:  # read (and checked: settings mismatch fails) before anything is written
        jobs, pre = _all_jobs(cfg, out)
        done = saved_results(jobs + ([pre] if pre else []))
    out.mkdir(parents=True, exist_ok=True)
    folders = _write_data(cfg, out)
    log(
        f"dopsd bench ({cfg.name}): {len(cfg.settings)} setting(s)"
        + (f" + continual ({', '.join(cfg.continual.methods)})" if cfg.continual else "")
        + f", methods {', '.join(cfg.methods)}, "
        f"{cfg.seeds} seed(s), {cfg.workers} worker process(es)"
    )
    results, dedistill = _execute(cfg, out, log, done)
    train_seconds = time.perf_counter() - started
    rows, curves, images = aggregate(results, cfg.settings)
    rounds = (
        continual.aggregate([r for r in results if r["job"]["setting"] == "continual"], cfg.continual)
        if cfg.continual
        else None
    )
    costs = {}
    for s in cfg.settings:
        t0 = time.perf_counter()
        costs[s.name] = measure_setting_costs(
            cfg, s, folders, out, [m for m in cfg.methods if m != "base" and s.runs(m)]
        )
        log(f"cost measurement {s.name}: {time.perf_counter() - t0:.1f} s")
    meta = {
        "preset": cfg.name,
        "command": "dopsd bench " + " ".join(sys.argv[2:])
        if sys.argv[1:2] == ["bench"]
        else f"dopsd bench ({cfg.name})",
        "seconds_training_and_eval": train_seconds,
        "machine": machine_note(),
        "workers": cfg.workers,
        "dedistill": dedistill,
    }
    meta["seconds"] = time.perf_counter() - started
    # CPU seconds ≈ what an idle machine needs (each job and the cost run use 1 thread): an honest estimate of
    # the wall time without other load, next to the measured one.
    main_cpu = time.process_time() - cpu_started
    worker_cpu = sum(r.get("cpu_seconds", 0.0) for r in results) + (dedistill or {}).get("cpu_seconds", 0.0)
    meta["cpu_seconds"] = {"main": main_cpu, "workers": worker_cpu if cfg.workers > 1 else 0.0}
    meta["idle_estimate_seconds"] = main_cpu + (worker_cpu / cfg.workers if cfg.workers > 1 else 0.0)
    build_report(out, cfg, rows, curves, images, costs, meta, rounds)
    return {"seconds": time.perf_counter() - started, "rows": rows, "costs": costs}


__all__ = ["ResumeMismatch", "machine_note", "run_bench", "saved_results"]

"""Full size, executed on the CPU: FLUX.2-klein-4B and Z-Image-Turbo (+ its Qwen3-VL-4B teacher encoder) at full
width and depth, random weights, through dopsd's command line as a user runs it.

    nice -n 10 .venv/bin/python benchmarks/cpu_full_size.py            # both models, full size (hours)
    .venv/bin/python benchmarks/cpu_full_size.py --tiny --work DIR     # the same on tiny configs (CI, < 1 min)

For each model (klein first): write its folders in the public layout (benchmarks/full_size/folders.py: configs from
dopsd/models/fullsize/, sharded safetensors written shard by shard, a stand-in tokenizer of the real class), a
two-image dataset and a config (the preset at 256², 3 steps, a checkpoint every step, no health sampling, one
sample prompt and seed; benchmarks/full_size/settings.py), then run, each in its own measured process
(benchmarks/full_size/phase.py):
  plan      `dopsd plan CONFIG --json --no-search` (what a user sees: GPU target) and the CPU-target plan
  probe     `dopsd probe CONFIG --limit 1 --seeds 1`
  train     `dopsd train CONFIG`, with the learning invariants checked after the last step; when step 3 begins
            the run folder is copied (what a kill at that moment leaves)
  kill      `dopsd train CONFIG train.output_dir=COPY --resume`, killed with SIGKILL in the middle of step 3
  resume    the same again, to the end; its LoRA, EMA and optimizer state must equal the uninterrupted run's bit for bit
  export    `dopsd export RUN --format diffusers`
  sample    `dopsd sample RUN --prompt P --seeds 0` at the turbo's steps
  pipeline  the model's diffusers pipeline, `load_lora_weights(EXPORT)`, the same prompt, noise and steps
Memory: before a command starts, the parts it holds at once must fit the available memory with a margin, and
while it runs a watchdog kills it when available memory falls under 1 GiB (reported, never risking the OOM
killer). Results: docs/measured/full-size-cpu.json and docs/full-size.md (full mode; --json/--docs elsewhere).
Exit 1 when an invariant fails, the resume is not bit-exact or a command fails (the files are written anyway).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "full_size"))
sys.path.insert(0, str(HERE))

import phase as phase_mod  # noqa: E402
import report  # noqa: E402
from collect import collect  # noqa: E402
from settings import PROMPT, TOGETHER, Rehearsal, part_gib  # noqa: E402

GiB = 2**30
MODELS = ("flux2-klein-4b", "zimage-turbo")
MARGIN_GIB = 1.5  # Python, torch and the libraries beside the weights
FLOOR_GIB = 1.0  # the watchdog kills a command when available memory falls below this


def available_gib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024 / GiB
    return float("inf")


class Runner:
    """Runs the phases of one model: measured, in their own processes (full size) or in this one (--tiny)."""

    def __init__(self, work: Path, tiny: bool, log: Any, only: set[str] | None = None, preset: str = ""):
        self.work, self.tiny, self.log = work, tiny, log
        self.only, self.preset = only, preset
        self.phases: dict[str, dict[str, Any]] = {}

    def say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self.log, flush=True)

    def fits(self, name: str, need_gib: float) -> bool:
        if self.only is not None and name.removeprefix(f"{self.preset}-") not in self.only:
            return False  # --only: another phase; its record stays as it is
        if self.tiny:
            return True
        free = available_gib()
        if need_gib + MARGIN_GIB <= free:
            return True
        why = f"skipped: needs {need_gib:.1f} GiB of weights at once + {MARGIN_GIB} GiB, {free:.1f} GiB available"
        self.phases[name] = {"skipped": why}
        (self.work / "stats").mkdir(parents=True, exist_ok=True)
        (self.work / "stats" / f"{name}.record.json").write_text(json.dumps(self.phases[name]))
        self.say(f"{name}: {why}")
        return False

    def _opts(self, checks: bool, snapshot: tuple | None, stall: tuple | None) -> list[str]:
        out = ["--checks"] if checks else []
        out += ["--snapshot-at", str(snapshot[0]), str(snapshot[1])] if snapshot else []
        out += ["--stall-at", str(stall[0]), str(stall[1])] if stall else []
        return out

    def run(self, name: str, argv: list[str], checks=False, snapshot=None, stall=None, script=None) -> dict:
        """One phase; returns its record (also kept in self.phases). `script`: a python script instead of dopsd."""
        stats, logs = self.work / "stats" / f"{name}.json", self.work / "logs" / name
        if self.only is not None and name.removeprefix(f"{self.preset}-") not in self.only:
            return {}  # --only: another phase; what it left in the work folder stays
        stats.parent.mkdir(parents=True, exist_ok=True)
        logs.parent.mkdir(parents=True, exist_ok=True)
        self.say(f"{name}: {' '.join(map(str, argv))}")
        started = time.perf_counter()
        if self.tiny and stall is None and script is not None:  # in this process: starting Python is the cost
            import contextlib
            import importlib

            with open(f"{logs}.out", "w") as out, contextlib.redirect_stdout(out):
                record = {"rc": importlib.import_module(Path(script).stem).main(list(map(str, argv)))}
        elif self.tiny and stall is None:
            opts = argparse.Namespace(checks=checks, snapshot_at=snapshot, stall_at=stall)
            phase_mod.run(list(map(str, argv)), stats, opts, logs)
            record = json.loads(stats.read_text())
        else:
            if script is not None:
                cmd = [sys.executable, str(script), *map(str, argv)]
            else:
                cmd = [sys.executable, str(HERE / "full_size" / "phase.py"), "--stats", str(stats)]
                cmd += self._opts(checks, snapshot, stall) + ["--", *map(str, argv)]
            record = self._process(name, cmd, logs, stall[1] if stall else None)
            if script is None and stats.is_file() and not record.get("killed"):
                record = {**json.loads(stats.read_text()), **record}
        record["seconds"] = round(time.perf_counter() - started, 1)
        self.phases[name] = record
        (self.work / "stats" / f"{name}.record.json").write_text(json.dumps(record, indent=2))
        self.say(f"{name}: rc {record.get('rc')}, {record['seconds']} s, peak RSS {record.get('peak_rss_gib')}")
        return record

    def _process(self, name: str, cmd: list[str], logs: Path, marker: str | None) -> dict[str, Any]:
        """Run `cmd`, watching memory (and, with `marker`, kill it with SIGKILL once the marker appears)."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with open(f"{logs}.out", "w") as out, open(f"{logs}.err", "w") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=ROOT, env=env)
            killed = None
            while proc.poll() is None:
                time.sleep(0.2 if self.tiny else 1.0)
                if marker is not None and Path(marker).is_file():
                    proc.send_signal(signal.SIGKILL)
                    killed = f"SIGKILL by design mid-step ({Path(marker).read_text()})"
                elif not self.tiny and available_gib() < FLOOR_GIB:
                    proc.send_signal(signal.SIGKILL)
                    killed = f"killed by the memory watchdog: available memory fell below {FLOOR_GIB} GiB"
            proc.wait()
        return {"rc": proc.returncode, **({"killed": killed} if killed else {})}


def rehearse(r: Rehearsal, work: Path, log: Any, only: set[str] | None = None) -> None:
    """Every phase of one model, in order; each writes its record into WORK/stats/ (collect.py reads them)."""
    p = r.preset
    run = Runner(work, r.tiny, log, only, p)
    write = ["--preset", p, "--out", work / "models"] + (["--tiny"] if r.tiny else [])
    run.run(f"{p}-write", write, script=HERE / "full_size" / "folders.py")
    written = work / "models" / f"{p}-{'tiny' if r.tiny else 'full'}" / "WRITTEN.json"
    if not written.is_file():
        return
    folders = json.loads(written.read_text())
    a, b = work / "runs" / f"{p}-A", work / "runs" / f"{p}-B"
    config = r.write_config(work, folders, a)
    together = TOGETHER[p]
    run.run(f"{p}-plan-cpu", ["plan-cpu", config])
    if r.gpu_plan:  # what a user sees (GPU target); the tests of `dopsd plan` cover the command on tiny models
        run.run(f"{p}-plan", ["plan", config, "--json", "--no-search"])
    if run.fits(f"{p}-probe", part_gib(folders, together["probe"])):
        run.run(f"{p}-probe", ["probe", config, "--limit", "1", "--seeds", "1", "--out", work / f"probe-{p}"])
    if run.fits(f"{p}-train", part_gib(folders, together["train"])):
        run.run(f"{p}-train", ["train", config], checks=True, snapshot=(r.steps - 1, b))
    if (a / "lora.safetensors").is_file() and b.is_dir():
        marker = work / f"kill-{p}.json"
        marker.unlink(missing_ok=True)
        resume = ["train", config, f"train.output_dir={b}", "--resume"]
        run.run(f"{p}-kill", resume, stall=(2, marker))
        run.run(f"{p}-resume", resume)
    if not (a / "lora.safetensors").is_file():
        return
    export = work / f"export-{p}"
    run.run(f"{p}-export", ["export", a, "--format", "diffusers", "--out", export, "--overwrite"])
    if run.fits(f"{p}-sample", part_gib(folders, together["sample"])):
        grid = work / f"sample-{p}.png"
        run.run(f"{p}-sample", ["sample", a, "--prompt", PROMPT, "--seeds", "0", "--out", grid, "--overwrite"])
    png = next(iter(sorted((work / f"sample-{p}").glob("p00-*-s0.png"))), None)
    if png is not None and run.fits(f"{p}-pipeline", part_gib(folders, together["pipeline"])):
        steps = json.loads(png.with_suffix(".json").read_text())["steps"]
        args = ["--config", a / "config.yaml", "--lora", export, "--png", png, "--prompt", PROMPT]
        args += ["--seed", "0", "--steps", steps, "--out", work / f"pipeline-{p}.json"]
        run.run(f"{p}-pipeline", args, script=HERE / "full_size" / "pipeline.py")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same architectures (CI)")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, among {', '.join(MODELS)}")
    parser.add_argument("--work", type=Path, default=None, help="work folder (models, runs, logs; reused)")
    parser.add_argument("--size", type=int, default=None, help="resolution (default 256; --tiny 32)")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps of the run (>= 2)")
    parser.add_argument(
        "--klein-caption-tokens",
        type=int,
        default=64,
        help="FLUX.2-klein's model.max_caption_tokens (klein pads every caption to it; default 64: a 512-token "
        "caption would make each forward ~2.5x longer at 256²)",
    )
    parser.add_argument(
        "--inference-steps",
        type=int,
        default=None,
        help="model.inference_steps for every model (default: each preset's: Z-Image 8 with a 4-state roll-out, "
        "klein 4); fewer steps shorten D-OPSD's roll-out, and so each step, proportionally",
    )
    parser.add_argument("--no-gpu-plan", action="store_true", help="skip `dopsd plan` for a GPU (the CPU plan runs)")
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated phases to run again (write, plan-cpu, plan, probe, train, kill, resume, export, "
        "sample, pipeline); the others' results are read from the work folder",
    )
    parser.add_argument("--note", default=None, help="a sentence for the docs page (e.g. why the settings differ)")
    parser.add_argument(
        "--report-only", action="store_true", help="run nothing: rebuild the JSON and docs from the work folder"
    )
    parser.add_argument("--json", type=Path, default=None, help="default docs/measured/full-size-cpu.json (full)")
    parser.add_argument("--docs", type=Path, default=None, help="default docs/full-size.md (full)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    models = [m for m in args.models.split(",") if m]
    if any(m not in MODELS for m in models) or args.steps < 2:
        parser.error(f"--models among {', '.join(MODELS)}; --steps >= 2")
    if args.tiny:
        import torch

        torch.set_num_threads(1)
    work = args.work or (Path(tempfile.mkdtemp(prefix="dopsd-full-size-")) if args.tiny else ROOT / "full-size-work")
    work.mkdir(parents=True, exist_ok=True)
    json_path = args.json or (work / "full-size-cpu.json" if args.tiny else ROOT / "docs/measured/full-size-cpu.json")
    docs_path = args.docs or (work / "full-size.md" if args.tiny else ROOT / "docs/full-size.md")
    size = args.size or (32 if args.tiny else 256)
    started = time.time()
    old = json.loads(json_path.read_text()) if json_path.is_file() and not args.tiny else {"models": []}
    entries = {e["preset"]: e for e in old.get("models", [])}
    old_minutes = {p: e.get("minutes") for p, e in entries.items()}
    for preset in models:
        tokens = args.klein_caption_tokens if preset == "flux2-klein-4b" and not args.tiny else None
        r = Rehearsal(preset, args.tiny, size, args.steps, 32 if args.tiny else tokens, args.inference_steps)
        r.gpu_plan = not (args.tiny or args.no_gpu_plan)
        t0 = time.time()
        if not args.report_only:
            if not args.only:  # the command that measures this model (a later --only reruns part of it)
                (work / "stats").mkdir(parents=True, exist_ok=True)
                (work / "stats" / f"{preset}.command").write_text(command(args))
            rehearse(r, work, sys.stdout, set(args.only.split(",")) if args.only else None)
        entries[preset] = collect(r, work)
        if args.only and old_minutes.get(preset):  # the earlier run's time plus this one's
            entries[preset]["minutes"] = round(old_minutes[preset] + (time.time() - t0) / 60, 1)
        elif not args.report_only or preset not in old_minutes:
            entries[preset]["minutes"] = round((time.time() - t0) / 60, 1)
        else:
            entries[preset]["minutes"] = old_minutes[preset]
        known = work / "stats" / f"{preset}.command"
        entries[preset]["command"] = known.read_text() if known.is_file() else command(args)
        write(json_path, docs_path, entries, started, args)
    ok = all(not entries[m]["problems"] for m in models)
    print(f"wrote {json_path} and {docs_path}; {'all phases ran and every check held' if ok else 'PROBLEMS: see them'}")
    return 0 if ok else 1


def command(args: Any) -> str:
    """The command line of this run (the models' entries keep the one that measured them)."""
    return shlex.join(["nice", "-n", "10", ".venv/bin/python", "benchmarks/cpu_full_size.py", *args.argv])


def write(json_path: Path, docs_path: Path, entries: dict[str, Any], started: float, args: Any) -> None:
    """The JSON (models in the order of MODELS) and the docs page, after each model (a partial run keeps both)."""
    from dopsd.files import atomic_write_json, atomic_write_text

    old_note = json.loads(json_path.read_text()).get("note") if json_path.is_file() and not args.tiny else None

    result = {
        "date": date.today().isoformat(),
        "machine": report.machine(),
        "command": "nice -n 10 .venv/bin/python benchmarks/cpu_full_size.py" + (" --tiny" if args.tiny else ""),
        "minutes": round(sum(e.get("minutes") or 0 for e in entries.values()), 1),
        "note": args.note or (old_note or "random weights, stand-in tokenizers; see docs/full-size.md"),
        "models": [entries[m] for m in MODELS if m in entries],
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json_path, result)
    docs_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(docs_path, report.page(result))


if __name__ == "__main__":
    sys.exit(main())

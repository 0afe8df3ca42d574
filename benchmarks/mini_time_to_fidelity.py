"""Wall time (and FLOPs) to a learned concept on the miniature, every speed option side by side in one process.

The concept, data, training setup and scoring are the demo's (`dopsd demo`, dopsd.mini.demo): the built-in
'orange' concept bound to `sks`, the mini preset (LoRA r8, lr 5e-4, batch 8), without prior preservation;
concept_fidelity on the concept prompts and fewstep_quality on unrelated prompts, at the turbo's 4 steps with
the same noise for every model. Each option is a real `Trainer` (dopsd.training.trainer); their optimizer steps
are interleaved round-robin, so load from other processes hits all of them alike, and each one's training wall
time is the sum of its own steps (evaluation excluded). Criteria, fixed before running:

  reached       concept_fidelity >= 0.85 with few-step quality kept (>= 0.95x the untouched turbo's), at an
                evaluation every --eval-every steps; a D-OPSD option stops there
  SFT's best    SFT runs --sft-steps; its time to its own best fidelity is the first evaluation at that best
  goal          D-OPSD's time to reached <= 1.5x SFT's time to its best

--probe N instead times N optimizer steps of every option interleaved round-robin, after 3 warm-up steps (a
compiled option's compilation falls in them and is reported as such): the fair per-step cost on a busy machine,
since the training runs above stop at different times and so see different load. Steps to the target times
that cost is the load-independent time to the target.

FLOPs per optimizer step: torch's FLOP counter around each option's first step (that step's time is replaced
by the median of its next ones; compiled options are not counted: the counter does not see inside a compiled
graph, and they compute the same as their uncompiled twin).

  .venv/bin/python benchmarks/mini_time_to_fidelity.py --out /tmp/ttf.json [--options sft,dopsd,dopsd_k1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dopsd.config import load_config
from dopsd.core.sampler import generate, seed_noise
from dopsd.data.dataset import load_dataset
from dopsd.files import atomic_write_text
from dopsd.mini import metrics, world
from dopsd.mini.adapter import load
from dopsd.mini.demo import CONCEPT, NO_PRIOR, TRAIN_OVERRIDES
from dopsd.planner.counting import count_flops
from dopsd.training.trainer import Trainer

TARGET_FIDELITY = 0.85
QUALITY_KEPT = 0.95  # x the untouched turbo's fewstep_quality
GOAL_TIME_RATIO = 1.5

# option -> config overrides on top of the demo's (no prior). GC is not an option here: the miniature has no
# gradient checkpointing, and `auto` resolves to off on the CPU (each option records what it resolved to).
OPTIONS: dict[str, list[str]] = {
    "sft": ["method.name=sft"],
    # every option names its train_states: "dopsd" is every roll-out state trained (0), whatever the default is
    "dopsd": ["method.name=dopsd", "method.train_states=0"],
    "dopsd_k2": ["method.name=dopsd", "method.train_states=2"],
    "dopsd_k1": ["method.name=dopsd", "method.train_states=1"],
    "dopsd_compile": ["method.name=dopsd", "method.train_states=0", "train.compile=true"],
    "dopsd_k1_compile": ["method.name=dopsd", "method.train_states=1", "train.compile=true"],
}


@dataclass
class Run:
    name: str
    trainer: Any
    max_steps: int
    seconds: float = 0.0
    step_times: list[float] = field(default_factory=list)
    flops: float | None = None
    curve: list[dict[str, Any]] = field(default_factory=list)
    reached: dict[str, Any] | None = None
    done: bool = False


class Scorer:
    """The demo's evaluation (dopsd.mini.demo.evaluate) on a live network: contexts built once, same noise."""

    def __init__(self, cfg: Any, samples: int, seed: int):
        adapter = load(cfg.model)
        self.concept = adapter.student_contexts(world.concept_prompts(samples))
        self.unrelated_prompts = world.unrelated_prompts(samples, seed=seed + 1)
        self.unrelated = adapter.student_contexts(self.unrelated_prompts)
        res = adapter.resolution
        self.schedule = adapter.inference_schedule(res, res)
        self.noise = seed_noise(adapter.latent_shape(res, res), range(seed, seed + samples))
        self.reference: torch.Tensor | None = None
        self.before = self(adapter, adapter.network)

    def __call__(self, adapter: Any, network: torch.nn.Module) -> dict[str, float]:
        was_training = network.training
        network.eval()
        try:
            concept = generate(adapter, network, self.concept, self.noise, self.schedule)
            plain = generate(adapter, network, self.unrelated, self.noise, self.schedule)
        finally:
            network.train(was_training)
        self.reference = plain if self.reference is None else self.reference
        return {
            "concept_fidelity": metrics.concept_fidelity(concept, CONCEPT),
            "fewstep_quality": metrics.fewstep_quality(plain, self.unrelated_prompts),
            "drift": metrics.drift(plain, self.reference),
        }


def config(name: str, data: Path, work: Path, seed: int, steps: int) -> Any:
    overrides = TRAIN_OVERRIDES + NO_PRIOR + OPTIONS[name]
    overrides += [
        f"data.path={data}",
        f"train.output_dir={work / name}",
        f"train.seed={seed}",
        f"train.max_steps={steps}",
        "train.threads=1",
        "train.checkpoint_every=0",
        "cache.enabled=false",
        "sample.health=false",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    return load_config("mini", overrides)


def build(name: str, data: Path, work: Path, seed: int, steps: int) -> Run:
    cfg = config(name, data, work, seed, steps)
    trainer = Trainer(cfg, work / name, load_dataset(cfg.data, cfg.model), adapter=load(cfg.model))
    trainer.prepare()
    return Run(name, trainer, steps)


def one_step(run: Run, compiled: bool) -> None:
    if run.flops is None and not compiled:
        holder: dict[str, Any] = {}
        run.flops = float(count_flops(lambda: holder.update(r=run.trainer.train_step())))
        run.step_times.append(float("nan"))  # replaced by the median of the next steps (counter overhead)
        return
    started = time.perf_counter()
    run.trainer.train_step()
    run.step_times.append(time.perf_counter() - started)


def train_seconds(run: Run) -> float:
    """Wall seconds of the steps so far (a counted first step: the median of the others)."""
    timed = [t for t in run.step_times if t == t]
    fill = statistics.median(timed) if timed else 0.0
    return sum(t if t == t else fill for t in run.step_times)


def evaluate(run: Run, scorer: Scorer, kept: float) -> None:
    step = run.trainer.step
    point = {"step": step, "seconds": round(train_seconds(run), 2), **scorer(run.trainer.adapter, run.trainer.network)}
    run.curve.append(point)
    ok = point["concept_fidelity"] >= TARGET_FIDELITY and point["fewstep_quality"] >= kept
    if run.name != "sft" and ok and run.reached is None:
        run.reached = point
        run.done = True
    print(
        f"  {run.name:18} step {step:4d}  {point['seconds']:7.1f} s  fidelity {point['concept_fidelity']:.3f}  "
        f"quality {point['fewstep_quality']:.3f}{'  REACHED' if run.reached is point else ''}",
        flush=True,
    )


def summarise(runs: dict[str, Run], scorer: Scorer, kept: float, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"options": {}}
    sft = runs.get("sft")
    sft_best = None
    if sft is not None and sft.curve:
        best = max(p["concept_fidelity"] for p in sft.curve)
        sft_best = next(p for p in sft.curve if p["concept_fidelity"] == best)
    for name, run in runs.items():
        timed = [t for t in run.step_times if t == t]
        steady = timed[len(timed) // 5 :] or timed  # after the first fifth: compilation and warm-up
        entry = {
            "overrides": OPTIONS[name],
            "gradient_checkpointing": run.trainer.speed,
            "steps_run": run.trainer.step,
            "train_seconds": round(train_seconds(run), 2),
            "first_step_seconds": round(timed[0], 3) if timed else None,
            "median_step_seconds": round(statistics.median(steady), 4) if steady else None,
            "flops_per_step": run.flops,
            "reached": run.reached,
            "curve": run.curve,
        }
        if sft_best is not None and run.reached is not None:
            entry["time_ratio_to_sft_best"] = round(run.reached["seconds"] / sft_best["seconds"], 3)
            entry["goal_met"] = entry["time_ratio_to_sft_best"] <= GOAL_TIME_RATIO
        if sft is not None and sft.flops and run.flops:
            entry["flops_ratio_to_sft"] = round(run.flops / sft.flops, 3)
        if sft is not None and sft.flops and name.endswith("_compile"):
            twin = runs.get(name.removesuffix("_compile"))
            if twin is not None and twin.flops:
                entry["flops_ratio_to_sft"] = round(twin.flops / sft.flops, 3)
        out["options"][name] = entry
    out["sft_best"] = sft_best
    out["criteria"] = {
        "target_fidelity": TARGET_FIDELITY,
        "quality_kept_at_least": round(kept, 4),
        "quality_kept_rule": f">= {QUALITY_KEPT} x the untouched turbo's fewstep_quality",
        "goal": f"D-OPSD time to reached <= {GOAL_TIME_RATIO} x SFT's time to its own best fidelity",
    }
    out["before"] = scorer.before
    out["setup"] = {
        "concept": CONCEPT,
        "seed": args.seed,
        "samples": args.samples,
        "eval_every": args.eval_every,
        "threads": 1,
        "prior_preservation": False,
        "device": "cpu",
        "torch": torch.__version__,
    }
    return out


def table(result: dict[str, Any]) -> str:
    head = (
        f"{'option':18} {'steps':>6} {'s/step':>7} {'FLOPs/SFT':>9} {'to 0.85 (s)':>11} {'x SFT best':>10} "
        f"{'fidelity':>8} {'quality':>7}"
    )
    lines = [head]
    for name, e in result["options"].items():
        point = e["reached"] or (e["curve"][-1] if e["curve"] else {})
        if name == "sft" and result["sft_best"]:
            point = result["sft_best"]
        when = point.get("seconds", float("nan"))
        ratio = e.get("time_ratio_to_sft_best")
        steps = point.get("step", e["steps_run"])
        lines.append(
            f"{name:18} {steps:>6} {e['median_step_seconds'] or float('nan'):7.3f} "
            f"{e.get('flops_ratio_to_sft', float('nan')):9.2f} "
            f"{(when if (e['reached'] or name == 'sft') else float('nan')):11.1f} "
            f"{(ratio if ratio is not None else float('nan')):10.2f} "
            f"{point.get('concept_fidelity', float('nan')):8.3f} {point.get('fewstep_quality', float('nan')):7.3f}"
        )
    lines.append("sft row: its first evaluation at its own best fidelity; others: first reaching the target")
    return "\n".join(lines)


def probe(runs: dict[str, Run], steps: int) -> dict[str, Any]:
    """Per-step seconds of every option, interleaved (see the module docstring)."""
    warm: dict[str, float] = {}
    for name, run in runs.items():
        started = time.perf_counter()
        for _ in range(3):
            run.trainer.train_step()
        warm[name] = time.perf_counter() - started
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, run in runs.items():
            started = time.perf_counter()
            run.trainer.train_step()
            times[name].append(time.perf_counter() - started)
    out = {}
    for name, t in times.items():
        med = statistics.median(t)
        out[name] = {"median_step_seconds": round(med, 4), "warmup_3_steps_seconds": round(warm[name], 2)}
        print(f"  {name:18} {med:.4f} s/step (3 warm-up steps {warm[name]:.1f} s)", flush=True)
    return {"steps": steps, "options": out, "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON results")
    p.add_argument("--work", type=Path, default=Path("/tmp/dopsd-time-to-fidelity"), help="run folders (replaced)")
    p.add_argument("--options", default=",".join(OPTIONS), help=f"comma-separated, of: {', '.join(OPTIONS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=64, help="evaluation samples per prompt set (the demo's 64)")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--max-steps", type=int, default=500, help="D-OPSD options stop here if not reached")
    p.add_argument("--sft-steps", type=int, default=400)
    p.add_argument("--probe", type=int, default=0, help="only time this many interleaved steps per option")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.options.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        print(f"--options: unknown {', '.join(unknown)}; choose from {', '.join(OPTIONS)}", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    if args.work.exists():
        shutil.rmtree(args.work)
    data = args.work / "data"
    world.write_concept_dataset(data, concept=CONCEPT, seed=args.seed)
    if args.probe:
        result = probe({n: build(n, data, args.work, args.seed, args.probe + 3) for n in names}, args.probe)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(result, indent=1))
        print(f"wrote {args.out}")
        return 0
    scorer = Scorer(config("sft", data, args.work, args.seed, 1), args.samples, args.seed)
    kept = QUALITY_KEPT * scorer.before["fewstep_quality"]
    print(f"untouched turbo: {scorer.before}; quality kept at >= {kept:.3f}", flush=True)
    runs = {n: build(n, data, args.work, args.seed, args.sft_steps if n == "sft" else args.max_steps) for n in names}
    started = time.time()
    for step in range(1, max(r.max_steps for r in runs.values()) + 1):
        for run in runs.values():
            if run.done or step > run.max_steps:
                continue
            one_step(run, compiled=run.name.endswith("_compile"))
            if step % args.eval_every == 0 or step == run.max_steps:
                evaluate(run, scorer, kept)
        if all(r.done or step >= r.max_steps for r in runs.values()):
            break
    result = summarise(runs, scorer, kept, args)
    result["setup"]["elapsed_seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1))
    print("\n" + table(result))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

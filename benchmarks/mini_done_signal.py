"""Does the done signal's lowest step (dopsd.training.done) fall where the measured fidelity peaks? On the miniature.

Per setting and seed: one `dopsd.train` run of the shipped configs (dopsd/configs/mini.yaml: a concept LoRA on the
held-out colour `orange`, 6 pairs as the bench's concept setting; dopsd/configs/mini-domain.yaml: a full fine-tune
on the held-out sepia domain, 128 pairs as the bench's quick domain setting), sampling every --every steps. The
run records the done signal itself (done.jsonl, the default palette features, the grid's own samples: 4 training
captions × 4 seeds); the bench's evaluation suite (dopsd.bench.suite, fixed noise, the same prompts the bench
scores) measures the fidelity at the same steps from the training loop's callback:
  concept: concept_fidelity on the training prompts (fraction of samples whose decoded colour is the concept's;
           the bench's curve metric), unseen-prompt fidelity, and colour_error (mean RGB distance of the decoded
           foreground to the concept colour: continuous, lower = better);
  domain:  tint_fidelity on the training captions (amount and hue of the fitted tint within tolerance: over-tinting
           fails it), domain_fidelity (background nearer its tinted twin: saturates), and amount_error (mean
           |fitted tint amount − the domain's 0.40|: continuous, lower = better).
The peak of a fidelity is its FIRST step at the maximum (its minimum for the errors). Criterion: the done step
within ±25% of the peak step of the primary fidelity (concept_fidelity; tint_fidelity). The same for the run's
as-good step (summary.json `done.as_good_step`), and where train.stop_when_done (patience 3) would stop: counted
from the lowest step (what it does) and, for comparison, from the as-good step (simulated from done.jsonl).

Run: nice -n 10 .venv/bin/python benchmarks/mini_done_signal.py --out /tmp/donesignal/done.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"concept": REPO / "dopsd/configs/mini.yaml", "domain": REPO / "dopsd/configs/mini-domain.yaml"}
PRIMARY = {"concept": "concept_fidelity", "domain": "tint_fidelity"}
SECONDARY = {"concept": "colour_error", "domain": "amount_error"}  # continuous; lower = better
PAIRS = {"concept": 6, "domain": 128}


def write_data(setting: str, folder: Path) -> None:
    from dopsd.mini import world

    if not folder.is_dir():
        if setting == "concept":
            world.write_concept_dataset(str(folder), "orange", n=PAIRS[setting])
        else:
            world.write_domain_dataset(str(folder), n=PAIRS[setting])


def fidelity_point(suite: Any, network: Any, setting: str, n: int) -> dict[str, float]:
    """The fidelity measures of `network` now on the suite's fixed noise."""
    from dopsd.mini import metrics, world

    train = suite.sample(network, "train", suite.few_steps, n)
    dec = metrics.decode(train)
    if setting == "concept":
        unseen = suite.sample(network, "unseen", suite.few_steps, n)
        colour = torch.tensor(world.CONCEPTS["orange"])
        return {
            "concept_fidelity": suite.fidelity(train, dec),
            "unseen_fidelity": suite.fidelity(unseen),
            "colour_error": float(world.colour_distance(dec.fg, colour).mean()),
        }
    captions = suite.sets["train"].captions[: len(train)]
    fit = metrics.fit_tint(train, dec, captions)
    return {
        "tint_fidelity": float(metrics.shows_tint(fit, world.DOMAIN_TINT).float().mean()),
        "domain_fidelity": metrics.domain_fidelity(train, dec),
        "amount_error": float((fit.amount - world.DOMAIN_TINT[1]).abs().mean()),
    }


def peak(steps: list[int], values: list[float], lower: bool = False) -> int:
    """The first step at the best value."""
    best = min(values) if lower else max(values)
    return steps[values.index(best)]


def stop_step(steps: list[int], values: list[float], patience: int = 3) -> int | None:
    """Where train.stop_when_done with this patience stops (None: it runs to the end), as dopsd.training.done."""
    best = values[0]
    since = 0
    for step, value in zip(steps[1:-1], values[1:-1]):  # the final measurement never stops a run
        if value < best:
            best, since = value, 0
        else:
            since += 1
        if since >= patience:
            return step
    return None


def as_good_stop(steps: list[int], as_good: list[int], patience: int = 3) -> int | None:
    """Where a stop counted from the as-good step would stop: at the first measurement (not the final one) with
    `patience` measurements after the as-good step as it stood then (None: it runs to the end)."""
    for i in range(1, len(steps) - 1):
        if sum(1 for s in steps[: i + 1] if s > as_good[i]) >= patience:
            return steps[i]
    return None


def within(done: int, at: int, tol: float = 0.25) -> bool:
    return abs(done - at) <= tol * at if at > 0 else done == 0


def run_one(setting: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    import dopsd
    from dopsd.bench.jobs import make_adapter
    from dopsd.bench.suite import build_suite
    from dopsd.config import load_config
    from dopsd.data.dataset import load_dataset

    work = Path(args.work)
    data = work / "data" / setting
    write_data(setting, data)
    out = work / "runs" / f"{setting}-{seed}"
    if out.exists():
        shutil.rmtree(out)
    overrides = [
        f"data.path={data}",
        f"train.output_dir={out}",
        f"train.seed={seed}",
        f"train.max_steps={args.steps}",
        f"sample.every={args.every}",
        "sample.control_steps=0",  # the grid's few-step samples are all the done signal needs
        "sample.health=false",
        "train.checkpoint_every=0",
        "cache.enabled=false",
        "log.progress=false",
        "log.tensorboard=false",
        "train.device=cpu",
    ]
    cfg = load_config(str(CONFIGS[setting]), overrides)
    adapter = make_adapter("turbo")
    captions = [c for ex in load_dataset(cfg.data, cfg.model) for c in ex.captions]
    target = "orange" if setting == "concept" else "domain"
    suite = build_suite(adapter, target, captions, args.n, args.n, 8, 4, 0)
    curve: dict[str, list[float]] = {"steps": []}

    def record(step: int) -> None:
        curve["steps"].append(step)
        for k, v in fidelity_point(suite, adapter.network, setting, args.n).items():
            curve.setdefault(k, []).append(v)

    def on_step(trainer: Any, rec: dict[str, Any]) -> None:
        if trainer.step % args.every == 0 or trainer.step == args.steps:
            record(trainer.step)

    started = time.perf_counter()
    record(0)
    result = dopsd.train(cfg, adapter=adapter, callback=on_step)
    done = [json.loads(line) for line in (out / "done.jsonl").read_text().splitlines()]
    d_steps, d_values = [r["step"] for r in done], [r["distance"] for r in done]
    if d_steps != curve["steps"]:
        raise RuntimeError(f"{setting} seed {seed}: done steps {d_steps} != fidelity steps {curve['steps']}")
    done_step, as_good = result.summary["done"]["best_step"], result.summary["done"]["as_good_step"]
    primary = peak(curve["steps"], curve[PRIMARY[setting]])
    secondary = peak(curve["steps"], curve[SECONDARY[setting]], lower=True)
    return {
        "setting": setting,
        "seed": seed,
        "config": str(CONFIGS[setting].relative_to(REPO)),
        "config_sha256": hashlib.sha256(CONFIGS[setting].read_bytes()).hexdigest()[:16],
        "resolved": {
            "lr": cfg.optim.lr,
            "lora": cfg.lora.enabled,
            "batch_size": cfg.train.batch_size,
            "ema_decay": cfg.method.ema_decay,
            "prior_weight": cfg.method.prior_weight,
        },
        "done_step": done_step,
        "peak_step": primary,
        "peak_step_continuous": secondary,
        "within_25pct": within(done_step, primary),
        "within_25pct_continuous": within(done_step, secondary),
        "as_good_step": as_good,
        "as_good_within_25pct": within(as_good, primary),
        "as_good_within_25pct_continuous": within(as_good, secondary),
        "curve": {**curve, "done_distance": d_values, "as_good_step": [r["as_good_step"] for r in done]},
        "seconds": round(time.perf_counter() - started, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| setting | seed | done step | as-good step | fidelity peak | ±25% (done / as good) | continuous peak | "
        "±25% (done / as good) | stops at, patience 3 (lowest / as good) | fidelity at peak / stops / end | s |"
    )
    lines = [head, "|" + "---|" * 11]
    yes = {True: "yes", False: "no", None: "–"}
    for r in rows:
        c = r["curve"]
        stops = [stop_step(c["steps"], c["done_distance"])]
        stops.append(as_good_stop(c["steps"], c["as_good_step"]) if "as_good_step" in c else None)
        fid = c[PRIMARY[r["setting"]]]
        at = [f"{fid[c['steps'].index(s)]:.3f}" if s is not None else "end" for s in stops]
        lines.append(
            f"| {r['setting']} | {r['seed']} | {r['done_step']} | {r.get('as_good_step', '–')} | {r['peak_step']} "
            f"({PRIMARY[r['setting']]}) | {yes[r['within_25pct']]} / {yes[r.get('as_good_within_25pct')]} | "
            f"{r['peak_step_continuous']} ({SECONDARY[r['setting']]}) | {yes[r['within_25pct_continuous']]} / "
            f"{yes[r.get('as_good_within_25pct_continuous')]} | "
            f"{' / '.join(str(s) if s is not None else 'end' for s in stops)} | "
            f"{max(fid):.3f} / {' / '.join(at)} / {fid[-1]:.3f} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def curves(r: dict[str, Any]) -> str:
    c = r["curve"]
    keys = [k for k in c if k != "steps"]
    lines = [f"{r['setting']} seed {r['seed']}:", "step " + " ".join(f"{k:>16}" for k in keys)]
    for i, s in enumerate(c["steps"]):
        lines.append(f"{s:4d} " + " ".join(f"{c[k][i]:16.4f}" for k in keys))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", nargs="+", default=["concept", "domain"], choices=sorted(CONFIGS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--n", type=int, default=32, help="samples per fidelity measurement (each prompt set)")
    p.add_argument("--work", default="/tmp/donesignal/work")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    rows: list[dict[str, Any]] = json.loads(out.read_text())["runs"] if out.is_file() else []
    have = {(r["setting"], r["seed"]) for r in rows}
    for setting in args.settings:
        for seed in args.seeds:
            if (setting, seed) in have:  # a rerun continues where a killed one stopped
                continue
            rows.append(run_one(setting, seed, args))
            print(curves(rows[-1]), flush=True)
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
            summary = {
                "what": "done signal (palette distance of the grid's samples to the training images) vs measured "
                "fidelity on the miniature; benchmarks/mini_done_signal.py",
                "steps": args.steps,
                "every": args.every,
                "n": args.n,
                "git": commit.stdout.strip(),
                "runs": rows,
            }
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(summary, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()

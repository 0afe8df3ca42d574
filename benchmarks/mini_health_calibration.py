"""Calibrate the few-step health alarm (dopsd.training.health) on the miniature, with a held-out concept.

Runs concept LoRA trainings (the bench's concept setting: 6 pairs, rank 8, lr 5e-4, batch 8) with SFT, which
loses few-step quality, and D-OPSD, which keeps it, on every held-out concept of the miniature. At every
sampling step it records
  * the health check's own samples (few-step and many-step control, fixed noise) on two prompt sets: the
    unrelated prompts of mini.yaml's prior preservation (`unrelated`) and the training prompts (`train`),
    4 seeds each (the trainer uses the first 2);
  * the measured few-step quality: `dopsd bench`'s metric (dopsd.mini.metrics.fewstep_quality on the bench's
    unrelated prompts, fixed noise), relative to the untouched turbo's.
A point is "damaged" when that measured quality fell by DAMAGE (5%) or more. The analysis scores candidate
statistics of the health samples (all model-free except `decoder_quality`, which is the miniature's own metric
on the health samples, for reference) and picks each one's alarm threshold on two concepts, testing it on the
third (leave one concept out): the miss rate on damaged points and the false-alarm rate on D-OPSD points that
kept their quality. Raw runs go to --raw (resumable); the summary JSON to --out.

    python benchmarks/mini_health_calibration.py --raw /tmp/health/raw --out docs/measured/health-calibration.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dopsd.mini import world  # noqa: E402
from dopsd.training import health as H  # noqa: E402

DAMAGE = 0.05  # a point is damaged when the measured few-step quality fell by this fraction of the turbo's or more
CONCEPT_OVERRIDES = ["lora.rank=8", "lora.alpha=8", "optim.lr=5e-4", "train.batch_size=8"]  # the bench's setting
UNRELATED = ["a red circle", "a blue square on a gray background", "a green triangle", "a white plus"]  # mini.yaml
# Prior preservation as mini.yaml sets it: its prompts are the health check's too (the trainer's default), so
# the prompts the health check samples are the ones the prior term keeps: the hard case for the alarm.
PRIOR = ["method.prior_weight=1.0", f"method.prior_prompts=[{', '.join(UNRELATED)}]"]
METHODS = {"sft": ("sft", []), "dopsd": ("dopsd", []), "sft_prior": ("sft", PRIOR), "dopsd_prior": ("dopsd", PRIOR)}


# --- one run ---------------------------------------------------------------------------------------------------
def run_one(concept: str, method: str, seed: int, steps: int, every: int, n_quality: int, raw: Path) -> None:
    from dopsd.bench.jobs import Job, make_adapter, train
    from dopsd.bench.suite import build_suite
    from dopsd.config import load_config
    from dopsd.data.dataset import load_dataset

    torch.set_num_threads(1)
    name = f"{concept}-{method}-{seed}"
    data = raw / "data" / concept
    if not data.exists():
        world.write_concept_dataset(data, concept, n=6)
    job = Job(
        setting="concept_lora",
        target=concept,
        method=method,
        seed=seed,
        data_dir=str(data),
        work_dir=str(raw / "work" / name),
        overrides=CONCEPT_OVERRIDES + METHODS[method][1],
        steps=steps,
        curve_every=every,
        curve_n=0,
        suite={},
    )
    adapter = make_adapter("turbo")
    cfg = load_config("mini", [f"data.path={data}"])
    captions = list(dict.fromkeys(c for ex in load_dataset(cfg.data, cfg.model) for c in ex.captions))
    suite = build_suite(adapter, concept, captions, 16, 1, n_quality, 32, 1)
    monitors = {
        "unrelated": H.FewStepHealth(adapter, UNRELATED, height=24, width=24, seeds=(0, 1, 2, 3), control_steps=32),
        "train": H.FewStepHealth(adapter, captions[:4], height=24, width=24, seeds=(0, 1, 2, 3), control_steps=32),
    }
    net = adapter.network
    suite.set_reference(net)  # the untouched turbo (drift)
    tensors: dict[str, torch.Tensor] = {}
    points: list[dict[str, Any]] = []

    def record(step: int) -> None:
        for key, mon in monitors.items():
            for kind, images in mon._sample(net).items():
                tensors[f"{key}/{kind}/{step}"] = images.contiguous()
        points.append({"step": step, **suite.curve_point(net, n_quality)})  # the bench's quality, fidelity, drift

    def on_step(trainer: Any, rec: dict[str, Any]) -> None:
        if trainer.step % every == 0 or trainer.step == steps:
            record(trainer.step)

    started = time.perf_counter()
    record(0)
    train(job, adapter, METHODS[method][0], on_step)
    save_file(tensors, str(raw / f"{name}.safetensors"))
    info = {"concept": concept, "method": method, "seed": seed, "steps": steps, "points": points}
    info["prompts"] = {key: mon.prompts for key, mon in monitors.items()}
    info["seconds"] = time.perf_counter() - started
    (raw / f"{name}.json").write_text(json.dumps(info, indent=1))
    print(f"{name}: {info['seconds']:.0f} s, quality {[round(p['fewstep_quality'], 3) for p in points]}", flush=True)


# --- candidate statistics of the health samples -------------------------------------------------------------------
def two_sided(r: float) -> float:
    return min(r, 1.0 / r) if r > 0 else 0.0


def statistics(few: torch.Tensor, many: torch.Tensor, few0: torch.Tensor, many0: torch.Tensor, prompts) -> dict:
    """Scores (1 = as the starting model, lower = worse) of one measurement vs the start, same noise."""
    s, s0 = float(H.sharpness(few).mean()), float(H.sharpness(few0).mean())
    sm, sm0 = float(H.sharpness(many).mean()), float(H.sharpness(many0).mean())
    g, g0 = float(H.relative_gap(few, many).mean()), float(H.relative_gap(few0, many0).mean())
    # per-sample self-relative detail: each sample's few-step sharpness over its own many-step sharpness
    per = (H.sharpness(few) / H.sharpness(many).clamp_min(1e-8)) / (
        H.sharpness(few0) / H.sharpness(many0).clamp_min(1e-8)
    )
    out = {
        "sharpness": two_sided(s / s0),  # `health` on real models now
        "gap": 1.0 - (g - g0),
        "self_sharpness": two_sided((s / sm) / (s0 / sm0)),  # tried: few-step detail over its own many-step detail
        "self_sharpness_median": two_sided(float(per.median())),
    }
    out["before"] = min(out["sharpness"], out["gap"])  # `health` on real models before this calibration
    from dopsd.mini import metrics  # the miniature's own metric on the health samples: `health`'s quality there

    out["decoder_quality"] = metrics.fewstep_quality(few, prompts) / metrics.fewstep_quality(few0, prompts)
    out["mini_health"] = min(out["sharpness"], out["decoder_quality"])  # `health` on the miniature now
    out["mini_health_before"] = min(out["before"], out["decoder_quality"])
    return out


def load_points(raws: list[Path], n_seeds: int) -> list[dict[str, Any]]:
    """One row per (run, step > 0): measured relative quality and every statistic on both prompt sets."""
    rows = []
    for meta in sorted(m for raw in raws for m in raw.glob("*.json")):
        info = json.loads(meta.read_text())
        t = load_file(str(meta.with_suffix(".safetensors")))
        q0 = info["points"][0]["fewstep_quality"]
        captions = sorted({k.split("/")[0] for k in t})
        for p in info["points"][1:]:
            row = {k: info[k] for k in ("concept", "method", "seed")} | {"step": p["step"]}
            row["quality_rel"] = p["fewstep_quality"] / q0
            row["concept_fidelity"] = p["concept_fidelity"]
            row["damaged"] = row["quality_rel"] <= 1.0 - DAMAGE
            for key in captions:
                n = t[f"{key}/few/0"].shape[0] * n_seeds // 4
                im = {kind: t[f"{key}/{kind}/{p['step']}"][:n] for kind in ("few", "many")}
                im0 = {kind: t[f"{key}/{kind}/0"][:n] for kind in ("few", "many")}
                stats = statistics(im["few"], im["many"], im0["few"], im0["many"], info["prompts"][key][:n])
                row.update({f"{key}/{k}": v for k, v in stats.items()})
            rows.append(row)
    return rows


# --- thresholds, leave one concept out ----------------------------------------------------------------------
def rates(rows: list[dict], stat: str, thr: float) -> dict[str, Any]:
    damaged = [r for r in rows if r["damaged"]]
    kept = [r for r in rows if not r["damaged"] and r["method"].startswith("dopsd")]
    miss = sum(r[stat] >= thr for r in damaged)
    false = sum(r[stat] < thr for r in kept)
    return {
        "miss": miss,
        "damaged": len(damaged),
        "false_alarms": false,
        "kept": len(kept),
        "miss_rate": miss / len(damaged) if damaged else None,
        "false_alarm_rate": false / len(kept) if kept else None,
    }


def fit_threshold(rows: list[dict], stat: str) -> float:
    """The alarm threshold (alarm = score < threshold) with the best balanced accuracy on `rows` (damaged vs
    D-OPSD points that kept quality); among equals the midpoint of the widest gap, rounded to 0.005."""
    values = sorted({round(r[stat], 4) for r in rows} | {0.0, 1.01})
    best, best_key = 1.0, None
    for lo, hi in zip(values, values[1:]):
        thr = (lo + hi) / 2
        rt = rates(rows, stat, thr)
        acc = (1 - (rt["miss_rate"] or 0)) + (1 - (rt["false_alarm_rate"] or 0))
        key = (round(acc, 6), hi - lo)
        if best_key is None or key > best_key:
            best, best_key = thr, key
    return round(best * 200) / 200


def evaluate(rows: list[dict], stats: list[str]) -> dict[str, Any]:
    concepts = sorted({r["concept"] for r in rows})
    out = {}
    for stat in stats:
        folds, miss, dam, fa, kept = [], 0, 0, 0, 0
        for held in concepts:
            calib = [r for r in rows if r["concept"] != held]
            test = [r for r in rows if r["concept"] == held]
            thr = fit_threshold(calib, stat)
            rt = rates(test, stat, thr)
            folds.append({"held_out": held, "threshold": thr, **rt})
            miss, dam, fa, kept = miss + rt["miss"], dam + rt["damaged"], fa + rt["false_alarms"], kept + rt["kept"]
        thr_all = fit_threshold(rows, stat)
        out[stat] = {
            "held_out_miss_rate": miss / dam if dam else None,
            "held_out_false_alarm_rate": fa / kept if kept else None,
            "held_out_counts": {"miss": miss, "damaged": dam, "false_alarms": fa, "kept": kept},
            "folds": folds,
            "threshold_all": thr_all,
            "all_concepts_at_threshold_all": rates(rows, stat, thr_all),
        }
    return out


def run_summary(rows: list[dict], stat: str, thr: float) -> list[dict[str, Any]]:
    """Per run: first damaged step, first alarm step, final quality and score."""
    out = []
    for key in sorted({(r["concept"], r["method"], r["seed"]) for r in rows}):
        rs = sorted((r for r in rows if (r["concept"], r["method"], r["seed"]) == key), key=lambda r: r["step"])
        first = lambda cond, rs=rs: next((r["step"] for r in rs if cond(r)), None)  # noqa: E731
        out.append(
            {
                "run": "-".join(map(str, key)),
                "first_damaged": first(lambda r: r["damaged"]),
                "first_alarm": first(lambda r: r[stat] < thr),
                "quality_rel": [round(r["quality_rel"], 3) for r in rs],
                stat: [round(r[stat], 3) for r in rs],
            }
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--raw", type=Path, default=Path("/tmp/health/raw"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--concepts", nargs="+", default=sorted(world.CONCEPTS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=25)
    ap.add_argument("--n-quality", type=int, default=128, help="unrelated prompts the measured quality samples")
    ap.add_argument("--also", nargs="*", type=Path, default=[], help="more raw folders to analyse (e.g. --steps)")
    ap.add_argument("--analyse-only", action="store_true")
    ap.add_argument("--primary", default="unrelated/sharpness", help="the statistic whose runs to list")
    args = ap.parse_args()
    args.raw.mkdir(parents=True, exist_ok=True)
    if not args.analyse_only:
        for seed in args.seeds:  # every concept's first seed first: a cut-short run still has all concepts
            for concept in args.concepts:
                for method in args.methods:
                    if not (args.raw / f"{concept}-{method}-{seed}.json").exists():
                        run_one(concept, method, seed, args.steps, args.every, args.n_quality, args.raw)
    result: dict[str, Any] = {
        "what": __doc__.split("\n\n")[0],
        "damaged_means": f"measured few-step quality (bench metric, {args.n_quality} unrelated prompts) "
        f"<= {1 - DAMAGE:.2f} x the turbo's",
        "runs": {"concepts": args.concepts, "methods": args.methods, "seeds": args.seeds, "steps": args.steps},
        "sample_every": args.every,
        "by_samples": {},
    }
    for n_seeds in (2, 4):
        rows = load_points([args.raw, *args.also], n_seeds)
        stats = sorted(k for k in rows[0] if "/" in k)
        ev = evaluate(rows, stats)
        result["by_samples"][f"{n_seeds}_seeds"] = ev
        print(f"\n{n_seeds} seeds x 4 prompts per set; {len(rows)} points, {sum(r['damaged'] for r in rows)} damaged")
        print(f"{'statistic':38s} {'miss (LOO)':>11s} {'false al.':>10s} {'thr(all)':>9s}  folds' thresholds")
        for stat in stats:
            e = ev[stat]
            c = e["held_out_counts"]
            mr, fr = (
                e[k] if e[k] is not None else float("nan") for k in ("held_out_miss_rate", "held_out_false_alarm_rate")
            )
            print(
                f"{stat:38s} {c['miss']:>3d}/{c['damaged']:<3d}{mr:>5.2f} "
                f"{c['false_alarms']:>3d}/{c['kept']:<3d}{fr:>4.2f} "
                f"{e['threshold_all']:>9.3f}  {[f['threshold'] for f in e['folds']]}"
            )
        old = {"unrelated": 0.93, "train": 0.85}  # the thresholds before this calibration
        result["by_samples"][f"{n_seeds}_seeds"]["before_calibration"] = {
            f"{key}/{stat}": {"threshold": thr, **rates(rows, f"{key}/{stat}", thr)}
            for key, thr in old.items()
            for stat in ("before", "mini_health_before")
        }
        if n_seeds == 2:
            result["points"] = [
                {
                    k: (round(v, 4) if isinstance(v, float) else v)
                    for k, v in r.items()
                    if k.split("/")[-1] not in ("self_sharpness", "self_sharpness_median", "mini_health_before")
                }
                for r in rows
            ]
            result["runs"] = {  # what was analysed (the folders may hold runs of other --steps/--every)
                f"{c}-{m}-{sd}": sorted(r["step"] for r in rows if (r["concept"], r["method"], r["seed"]) == (c, m, sd))
                for c, m, sd in sorted({(r["concept"], r["method"], r["seed"]) for r in rows})
            }
            result.pop("sample_every", None)
            thr = ev[args.primary]["threshold_all"]
            result["primary"] = {"statistic": args.primary, "threshold": thr}
            result["per_run"] = run_summary(rows, args.primary, thr)
            for r in result["per_run"]:
                print(r)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

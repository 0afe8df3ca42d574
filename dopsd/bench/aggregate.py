"""Aggregation of the bench's job results per setting: method rows (mean and std over runs), curves, images."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING, Any

from dopsd.bench.jobs import METHODS, REFERENCE_ROW

if TYPE_CHECKING:
    from dopsd.bench.settings import Setting

ALL_METHODS = list(METHODS)
BY_TARGET = ("concept_fidelity", "unseen_prompt_fidelity", "fewstep_quality", "preservation")
# what the curves carry (the last three: the done signal, and a domain's strict fidelity on training/unseen prompts)
CURVE_METRICS = (
    "concept_fidelity",
    "fewstep_quality",
    "drift",
    "done_distance",
    "strict_fidelity",
    "unseen_strict_fidelity",
)


def _mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and std over the finite values (a diverged run must not take the whole report down with it)."""
    vals = [v for v in (float(x) for x in values if x is not None) if math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(
    results: list[dict[str, Any]], settings: list[Setting]
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Per setting: method rows (mean and *_std over runs), curves {metric: {method: [run curves]}}, images."""
    rows: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    images: dict[str, Any] = {}
    for s in settings:
        mine = [r for r in results if r["job"]["setting"] == s.name]
        order = ALL_METHODS + [REFERENCE_ROW]
        methods = sorted(dict.fromkeys(r["job"]["method"] for r in mine), key=order.index)
        rows[s.name], images[s.name] = {}, {}
        curves[s.name] = {"steps": None, "metrics": {}}
        for m in methods:
            runs = [r for r in mine if r["job"]["method"] == m]
            row: dict[str, Any] = {}
            for key in runs[0]["final"]:
                row[key], row[f"{key}_std"] = _mean_std([r["final"][key] for r in runs])
            row["seeds"] = len({r["job"]["seed"] for r in runs})
            row["runs"] = len(runs)
            row["targets"] = sorted({r["job"]["target"] for r in runs})
            if len(row["targets"]) > 1:  # several concepts: each one's mean too
                row["by_target"] = {
                    t: {k: statistics.fmean(r["final"][k] for r in runs if r["job"]["target"] == t) for k in BY_TARGET}
                    for t in row["targets"]
                }
            trained = [r for r in runs if r["steps"]]
            row["train_sec_per_step"] = (
                statistics.fmean(r["train_seconds"] / r["steps"] for r in trained) if trained else None
            )
            row["steps"] = runs[0]["steps"]
            rows[s.name][m] = row
            for r in runs:
                if r["images"] is not None:
                    images[s.name][m] = {"images": r["images"], "captions": r["captions"]}
            if runs[0]["curve"] is not None:
                curves[s.name]["steps"] = runs[0]["curve"]["steps"]
                curves[s.name].setdefault("budgets", {})[m] = [
                    {int(step): v for step, v in (r.get("budgets") or {}).items()} for r in runs
                ]
                curves[s.name].setdefault("as_good", {})[m] = [r.get("done_as_good_step") for r in runs]
                curves[s.name].setdefault("runs", {})[m] = [
                    f"{r['job']['target']} seed {r['job']['seed']}" for r in runs
                ]
                for metric in CURVE_METRICS:
                    if all(metric in r["curve"] for r in runs):  # a resumed run's older results may lack one
                        curves[s.name]["metrics"].setdefault(metric, {})[m] = [r["curve"][metric] for r in runs]
    return rows, curves, images

"""When is a run done: the done signal's lowest step against the step where measured fidelity peaks (both from the
bench's curves), and a domain's strict fidelity at its budgets (measured on the whole prompt sets at those steps).

The done signal is what `dopsd train` logs on a user's data (`dopsd.training.done`: the palette distance of the
training prompts' samples to their captions' training images); the fidelity is what only the miniature can score.
The peak is the first step at the curve's maximum (concept: `concept_fidelity`; domain: `strict_fidelity`, which
over-tinting fails); the done step is the first step at the signal's minimum. The criterion, fixed before any run:
the done step lies within ±25% of the peak step (DONE_TOLERANCE). A run whose fidelity never rose above its start
has no peak (`within` None). Besides the lowest step, two plateau readings: the settled step (`settled_at`), the
first step within 10% of the signal's whole fall of its minimum; and the as-good step
(`dopsd.training.done.earliest_as_good`, what `dopsd train` reports), the first step whose samples are not
further from the data than the lowest step's by more than two standard errors of the paired difference.
"""

from __future__ import annotations

import statistics
from typing import Any

DONE_TOLERANCE = 0.25  # the done step within ±25% of the fidelity's peak step
# the plateau reading of the signal (`settled_at`), fixed before the bench's runs that measure it: within 10% of
# the signal's whole fall of its minimum
SETTLED_FRACTION = 0.1
STRICT_GOAL = 0.95  # a domain's strict fidelity, training and unseen prompts, at every budget
QUALITY_GOAL = 0.97  # few-step quality at least 97% of the untouched turbo's (within 3%)


def peak_metric(domain: bool) -> str:
    return "strict_fidelity" if domain else "concept_fidelity"


def first_at(steps: list[int], values: list[float], best: Any) -> int:
    """The first step whose value is `best(values)` (min or max)."""
    target = best(values)
    return next(s for s, v in zip(steps, values) if v == target)


def settled_at(steps: list[int], values: list[float], fraction: float = SETTLED_FRACTION) -> int:
    """The first step at which the signal has come within `fraction` of its whole fall (start − minimum) of its
    minimum: the earliest step as good as the lowest, give or take the signal's slow creep on a plateau."""
    low = min(values)
    bar = low + fraction * (values[0] - low)
    return next(s for s, v in zip(steps, values) if v <= bar)


def within(done_step: int, peak_step: int, tolerance: float = DONE_TOLERANCE) -> bool:
    return abs(done_step - peak_step) <= tolerance * peak_step


def done_rows(curves: dict[str, Any], domain: bool) -> list[dict[str, Any]]:
    """One row per trained run that has the done signal: its done step, the fidelity peak and their values."""
    metric, metrics = peak_metric(domain), curves.get("metrics", {})
    signal, fidelity = metrics.get("done_distance", {}), metrics.get(metric, {})
    rows = []
    for method, runs in signal.items():
        if method == "base" or method not in fidelity:
            continue
        labels = curves.get("runs", {}).get(method) or [f"run {i}" for i in range(len(runs))]
        as_good = curves.get("as_good", {}).get(method) or [None] * len(runs)
        for label, dist, fid, good in zip(labels, runs, fidelity[method], as_good):
            steps = curves["steps"][: len(dist)]
            done, peak, settled = first_at(steps, dist, min), first_at(steps, fid, max), settled_at(steps, dist)
            rose = max(fid) > fid[0]  # a curve that never rose above its start has no peak to be near
            rows.append(
                {
                    "method": method,
                    "run": label,
                    "metric": metric,
                    "done_step": done,
                    "peak_step": peak if rose else None,
                    "within": within(done, peak) if rose else None,
                    "settled_step": settled,
                    "settled_within": within(settled, peak) if rose else None,
                    "fidelity_at_settled": fid[steps.index(settled)],
                    "as_good_step": good,
                    "as_good_within": within(good, peak) if rose and good is not None else None,
                    "fidelity_at_as_good": fid[steps.index(good)] if good in steps else None,
                    "fidelity_at_peak": max(fid),
                    "fidelity_at_done": fid[steps.index(done)],
                    "fidelity_at_end": fid[-1],
                    "end_step": steps[-1],
                }
            )
    return rows


def budget_rows(
    per_run: dict[str, list[dict[int, dict[str, float]]]], budgets: list[int], base_quality: float | None
) -> list[dict[str, Any]]:
    """Per method and budget: strict fidelity on the training and unseen prompts and few-step quality (mean, min
    and max over runs; `per_run`: {method: [{step: measures} per run]}, measured on the whole prompt sets at those
    steps), and whether the goal holds (both ≥ STRICT_GOAL in every run, quality ≥ QUALITY_GOAL × the untouched
    turbo's)."""
    rows = []
    for method, runs in per_run.items():
        if method == "base":
            continue
        for budget in budgets:
            cells: dict[str, Any] = {"method": method, "budget": budget}
            reached = [run[budget] for run in runs if budget in run]
            for key in ("strict_fidelity", "unseen_strict_fidelity", "fewstep_quality"):
                values = [m[key] for m in reached if key in m]
                cells[key] = (statistics.fmean(values), min(values), max(values)) if values else None
            cells["runs"] = len(reached)
            s, u, q = cells["strict_fidelity"], cells["unseen_strict_fidelity"], cells["fewstep_quality"]
            cells["goal"] = bool(
                s
                and u
                and q
                and base_quality
                and len(reached) == len(runs)
                and s[1] >= STRICT_GOAL
                and u[1] >= STRICT_GOAL
                and q[0] >= QUALITY_GOAL * base_quality
            )
            rows.append(cells)
    return rows


__all__ = [
    "DONE_TOLERANCE",
    "QUALITY_GOAL",
    "SETTLED_FRACTION",
    "STRICT_GOAL",
    "budget_rows",
    "done_rows",
    "peak_metric",
    "settled_at",
    "within",
]

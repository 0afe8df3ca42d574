"""The bench's stopping measurements: the done signal against the fidelity peak, a domain's strict fidelity at its
budgets (dopsd.bench.done), the suite's done distance (the same as `dopsd train`'s), and a tiny bench carrying both
into results.json, curves.json and the report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dopsd.bench.done import budget_rows, done_rows, settled_at, within
from dopsd.bench.suite import PromptSet, Suite
from dopsd.mini import world
from dopsd.training.done import palette, palette_distance

torch.set_num_threads(1)


def _curves(steps: list[int], **metrics: dict[str, list[list[float]]]) -> dict:
    return {"steps": steps, "metrics": metrics, "runs": {}}


def test_done_step_against_the_first_peak() -> None:
    steps = [0, 25, 50, 75, 100]
    curves = _curves(
        steps,
        done_distance={"dopsd": [[0.30, 0.20, 0.10, 0.12, 0.15], [0.30, 0.25, 0.20, 0.15, 0.10]]},
        concept_fidelity={"dopsd": [[0.0, 0.5, 1.0, 1.0, 0.8], [0.0, 1.0, 1.0, 1.0, 1.0]]},
    )
    first, second = done_rows(curves, domain=False)
    # run 1: done at 50, fidelity first at its maximum at 50 (the later equal value does not move the peak)
    assert (first["done_step"], first["peak_step"], first["within"]) == (50, 50, True)
    assert first["fidelity_at_done"] == 1.0 and first["fidelity_at_end"] == 0.8
    # run 2: the signal keeps falling to 100 while the fidelity peaked at 25: outside ±25%
    assert (second["done_step"], second["peak_step"], second["within"]) == (100, 25, False)
    assert within(60, 50) and within(40, 50) and not within(63, 50) and not within(37, 50)
    # settled: the first step within 10% of the whole fall of the lowest (run 2: 0.30 → 0.10, bar 0.12)
    assert (first["settled_step"], second["settled_step"]) == (50, 100)
    assert settled_at(steps, [0.30, 0.115, 0.11, 0.105, 0.10]) == 25 and first["settled_within"]
    # without the runs' as-good steps (older results): none; with them, read against the same peak
    assert first["as_good_step"] is None and first["as_good_within"] is None
    curves["as_good"] = {"dopsd": [50, 50]}
    first, second = done_rows(curves, domain=False)
    assert (first["as_good_step"], first["as_good_within"], first["fidelity_at_as_good"]) == (50, True, 1.0)
    assert (second["as_good_step"], second["as_good_within"]) == (50, False)  # 50 vs the peak at 25


def test_a_curve_that_never_rose_has_no_peak_and_base_is_not_a_run() -> None:
    curves = _curves(
        [0, 1, 2],
        done_distance={"base": [[0.2, 0.2, 0.2]], "sft": [[0.3, 0.2, 0.25]]},
        strict_fidelity={"base": [[0.0, 0.0, 0.0]], "sft": [[0.4, 0.4, 0.1]]},
    )
    (row,) = done_rows(curves, domain=True)
    assert row["method"] == "sft" and row["metric"] == "strict_fidelity"
    assert row["peak_step"] is None and row["within"] is None and row["done_step"] == 1


def test_budget_goal_needs_every_run_and_the_quality() -> None:
    def point(strict: float, unseen: float, quality: float) -> dict[str, float]:
        return {"strict_fidelity": strict, "unseen_strict_fidelity": unseen, "fewstep_quality": quality}

    per_run = {
        "base": [{200: point(0.0, 0.0, 0.9)}],
        "dopsd": [
            {200: point(0.96, 0.96, 0.9), 400: point(0.95, 0.95, 0.9)},
            {200: point(0.97, 0.96, 0.9), 400: point(0.80, 0.96, 0.9)},  # grew past the data
        ],
        "dopsd_base_teacher": [{200: point(0.97, 0.97, 0.85), 400: point(0.97, 0.97, 0.85)}],
        "diverged": [{200: point(0.97, 0.97, 0.9)}, {}],
    }
    rows = {(r["method"], r["budget"]): r for r in budget_rows(per_run, [200, 400], base_quality=0.9)}
    assert "base" not in {m for m, _ in rows}
    assert rows[("dopsd", 200)]["goal"] and rows[("dopsd", 200)]["runs"] == 2
    assert not rows[("dopsd", 400)]["goal"]  # one run of two fell to 0.80
    assert rows[("dopsd", 400)]["strict_fidelity"] == pytest.approx((0.875, 0.80, 0.95))
    # fidelity holds, but few-step quality is 94% of the turbo's (below 97%)
    assert not rows[("dopsd_base_teacher", 400)]["goal"]
    # a run that never got to the budget fails the goal; one that never got to it at all has no values
    assert not rows[("diverged", 200)]["goal"] and rows[("diverged", 200)]["runs"] == 1
    assert rows[("diverged", 400)]["strict_fidelity"] is None and not rows[("diverged", 400)]["goal"]


def test_suite_done_distance_is_the_trainers_signal() -> None:
    """Zero for samples that are their captions' training images; otherwise the mean of the nearest distances."""
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.rand(1, 3, 16, 16, generator=g) * 2 - 1 for _ in range(3))
    targets = {"x": palette(torch.cat([a, b])), "y": palette(c)}
    suite = Suite(
        target="domain",
        sets={"train": PromptSet(["x", "y", "x"], torch.zeros(3, 3, 16, 16))},
        few_steps=4,
        many_steps=8,
        n_many=0,
        velocity=None,
        schedule=None,
        done_targets=targets,
    )
    assert float(suite.done_distances(torch.cat([b, c, a])).abs().max()) == pytest.approx(0.0, abs=1e-6)
    shifted = torch.cat([b, c, a]) * 0.5
    expected = torch.stack(
        [
            palette_distance(palette(shifted[0:1]), targets["x"]).min(),
            palette_distance(palette(shifted[1:2]), targets["y"]).min(),
            palette_distance(palette(shifted[2:3]), targets["x"]).min(),
        ]
    ).mean()
    per_sample = suite.done_distances(shifted)
    assert per_sample.shape == (3,) and float(per_sample.mean()) == pytest.approx(float(expected))
    assert float(expected) > 0.05


def test_strict_fidelity_fails_an_over_tinted_domain() -> None:
    """The loose domain fidelity passes a doubled tint; the strict one does not."""
    from dataclasses import replace

    scenes = world.domain_scenes(8, seed=1)
    tint, amount = world.DOMAIN_TINT
    captions = [s.caption() for s in scenes]
    suite = Suite(
        target="domain",
        sets={"train": PromptSet(captions, torch.zeros(len(captions), 3, world.RES, world.RES))},
        few_steps=4,
        many_steps=8,
        n_many=0,
        velocity=None,
        schedule=None,
    )
    right = world.render(scenes)
    over = world.render([replace(s, tint=(tint, min(1.0, 2 * amount))) for s in scenes])
    assert suite.fidelity(right) == 1.0 and suite.fidelity(over) == 1.0
    assert suite.strict_fidelity(right, "train") == 1.0 and suite.strict_fidelity(over, "train") == 0.0
    # the ceiling's pixel-space tint on the untinted world is the world's own tint
    suite.sets["unseen"] = suite.sets["train"]
    plain = world.render([replace(s, tint=None) for s in scenes])
    assert suite.strict_fidelity(plain, "train") == 0.0
    assert suite.tinted_ceiling({"train": plain, "unseen": over}) == {
        "tinted_strict_fidelity": 1.0,
        "tinted_unseen_strict_fidelity": 0.0,  # tinted twice
    }


def test_tiny_bench_reports_done_signal_and_budgets(tmp_path: Path) -> None:
    from dopsd.cli import main

    out = tmp_path / "report"
    argv = ["bench", "--tiny", "--out", str(out), "--settings", "concept_lora", "domain_full"]
    assert main(argv + ["--methods", "base", "sft", "dopsd"]) == 0
    results, curves = (json.loads((out / f).read_text()) for f in ("results.json", "curves.json"))
    for name in ("concept_lora", "domain_full"):
        rows = results[name]["setting"]["done_signal"]
        assert {r["method"] for r in rows} == {"sft", "dopsd"} and len(rows) == 6  # 3 seeds each, base excluded
        assert all(len(run) == 3 for run in curves[name]["metrics"]["done_distance"]["dopsd"])  # steps 0, 2, 4
        assert curves[name]["runs"]["dopsd"] == [f"{results[name]['setting']['targets'][0]} seed {s}" for s in range(3)]
    budgets = results["domain_full"]["setting"]["budgets"]
    assert [(r["method"], r["budget"]) for r in budgets] == [("sft", 2), ("sft", 4), ("dopsd", 2), ("dopsd", 4)]
    assert all(r["runs"] == 3 for r in budgets)
    # the last budget is the end of training: measured on the same samples as the final evaluation
    last = results["domain_full"]["methods"]["dopsd"]
    assert budgets[3]["strict_fidelity"][0] == pytest.approx(last["strict_fidelity"])
    assert budgets[3]["unseen_strict_fidelity"][0] == pytest.approx(last["unseen_strict_fidelity"])
    assert "budgets" not in results["concept_lora"]["setting"]
    for key in ("strict_fidelity", "unseen_strict_fidelity"):
        assert 0.0 <= results["domain_full"]["methods"]["dopsd"][key] <= 1.0
    ceiling = results["domain_full"]["setting"]["budget_ceiling"]  # the untouched turbo, tinted
    assert ceiling == {
        "strict_fidelity": results["domain_full"]["methods"]["base"]["tinted_strict_fidelity"],
        "unseen_strict_fidelity": results["domain_full"]["methods"]["base"]["tinted_unseen_strict_fidelity"],
    }
    assert all(0.0 <= v <= 1.0 for v in ceiling.values())
    report = (out / "report.md").read_text()
    assert "### Done signal (concept_lora)" in report and "### Budgets (domain_full)" in report

"""The bench report's per-setting sections as blocks: the results table, the per-target table, curves, the cost
table and sample grids of a setting; the round tables of the continual setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dopsd.bench.continual import sequence_name
from dopsd.bench.figures import image_grid, plot_curves
from dopsd.bench.report import Block, fmt, results_table

GRID_ROWS = {
    "train": "training prompts",
    "unseen": "unseen prompts",
    "unrelated": "unrelated prompts",
    "unrelated_many": "unrelated, many steps",
}


def _grid(out: Path, setting: str, method: str, data: dict[str, Any]) -> str:
    imgs = data["images"]
    keys = [k for k in GRID_ROWS if k in imgs]
    name = f"grid_{setting}_{method}.png"
    image_grid([imgs[k] for k in keys], labels=[GRID_ROWS[k] for k in keys]).save(out / name)
    return name


def _compare(out: Path, setting: str, images: dict[str, Any], per: int = 4) -> str:
    """Methods side by side: the same training-prompt and unrelated-prompt samples (4 steps, same noise)."""
    import torch

    rows = [torch.cat([d["images"]["train"][:per], d["images"]["unrelated"][:per]]) for d in images.values()]
    name = f"compare_{setting}.png"
    image_grid(rows, labels=list(images)).save(out / name)
    return name


def _cost_blocks(name: str, costs: dict[str, Any]) -> list[Block]:
    if not costs:
        return []
    table = [
        [
            "method",
            "s/step (median)",
            "q25–q75",
            "time ×ref",
            "implied FLOPs ×ref",
            "counted FLOPs/step",
            "overhead",
            "peak MiB (resident + transient)",
            "mem ×ref",
        ]
    ]
    for m, v in costs.items():
        transient = v["peak_mem_mb"] - v["resident_mb"]
        table.append(
            [
                f"`{m}`",
                fmt(v["sec_per_step"], digits=4),
                f"{fmt(v['sec_per_step_q25'], digits=4)}–{fmt(v['sec_per_step_q75'], digits=4)}",
                fmt(v["time_ratio"], digits=2),
                fmt(v["flop_ratio"], digits=2),
                f"{v['flops_per_step']:.3g}",
                fmt(v["overhead"], digits=2),
                f"{v['peak_mem_mb']:.2f} ({v['resident_mb']:.2f} + {transient:.2f})",
                fmt(v["mem_ratio"], digits=2),
            ]
        )
    ref = next(iter(costs.values()))["reference"]
    return [("h3", f"Cost ({name}, reference `{ref}`)"), ("table", table)]


def _span(cell: Any) -> str:
    """(mean, min, max) → 'mean [min–max]'."""
    return "–" if cell is None else f"{cell[0]:.3f} [{cell[1]:.3f}–{cell[2]:.3f}]"


def _as_good_cell(mine: list[dict[str, Any]], peaked: list[dict[str, Any]]) -> str:
    if not any(r.get("as_good_step") is not None for r in mine):  # results from before the as-good reading
        return "–"
    steps = ", ".join("–" if r.get("as_good_step") is None else str(r["as_good_step"]) for r in mine)
    return f"{steps} ({sum(bool(r.get('as_good_within')) for r in peaked)} of {len(peaked)})"


def _stopping_blocks(name: str, info: dict[str, Any]) -> list[Block]:
    """The done signal's lowest step against the fidelity peak (every run), and a domain's budgets."""
    blocks: list[Block] = []
    rows = info.get("done_signal") or []
    if rows:
        tol, metric = info["done_tolerance"], rows[0]["metric"]
        table = [
            [
                "method",
                f"within ±{tol:.0%} (runs with a peak)",
                "done steps",
                f"peak steps of {metric}",
                "fidelity at peak / done / end (mean)",
                f"settled steps (within ±{tol:.0%})",
                "fidelity at settled (mean)",
                f"as-good steps (within ±{tol:.0%})",
                "fidelity at as-good (mean)",
            ]
        ]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            peaked = [r for r in mine if r["within"] is not None]

            def mean(key: str, runs: list[dict[str, Any]] = mine) -> str:
                return f"{sum(r[key] for r in runs) / len(runs):.3f}"

            table.append(
                [
                    f"`{method}`",
                    f"{sum(r['within'] for r in peaked)} of {len(peaked)}",
                    ", ".join(str(r["done_step"]) for r in mine),
                    ", ".join("–" if r["peak_step"] is None else str(r["peak_step"]) for r in mine),
                    f"{mean('fidelity_at_peak')} / {mean('fidelity_at_done')} / {mean('fidelity_at_end')}",
                    f"{', '.join(str(r['settled_step']) for r in mine)} "
                    f"({sum(r['settled_within'] for r in peaked)} of {len(peaked)})",
                    mean("fidelity_at_settled"),
                    _as_good_cell(mine, peaked),
                    mean("fidelity_at_as_good", good)
                    if (good := [r for r in mine if r.get("fidelity_at_as_good") is not None])
                    else "–",
                ]
            )
        blocks += [
            ("h3", f"Done signal ({name})"),
            (
                "p",
                "The done signal `dopsd train` logs (palette distance of the training prompts' samples to their "
                "captions' training images) at each curve point: its lowest step (done) against the first step "
                f"at the maximum of {metric} (peak; – where it never rose above its start), per run in the order "
                "of the runs; settled: the first step within 10% of the signal's whole fall (start − lowest) of its "
                "lowest value; as-good: the first step whose samples are no further from the data than the lowest "
                "step's by more than two standard errors (what `dopsd train` reports as `as_good_step`). "
                "results.json has each run's row.",
            ),
            ("table", table),
        ]
    budgets = info.get("budgets") or []
    if budgets:
        goal, ceiling = info["budget_goal"], info.get("budget_ceiling") or {}
        table = [
            [
                "method",
                "budget (runs)",
                "strict fidelity, training",
                "strict fidelity, unseen",
                "few-step quality",
                "goal",
            ]
        ]
        for r in budgets:
            table.append(
                [
                    f"`{r['method']}`",
                    f"{r['budget']} ({r['runs']} runs)",
                    _span(r["strict_fidelity"]),
                    _span(r["unseen_strict_fidelity"]),
                    _span(r["fewstep_quality"]),
                    "met" if r["goal"] else "**not met**",
                ]
            )
        blocks += [
            ("h3", f"Budgets ({name})"),
            (
                "p",
                "Does the domain stop at the data? Strict fidelity (the fitted tint's amount, hue and chroma: "
                "over-tinting fails it) on the training and the unseen prompts at each budget, mean [min–max] over "
                f"runs, on the whole prompt sets at that step. Goal: both ≥ {goal['strict_fidelity']:.2f} in every run, few-step "
                f"quality ≥ {goal['fewstep_quality_vs_base']:.0%} of the untouched turbo's ({fmt(goal['base'])}). "
                "The ceiling: the untouched turbo's own samples with the tint added in pixel space score "
                f"{fmt(ceiling.get('strict_fidelity'))} (training) and {fmt(ceiling.get('unseen_strict_fidelity'))} "
                "(unseen prompts), what a fine-tune that adds exactly the tint and changes nothing else would score.",
            ),
            ("table", table),
        ]
    return blocks


def setting_section(
    out: Path,
    cfg: Any,
    s: Any,
    info: dict[str, Any],
    methods: dict[str, Any],
    curves: dict[str, Any],
    images: dict[str, Any],
    costs: dict[str, Any],
) -> list[Block]:
    blocks: list[Block] = [
        ("h2", f"Setting: {s.name}"),
        ("p", s.description),
        (
            "p",
            f"{s.steps} optimizer steps, batch {info['batch_size']}, lr {info['lr']}, {info['fine_tune']}; targets "
            f"{', '.join(s.targets)}; {cfg.seeds} seed(s) per target ({cfg.ablation_seeds or cfg.seeds} for the "
            "teacher/loss ablations and the baselines pso, dreambooth, offpolicy, sft_teacher). Values are mean ± std over runs (targets × seeds).",
        ),
        ("table", results_table(methods)),
    ]
    by_target = {m: r["by_target"] for m, r in methods.items() if r.get("by_target")}
    if by_target:
        targets = s.targets
        head = ["method"] + [f"{t}: fidelity / unseen / few-step quality / preservation" for t in targets]
        body = [
            [f"`{m}`"] + [" / ".join(f"{v[t][k]:.2f}" for k in v[t]) for t in targets] for m, v in by_target.items()
        ]
        blocks += [("p", "Per concept (mean over seeds):"), ("table", [head] + body)]
    if curves["steps"]:
        png = plot_curves(curves, out / f"curves_{s.name}.png", f"{s.name}: mean ± std over runs")
        blocks.append(("img", (png.name, f"{s.name}: curves over training steps (mean ± std over runs)")))
    blocks += _stopping_blocks(s.name, info)
    blocks += _cost_blocks(s.name, costs)
    blocks.append(("h3", f"Samples ({s.name})"))
    if images:
        blocks.append(
            (
                "img",
                (
                    _compare(out, s.name, images),
                    f"{s.name}: methods side by side — 4 training-prompt "
                    "then 4 unrelated-prompt samples at 4 steps, same noise",
                ),
            )
        )
    blocks.append(
        (
            "p",
            "Per method, rows: training prompts, unseen prompts, unrelated prompts at 4 steps, and the "
            "unrelated prompts at many steps (control); the same noise in every grid.",
        )
    )
    blocks += [("img", (_grid(out, s.name, m, data), f"{s.name} / {m}")) for m, data in images.items()]
    return blocks


def continual_section(cs: Any, rows: dict[str, Any]) -> list[Block]:
    """One table per sequence: a row per (method, round) with the new target's fidelity, each earlier target's
    retention, few-step quality, preservation and unrelated-prompt accuracy (mean ± std over seeds)."""
    blocks: list[Block] = [
        ("h2", "Setting: continual"),
        ("p", cs.description),
        (
            "p",
            f"{cs.steps} optimizer steps per round; concept rounds: {' '.join(cs.concept_overrides)}"
            f"; domain rounds: {' '.join(cs.domain_overrides)}; {cs.seeds} seed(s). Round 0 is "
            "the untouched turbo (its 'new target fidelity' is the first target's).",
        ),
    ]
    head = [
        "method",
        "round",
        "target",
        "new target fidelity ↑",
        "retention of earlier ↑",
        "few-step quality ↑",
        "preservation ↑",
        "unrelated acc. ↑",
        "drift ↓",
    ]

    for seq in cs.sequences:
        name, table = sequence_name(seq), [head]
        for method, sequences in rows.items():
            for r in (sequences.get(name) or {}).get("rounds", []):
                kept = ", ".join(f"{t} {v:.3f}" for t, v in r["retention_by_target"].items()) or "–"
                table.append(
                    [
                        f"`{method}`",
                        str(r["round"]),
                        r["target"] or "(untouched)",
                        fmt(r["new_fidelity"], r["new_fidelity_std"]),
                        kept,
                        fmt(r["fewstep_quality"], r["fewstep_quality_std"]),
                        fmt(r["preservation"], r["preservation_std"]),
                        fmt(r["unrelated_accuracy"], r["unrelated_accuracy_std"]),
                        fmt(r["drift"], r["drift_std"]),
                    ]
                )
        blocks += [("h3", f"Sequence {name}"), ("table", table)]
    return blocks


__all__ = ["continual_section", "setting_section"]

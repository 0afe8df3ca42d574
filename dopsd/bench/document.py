"""Assemble the bench report folder: results.json, curves, grids, claims, report.md and report.html; the report's
introduction and its fixed texts (metrics, how cost is measured)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dopsd.bench.claims import MIN_EFFECT, check_cost, check_setting
from dopsd.bench.continual import check_claim
from dopsd.bench.done import DONE_TOLERANCE, QUALITY_GOAL, STRICT_GOAL, budget_rows, done_rows
from dopsd.bench.report import Block, write_report
from dopsd.bench.report_sections import continual_section, setting_section
from dopsd.bench.results import (
    FIELD_DOCS,
    REQUIRED_FIELDS,
    REQUIRED_METHODS,
    field_doc_table,
    is_trained,
    write_results,
)
from dopsd.config import load_config

COST_MAP = {
    "sec_per_step": "sec_per_step",
    "peak_mem_mb": "peak_mem_mb",
    "time_ratio_vs_sft": "time_ratio",
    "flop_ratio_vs_sft": "flop_ratio",
    "overhead_vs_flops": "overhead",
    "mem_ratio_vs_sft": "mem_ratio",
    "flops_per_step": "flops_per_step",
}

METRICS_TEXT = (
    "All samples use fixed noise per prompt, identical for every method, seed and curve point; 4 Euler steps (the "
    "turbo's setting) unless stated, and many steps (`many_steps`) for the control. Decoding fits every clean shape "
    "mask of the world with free foreground/background colours (`dopsd.mini.metrics.decode`). **fidelity**: "
    "concept — "
    "the decoded foreground colour is the held-out concept's (nearer it than any named colour and within 0.25 RGB); "
    "domain — the decoded background is nearer its sepia-tinted version than any plain background. **quality** "
    "(`dopsd.mini.metrics.fewstep_quality`): per sample, sharpness (mean |Laplacian|) relative to its own best-fitting "
    "clean render, capped at 1 — blur lowers it; a nearest-render error is not used because it rewards blur. "
    "**preservation**: on unrelated named-colour prompts, the fraction of samples whose decoded scene matches the "
    "untouched turbo's sample for the same noise: same shape, colour name and background name (tint-invariant names), "
    "centre within 1.5 px per axis and extent within 1.5 px (the decoder's grid is 0.5 px for centres, 1 px for "
    "sizes) — for the domain setting this is retention of the original content under the new look. "
    "**unrelated_accuracy**: the fraction of unrelated-prompt samples whose captioned shape, colour and background "
    "are all decoded right; `position_shift_px` / `size_change_px`: how far shapes moved or resized. **drift**: MSE "
    "to the untouched turbo's samples (same noise). Extra fields: `sharpness`, `render_psnr` (dB to the best clean "
    "fit; speckle and blur lower it), `attribute_accuracy` (captioned shape/colour/background decoded right, "
    "tint-invariant), `fewstep_quality_concept` (quality on the training prompts), `concept_leak` (concept colour on "
    "unrelated prompts, lower = better) or `domain_on_unrelated`."
)

COST_TEXT = (
    "Each trained method gets a fresh trainer (`dopsd.training.trainer.Trainer`) on the same data and batch; their "
    "`train_step()` calls (zero-grad, loss, backward, clip, AdamW, teacher update — the step `dopsd train` runs) are "
    "timed interleaved round-robin in one process with 1 thread, median over the repeats after warm-up. FLOPs are "
    "counted with `torch.utils.flop_counter.FlopCounterMode` (CPU attention kernels added): per step, and per network "
    "call; the implied count is D-OPSD = k·(student fwd+bwd + teacher fwd) + (K − k)·(student fwd) for k trained of "
    "the K roll-out states (`method.train_states`), plus prior preservation's roll-out where it is on; SFT = 1 "
    "student fwd+bwd (the baselines: `dopsd.bench.cost.implied_flops`), and "
    "`overhead` = time ratio / implied-FLOP ratio (1 = exactly the algorithm's arithmetic). Peak memory (CPU) = bytes "
    "of the tensors resident at the step's start (weights, gradients, optimizer and teacher state; unique storages) + "
    "the peak of bytes allocated during one step above that, from the torch profiler's allocation events — process "
    "RSS cannot separate methods that share a process. `train_sec_per_step` is the trainer's mean from the training "
    "runs, which ran in parallel worker processes and are not a fair comparison."
)


def _merge_costs(rows: dict[str, dict[str, Any]], costs: dict[str, Any]) -> None:
    for method, row in rows.items():
        cost = costs.get(method) if is_trained(method) else None
        for field, key in COST_MAP.items():
            row[field] = None if cost is None else cost[key]


def _setting_info(cfg: Any, s: Any, meta: dict[str, Any]) -> dict[str, Any]:
    tc = load_config("mini", s.overrides)  # the trainer's resolved values (preset + the setting's overrides)
    return {
        "name": s.name,
        "description": s.description or "",
        "targets": s.targets,
        "pairs_per_target": s.pairs,
        "fine_tune": f"LoRA rank {tc.lora.rank} alpha {tc.lora.alpha:g}" if tc.lora.enabled else "full",
        "optimizer_steps": s.steps,
        "batch_size": tc.train.batch_size,
        "lr": tc.optim.lr,
        "ema_decay": tc.method.ema_decay,
        "optimizer": f"AdamW, {tc.optim.schedule} lr, grad clip {tc.optim.grad_clip:g}",
        "trainer_overrides": s.overrides,
        "dopsd_overrides": s.dopsd_overrides,
        "seeds": cfg.seeds,
        "ablation_seeds": cfg.ablation_seeds or cfg.seeds,
        "few_steps": 4,
        "many_steps": cfg.many_steps,
        "curve_every": s.curve_every,
        "eval_samples": {
            "train": cfg.n_train,
            "unseen": cfg.n_unseen,
            "unrelated": cfg.n_unrelated,
            "unrelated_many_steps": cfg.n_many,
            "curve": cfg.curve_n,
        },
        "model": cfg.model,
        "preset": cfg.name,
        "seconds_total": round(meta["seconds"], 1),
        "seconds_idle_estimate": round(meta.get("idle_estimate_seconds", float("nan")), 1),
        "machine": meta["machine"],
    }


def _intro(cfg: Any, meta: dict[str, Any]) -> list[Block]:
    cpu = meta.get("cpu_seconds", {})
    text = (
        f"Preset `{meta['preset']}` (`{meta['command']}`): {meta['seconds']:.0f} s wall time in total, "
        f"{meta['seconds_training_and_eval']:.0f} s of it training and evaluation in {meta['workers']} worker "
        f"process(es). Machine: {meta['machine']}. The machine may be shared with other processes, so absolute "
        "timings are noisy; the cost ratios are measured side by side in one process. CPU time used: "
        f"{cpu.get('workers', 0):.0f} s in worker processes + {cpu.get('main', 0):.0f} s in the main process, "
        f"i.e. about {meta.get('idle_estimate_seconds', float('nan')):.0f} s of wall time on an otherwise idle "
        "machine (an estimate: the work is single-threaded, so CPU time ≈ wall time on a free core)."
    )
    blocks: list[Block] = [("h1", "D-OPSD bench on the miniature world"), ("p", text)]
    if meta.get("note"):
        blocks.append(("p", f"**{meta['note']}**"))
    if meta.get("dedistill"):
        d = meta["dedistill"]
        blocks.append(
            (
                "p",
                f"De-distillation adapter for `sft_adapter`: an SFT LoRA trained first on "
                f"{cfg.dedistill_pairs} ordinary pairs for {d['steps']} steps ({d['seconds']:.1f} s), "
                "merged into the weights while the method trains and removed for every evaluation "
                "(ai-toolkit's recipe for Z-Image-Turbo).",
            )
        )
    blocks.append(
        (
            "p",
            "Methods: `base` the untouched turbo; `sft` flow matching on the targets; `sft_adapter` the "
            "same with a de-distillation adapter (below); `dopsd` D-OPSD, EMA teacher, x0-space loss; "
            "`dopsd_base_teacher` / `dopsd_live_teacher` the frozen initial / the current weights as "
            "teacher; `dopsd_velocity` velocity-space loss; `dopsd_prior` (concept setting only; not in "
            "the paper) D-OPSD plus dopsd's on-policy prior preservation on unrelated prompts; "
            "`ref_undistilled_4step` the multi-step base sampled at 4 steps (a reference level, not a "
            "method). The paper's baselines (`dopsd.methods.baselines`; fewer seeds, like the ablations): `pso` "
            "online Pairwise Sample Optimization (references: the current model's own few-step samples "
            "of the target's caption; DPO-form margin against the frozen starting model); `dreambooth` SFT "
            "plus class images of the starting model for the captions without `sks`; `offpolicy` "
            "D-OPSD's loss at the teacher's own roll-out states; `sft_teacher` SFT on the teacher's "
            "few-step samples (caption + target image).",
        )
    )
    return blocks


def stopping(s: Any, curves: dict[str, Any], methods: dict[str, Any]) -> dict[str, Any]:
    """The done signal against the fidelity peak, per run; a domain's strict fidelity at its budgets, with the
    untouched turbo's tinted samples as the ceiling."""
    domain = s.targets == ["domain"]
    ref = methods.get("base") or {}
    out: dict[str, Any] = {"done_signal": done_rows(curves, domain), "done_tolerance": DONE_TOLERANCE}
    if domain and s.budgets:
        base = ref.get("fewstep_quality")
        out["budgets"] = budget_rows(curves.get("budgets", {}), list(s.budgets), base)
        out["budget_goal"] = {"strict_fidelity": STRICT_GOAL, "fewstep_quality_vs_base": QUALITY_GOAL, "base": base}
        out["budget_ceiling"] = {
            "strict_fidelity": ref.get("tinted_strict_fidelity"),
            "unseen_strict_fidelity": ref.get("tinted_unseen_strict_fidelity"),
        }
    return out


def build_report(
    out: Path,
    cfg: Any,
    rows: dict[str, Any],
    curves: dict[str, Any],
    images: dict[str, Any],
    costs: dict[str, Any],
    meta: dict[str, Any],
    continual: dict[str, Any] | None = None,
) -> None:
    results: dict[str, Any] = {}
    claims: list[dict[str, str]] = []
    setting_blocks: list[Block] = []
    for s in cfg.settings:
        methods, cost = rows[s.name], costs.get(s.name, {})
        _merge_costs(methods, cost)
        info = _setting_info(cfg, s, meta)
        info.update(stopping(s, curves[s.name], methods))
        results[s.name] = {"setting": info, "methods": methods}
        claims += check_setting(s.name, methods, curves[s.name]) + check_cost(s.name, cost)
        setting_blocks += setting_section(out, cfg, s, info, methods, curves[s.name], images[s.name], cost)
    if continual is not None:
        cs = cfg.continual
        results["continual"] = {
            "setting": {
                "kind": "continual",
                "sequences": cs.sequences,
                "steps": cs.steps,
                "methods": cs.methods,
                "seeds": cs.seeds,
                "pairs": cs.pairs,
                "concept_overrides": cs.concept_overrides,
                "domain_overrides": cs.domain_overrides,
                "description": cs.description,
            },
            "methods": continual,
        }
        claims += check_claim(continual, cs, MIN_EFFECT)
        setting_blocks += continual_section(cs, continual)
    run_methods = [m for m in REQUIRED_METHODS if m in cfg.methods]
    write_results(out / "results.json", results, run_methods)
    (out / "claims.json").write_text(json.dumps(claims, indent=2) + "\n")
    (out / "curves.json").write_text(json.dumps(curves, indent=2) + "\n")
    claim_rows = [[c["setting"], c["claim"], c["source"], c["evidence"], f"**{c['verdict']}**"] for c in claims]
    skipped = [m for m in REQUIRED_METHODS if m not in cfg.methods]
    if skipped:
        meta = {**meta, "note": f"Restricted run: the methods {', '.join(skipped)} were not run (--methods)."}
    blocks = (
        _intro(cfg, meta)
        + [
            ("h2", "Claims"),
            (
                "p",
                "Each claim of the paper checked with fixed criteria: a difference counts when it exceeds 2× the "
                f"combined std over runs and {MIN_EFFECT}. Claims that do not reproduce are listed with their numbers; "
                "no metric was tuned to agree.",
            ),
            ("table", [["setting", "claim", "source", "evidence", "verdict"]] + claim_rows),
        ]
        + setting_blocks
    )
    extra = [f for f in FIELD_DOCS if f not in REQUIRED_FIELDS]
    blocks += [
        ("h2", "results.json"),
        (
            "p",
            '`{SETTING: {"setting": {...}, "methods": {METHOD: {...}}}}`; every metric field has a '
            "`_std` twin (std over runs); `base` (no training) and `ref_*` rows have null cost fields. "
            "`ref_undistilled_4step` is the multi-step base model sampled at 4 steps: the blur level SFT "
            "falls toward.",
        ),
        ("table", field_doc_table(list(REQUIRED_FIELDS) + extra)),
        ("h2", "Metrics"),
        ("p", METRICS_TEXT),
        ("h2", "How cost is measured"),
        ("p", COST_TEXT),
        ("h2", "Reproduce"),
        (
            "code",
            "dopsd bench --quick --out bench-quick   # under 10 min on 2 idle CPU cores\n"
            "dopsd bench --out bench-full           # the full run, about 95 min",
        ),
    ]
    write_report(out, blocks, "D-OPSD bench")

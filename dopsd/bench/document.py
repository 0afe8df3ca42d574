"""Assemble the bench report folder: results.json, curves, grids, claims, report.md and report.html."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dopsd.bench.claims import MIN_EFFECT, check_cost, check_setting
from dopsd.bench.report import (
    FIELD_DOCS,
    REQUIRED_FIELDS,
    REQUIRED_METHODS,
    Block,
    field_doc_table,
    fmt,
    image_grid,
    is_trained,
    plot_curves,
    results_table,
    write_report,
    write_results,
)

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
    "Each trained method gets a fresh trainer (`dopsd.trainer.Trainer`) on the same data and batch; their "
    "`train_step()` calls (zero-grad, loss, backward, clip, AdamW, teacher update — the step `dopsd train` runs) are "
    "timed interleaved round-robin in one process with 1 thread, median over the repeats after warm-up. FLOPs are "
    "counted with `torch.utils.flop_counter.FlopCounterMode` (CPU attention kernels added): per step, and per network "
    "call; the implied count is D-OPSD = K·(student fwd+bwd) + K·(teacher fwd), SFT = 1 student fwd+bwd (the "
    "baselines: `dopsd.bench.cost.implied_flops`), and "
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
    from dopsd.config import load_config

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
            "method). The paper's baselines (`dopsd.baselines`; fewer seeds, like the ablations): `pso` "
            "online Pairwise Sample Optimization (references: the current model's own few-step samples "
            "of the target's caption; DPO-form margin against the frozen starting model); `dreambooth` SFT "
            "plus class images of the starting model for the captions without `sks`; `offpolicy` "
            "D-OPSD's loss at the teacher's own roll-out states; `sft_teacher` SFT on the teacher's "
            "few-step samples (caption + target image).",
        )
    )
    return blocks


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


def _setting_blocks(
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


def _continual_blocks(cs: Any, rows: dict[str, Any]) -> list[Block]:
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
    from dopsd.bench.continual import sequence_name

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
        results[s.name] = {"setting": info, "methods": methods}
        claims += check_setting(s.name, methods, curves[s.name]) + check_cost(s.name, cost)
        setting_blocks += _setting_blocks(out, cfg, s, info, methods, curves[s.name], images[s.name], cost)
    if continual is not None:
        from dopsd.bench.continual import check_claim

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
        setting_blocks += _continual_blocks(cs, continual)
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
            "dopsd bench --quick --out bench-quick   # < 10 min on 2 CPU cores\n"
            "dopsd bench --out bench-full           # the full run",
        ),
    ]
    write_report(out, blocks, "D-OPSD bench")

"""The rehearsal's results: the machine it ran on, one entry per model for docs/measured/full-size-cpu.json, and the
docs page (docs/full-size.md) rendered from that JSON."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

GiB = 2**30


def machine() -> dict[str, Any]:
    import diffusers
    import peft
    import torch
    import transformers

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    mem = next(
        (
            int(line.split()[1]) * 1024
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        ),
        0,
    )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "bf16_instructions": [f for f in ("amx_bf16", "avx512_bf16") if f in flags.split()],
        "memory_gib": round(mem / GiB, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def entry(r: Any, phases: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """One model's entry: the headline numbers first (training steps window), then every phase."""
    train = phases.get("train") or {}
    steps = [s["seconds"] for s in train.get("steps", []) if s.get("seconds") is not None]
    plan_cpu = extra.get("plan_cpu") or {}
    planned = _get(plan_cpu, "methods", "dopsd", "peak_gb")
    tensor = _get(train, "windows", "steps", "peak_tensor_gib")
    pipe = phases.get("pipeline") or {}
    return {
        "model": r.label,
        "preset": r.preset,
        "resolution": [r.size, r.size],
        "steps": r.steps,
        "step_seconds": round(sum(steps) / len(steps), 1) if steps else None,
        "step_seconds_each": steps,
        "peak_rss_gib": _round(_get(train, "windows", "steps", "peak_rss_gib")),
        "peak_tensor_gib": _round(tensor),
        "planned_gib": _round(planned),
        "tensor_over_planned": round(tensor / planned, 3) if tensor and planned else None,
        "export_max_abs_diff": pipe.get("max_abs_diff"),
        "export_lora_effect_max_abs_diff": pipe.get("lora_effect_max_abs_diff"),
        "resumed_bit_exact": extra.get("resumed_bit_exact"),
        "invariants": extra.get("invariants"),
        "planned": plan_summary(plan_cpu, extra.get("plan_gpu")),
        "phases": {name: phase_summary(p) for name, p in phases.items()},
        "settings": settings(r, extra.get("config")),
        "folders": extra.get("folders"),
        "problems": extra.get("problems", []),
        "status": "complete" if not extra.get("problems") else "partial",
    }


def settings(r: Any, config: dict[str, Any] | None) -> dict[str, Any]:
    """The rehearsal's settings; with the config file the run used, its overrides of the preset as written."""
    out = r.settings()
    if config:
        drop = {"pretrained", "teacher_encoder", "path", "output_dir", "dir"}
        out["overrides"] = {
            k: {kk: vv for kk, vv in v.items() if kk not in drop} for k, v in config.items() if isinstance(v, dict)
        }
    return out


def _round(x: float | None, n: int = 3) -> float | None:
    return None if x is None else round(float(x), n)


def phase_summary(p: dict[str, Any]) -> dict[str, Any]:
    out = {k: p.get(k) for k in ("rc", "seconds", "peak_rss_gib", "peak_tensor_gib", "skipped", "killed") if k in p}
    for k in ("peak_rss_gib", "peak_tensor_gib"):
        if out.get(k) is not None:
            out[k] = _round(out[k])
    if p.get("windows"):
        out["windows"] = {
            n: {k: _round(v, 3 if "gib" in k else 1) for k, v in w.items()} for n, w in p["windows"].items()
        }
    return out


def plan_summary(cpu: dict[str, Any], gpu: dict[str, Any] | None) -> dict[str, Any]:
    """What `dopsd plan` predicted: for the CPU at the rehearsal's settings, and (as printed) for a GPU."""

    def one(p: dict[str, Any] | None) -> dict[str, Any] | None:
        if not p:
            return None
        d = p["methods"]["dopsd"]
        return {
            "target": p["settings"]["target"],
            "dopsd_peak_gib": _round(d["peak_gb"]),
            "caching_peak_gib": _round(d["caching_peak_gb"]),
            "breakdown_gib": {k: _round(v, 3) for k, v in d["breakdown_gb"].items()},
            "tflops_per_step": _round(d["tflops_per_step"], 1),
            "caching_stages": [
                {"name": s["name"], "loaded": s["loaded"], "peak_gib": _round(s["peak_gb"])}
                for s in p["caching"]["stages"]
            ],
        }

    return {"cpu": one(cpu), "gpu": one(gpu)}


# --- the docs page ---------------------------------------------------------------------------------------------


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    return fmt.format(x) if isinstance(x, (int, float)) else str(x)


def page(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        "# Full size, executed on a CPU",
        "",
        "The real Z-Image-Turbo (with its Qwen3-VL-4B teacher encoder) and FLUX.2-klein-4B, at full width and depth",
        "with random weights, run end to end through dopsd's command line as a user runs it: `dopsd plan`, `dopsd "
        "probe`, `dopsd train` (D-OPSD, LoRA rank 64, bf16, gradient checkpointing, a checkpoint every step), a kill "
        "and `--resume`, `dopsd export`, `dopsd sample`, then the exported LoRA in the model's own diffusers "
        "pipeline (`load_lora_weights`). Written by `benchmarks/cpu_full_size.py` (its docstring has the details).",
        "",
        f"Measured {result['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB RAM, bf16 instructions: "
        f"{', '.join(m['bf16_instructions']) or 'none'}; shared with other jobs), torch {m['torch']}, diffusers "
        f"{m['diffusers']}, transformers {m['transformers']}, peft {m['peft']}. The whole rehearsal, from a fresh "
        f"clone after `make test`'s install: `{result['command']}`; each model's section names the command that "
        f"measured it and how long it took ({_f(result.get('minutes'), '{:.0f}')} minutes in all here).",
        "",
        result.get("note") or "",
        "",
        "| model | resolution | steps | step s | peak RSS GiB | peak tensors GiB | planned GiB | tensors / planned "
        "| export max abs diff | resume bit-exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in result["models"]:
        res = "×".join(map(str, e["resolution"]))
        lines.append(
            f"| {e['model']} | {res} | {e['steps']} | {_f(e['step_seconds'], '{:.0f}')} | {_f(e['peak_rss_gib'])} "
            f"| {_f(e['peak_tensor_gib'])} | {_f(e['planned_gib'])} | {_f(e['tensor_over_planned'])} "
            f"| {_f(e['export_max_abs_diff'], '{:.4f}')} | {_f(e['resumed_bit_exact'])} |"
        )
    lines += [
        "",
        "Peaks are of the training steps (inside the trainer's optimizer steps): the process's resident memory "
        "(VmHWM) and the bytes of live tensors (every storage from the first op that creates or reads it until it "
        "is freed). Planned: `dopsd plan`'s D-OPSD peak for the CPU at the same settings (weights, LoRA, gradients, "
        "AdamW state, EMA teacher, the VAE, and the largest step phase). Export max abs diff: the diffusers "
        "pipeline with the exported LoRA against `dopsd sample`'s PNG, same prompt, noise and steps, pixel values "
        "in [0, 1] rounded to 8 bits.",
        "",
    ]
    for e in result["models"]:
        lines += model_section(e)
    lines += [
        "## What is not the real thing",
        "",
        "- Weights are random (each layer's default scale), so images are noise and losses mean nothing; time and "
        "memory do not depend on the values. The configs are the published ones (dopsd/models/fullsize/).",
        "- The tokenizers are stand-ins of the real class (`Qwen2Tokenizer`: a small byte-level BPE with Qwen's "
        "special tokens at their published ids; `tokenizer/STAND-IN.txt` in each folder): captions tokenize to "
        "other ids and lengths than with Qwen's vocabulary.",
        "- CPU, not GPU: attention takes the CPU's path, and the resident memory includes what a GPU run keeps in "
        "host memory. GPU numbers: docs/gpu-check.md.",
        "",
    ]
    return "\n".join(lines)


def model_section(e: dict[str, Any]) -> list[str]:
    lines = [f"## {e['model']}", ""]
    o = e["settings"]["overrides"]
    knobs = {**o["model"], **o.get("optim", {}), **{k: v for k, v in o["train"].items() if k != "output_dir"}}
    shown = ", ".join(f"{k} {v}" for k, v in knobs.items() if k not in ("pretrained", "teacher_encoder"))
    lines += [
        f"Settings: the `{e['preset']}` preset with {shown} (every other value the preset's). Measured by "
        f"`{e.get('command')}` in {_f(e.get('minutes'), '{:.0f}')} minutes.",
        "",
    ]
    if e.get("problems"):
        lines += ["Not everything ran:", ""] + [f"- {p}" for p in e["problems"]] + [""]
    lines += ["| phase | seconds | peak RSS GiB | peak tensors GiB | note |", "|---|---|---|---|---|"]
    for name, p in e["phases"].items():
        note = p.get("skipped") or p.get("killed") or ("" if p.get("rc") in (0, None) else f"exit {p.get('rc')}")
        lines.append(
            f"| {name} | {_f(p.get('seconds'), '{:.0f}')} | {_f(p.get('peak_rss_gib'))} "
            f"| {_f(p.get('peak_tensor_gib'))} | {note} |"
        )
        for w, v in (p.get("windows") or {}).items():
            if name.startswith(("train", "resume")):
                lines.append(
                    f"| &nbsp;&nbsp;{name}: {w} | {_f(v.get('seconds'), '{:.0f}')} | {_f(v.get('peak_rss_gib'))} "
                    f"| {_f(v.get('peak_tensor_gib'))} | |"
                )
    inv = e.get("invariants") or {}
    if inv:
        lines += ["", "Learning invariants after the last step (`dopsd train`'s own trainer, bf16 autocast):", ""]
        lines += [f"- {k}: {_f(v, '{:.3g}')}" for k, v in inv.items()]
    cpu = (e.get("planned") or {}).get("cpu")
    if cpu:
        stages = ", ".join(
            f"{s['name']} {s['peak_gib']} GiB ({' + '.join(s['loaded'])})" for s in cpu["caching_stages"]
        )
        lines += ["", f"Planned for the CPU: training {cpu['dopsd_peak_gib']} GiB; feature caching: {stages}."]
    lines.append("")
    return lines

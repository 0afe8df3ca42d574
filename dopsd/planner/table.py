"""The README's table of predictions: `python -m dopsd.planner.table` (markdown on stdout).

Z-Image-Turbo and FLUX.2-klein 4B / 9B at 1024², LoRA r64, batch 1, gradient checkpointing (their presets' `auto`
turns it on on the cards that need it: the small-card view),
for a bf16, an 8-bit (int8) and a 4-bit (nf4) frozen base. One measurement per model: quantization changes
resident bytes (and adds dequantized weights: dopsd.planner.resident), not the step's other activations. The
run peak is the largest of training, feature caching and sampling (grids and few-step health between steps).
"""

from __future__ import annotations

import datetime
from dataclasses import replace

import torch

from dopsd.config import load_config
from dopsd.models.registry import plan_spec
from dopsd.planner.caching import caching_peaks
from dopsd.planner.plan import Choice, Planner, choice_from_config, compute
from dopsd.planner.resident import GiB
from dopsd.planner.search import CUDA_CONTEXT, METHODS

PRESETS = ("zimage-turbo", "flux2-klein-4b", "flux2-klein-9b")
BASES = (("bf16", "none"), ("8-bit", "int8"), ("4-bit", "nf4"))


def rows(preset: str) -> list[str]:
    cfg = load_config(preset, ["train.gradient_checkpointing=true"])
    spec = plan_spec(cfg.model, preset)
    planner = Planner(cfg, spec)
    base = choice_from_config(cfg)
    flops = compute(planner, base)
    out = []
    for label, q in BASES:
        c: Choice = replace(base, quantize=q)
        peaks = planner.peaks(c)
        caching = caching_peaks(spec, c)["stages"]
        teacher_cache = max(s["peak"] for s in caching if s["needed_by"] in ("student", "teacher"))
        sampling = planner.sampling(c)["dopsd"]
        gb = lambda x: f"{x / GiB:.1f}"  # noqa: E731
        train = [peaks[m]["peak"] for m in METHODS]
        out.append(
            f"| {spec.label} | {label} | "
            + " | ".join(gb(x) for x in train)
            + f" | {train[1] / train[0]:.2f} | {gb(teacher_cache)} | {gb(sampling)} | "
            + f"{gb(max(train[1], teacher_cache, sampling))} | "
            + (
                f"{flops['per_step_tflops']['sft']:.0f} / {flops['per_step_tflops']['dopsd']:.0f} "
                f"(×{flops['ratio_dopsd_sft']:.2f})"
                if q == "none"
                else "″"
            )
            + " |"
        )
    return out


def main() -> None:
    torch.set_num_threads(1)
    print(
        f"Predicted {datetime.date.today().isoformat()} with `python -m dopsd.planner.table` (GiB; +{CUDA_CONTEXT / GiB:.0f} "
        "GiB CUDA context not included).\n"
    )
    print(
        "| model | frozen base | SFT | D-OPSD | D-OPSD + prior | D-OPSD / SFT | feature caching (D-OPSD) | "
        "sampling (D-OPSD) | D-OPSD run peak | TFLOPs per step: SFT / D-OPSD |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset in PRESETS:
        for line in rows(preset):
            print(line, flush=True)


if __name__ == "__main__":
    main()

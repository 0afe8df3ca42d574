"""The printed table of benchmarks/gpu_real_scale.py and the versions that ran."""

from __future__ import annotations

import sys
from typing import Any

import torch

HEADER = (
    f"{'model':<16} {'base':<6} {'method':<6} {'step s':>8} {'peak alloc':>11} {'peak reserved':>14} "
    f"{'plan predicts':>14} {'alloc/plan':>11} {'invariants':>10}"
)


def _gb(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.2f} GiB" if x >= 0.1 else f"{x * 1024:.2f} MiB"


def sampling_text(s: dict[str, Any]) -> str:
    parts = [
        f"{name} {s[name]['seconds']:.1f} s alloc {_gb(s[name]['peak_allocated_gb'])} "
        f"reserved {_gb(s[name]['peak_reserved_gb'])}"
        for name in ("grid", "control_grid", "health")
        if name in s
    ]
    return f"{s['preset']:<16} {s['base']:<6} sampling ({s['images']} images, batch {s['batch']}): " + "; ".join(parts)


def row_text(r: dict[str, Any]) -> str:
    ratio = "-" if r["measured_over_predicted"] is None else f"{r['measured_over_predicted']:.2f}"
    return (
        f"{r['preset']:<16} {r['base']:<6} {r['method']:<6} {r['step_seconds']:>8.2f} "
        f"{_gb(r['peak_allocated_gb']):>11} {_gb(r['peak_reserved_gb']):>14} {_gb(r['predicted_peak_gb']):>14} "
        f"{ratio:>11} {'yes' if r['invariants']['holds'] else 'NO':>10}"
    )


def versions() -> dict[str, str | None]:
    """The versions that ran (the GPU machine brings its own torch; the rest come from the carried wheels)."""
    import importlib.metadata as md

    names = ("diffusers", "transformers", "peft", "accelerate", "safetensors", "tokenizers", "torchao")
    out: dict[str, str | None] = {"python": sys.version.split()[0], "torch": torch.__version__}
    out["cuda"] = torch.version.cuda
    for n in (*names, "huggingface_hub", "numpy"):
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            out[n] = None
    return out

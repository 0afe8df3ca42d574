"""The planner against the real trainer on the CPU: predicted vs measured peak memory of one optimizer step.

Measured: the trainer's own `train_step` (dopsd.training.trainer.Trainer, after one warm-up step so the optimizer state
exists), as `dopsd bench` measures cost: unique storages of the weights, gradients, optimizer state and
teacher/prior shadows at the step's start, plus the peak of bytes allocated during the step from the
profiler's allocation events (dopsd.planner.counting.transient_peak_bytes). The previous step's gradients are set to
None first — the step's own first action (`zero_grad(set_to_none=True)`) — because the profiler records no
frees of blocks allocated before it started: counted as held, they would never leave, and the new gradients
would come on top of them. Predicted: the planner for the same config with the CPU
as target (the CPU's own attention dispatch, single-tensor AdamW), the same resident tensors (the VAE and
encoders that the measurement leaves out are left out here too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dopsd.data.dataset import load_dataset
from dopsd.models.registry import plan_spec
from dopsd.planner.counting import resident_bytes, state_tensors, transient_peak_bytes
from dopsd.planner.plan import Planner, choice_from_config
from dopsd.training.trainer import Trainer


def measured_peak(cfg: Any, out: Path, warmup: int = 1) -> tuple[int, dict[str, dict[str, int]]]:
    """Bytes: the real trainer's resident tensors + the peak allocated during one train_step (CPU); and, per
    kind of cached context and tensor name, the longest first dimension the run had (its token counts)."""
    torch.manual_seed(0)
    trainer = Trainer(cfg, out, load_dataset(cfg.data, cfg.model))
    trainer.prepare()
    for _ in range(warmup):
        trainer.train_step()
    net = trainer.network
    trainer.optimizer.zero_grad(set_to_none=True)

    def resident() -> list[torch.Tensor]:
        tensors = (
            list(net.parameters()) + list(net.buffers()) + [p.grad for p in net.parameters() if p.grad is not None]
        )
        tensors += state_tensors(trainer.optimizer.state_dict()["state"])
        for shadow in {id(x): x for x in (trainer.teacher, trainer.prior) if x is not None}.values():
            tensors += list(shadow.shadow.values())
        return tensors

    held = resident_bytes(resident())
    peak = held + transient_peak_bytes(trainer.train_step)
    lengths: dict[str, dict[str, int]] = {}
    for kind, keys in (("student", trainer.feats.student), ("teacher", trainer.feats.teacher)):
        for key in keys.values():
            for name, t in trainer.feats.load(key).items():
                if t.ndim:
                    lengths.setdefault(kind, {})[name] = max(lengths.get(kind, {}).get(name, 0), t.shape[0])
    return peak, lengths


def predicted_peak(cfg: Any, model_overrides: dict[str, Any] | None = None) -> int:
    """Bytes the planner predicts for the same step on the CPU (the method of cfg, whole network, no search).

    model_overrides: model settings for the plan only, e.g. the caption lengths a run actually had
    (max_caption_tokens / teacher_max_tokens; variable-length contexts are planned at their longest)."""
    from dataclasses import replace

    model = replace(cfg.model, **(model_overrides or {}))
    spec = plan_spec(model, cfg.preset)
    method = cfg.method.name
    if method == "dopsd" and cfg.method.prior_weight > 0 and cfg.method.prior_prompts:
        method = "dopsd_prior"
    if method not in ("sft", "dopsd", "dopsd_prior"):
        raise ValueError(f"the planner covers sft and dopsd (with or without prior preservation), not {method!r}")
    phases = {"sft": ("sft", "optim"), "dopsd": ("rollout", "optim"), "dopsd_prior": ("rollout", "prior", "optim")}
    planner = Planner(cfg, spec, target="cpu", exact=True, only=phases[method])
    c = choice_from_config(cfg)
    peak = planner.peaks(c)[method]["peak"]
    return int(peak - planner.resident(c).kept)  # the measurement counts the trainer's tensors only


def error(predicted: float, measured: float) -> float:
    """Relative error of the prediction."""
    return (predicted - measured) / measured

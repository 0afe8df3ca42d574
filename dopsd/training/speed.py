"""Options that change a step's speed and memory but not what it computes: gradient checkpointing and
torch.compile of the denoiser (`train.gradient_checkpointing`, `train.compile`), set up on the trained network.

`train.gradient_checkpointing: auto` is resolved with the planner's memory estimate by `dopsd train`
(dopsd.planner.auto, above this layer) before the trainer is built, so the run folder's config.yaml records what
was chosen. What reaches the trainer still as "auto" (a Python caller that did not resolve it) is decided here
without a plan: off where the network has no checkpointing or the step runs on the CPU (host memory; the
recomputation would only cost time), on for an accelerator (the safe side when memory is not known).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

CPU_REASON = "auto: off on the CPU (host memory; recomputing would only cost time)"


def checkpointing(value: bool | str, network: nn.Module, device: torch.device) -> tuple[bool, str]:
    """Whether to enable the network's gradient checkpointing, and why (the reason goes into the step log)."""
    name = type(network).__name__
    supported = hasattr(network, "enable_gradient_checkpointing")
    if value is False:
        return False, "off (train.gradient_checkpointing=false)"
    if not supported:
        if value is True:
            warnings.warn(f"{name} has no gradient checkpointing; train.gradient_checkpointing ignored")
        return False, f"off ({name} has no gradient checkpointing)"
    if value is True:
        return True, "on (train.gradient_checkpointing=true)"
    if device.type == "cpu":
        return False, CPU_REASON
    return True, "auto: on (not resolved with a plan: `dopsd train` or dopsd.planner.auto.resolve does that)"


def setup(network: nn.Module, train: Any, device: torch.device) -> str:
    """Gradient checkpointing and torch.compile on the (LoRA-injected) network, in place. Returns what was done."""
    on, why = checkpointing(train.gradient_checkpointing, network, device)
    if on:
        network.enable_gradient_checkpointing()  # type: ignore[operator]
    if train.compile:
        # nn.Module.compile compiles the module's own call in place: parameter names, LoRA state-dict keys and
        # the teacher's weight swaps (ParamShadow replaces parameters' data, graph inputs to dynamo) are unchanged.
        network.compile()
        why += "; torch.compile on"
    return why

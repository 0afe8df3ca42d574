"""Per-GPU memory of a full fine-tune sharded over N GPUs by train.fsdp (dopsd.training.sharding), from the one-GPU
plan's measured parts.

FSDP2 splits every float32 tensor the run keeps per weight: the weights, their gradients, both AdamW states, the
EMA teacher and a separate prior copy, and the optimizer step's own temporaries (it runs on the shards). Each
process still runs its own micro-batch, so the step's activations are the one-GPU plan's. On top, whole weights
exist for a while (fully_shard per block, then the root): the root's weights during the whole forward and its
gradients during the whole backward, and per block, the running one and the prefetched next one, plus one
block's gradients before they are reduce-scattered:
  step      frozen + kept + sharded/N + max(activations + 2·root + 3·block, optimizer step/N)
  sampling  frozen + kept + sharded/N + max(sampler forward + root + 2·block, decode)
  set-up    frozen + kept + every float32 weight (the model is made float32, then sharded)
The run peak per GPU is the largest of these and the feature-caching peak (which holds no trained weights). Not
counted: NCCL's buffers, and allocator fragmentation (as in the one-GPU plan).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dopsd.planner.measure import build_denoiser
from dopsd.training.sharding import block_names

GPUS = (2, 4, 8)


def whole_bytes(network: nn.Module, family: str) -> tuple[int, int]:
    """(root, largest block): bytes of the trained weights outside every block, and of the largest block."""
    names = block_names(None, family)
    blocks = [m for m in network.modules() if type(m).__name__ in names]
    inside = {id(p) for b in blocks for p in b.parameters()}
    size = lambda ps: sum(p.numel() * p.element_size() for p in ps if p.requires_grad)  # noqa: E731
    root = size(p for p in network.parameters() if id(p) not in inside)
    return root, max((size(b.parameters()) for b in blocks), default=0)


def per_gpu(planner: Any, c: Any) -> dict[str, dict[str, float]]:
    """{method: {N: peak bytes per GPU}} of a full fine-tune over N GPUs (module doc), feature caching aside."""
    r, ph = planner.resident(c), planner.measured(c)
    parts = planner.sampling_parts(c)
    root, block = whole_bytes(build_denoiser(planner.spec, planner.setting(c), {}), planner.cfg.model.family)
    held = r.frozen + r.kept
    forward = max(parts[k] for k in ("grid", "health") if k in parts)
    out: dict[str, dict[str, float]] = {}
    for name, p in planner.peaks(c).items():
        sharded = r.trainable + r.grads + r.optimizer
        sharded += (r.ema if name != "sft" else 0) + (r.prior if name == "dopsd_prior" else 0)
        figures = {}
        for n in GPUS:
            step = held + sharded / n + max(p["activations"] + 2 * root + 3 * block, ph["optim"].peak / n)
            sample = held + sharded / n + max(forward + root + 2 * block, parts["decode"])
            figures[str(n)] = max(step, sample, held + r.trainable)
        out[name] = figures
    return out

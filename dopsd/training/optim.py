"""The optimizer (AdamW, or bitsandbytes' 8-bit AdamW) and the learning-rate schedule of `optim.*`."""

from __future__ import annotations

import math
from typing import Any

import torch

from dopsd.config import Config, ConfigError


def lr_factor(step: int, cfg: Config) -> float:
    """Warm-up then constant or cosine, as a factor of optim.lr for the 0-based optimizer step."""
    o, total = cfg.optim, cfg.train.max_steps
    warm = min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps > 0 else 1.0
    if o.schedule == "constant":
        return warm
    p = min(1.0, max(0.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps)))
    return warm * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def build(params: list[torch.nn.Parameter], cfg: Config) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer over `params` and its schedule."""
    o = cfg.optim
    kw = dict(lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    if not o.eight_bit:
        optimizer = torch.optim.AdamW(params, **kw)
    else:
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError as err:
            raise ConfigError(
                "optim.eight_bit needs bitsandbytes (pip install bitsandbytes; CUDA only), or set optim.eight_bit=false"
            ) from err
        optimizer = bnb.optim.AdamW8bit(params, **kw)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))

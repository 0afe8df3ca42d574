"""Bytes that stay on the device for the whole run, counted tensor by tensor on the full-size meta network.

Weights, trainable weights, gradients, optimizer state, the EMA teacher's and the prior's shadow copies, and
a quantized frozen base. Quantization (`model.quantize`, dopsd.models.quantize, through torchao) applies to the
weights of the frozen denoiser's nn.Linear layers (LoRA base layers included); every other tensor keeps its
dtype. Bytes per scheme, for a weight of `rows` output features, `n` elements and `d` bytes per element of its
dtype (torchao's storage; a test compares these with the quantized tensors themselves):

  int8   (weight-only, per output row)    n + rows·5  (int8 data, fp32 scale, int8 zero point)
  float8 (e4m3, weight-only, per row)     n + rows·4  (fp8 data, fp32 scale)
  nf4    (NF4Tensor, block 64, double-quantized scales)
         n/2 + ceil(n/64) + d·ceil(ceil(n/64)/256) + d + 16·d  (4-bit codes, one int8 scale per block, one
         factor per 256 blocks and their mean in the weight's dtype, the 16-entry code table)
  A few small layers a family leaves unquantized (its adapter's QUANTIZE_SKIP) are counted quantized here.

8-bit AdamW (bitsandbytes, block-wise): two uint8 states + one fp32 absmax per 256 elements for each state;
tensors under 4,096 elements keep 32-bit states; each tensor also holds two 256-entry fp32 quantisation maps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

QUANTIZE = ("none", "int8", "float8", "nf4")
GiB = 2**30


def quantized_bytes(shape: torch.Size | tuple[int, ...], scheme: str, dtype: torch.dtype) -> int:
    n = math.prod(shape)
    rows = shape[0]
    if scheme == "none":
        return n * torch.empty((), dtype=dtype).element_size()
    if scheme == "int8":
        return n + rows * 5
    if scheme == "float8":
        return n + rows * 4
    if scheme == "nf4":
        d = torch.empty((), dtype=dtype).element_size()
        blocks = math.ceil(n / 64)
        return math.ceil(n / 2) + blocks + d * math.ceil(blocks / 256) + d + 16 * d
    raise ValueError(f"unknown quantization {scheme!r}; use one of {', '.join(QUANTIZE)}")


def adamw_state_bytes(params: list[torch.Tensor], eight_bit: bool) -> int:
    """AdamW's exp_avg and exp_avg_sq (+ its step counters) for every trainable tensor."""
    total = 0
    for p in params:
        n = p.numel()
        if not eight_bit:
            total += 2 * n * p.element_size() + 4  # torch AdamW: states in the parameter's dtype, fp32 step
        elif n >= 4096:
            total += 2 * (n + 4 * math.ceil(n / 256)) + 2 * 256 * 4 + 4
        else:
            total += 2 * 4 * n + 4
    return total


@dataclass
class Resident:
    """Bytes of what lives on the device through training (see the module docstring)."""

    frozen: int  # frozen denoiser weights and buffers (quantized Linear weights at their scheme's size)
    trainable: int  # trainable weights (LoRA in float32, or every weight under full fine-tuning)
    grads: int
    optimizer: int
    ema: int  # the EMA teacher's shadow (0 for a live teacher)
    prior: int  # the prior-preservation shadow when it is a separate copy
    kept: int  # other parts that stay loaded while training (e.g. the VAE)
    quant_scratch: int  # one dequantized weight at a time (the largest quantized Linear), 0 without quantization
    trainable_params: int
    total_params: int


def count(
    network: nn.Module,
    dtype: torch.dtype,
    quantize: str,
    eight_bit: bool,
    teacher: str,
    prior_separate: bool,
    kept_bytes: int,
) -> Resident:
    """Resident bytes of a prepared (LoRA-injected or fully trainable) full-size meta network."""
    linear_weights = {id(m.weight): m for m in network.modules() if isinstance(m, nn.Linear)}
    frozen = trainable = scratch = params = 0
    train_list = []
    seen: set[int] = set()
    for p in network.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        if p.requires_grad:
            trainable += p.numel() * p.element_size()
            train_list.append(p)
        elif id(p) in linear_weights and quantize != "none":
            frozen += quantized_bytes(p.shape, quantize, p.dtype)
            scratch = max(scratch, p.numel() * p.element_size())
        else:
            frozen += p.numel() * p.element_size()
    frozen += sum(b.numel() * b.element_size() for b in network.buffers())
    shadow = 0 if teacher == "live" else trainable
    return Resident(
        frozen=frozen,
        trainable=trainable,
        grads=trainable,
        optimizer=adamw_state_bytes(train_list, eight_bit),
        ema=shadow,
        prior=trainable if prior_separate else 0,
        kept=kept_bytes,
        quant_scratch=scratch,
        trainable_params=sum(p.numel() for p in train_list),
        total_params=params,
    )


def module_bytes(module: nn.Module, quantize: str = "none") -> int:
    """Weights + buffers of a frozen module (Linear weights quantized when asked)."""
    linear_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    total, seen = 0, set()
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in linear_weights and quantize != "none":
            total += quantized_bytes(p.shape, quantize, p.dtype)
        else:
            total += p.numel() * p.element_size()
    return total + sum(b.numel() * b.element_size() for b in module.buffers())


def gib(n: float) -> float:
    return round(n / GiB, 2)


__all__ = ["QUANTIZE", "Resident", "adamw_state_bytes", "count", "gib", "module_bytes", "quantized_bytes"]

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

What quantized layers add to a step: a forward dequantizes each weight to its dtype for its matmul, one at a
time: `quant_scratch`, the largest weight's dequantization peak, n·d bytes for int8/float8 (the dequantized
weight) and n·(8 + 3d) for nf4 (torchao's NF4 dequantization indexes its code table with int64 tensors: 14 bytes
per element of a bf16 weight, 7× the weight it makes; measured with torchao on the CPU, the same code on CUDA).
With grad, torchao's int8/float8 weight-only Linear saves the dequantized weight for the backward (NF4 saves the
NF4 tensor itself and dequantizes again in the backward), so a student forward+backward holds every dequantized
weight at once without gradient checkpointing (about 11 GiB for Z-Image), and one checkpointed block's (the one
being recomputed) with it: `dequant_saved`. tests/test_plan.py measures both on torchao's own layers.

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


def dequant_peak(numel: int, scheme: str, element_size: int) -> int:
    """Peak bytes of dequantizing one weight of `numel` elements for a matmul (module doc)."""
    if scheme == "nf4":
        return numel * (8 + 3 * element_size)
    return numel * element_size if scheme in ("int8", "float8") else 0


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
    quant_scratch: int  # one weight's dequantization at a time (the largest quantized Linear's peak; module doc)
    dequant_saved: int  # int8/float8: dequantized weights a student forward saves for its backward (module doc)
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
    gradient_checkpointing: bool = False,
    saves: set[str] | None = None,
) -> Resident:
    """Resident bytes of a prepared (LoRA-injected or fully trainable) full-size meta network. `saves`: the
    frozen Linear layers whose input needs a gradient (dopsd.planner.measure.grad_input_linears; None: all)."""
    linear_weights = {id(m.weight): m for m in network.modules() if isinstance(m, nn.Linear)}
    frozen = trainable = scratch = params = 0
    dequantized: dict[int, int] = {}  # quantized weight -> bytes of its dequantized copy
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
            dequantized[id(p)] = p.numel() * p.element_size()
            scratch = max(scratch, dequant_peak(p.numel(), quantize, p.element_size()))
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
        dequant_saved=0
        if quantize == "nf4"
        else saved_dequantized(network, dequantized, gradient_checkpointing, saves),
        trainable_params=sum(p.numel() for p in train_list),
        total_params=params,
    )


def saved_dequantized(
    network: nn.Module, dequantized: dict[int, int], gradient_checkpointing: bool, saves: set[str] | None = None
) -> int:
    """Bytes of the dequantized weights alive at once for a backward. The repeated blocks (every composite module
    of an nn.ModuleList, which diffusers checkpoints one by one) save all of theirs: past the first LoRA layer
    every input needs a gradient. Outside them, only the layers in `saves` do (None: all; an embedder or a shared
    modulation fed by frozen inputs saves nothing). Without checkpointing all of these are alive at once; with
    it, those outside the blocks and the largest block's, recomputed with its saved tensors."""
    names = {id(m.weight): n for n, m in network.named_modules() if isinstance(m, nn.Linear)}
    inside: set[int] = set()
    blocks: list[int] = [0]  # each block's dequantized bytes
    for repeated in (m for m in network.modules() if isinstance(m, nn.ModuleList)):
        for block in repeated:
            if isinstance(block, nn.Linear):  # e.g. an attention's to_out list: part of a block, not one
                continue
            ids = {id(m.weight) for m in block.modules() if isinstance(m, nn.Linear)} & dequantized.keys()
            ids -= inside  # a nested list inside a block counted already
            inside |= ids
            blocks.append(sum(dequantized[i] for i in ids))
    outside = sum(v for i, v in dequantized.items() if i not in inside and (saves is None or names[i] in saves))
    return outside + (max(blocks) if gradient_checkpointing else sum(blocks))


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


__all__ = [
    "QUANTIZE",
    "Resident",
    "adamw_state_bytes",
    "count",
    "dequant_peak",
    "gib",
    "module_bytes",
    "quantized_bytes",
    "saved_dequantized",
]

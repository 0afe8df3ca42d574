"""A quantized frozen base (`model.quantize`): the denoiser's nn.Linear weights stored in 8 or 4 bits, the LoRA
on top in higher precision. Family-agnostic: a family only names the modules to leave alone (`skip`).

Every mode goes through torchao, one maintained library that peft's LoRA already understands, and that runs the
same code on CUDA (for users) and on the CPU (for tests):

  * int8   — torchao `Int8WeightOnlyConfig`: int8 weights with one fp32 scale per output row, dequantized inside
             each matmul. Works on CPU and CUDA; peft wraps these layers as `TorchaoLoraLinear`.
  * float8 — torchao `Float8WeightOnlyConfig` (e4m3 weights, one fp32 scale per row). Needs a CUDA GPU with
             float8 support (compute capability 8.9+: Ada, Hopper, Blackwell); torchao's float8 workflows are
             built and checked for those. It is refused on the CPU: there it would only emulate float8, with the
             memory of int8 and nothing gained, so int8 is the mode to use there.
  * nf4    — torchao's `NF4Tensor` (QLoRA's 4-bit NormalFloat: blocks of 64, double-quantized block scales), whose
             matmul dequantizes to the activation dtype and back-propagates to the input. Works on CPU and CUDA;
             peft wraps it as a plain LoRA Linear. A weight whose size is not a multiple of 64·256 elements
             (only tiny layers) cannot be stored this way and stays in its dtype.
bitsandbytes' 4-bit layers would need CUDA (or its separate CPU backend) and a second quantization library for
the same job, so it is not used here (it stays an option for the 8-bit optimizer, `optim.eight_bit`).

Order: the base is quantized when the denoiser is loaded, then `dopsd.lora.inject.add_lora` adds the LoRA
(peft dispatches on the quantized weight type). Nothing else changes: the trainable weights are the LoRA's (the
EMA teacher and the prior swap those values only), checkpoints hold them alone, and the exported LoRA has the
same layout as on an unquantized base, so it loads into the unquantized model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from dopsd.config.types import ConfigError

MODES = ("none", "int8", "float8", "nf4")
NF4_BLOCK, NF4_SCALER_BLOCK = 64, 256
FLOAT8_CAPABILITY = (8, 9)


class QuantizeUnavailable(ConfigError):
    """model.quantize names a mode this machine (or this install) cannot run."""


@dataclass
class QuantizeReport:
    mode: str
    quantized: int = 0  # Linear layers whose weight is now quantized
    kept: list[str] = field(default_factory=list)  # Linear layers left in their dtype (skipped or unfit)
    bytes_before: int = 0  # their weights' bytes before quantization
    bytes_after: int = 0  # the same weights' bytes after

    def __str__(self) -> str:
        gib = 2**30
        return (
            f"base quantized to {self.mode}: {self.quantized} Linear weights, {self.bytes_before / gib:.3f} → "
            f"{self.bytes_after / gib:.3f} GiB ({len(self.kept)} kept in full precision)"
        )


def check_available(mode: str, device: torch.device | str, lora: bool = True) -> None:
    """Refuse, before any work, a mode that cannot run here: full fine-tuning of a quantized base, float8 off a
    float8 GPU, or torchao missing. `device` is where the denoiser will run."""
    if mode not in MODES:
        raise ConfigError(f"model.quantize must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return
    if not lora:
        raise ConfigError(
            f"model.quantize={mode} needs a LoRA (lora.enabled=true): a quantized base cannot be "
            "fine-tuned itself; set model.quantize=none for a full fine-tune"
        )
    device = torch.device(device)
    if mode == "float8":
        if device.type != "cuda":
            raise QuantizeUnavailable(
                "model.quantize=float8 needs a CUDA GPU with float8 support (compute capability 8.9+: RTX 40xx, "
                "L4/L40, H100/H200, B200) and this run is on the CPU; use model.quantize=int8 (same memory) or nf4"
            )
        cap = torch.cuda.get_device_capability(device)
        if cap < FLOAT8_CAPABILITY:
            raise QuantizeUnavailable(
                f"model.quantize=float8 needs a GPU with float8 support (compute capability 8.9+), but "
                f"{torch.cuda.get_device_name(device)} has {cap[0]}.{cap[1]}; use model.quantize=int8 or nf4"
            )
    _torchao()


def planned_device(cfg: Any) -> torch.device:
    """Where a run of this config will put the denoiser (before accelerate is set up): the CPU when asked for
    (train.device=cpu) or when there is no GPU, else this process's GPU."""
    if cfg.train.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _torchao() -> Any:
    try:
        # torchao announces each optional compiled kernel it cannot load (none is used here) as a warning.
        logging.getLogger("torchao").setLevel(logging.ERROR)
        import torchao
        import torchao.quantization  # noqa: F401
    except ImportError as err:
        raise QuantizeUnavailable(
            f"model.quantize needs torchao ({err}); install it with pip install "
            "torchao (dopsd pins the version it was tested with in pyproject.toml)"
        ) from None
    return torchao


def nf4_fits(weight: torch.Tensor) -> bool:
    return weight.numel() % (NF4_BLOCK * NF4_SCALER_BLOCK) == 0


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a plain or torchao-quantized tensor (the sum of its inner tensors)."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, nn.Parameter):
        return t.numel() * t.element_size()
    names = flatten()[0]
    return sum(tensor_bytes(getattr(t, n)) for n in names)


def _skipped(name: str, skip: Iterable[str]) -> bool:
    return any(name == s or name.startswith(s + ".") for s in skip)


@torch.no_grad()
def quantize_network(
    network: nn.Module, mode: str, skip: Iterable[str] = (), device: torch.device | str | None = None
) -> QuantizeReport:
    """Quantize the weights of `network`'s nn.Linear layers in place (except modules named in `skip`, with their
    children), moving each to `device` first so that only quantized weights ever land there; the rest of the
    network is then moved too. Call before the LoRA is added."""
    report = QuantizeReport(mode)
    if mode == "none":
        return report
    check_available(mode, device or next(network.parameters()).device)
    _torchao()
    from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_, to_nf4

    skip = tuple(skip)
    for name, module in list(network.named_modules()):
        if type(module) is not nn.Linear:
            continue
        weight = module.weight
        if _skipped(name, skip) or (mode == "nf4" and not nf4_fits(weight)):
            report.kept.append(name)
            continue
        report.bytes_before += tensor_bytes(weight)
        if device is not None:
            module.to(device)
        if mode == "nf4":
            module.weight = nn.Parameter(
                to_nf4(module.weight.detach(), NF4_BLOCK, NF4_SCALER_BLOCK), requires_grad=False
            )
        else:
            config = Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()
            quantize_(module, config, filter_fn=lambda m, fqn: True)
        module.weight.requires_grad_(False)
        report.bytes_after += tensor_bytes(module.weight)
        report.quantized += 1
    if device is not None:
        network.to(device)
    return report


def is_quantized(weight: torch.Tensor) -> bool:
    """Whether a weight is one of the quantized tensor types this module creates."""
    return type(weight) not in (torch.Tensor, nn.Parameter) and hasattr(weight, "__tensor_flatten__")


def plain(t: torch.Tensor) -> torch.Tensor:
    """A quantized weight as an ordinary tensor (its dequantized values); any other tensor as it is."""
    if not is_quantized(t):
        return t
    # torchao's NF4Tensor has no instance `dequantize()` (its `dequantize` is a static helper of another signature)
    return t.get_original_weight() if hasattr(t, "get_original_weight") else t.dequantize()


def quantized_linear_count(network: nn.Module) -> int:
    return sum(
        1
        for m in network.modules()
        if isinstance(getattr(m, "weight", None), torch.Tensor) and isinstance(m, nn.Linear) and is_quantized(m.weight)
    )

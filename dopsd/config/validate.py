"""Config checks after typing: every bounded option inside its range, the relations the trainer relies on
(full fine-tunes' precision and train.fsdp among them).

Ranges are declared on the fields themselves (`opt(..., ge=1)` in dopsd.config); this module enforces them
for every option, so a new bounded option needs no code here. Each message names the key, the value given and
the valid range.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dopsd.config.types import ConfigError

Config = Any  # a dopsd.config.Config (not imported: dopsd.config calls this module)


def _number_text(x: float) -> str:
    if isinstance(x, int) and x >= 2**16 and (x & (x - 1)) == 0:
        return f"2^{x.bit_length() - 1}"  # seed limits read better as powers of two
    return f"{x:g}" if isinstance(x, float) else str(x)


def range_text(bounds: dict[str, float]) -> str:
    """'> 0', '>= 1', 'in [0, 1)' … for bounds {ge|gt: lo, le|lt: hi}."""
    lo = ("[", bounds["ge"]) if "ge" in bounds else ("(", bounds["gt"]) if "gt" in bounds else None
    hi = ("]", bounds["le"]) if "le" in bounds else (")", bounds["lt"]) if "lt" in bounds else None
    if lo and hi:
        return f"in {lo[0]}{_number_text(lo[1])}, {_number_text(hi[1])}{hi[0]}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {_number_text(lo[1])}"
    assert hi is not None
    return f"{'<=' if hi[0] == ']' else '<'} {_number_text(hi[1])}"


def _inside(x: float, bounds: dict[str, float]) -> bool:
    return not (
        ("ge" in bounds and x < bounds["ge"])
        or ("gt" in bounds and x <= bounds["gt"])
        or ("le" in bounds and x > bounds["le"])
        or ("lt" in bounds and x >= bounds["lt"])
    )


def check_bounds(config: Config) -> None:
    """Every option with declared bounds (each list element; null values are not checked)."""
    sections = [f.name for f in dataclasses.fields(config) if dataclasses.is_dataclass(getattr(config, f.name))]
    for section in sections:
        obj = getattr(config, section)
        for f in dataclasses.fields(obj):
            bounds = f.metadata.get("bounds")
            value = getattr(obj, f.name)
            if not bounds or value is None:
                continue
            for i, x in enumerate(value if isinstance(value, list) else [value]):
                if not _inside(x, bounds):
                    where = f"{section}.{f.name}" + (f"[{i}]" if isinstance(value, list) else "")
                    raise ConfigError(f"config key {where!r} must be {range_text(bounds)}, got {x!r}")


def check_relations(c: Config) -> None:
    """What the options mean together (each one alone is already in range)."""
    if not c.train.output_dir.strip():
        raise ConfigError("config key 'train.output_dir' is empty; name the run folder to write")
    if len(c.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' needs two numbers (beta1, beta2), got {c.optim.betas}")
    if not c.sample.seeds:
        raise ConfigError("config key 'sample.seeds' must list at least one seed")
    if c.model.inference_steps is not None and c.model.rollout_every > c.model.inference_steps:
        raise ConfigError(
            f"config key 'model.rollout_every' is {c.model.rollout_every} but model.inference_steps is "
            f"{c.model.inference_steps}: the roll-out takes every n-th of those steps, so n must be <= "
            f"{c.model.inference_steps}"
        )
    if c.method.prior_weight > 0 and not c.method.prior_prompts:
        raise ConfigError(
            f"config key 'method.prior_weight' is {c.method.prior_weight} but method.prior_prompts is empty; list "
            "prompts unrelated to the concept, or set method.prior_weight=0 to turn prior preservation off"
        )
    if c.model.editing and not c.data.source_dir:
        raise ConfigError("model.editing is true but data.source_dir is not set: point it at the source images")
    if c.model.editing and c.method.prior_prompts and c.method.prior_weight > 0:
        raise ConfigError(
            "prior preservation (method.prior_prompts) is not supported for editing models (model.editing)"
        )
    if c.method.class_prompts and c.method.name != "dreambooth":
        raise ConfigError(
            f"config key 'method.class_prompts' is set but method.name is {c.method.name!r}; only "
            "dreambooth samples class images: set method.name=dreambooth or leave class_prompts empty"
        )
    if c.model.editing and c.method.name == "dreambooth":
        raise ConfigError(
            "method.name=dreambooth is not supported for editing models (model.editing): its class "
            "images have no source images; use dopsd, sft, pso, offpolicy or sft_teacher"
        )
    if c.train.device not in (None, "cpu"):
        raise ConfigError(
            f"config key 'train.device' must be 'cpu' or null, got {c.train.device!r} "
            "(choose GPUs with CUDA_VISIBLE_DEVICES or accelerate launch)"
        )
    if c.model.quantize != "none" and not c.lora.enabled:
        raise ConfigError(
            f"config key 'model.quantize' is {c.model.quantize!r} but lora.enabled is false: a "
            "quantized base cannot be fine-tuned itself; train a LoRA (lora.enabled=true) or set "
            "model.quantize=none for a full fine-tune"
        )
    if c.train.stop_when_done and not (c.sample.every and c.sample.done):
        raise ConfigError(
            "config key 'train.stop_when_done' is true but the done signal is only measured at sampling intervals: "
            "set sample.every > 0 (e.g. sample.every=50) and sample.done=true, or train.stop_when_done=false"
        )
    check_precision(c)


# --- full fine-tunes and train.fsdp ----------------------------------------------------------------------------
def check_precision(c: Config) -> None:
    """A full fine-tune keeps float32 master weights and needs autocast on a low-precision model; train.fsdp
    shards such a run (dopsd.training.sharding) and supports what it was built and tested for."""
    full, low = not c.lora.enabled, c.model.dtype in ("bfloat16", "float16")
    if full and low and c.train.mixed_precision == "no":
        raise ConfigError(
            f"config key 'train.mixed_precision' is 'no' but model.dtype is {c.model.dtype!r} and lora.enabled is "
            "false: a full fine-tune trains float32 master weights and computes in the model's dtype under "
            "autocast; set train.mixed_precision=bf16 (fp16 for a float16 model), or model.dtype=float32"
        )
    if not c.train.fsdp:
        return
    if c.lora.enabled:
        raise ConfigError(
            "config key 'train.fsdp' is true but lora.enabled is true: train.fsdp shards a full fine-tune "
            "(lora.enabled=false); a LoRA run trains few weights on a frozen base (model.quantize shrinks that "
            "base), so set train.fsdp=false"
        )
    if c.train.mixed_precision == "fp16":
        raise ConfigError(
            "config key 'train.mixed_precision' is 'fp16' with train.fsdp: the fp16 gradient scaler is not "
            "supported on sharded gradients; use train.mixed_precision=bf16"
        )
    if c.optim.eight_bit:
        raise ConfigError(
            "config key 'optim.eight_bit' is true with train.fsdp: 8-bit AdamW does not take sharded weights; "
            "set optim.eight_bit=false (FSDP already splits the AdamW states over the processes)"
        )


def validate(config: Config) -> None:
    """Ranges, then relations; raises ConfigError naming the key, the value and what is valid."""
    check_bounds(config)
    check_relations(config)

"""Bad-input cases of the config: unknown keys and sections, wrong types and ranges, presets, YAML files and
overrides; the first rows of docs/bad-inputs.md (tests/bad_input_cases.py joins the groups in the table's order)."""

from __future__ import annotations

from bad_input_setups import SAMPLE, TRAIN, Z, text
from bad_inputs import Case

CONFIG_CASES: list[Case] = [
    # --- config -----------------------------------------------------------------------------------------
    Case(
        "config", "unknown key", "train mini optim.lrr=1e-4", ("optim.lrr", "did you mean 'optim.lr'"), subprocess=True
    ),
    Case("config", "unknown section", "train mini optimizer.lr=1e-4", ("optimizer.lr", "optim.lr")),
    Case(
        "config",
        "unknown key in a YAML file",
        "train my.yaml",
        ("train.batch_size",),
        text("my.yaml", "preset: mini\ntrain:\n  batchsize: 4\n"),
    ),
    Case("config", "wrong type", "train mini train.max_steps=many", ("train.max_steps", "many")),
    Case("config", "not one of the choices", "train mini method.name=dops", ("method.name", "'dopsd'")),
    Case("config", "NaN", "train mini optim.lr=nan", ("optim.lr", "nan")),
    Case("config", "infinity", "train mini method.ema_decay=inf", ("method.ema_decay", "inf")),
    Case("config", "negative learning rate", "train mini optim.lr=-1e-4", ("optim.lr", "> 0", "-0.0001")),
    Case("config", "beta of 1", "train mini 'optim.betas=[0.9, 1.0]'", ("optim.betas[1]", "[0, 1)")),
    Case("config", "epsilon 0", "train mini optim.eps=0", ("optim.eps", "> 0")),
    Case("config", "zero steps", "train mini train.max_steps=0", ("train.max_steps", ">= 1")),
    Case("config", "negative seed", "train mini train.seed=-1", ("train.seed", "-1")),
    Case("config", "negative sample seed", "train mini 'sample.seeds=[0, -2]'", ("sample.seeds[1]", "-2")),
    Case("config", "caption dropout 1.5", "train mini data.caption_dropout=1.5", ("data.caption_dropout", "1.5")),
    Case("config", "LoRA dropout 1", "train mini lora.dropout=1", ("lora.dropout", "[0, 1)")),
    Case("config", "zero inference steps", "train mini model.inference_steps=0", ("model.inference_steps", ">= 1")),
    Case(
        "config",
        "roll-out coarser than the schedule",
        "train mini model.inference_steps=4 model.rollout_every=8",
        ("model.rollout_every", "model.inference_steps"),
    ),
    Case(
        "config",
        "prior weight without prompts",
        "train mini method.prior_weight=1",
        ("method.prior_weight", "method.prior_prompts"),
    ),
    Case(
        "config",
        "sample prompt the model cannot read",
        f"{TRAIN} 'sample.prompts=[a red circle, a zebra]'",
        ("sample.prompts[1]", "a zebra"),
    ),
    Case(
        "config",
        "prior prompt the model cannot read",
        f"{TRAIN} method.prior_weight=1 'method.prior_prompts=[a purple llama]'",
        ("method.prior_prompts[0]", "a purple llama"),
    ),
    Case("config", "unknown mixed precision", "train mini train.mixed_precision=fp8", ("train.mixed_precision", "fp8")),
    Case("config", "device other than cpu", "train mini train.device=cuda:0", ("train.device", "CUDA_VISIBLE_DEVICES")),
    Case("config", "FSDP for a LoRA", "train mini train.fsdp=true", ("train.fsdp", "lora.enabled=false")),
    Case(
        "config",
        "quantized base with a full fine-tune",
        "train mini model.quantize=int8 lora.enabled=false",
        ("model.quantize", "lora.enabled=true", "model.quantize=none"),
    ),
    Case(
        "config",
        "float8 base on the CPU",
        f"{TRAIN} model.quantize=float8 train.device=cpu",
        ("model.quantize=float8", "CUDA", "compute capability 8.9", "model.quantize=int8"),
    ),
    Case("config", "unknown quantization", "train mini model.quantize=int4", ("model.quantize", "int4", "'nf4'")),
    Case("config", "unknown preset", "train mini-turbo", ("mini-turbo", "preset")),
    Case(
        "config",
        "unknown preset in a YAML file",
        "train my.yaml",
        ("zimage_turbo", "did you mean 'zimage-turbo'"),
        text("my.yaml", "preset: zimage_turbo\n"),
    ),
    Case(
        "config", "invalid YAML", "train my.yaml", ("my.yaml", "not valid YAML"), text("my.yaml", "optim: {lr: 1e-4\n")
    ),
    Case("config", "YAML that is a list", "train my.yaml", ("my.yaml", "mapping"), text("my.yaml", "- preset: mini\n")),
    Case(
        "config",
        "YAML section that is not a mapping",
        "train my.yaml",
        ("my.yaml", "'train'"),
        text("my.yaml", "preset: mini\ntrain: 5\n"),
    ),
    Case("config", "missing config file", "train missing.yaml", ("missing.yaml",)),
    Case("config", "override without =", "train mini optim.lr", ("optim.lr", "section.key=value")),
    Case(
        "config",
        "editing without source images",
        "train flux2-klein-4b model.editing=true",
        ("model.editing", "data.source_dir"),
    ),
    Case(
        "config", "size the miniature cannot render", f"{SAMPLE} model.height=32 model.width=32", ("model.height", "24")
    ),
    Case(
        "config",
        "size Z-Image cannot render",
        f"sample zimage-turbo {Z} model.height=30 --prompt 'a cat'",
        ("30", "model.height"),
    ),
]

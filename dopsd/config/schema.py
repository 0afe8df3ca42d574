"""The training configuration's typed sections: every option a dataclass field declared once, with `opt`.

Every option's `help` metadata is its one documentation; `dopsd.config.docs` renders them into
docs/configuration.md (a test keeps that file up to date: `python -m dopsd.config.docs`). Its range (`ge`/`gt`/
`le`/`lt`) and, for an option newer than existing run folders, the value older runs resume with (`before`) are
declared beside it. Loading a config from a preset, a YAML file and overrides: dopsd.config.load.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

SEED_LIMIT = 2**32  # numpy's legacy seeding (accelerate.set_seed) takes seeds below 2^32


NOT_NEW = object()  # opt(before=...) not given: the option is as old as the run folders


def opt(
    default: Any,
    help: str,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    before: Any = NOT_NEW,
    **kw: Any,
) -> Any:
    """A documented field (lists/dicts get a factory so instances never share them).

    ge/gt/le/lt bound a number (each element of a list; a null value is not checked): `validate` enforces them
    and the reference docs list them, so a range is declared once, here. `before`: for an option added after runs
    already existed, the value that reproduces a run whose config.yaml does not name it (`--resume` continues
    such a run with it, `as_before_the_options`).
    """
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {
        "help": help,
        **({"bounds": bounds} if bounds else {}),
        **({"before": before} if before is not NOT_NEW else {}),
    }
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@dataclass
class ModelConfig:
    family: Literal["mini", "zimage", "flux2"] = opt(
        "mini", "Model family: the built-in miniature, Z-Image or FLUX.2-klein."
    )
    pretrained: str | None = opt(
        None,
        "Local folder with the weights (diffusers layout; relative to the YAML file). mini: null/'turbo' "
        "(shipped turbo), 'base', or a path.",
    )
    teacher_context: Literal["vlm", "reference", "text"] = opt(
        "vlm",
        "How the teacher sees the target image: VLM features of image+caption, the model's reference-image "
        "path (FLUX.2, mini), or 'text' (caption only: no image, a control for probes/ablations).",
    )
    teacher_encoder: str | None = opt(
        None, "Local folder of the teacher's multimodal encoder (Z-Image: a Qwen3-VL model)."
    )
    teacher_instruction: str | None = opt(
        None,
        "Text appended to the teacher caption (reference teacher), e.g. asking for consistency with the "
        "reference; null = the model's own (FLUX.2: consistency with the reference image; editing: that the last "
        "reference is the expected output).",
    )
    teacher_max_tokens: int = opt(
        1024,
        "VLM teacher (teacher_context=vlm): most tokens of its context, image tokens + caption (Z-Image: at "
        "most the caption limit of its RoPE table).",
        ge=1,
    )
    teacher_image_tokens: int = opt(
        256, "VLM teacher: most tokens the target image may take in its context (the image is downscaled to fit).", ge=1
    )
    height: int = opt(24, "Training/sampling height in pixels (the bucket area for aspect-ratio buckets).", ge=1)
    width: int = opt(24, "Training/sampling width in pixels.", ge=1)
    inference_steps: int | None = opt(
        None, "Few-step sampling steps the LoRA must keep working at (roll-out, grids); null = the model's own.", ge=1
    )
    shift: float | None = opt(
        None,
        "Static σ shift of the inference schedule (Z-Image-Turbo: 3); null = the model's own. FLUX.2: dynamic.",
        gt=0,
    )
    rollout_every: int = opt(
        1, "Training roll-out = every n-th σ of the inference schedule (Z-Image-Turbo: 2 → 4 steps).", ge=1
    )
    max_caption_tokens: int = opt(512, "Maximum caption tokens for the student text encoder.", ge=1)
    text_encoder_out_layers: list[int] | None = opt(
        None,
        "FLUX.2: the text encoder's hidden layers concatenated as caption features; null = the model's own "
        "(9, 18, 27).",
        ge=0,
    )
    editing: bool = opt(False, "Editing LoRA: the student sees source image(s) + instruction (needs data.source_dir).")
    dtype: Literal["float32", "bfloat16", "float16"] = opt("float32", "Weight dtype of the frozen model.")
    quantize: Literal["none", "int8", "float8", "nf4"] = opt(
        "none",
        "Store the frozen denoiser's Linear weights quantized (torchao) under a LoRA kept in higher "
        "precision: int8 and nf4 run on CPU and CUDA, float8 needs a CUDA GPU with float8 support (compute "
        "capability 8.9+). LoRA only; `dopsd plan` shows the memory each saves.",
    )


@dataclass
class DataConfig:
    path: str = opt("", "Dataset folder: images with same-name .txt captions, or a metadata.jsonl {file_name, text}.")
    trigger_word: str | None = opt(None, "Word that names the concept; replaces `placeholder`, else is prepended.")
    placeholder: str = opt("[V]", "Placeholder in captions replaced by trigger_word.")
    caption_dropout: float = opt(
        0.0,
        "Probability of an empty caption for a sample (student and teacher; the teacher still sees the image).",
        ge=0,
        lt=1,
    )
    min_size: int | None = opt(
        None, "Smallest accepted image side in pixels; null = half the training resolution.", ge=1
    )
    buckets: bool = opt(
        False, "Aspect-ratio buckets around height×width (real models); off = centre-crop to height×width."
    )
    bucket_multiple: int = opt(16, "Bucket sides are multiples of this many pixels.", ge=1)
    source_dir: str | None = opt(
        None, "Editing: folder of source images named like the targets (NAME.ext or NAME_0.ext, NAME_1.ext …)."
    )


@dataclass
class MethodConfig:
    name: Literal["dopsd", "sft", "hybrid", "pso", "dreambooth", "offpolicy", "sft_teacher"] = opt(
        "dopsd",
        "Objective: D-OPSD, the SFT baseline, D-OPSD + sft_weight·SFT, or a baseline of the paper: pso "
        "(online Pairwise Sample Optimization), dreambooth (SFT + class images of the starting model), offpolicy "
        "(D-OPSD's loss at the teacher's own roll-out states), sft_teacher (SFT on the teacher's samples).",
    )
    teacher: Literal["ema", "base", "live"] = opt(
        "ema", "Teacher weights: EMA of the student, the frozen initial model, or the current student (ablation)."
    )
    ema_decay: float = opt(0.9999, "EMA decay of the teacher, updated after every optimizer step.", ge=0, le=1)
    loss_space: Literal["x0", "velocity"] = opt(
        "x0", "D-OPSD loss in x0 space (σ²-weighted velocity) or velocity space."
    )
    step_weighting: Literal["uniform", "sigma"] = opt("uniform", "Per-roll-out-step loss weights.")
    per_step_backward: bool = opt(True, "Backward after each roll-out step (same gradient, 1/K activation memory).")
    train_states: int = opt(
        1,
        "D-OPSD-form losses (dopsd, offpolicy, prior): train at this many of the K roll-out states, drawn anew "
        "for each micro-batch; the others are rolled out without a graph (no student backward, no teacher "
        "forward) and the loss is rescaled by K/k, an unbiased estimate of the full one. 0 = all K. Default 1: "
        "the same concept in less time on the miniature (docs/time-to-fidelity.md).",
        ge=0,
        before=0,
    )
    sft_weight: float = opt(1.0, "λ of the SFT term in the hybrid objective.", ge=0)
    sft_timesteps: Literal["uniform", "logit_normal", "shifted"] = opt("logit_normal", "SFT σ sampling.")
    sft_shift: float = opt(3.0, "Shift for sft_timesteps=shifted.", gt=0)
    prior_prompts: list[str] = opt([], "On-policy prior preservation: unrelated prompts (empty = off).")
    prior_weight: float = opt(0.0, "Weight of the prior-preservation term (0 = off).", ge=0)
    prior_batch_size: int = opt(1, "Prior prompts per micro-batch.", ge=1)
    pso_form: Literal["dpo", "hinge"] = opt(
        "dpo", "pso: the pairwise loss, DPO form against the frozen starting model, or the released code's hinge."
    )
    pso_beta: float = opt(5.0, "pso: β, the margin's scale.", gt=0)
    pso_ref_weight: float = opt(0.1, "pso: γ, the weight of the reference image's error in the margin.", ge=0)
    pso_prior_weight: float = opt(0.5, "pso: λ, the weight of the plain error on the reference images.", ge=0)
    class_prompts: list[str] = opt(
        [],
        "dreambooth: prompts of the class images; empty = each training caption without the trigger word "
        "and the placeholder.",
    )
    class_images: int = opt(100, "dreambooth: class images the starting model samples before training.", ge=1)
    class_weight: float = opt(1.0, "dreambooth: λ of the class-prior term.", ge=0)


@dataclass
class LoraConfig:
    enabled: bool = opt(True, "Train a LoRA; false = full fine-tune (the teacher then copies all trainable weights).")
    rank: int = opt(16, "LoRA rank.", ge=1)
    alpha: float = opt(16.0, "LoRA alpha (scale = alpha / rank).", gt=0)
    dropout: float = opt(0.0, "LoRA dropout.", ge=0, lt=1)
    targets: list[str] | str | None = opt(None, "peft target_modules (names or a regex); null = the model's defaults.")


@dataclass
class OptimConfig:
    lr: float = opt(1e-4, "Peak learning rate (AdamW).", gt=0)
    weight_decay: float = opt(0.0, "AdamW weight decay.", ge=0)
    betas: list[float] = opt([0.9, 0.999], "AdamW betas.", ge=0, lt=1)
    eps: float = opt(1e-8, "AdamW epsilon.", gt=0)
    eight_bit: bool = opt(False, "8-bit AdamW from bitsandbytes (must be installed).")
    grad_clip: float = opt(1.0, "Clip the gradient norm to this value (0 = off).", ge=0)
    schedule: Literal["constant", "cosine"] = opt("constant", "Learning-rate schedule after warm-up.")
    warmup_steps: int = opt(0, "Linear warm-up steps.", ge=0)
    min_lr_ratio: float = opt(0.0, "Cosine: final lr as a fraction of lr.", ge=0, le=1)


@dataclass
class TrainConfig:
    output_dir: str = opt("runs/dopsd", "Run folder (never overwritten unless --overwrite / overwrite=True).")
    max_steps: int = opt(500, "Optimizer steps.", ge=1)
    batch_size: int = opt(1, "Samples per process per micro-batch.", ge=1)
    gradient_accumulation: int = opt(
        1, "Micro-batches per optimizer step (global batch = batch_size·processes·this).", ge=1
    )
    seed: int = opt(0, "Seed of everything: LoRA init, data order, captions, noise.", ge=0, lt=SEED_LIMIT)
    mixed_precision: Literal["no", "bf16", "fp16"] = opt("no", "accelerate mixed precision.")
    gradient_checkpointing: bool | Literal["auto"] = opt(
        "auto",
        "The network's gradient checkpointing (if it has one): less activation memory for one more forward. "
        "auto: `dopsd train` asks the planner (`dopsd plan`) for the configured method's peak without it on "
        "this GPU and turns it on only when that does not fit (config.yaml records the choice); off on the CPU.",
    )
    compile: bool = opt(
        False,
        "torch.compile the denoiser (in place, once per run; the first steps pay the compilation). Same outputs "
        "to float tolerance; measure before turning it on (docs/time-to-fidelity.md).",
        before=False,
    )
    checkpoint_every: int = opt(250, "Write a resumable checkpoint every n steps (0 = only at the end).", ge=0)
    keep_checkpoints: int = opt(2, "Keep the last n checkpoints.", ge=1)
    max_nonfinite: int = opt(
        5, "Abort after this many non-finite losses/gradients in a row (each one is skipped).", ge=1
    )
    fsdp: bool = opt(
        False,
        "Shard the trained network over the processes with torch's FSDP2 (fully_shard per transformer block, then "
        "the whole model): each process holds 1/N of the float32 weights, gradients, AdamW states and EMA teacher. "
        "Full fine-tunes (lora.enabled=false), with bf16 or no mixed precision. The same on the CPU (gloo) and on "
        "GPUs: start N processes (`accelerate launch --multi_gpu --num_processes N`, or `torchrun --nproc_per_node "
        "N`); with one process the model trains whole. Checkpoints and model.safetensors hold whole tensors, one "
        "ordinary file each (gathered on saving), and resume with another number of processes (the same global batch).",
    )
    device: str | None = opt(
        None, "'cpu' forces the CPU; null = accelerate's choice (choose GPUs with CUDA_VISIBLE_DEVICES)."
    )
    init_from: str | None = opt(
        None,
        "Continual tuning: start from a finished dopsd run (its folder, or its lora.safetensors / "
        "model.safetensors) of the same model; its own lineage is rebuilt. null = start from the model itself.",
    )
    init_mode: Literal["merge", "continue"] = opt(
        "merge",
        "With init_from: 'merge' folds its LoRA into the base and trains a fresh LoRA; 'continue' keeps "
        "training its LoRA (same lora.rank/alpha/targets). A full fine-tune continues from its weights either way.",
    )
    threads: int | None = opt(
        None,
        "torch CPU threads per process (torch.set_num_threads at the start of the run). null = automatic: 1 "
        "when training on the CPU on a machine with at most 4 cores, else torch's default (OMP_NUM_THREADS when "
        "set). Why: the miniature's matrices are small; on a 2-core CPU shared with other jobs a 4-step batch of 8 "
        "samples took 0.5 s with 1 thread and 4 s with 2 (threads wait for cores). On a GPU it only affects "
        "CPU-side work.",
        ge=1,
    )
    stop_when_done: bool = opt(
        False, "Stop (exit 0) once the done signal made no new low for done_patience samplings.", before=False
    )
    done_patience: int = opt(3, "With stop_when_done: sampling intervals without a new low before stopping.", ge=1)


@dataclass
class SampleConfig:
    every: int = opt(0, "Sample grids every n steps (0 = only before training and at the end).", ge=0)
    prompts: list[str] = opt([], "Fixed prompts; empty = the first distinct training captions.")
    num_prompts: int = opt(4, "How many training captions to use when prompts is empty.", ge=1)
    seeds: list[int] = opt([0, 1, 2, 3], "Fixed seeds (grid columns).", ge=0, lt=SEED_LIMIT)
    control_steps: int = opt(
        32, "Also sample at this many steps as a control (0 = off), to make few-step blur visible.", ge=0
    )
    health: bool = opt(True, "Track few-step health (dopsd.training.health) at each sampling interval.")
    done: bool = opt(True, "Done signal: the samples' distance to the training images (docs/done-signal.md).")
    done_features: str | None = opt(None, "DINOv2/CLIP/SigLIP folder for the done signal; null = colour distribution.")
    health_prompts: list[str] = opt(
        [],
        "Prompts the health signal samples (empty = method.prior_prompts, else the sample prompts). Prompts "
        "unrelated to the concept keep the concept itself from moving the signal.",
    )


@dataclass
class LogConfig:
    tensorboard: bool = opt(True, "Write TensorBoard logs to OUTPUT/logs.")
    progress: bool = opt(True, "Show a progress bar.")


@dataclass
class CacheConfig:
    enabled: bool = opt(True, "Cache frozen features (student text, teacher context, SFT latents) on disk.")
    dir: str | None = opt(None, "Cache folder; null = $DOPSD_CACHE or ~/.cache/dopsd.")


@dataclass
class Config:
    preset: str = opt("mini", "Preset the file starts from.")
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "The model and its sampling setting."})
    data: DataConfig = field(default_factory=DataConfig, metadata={"help": "The image–caption pairs."})
    method: MethodConfig = field(default_factory=MethodConfig, metadata={"help": "Objective and teacher."})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"help": "LoRA or full fine-tune."})
    optim: OptimConfig = field(default_factory=OptimConfig, metadata={"help": "Optimizer and learning rate."})
    train: TrainConfig = field(default_factory=TrainConfig, metadata={"help": "The loop, checkpoints, distribution."})
    sample: SampleConfig = field(default_factory=SampleConfig, metadata={"help": "Sample grids and few-step health."})
    log: LogConfig = field(default_factory=LogConfig, metadata={"help": "Progress bar and TensorBoard."})
    cache: CacheConfig = field(default_factory=CacheConfig, metadata={"help": "The on-disk feature cache."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)


SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "preset"]


def as_before_the_options() -> dict[str, Any]:
    """{section.key: value} of the options declared with opt(before=...): added after runs already existed, with
    the value that reproduces a run whose config.yaml does not name them."""
    out = {}
    for section in dataclasses.fields(Config):
        if section.name in SECTIONS:
            for f in dataclasses.fields(section.default_factory()):
                if "before" in f.metadata:
                    out[f"{section.name}.{f.name}"] = f.metadata["before"]
    return out

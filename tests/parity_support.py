"""Preset parity on the tiny real models: each real preset's own training settings (bf16 autocast, bf16 weights,
gradient checkpointing, optimizer, EMA teacher, buckets, and the int8 / nf4 bases users may add), with only the size
changed, run for a few steps and checked for learning (tests/test_preset_parity.py asserts; this file runs).

A cell is one preset × method (× quantized base). It runs twice from the same start: in the preset's own settings
and, as its reference, the same run in float32 (`model.dtype=float32`, `train.mixed_precision=no`). Learning is
measured on the objective of the first step's own draws (its batch, noise, σ and prior prompts), evaluated again
after the last step with the learning rate at zero: a deterministic before/after of the same loss, where the
per-step losses of a few steps are dominated by each step's new noise. The preset-precision run's drop is measured
twice: as the run itself evaluates it (its own bf16 forward), and with its model (base values, features, start and
trained weights, EMA teacher) evaluated in float32 on the reference run's trainer, which sees what it learned
without bf16's rounding of the evaluation: on the tiny FLUX.2 model that rounding alone (about 5e-6) is larger than
the whole D-OPSD drop.

docs/preset-coverage.md (tests/parity_coverage.py) is generated from the cells and the configs they run.
"""

from __future__ import annotations

import copy
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_real import _fill_pad_tokens, build_flux2, build_zimage, write_pairs  # noqa: E402

CONFIGS = ROOT / "dopsd" / "configs"
PRESETS = ("zimage-turbo", "zimage-turbo-style", "zimage-turbo-domain", "flux2-klein-4b", "flux2-klein-9b")
SIZE = 32
LORA_STEPS = 2  # the first step moves only lora_B (lora_A's gradient is zero while B is): two reach every tensor
FULL_STEPS = 10
LORA_LR = 1e-3
PRIOR_PROMPTS = ["a photo of a dog", "a bowl of fruit on a table"]
CAPTIONS = ["a red cat on a mat", "a [V] teapot on a wooden table"]
# How close the preset-precision run's drop of the first step's objective must come to the float32 run's drop.
DROP_TOLERANCE = 0.3
METHODS = {
    "sft": ["method.name=sft"],
    "dopsd": ["method.name=dopsd"],
    "dopsd_prior": ["method.name=dopsd", f"method.prior_prompts={PRIOR_PROMPTS}", "method.prior_weight=1.0"],
}
FLOAT32 = ["model.dtype=float32", "train.mixed_precision=no"]
# Settings that only run on CUDA: the GPU check's, never run here.
GPU_ONLY = {
    "model.quantize=float8": "torchao float8 weights need a CUDA GPU of compute capability 8.9+",
    "optim.eight_bit=true": "bitsandbytes' 8-bit AdamW needs CUDA",
}


@dataclass(frozen=True)
class Cell:
    preset: str
    method: str
    quantize: str = "none"

    @property
    def id(self) -> str:
        return f"{self.preset}-{self.method}" + ("" if self.quantize == "none" else f"-{self.quantize}")

    @property
    def family(self) -> str:
        return "zimage" if self.preset.startswith("zimage") else "flux2"

    @property
    def full(self) -> bool:
        return not preset_config(self.preset).lora.enabled

    @property
    def steps(self) -> int:
        return FULL_STEPS if self.full else LORA_STEPS


CELLS = [Cell(p, m) for p in PRESETS for m in METHODS] + [
    Cell(p, "dopsd", q) for p in ("zimage-turbo", "flux2-klein-4b") for q in ("int8", "nf4")
]


def preset_config(preset: str, overrides: list[str] | None = None):
    from dopsd.config import load_config

    return load_config(CONFIGS / f"{preset}.yaml", overrides or [])


def placeholders() -> SimpleNamespace:
    """Stand-ins for the tiny folders, for the coverage table (which needs no model)."""
    names = ("zimage", "zimage_wide", "flux2", "flux2_wide", "vlm", "data", "work")
    return SimpleNamespace(**{n: f"<{n}>" for n in names})


def tiny_overrides(cell: Cell, folders: SimpleNamespace) -> dict[str, tuple[str, str]]:
    """key -> (value, why): every change a cell makes to its preset besides the method; nothing else differs."""
    base = preset_config(cell.preset)
    model = getattr(folders, cell.family + ("_wide" if cell.quantize == "nf4" else ""))
    out = {
        "model.pretrained": (model, "the tiny random model of the architecture (tests/tiny_real.py)"),
        "model.height": (SIZE, "32² images instead of 1024²"),
        "model.width": (SIZE, "32² images instead of 1024²"),
        "model.max_caption_tokens": (64, "the tiny captions are short; padding to 512 would cost 8× per forward"),
        "data.path": (folders.data, "two tiny image–caption pairs"),
        "data.bucket_multiple": (
            16,
            "at 32² a multiple of 64 adds a 64² bucket (4× the area) that square images "
            "take; 16 px is the models' own step (VAE 8 × patch 2)",
        ),
        "train.max_steps": (cell.steps, "a few steps"),
        "train.device": ("cpu", "the tests' machine"),
        "train.output_dir": (f"{folders.work}/run", "a temporary folder"),
        "cache.dir": (f"{folders.work}/cache", "a temporary folder"),
        "sample.health": (False, "sampling and its health check are no part of a training step"),
        "method.train_states": (
            0,
            "every roll-out state: a few steps must move the loss measurably; one random state per step (the "
            "default) is tested by tests/test_rollout_subset.py",
        ),
    }
    if base.train.gradient_checkpointing in (True, "auto"):
        out["train.gradient_checkpointing"] = (
            True,
            "auto turns it off on a CPU; on is the recomputed path a card too small for the step without it runs",
        )
    if cell.quantize != "none":
        out["model.quantize"] = (cell.quantize, "a quantized base, as users may add to any LoRA preset")
    if cell.quantize == "nf4":
        out["model.pretrained"] = (
            model,
            "a tiny model with 128-wide layers: nf4 stores only weights of a "
            "multiple of 64·256 elements, none of the 32-wide tiny layers",
        )
    if cell.family == "zimage":
        out["model.teacher_encoder"] = (folders.vlm, "the tiny Qwen3-VL (tests/tiny_encoders.py)")
    if base.lora.enabled:
        scale = base.lora.alpha / base.lora.rank
        out["lora.rank"] = (4, "layers 32 wide; alpha/rank, the LoRA's scale, is kept")
        out["lora.alpha"] = (4 * scale, "alpha/rank, the LoRA's scale, is kept")
        out["optim.lr"] = (
            LORA_LR,
            f"{LORA_STEPS} steps must move the tiny LoRA by more than a bf16 forward resolves (at 1e-4, 4 Z-Image steps: "
            "the bf16 run sees 0.68 of float32's drop, its weights hold 1.00 of it); the presets' rates are for "
            "thousands of steps",
        )
    return out


def cell_config(cell: Cell, folders: SimpleNamespace, float32: bool = False):
    over = [f"{k}={v}" for k, (v, _) in tiny_overrides(cell, folders).items()] + METHODS[cell.method]
    return preset_config(cell.preset, over + (FLOAT32 if float32 else []))


def run_key(cell: Cell, folders: SimpleNamespace) -> str:
    """What makes two cells the same run: their training settings (the klein 4B and 9B presets differ only in the
    model folder, which is the same tiny model here)."""
    d = cell_config(cell, folders).to_dict()
    for section, key in (("train", "output_dir"), ("model", "pretrained")):
        d[section].pop(key)
    d.pop("preset"), d.pop("sample"), d.pop("log")
    return f"{getattr(folders, cell.family)}|{cell.quantize}|{d}"


# --- the tiny folders ----------------------------------------------------------------------------------------------
def widen(path: Path, family: str) -> Path:
    """The tiny model with a 128-wide transformer in place of the 32-wide one (nf4 needs 64·256-element weights)."""
    from diffusers import Flux2Transformer2DModel, ZImageTransformer2DModel
    from gpu_real_scale_tiny import TINY

    torch.manual_seed(1)
    if family == "zimage":
        build_zimage(path)
        net = ZImageTransformer2DModel(**{**TINY["zimage-turbo"]["transformer"], "dim": 128, "axes_dims": [32, 16, 16]})
        _fill_pad_tokens(net)
    else:
        build_flux2(path)
        parts = {**TINY["flux2-klein-4b"]["transformer"], "attention_head_dim": 64, "axes_dims_rope": [16] * 4}
        net = Flux2Transformer2DModel(**parts)
    shutil.rmtree(path / "transformer")
    net.save_pretrained(path / "transformer")
    return path


def build_folders(root: Path) -> SimpleNamespace:
    from tiny_encoders import build_qwen3_vl

    return SimpleNamespace(
        zimage=str(build_zimage(root / "zimage")),
        zimage_wide=str(widen(root / "zimage_wide", "zimage")),
        flux2=str(build_flux2(root / "flux2")),
        flux2_wide=str(widen(root / "flux2_wide", "flux2")),
        vlm=str(build_qwen3_vl(root / "vlm")),
        data=str(write_pairs(root / "data", CAPTIONS, SIZE, seed=7)),
        work=str(root / "work"),
    )


# --- one run ---------------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What one run of a cell showed (the trainer stays, for the cross-evaluation)."""

    trainer: Any
    loop: dict[str, Any]  # the trainer's loop state (step, data order) after prepare
    start: dict[str, torch.Tensor]  # trainable values after prepare
    frozen: dict[str, torch.Tensor]  # the other parameters' values (dequantized) after prepare
    losses: list[float] = field(default_factory=list)
    zero_grads: list[str] = field(default_factory=list)  # trainable tensors whose last gradient was all zero
    ema_error: float = 0.0  # max |shadow_after − (shadow_before + (1−d)(θ_after − shadow_before))| / tolerance
    ema_move: float = 0.0  # the largest predicted move of the last update, in units of the tolerance
    prior_changed: list[str] = field(default_factory=list)
    prior_b_nonzero: list[str] = field(default_factory=list)
    frozen_changed: list[str] = field(default_factory=list)
    changed_fraction: float = 0.0  # of trainable elements that differ from their start
    probe: float = float("nan")  # the first step's objective after the last step


def is_quantized(t: torch.Tensor) -> bool:
    from dopsd.models.quantize import is_quantized

    return is_quantized(t)


def _values(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from dopsd.models.quantize import plain

    return {n: plain(p.detach()).clone() for n, p in params.items()}


def probe(run: Run) -> float:
    """The first step's objective (same batch, noise, σ, prior prompts) at the current weights: one step from the
    loop state the run started with, at learning rate zero (its own EMA update is the only change it makes)."""
    trainer = run.trainer
    trainer.load_state_dict(copy.deepcopy(run.loop))
    for group in trainer.optimizer.param_groups:
        group["lr"] = 0.0
    return float(trainer.train_step()["loss"])


def run(cfg) -> Run:
    from dopsd.data.dataset import load_dataset
    from dopsd.training.trainer import Trainer

    trainer = Trainer(cfg, Path(cfg.train.output_dir), load_dataset(cfg.data, cfg.model))
    trainer.prepare()
    trainable = trainer.trainable
    frozen = {n: p for n, p in trainer.network.named_parameters() if n not in trainable}
    out = Run(trainer, copy.deepcopy(trainer.state_dict()), _values(trainable), _values(frozen))
    for i in range(cfg.train.max_steps):
        last = i == cfg.train.max_steps - 1
        shadow = trainer.teacher.shadow if trainer.teacher is not None and trainer.teacher.mode == "ema" else None
        before = {n: s.detach().double() for n, s in shadow.items()} if last and shadow else None
        out.losses.append(float(trainer.train_step()["loss"]))
        if before is not None:
            _ema_check(out, trainer, before)
    out.zero_grads = [n for n, p in trainable.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    now = _values(trainable)
    total = sum(v.numel() for v in now.values())
    out.changed_fraction = sum(int((now[n] != out.start[n]).sum()) for n in now) / total
    out.frozen_changed = [n for n, v in _values(frozen).items() if not torch.equal(v, out.frozen[n])]
    if trainer.prior is not None:
        prior = trainer.prior.shadow
        out.prior_changed = [n for n in prior if not torch.equal(prior[n].float(), out.start[n].float())]
        out.prior_b_nonzero = [n for n in prior if "lora_B" in n and bool(prior[n].abs().sum() > 0)]
    out.probe = probe(out)
    return out


def _ema_check(out: Run, trainer, before: dict[str, torch.Tensor]) -> None:
    """The last step's EMA update against θ̄ + (1−d)(θ − θ̄), in float64, to the shadow dtype's rounding."""
    d = trainer.teacher.decay
    worst = move = 0.0
    for n, p in trainer.trainable.items():
        after = trainer.teacher.shadow[n].detach().double()
        step = (1 - d) * (p.detach().double() - before[n])
        eps = torch.finfo(trainer.teacher.shadow[n].dtype).eps
        tol = 2 * eps * (before[n].abs() + step.abs()) + 1e-30
        worst = max(worst, float(((after - (before[n] + step)).abs() / tol).max()))
        move = max(move, float((step.abs() / tol).max()))
    out.ema_error, out.ema_move = worst, move


def cross_probe(reference: Run, other: Run) -> tuple[float, float]:
    """The first step's objective of the other run's model before and after its steps, evaluated in float32 on the
    reference run's trainer: its features (computed by its own encoders), its base values (bf16-rounded weights,
    unless quantized: both bases then hold the same quantized values), its starting and trained weights, its EMA
    teacher and its prior."""
    ref, oth = reference.trainer, other.trainer

    def load(values: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            for n, p in ref.trainable.items():
                p.copy_(values[n].to(p.dtype))
            for shadow, source in ((ref.teacher, teacher), (ref.prior, other.start)):
                if shadow is not None and shadow.mode != "live":
                    for n, s in shadow.shadow.items():
                        s.copy_(source[n].to(s.dtype))
        return probe(reference)

    ref.feats = oth.feats  # its caption, teacher and latent features, which the bf16 encoders computed
    with torch.no_grad():
        for n, p in ref.network.named_parameters():
            if n in other.frozen and not is_quantized(p):
                p.copy_(other.frozen[n].to(p.dtype))
    before = load(other.start, other.start)
    trained = {n: p.detach() for n, p in oth.trainable.items()}
    ema = oth.teacher.shadow if oth.teacher is not None and oth.teacher.mode == "ema" else other.start
    return before, load(trained, ema)


@dataclass
class Pair:
    """A cell's two runs and what they learned, each drop measured on the first step's objective."""

    cell: Cell
    own: Run  # in the preset's own precision
    ref: Run  # float32
    before: float  # the own run's model at its start, evaluated in float32
    after: float  # … after its steps

    @property
    def drop32(self) -> float:
        """What the float32 run learned."""
        return self.ref.losses[0] - self.ref.probe

    @property
    def learned(self) -> float:
        """What the own run learned, evaluated in float32 on its own base and features."""
        return self.before - self.after

    @property
    def raw(self) -> float:
        """What the own run learned as it sees it: evaluated in its own precision."""
        return self.own.losses[0] - self.own.probe

    @property
    def floor(self) -> float:
        """How far its own precision's evaluation of its start is from float32's: the resolution of `raw`."""
        return abs(self.own.losses[0] - self.before)

    def summary(self) -> str:
        d = self.drop32
        return (
            f"{self.cell.id}: float32 {self.ref.losses[0]:.4g} -> {self.ref.probe:.4g}; own precision learned "
            f"{self.learned / d:.3f} of float32's drop (float32 evaluation), {self.raw / d:.3f} as it sees it "
            f"(floor {self.floor / d:.3f}); weights changed {self.own.changed_fraction:.3f}"
        )


PAIRS: dict[str, Pair] = {}


def run_pair(cell: Cell, folders: SimpleNamespace) -> Pair:
    """The cell's two runs (cells of identical settings share them)."""
    key = run_key(cell, folders)
    if key not in PAIRS:
        ref = run(cell_config(cell, folders, float32=True))
        own = run(cell_config(cell, folders))
        before, after = cross_probe(ref, own)
        PAIRS[key] = Pair(cell, own, ref, before, after)
    return PAIRS[key]


# --- the command line: the 12-step comparison -------------------------------------------------------------
CLI_STEPS = 12


def cli_losses(preset: str, folders: SimpleNamespace, out: Path, float32: bool) -> list[float]:
    """`dopsd train PRESET …`: a D-OPSD LoRA run of the preset on its tiny model, 12 steps, lr 1e-3, rank 4, 32², no
    prior, in the preset's own precision or in float32; the per-step losses from the run folder's losses.jsonl."""
    import json

    from dopsd.cli import main

    family = "zimage" if preset.startswith("zimage") else "flux2"
    argv = ["train", preset, f"model.pretrained={getattr(folders, family)}", f"data.path={folders.data}"]
    argv += [f"model.teacher_encoder={folders.vlm}"] if family == "zimage" else []
    argv += [f"model.height={SIZE}", f"model.width={SIZE}", "model.max_caption_tokens=64", "data.bucket_multiple=16"]
    argv += [f"train.max_steps={CLI_STEPS}", "train.batch_size=2", "train.device=cpu", "train.checkpoint_every=0"]
    argv += ["lora.rank=4", "lora.alpha=8", "optim.lr=1e-3", "method.prior_prompts=[]", "method.prior_weight=0"]
    argv += ["sample.health=false", "sample.control_steps=0", "sample.seeds=[0]", "log.progress=false"]
    argv += ["log.tensorboard=false", f"cache.dir={out / 'cache'}", f"train.output_dir={out / 'run'}"]
    assert main(argv + (FLOAT32 if float32 else [])) == 0
    return [json.loads(line)["loss"] for line in (out / "run" / "losses.jsonl").read_text().splitlines()]

"""A full fine-tune of a bf16 model trains: float32 master weights and a float32 EMA teacher under bf16 autocast.

The run is the domain preset (dopsd/configs/zimage-turbo-domain.yaml: full fine-tune, lr 1e-5, EMA decay 0.9999,
bf16 weights, bf16 autocast, gradient checkpointing) on the tiny Z-Image of tests/tiny_real.py, only the size and
the run length changed. With bf16 weights, 10 AdamW steps at lr 1e-5 changed 6% of them and the bf16 EMA not one
value (a 1e-4 lerp rounds away), so the teacher stayed the base model for ever.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_encoders import build_qwen3_vl
from tiny_real import build_zimage, write_pairs

import dopsd
from dopsd.config import load_config
from dopsd.data.dataset import load_dataset
from dopsd.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = ROOT / "dopsd" / "configs" / "zimage-turbo-domain.yaml"
CAPTIONS = ["a red cat", "a blue dog in the park", "a photo of a red cat on a mat", "turn the sky orange"]
STEPS = 10


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage")
    return {
        "zi": build_zimage(root / "zi"),
        "vl": build_qwen3_vl(root / "vl"),
        "data": write_pairs(root / "data", CAPTIONS, 32, seed=7),
    }


def domain_config(models, out: Path, *extra: str):
    """The domain preset at 32² for a few steps on the CPU; everything that decides how it trains is the preset's."""
    return load_config(
        DOMAIN,
        [
            f"model.pretrained={models['zi']}",
            f"model.teacher_encoder={models['vl']}",
            f"data.path={models['data']}",
            "model.height=32",
            "model.width=32",
            "model.max_caption_tokens=32",
            "data.buckets=false",
            f"train.max_steps={STEPS}",
            "train.batch_size=2",
            "train.device=cpu",
            "train.checkpoint_every=5",
            "sample.every=0",
            "sample.control_steps=0",
            "sample.seeds=[0]",
            "log.progress=false",
            "log.tensorboard=false",
            f"cache.dir={out.parent / 'cache'}",
            f"train.output_dir={out}",
            *extra,
        ],
    )


def spacing(x: torch.Tensor) -> torch.Tensor:
    """The float32 spacing (1 ulp) at each value of x."""
    a = x.abs().float()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def test_the_domain_preset_is_a_bf16_full_fine_tune(models, tmp_path):
    cfg = domain_config(models, tmp_path / "run")
    assert not cfg.lora.enabled and cfg.model.dtype == "bfloat16" and cfg.train.mixed_precision == "bf16"
    assert cfg.optim.lr == 1e-5 and cfg.method.teacher == "ema" and cfg.method.ema_decay == 0.9999


def test_ten_steps_change_the_weights_and_move_the_ema_as_its_decay_predicts(models, tmp_path):
    cfg = domain_config(models, tmp_path / "run")
    trainer = Trainer(cfg, tmp_path / "run", load_dataset(cfg.data, cfg.model))
    trainer.prepare()
    trainable, shadow, d = trainer.trainable, trainer.teacher.shadow, trainer.teacher.decay
    assert all(p.dtype == torch.float32 for p in trainable.values())  # float32 masters of the bf16 model
    assert all(v.dtype == torch.float32 for v in shadow.values())
    assert trainer.network.x_pad_token.dtype == torch.float32
    start = {k: p.detach().clone() for k, p in trainable.items()}
    first = {k: v.clone() for k, v in shadow.items()}
    exact = {k: v.double() for k, v in shadow.items()}  # the EMA of the same student, in float64
    for _ in range(STEPS):
        before = {k: v.clone() for k, v in shadow.items()}
        record = trainer.train_step()
        assert not record["skipped"]
        for k, p in trainable.items():
            theta = p.detach().double()
            # this step's move is (1 − d)(θ − θ̄), carried out in float32: off by at most one float32 ulp
            predicted = before[k].double() + (1 - d) * (theta - before[k].double())
            assert ((shadow[k].double() - predicted).abs() <= spacing(predicted)).all(), k
            exact[k] = exact[k] + (1 - d) * (theta - exact[k])
    n = sum(p.numel() for p in trainable.values())
    changed = sum(int((p.detach() != start[k]).sum()) for k, p in trainable.items())
    moved = sum(int((shadow[k] != first[k]).sum()) for k in shadow)
    print(f"weights changed: {changed / n:.3f}; EMA values moved: {moved / n:.3f} of {n}")
    assert changed / n >= 0.9
    # The EMA moved, as far as float32 allows: a step whose move is under half an ulp rounds away, so the shadow
    # trails the exact EMA by at most half an ulp per step (measured: 89% of its values moved in 10 steps).
    assert moved / n >= 0.5
    for k in shadow:
        ulp = spacing(torch.maximum(shadow[k].double().abs(), exact[k].abs()))  # measured: at most 2.6 ulps
        assert ((shadow[k].double() - exact[k]).abs() <= STEPS * ulp / 2).all(), k
    total = sum(float((exact[k] - first[k].double()).norm() ** 2) for k in shadow) ** 0.5
    assert total > 0


def test_a_resumed_full_fine_tune_is_bit_exact_and_saves_the_models_dtype(models, tmp_path):
    full = dopsd.train(domain_config(models, tmp_path / "full"))
    ckpts = full.output_dir / "checkpoints"
    trained = load_file(str(ckpts / "step-0000010" / "trainable.safetensors"))
    assert all(v.dtype == torch.float32 for v in trained.values())  # checkpoints keep the float32 masters
    final = load_file(str(full.weights))
    assert full.weights.name == "model.safetensors"
    base = load_file(str(Path(models["zi"]) / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(final) == set(base)
    assert {v.dtype for v in final.values()} == {torch.bfloat16}  # the model's dtype (model.dtype), as loaded
    assert all(torch.equal(final[k], trained[k].to(final[k].dtype)) for k in trained)

    cut = tmp_path / "cut"  # the same run as if it had stopped right after its step-5 checkpoint
    shutil.copytree(full.output_dir, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000010")
    for name in ("model.safetensors", "lora_config.json", "summary.json"):
        (cut / name).unlink()
    resumed = dopsd.train(domain_config(models, cut), resume=True)
    assert resumed.summary["resumed_from"].endswith("step-0000005")
    assert resumed.losses == full.losses
    for name in ("trainable", "teacher", "optimizer"):
        a = load_file(str(ckpts / "step-0000010" / f"{name}.safetensors"))
        b = load_file(str(cut / "checkpoints" / "step-0000010" / f"{name}.safetensors"))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    again = load_file(str(resumed.weights))
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_the_plan_counts_float32_masters_and_their_shards_per_gpu():
    """`dopsd plan` of a bf16 full fine-tune: 4 bytes per weight for the weights, the EMA and each gradient, 8 for
    AdamW; with train.fsdp over N GPUs each holds 1/N of those (dopsd.planner.sharded)."""
    from dopsd.planner.plan import plan

    cfg = load_config("mini", ["lora.enabled=false", "model.dtype=bfloat16", "train.mixed_precision=bf16"])
    result = plan(cfg, search=False)
    n = result["params"]["trainable"]
    for name, m in result["methods"].items():
        parts = {k: v * 2**30 / n for k, v in m["breakdown_gb"].items()}
        assert parts["trainable_weights"] == pytest.approx(4) and parts["gradients"] == pytest.approx(4)
        assert parts["optimizer_state"] == pytest.approx(8, rel=1e-3)
        assert parts["ema_teacher"] == (0 if name == "sft" else pytest.approx(4))
        per_gpu = m["fsdp_run_peak_gb_per_gpu"]
        sharded = (16 + parts["ema_teacher"] + parts["prior_shadow"]) * n / 2**30
        # from N to 2N GPUs each one sheds half of its shard, the rest of its peak unchanged
        assert per_gpu["2"] - per_gpu["4"] == pytest.approx(sharded / 4, rel=0.02)
        assert per_gpu["4"] - per_gpu["8"] == pytest.approx(sharded / 8, rel=0.02)
    lora = plan(load_config("mini"), search=False)
    assert all("fsdp_run_peak_gb_per_gpu" not in m for m in lora["methods"].values())

"""`dopsd plan` against the real trainer: predicted vs measured peak memory on the CPU (within 15 %), FLOPs vs
torch's counter on a real step, the depth extrapolation vs the whole network, quantization bytes, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_concept_folder
from tiny_encoders import build_qwen3_vl
from tiny_real import build_flux2, build_zimage, train_config, write_pairs

from dopsd.config import load_config
from dopsd.planner.validate import error, measured_peak, predicted_peak

TOLERANCE = 0.15
CAPTIONS = ["a red cat", "a [V] teapot on a wooden table"]


def mini_config(root: Path, data: Path, method: str, lora: bool):
    extra = [
        f"data.path={data}",
        f"train.output_dir={root / 'run'}",
        f"cache.dir={root / 'cache'}",
        "log.progress=false",
        "log.tensorboard=false",
        "sample.every=0",
        "sample.health=false",
        "train.checkpoint_every=0",
        f"lora.enabled={str(lora).lower()}",
        f"method.name={'sft' if method == 'sft' else 'dopsd'}",
    ]
    if method == "dopsd_prior":
        extra += ["method.prior_prompts=['a red circle', 'a blue square']", "method.prior_weight=1.0"]
    return load_config("mini", extra)


def check(cfg, out: Path, overrides=None) -> float:
    measured, lengths = measured_peak(cfg, out)
    predicted = predicted_peak(cfg, overrides(lengths) if overrides else None)
    err = error(predicted, measured)
    print(
        f"{cfg.model.family} {cfg.method.name} lora={cfg.lora.enabled}: measured {measured / 2**20:.3f} MiB, "
        f"predicted {predicted / 2**20:.3f} MiB ({err:+.1%})"
    )
    assert abs(err) <= TOLERANCE, (predicted, measured)
    return err


@pytest.mark.parametrize(
    "method,lora", [("sft", True), ("sft", False), ("dopsd", True), ("dopsd", False), ("dopsd_prior", True)]
)
def test_prediction_matches_the_trainer_on_the_miniature(tmp_path, method, lora):
    """The shipped turbo, preset mini (batch 8, 4-step roll-out), one real train_step measured on the CPU."""
    data = write_concept_folder(tmp_path / "data", n=8)
    check(mini_config(tmp_path, data, method, lora), tmp_path / "run")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_plan")
    return {
        "root": root,
        "zimage": build_zimage(root / "zi"),
        "vlm": build_qwen3_vl(root / "vl"),
        "flux2": build_flux2(root / "fl"),
    }


def zimage_lengths(lengths):
    """Z-Image's contexts have the captions' own lengths: plan for the ones the run had."""
    out = {"max_caption_tokens": lengths["student"]["cap_feats"]}
    if "teacher" in lengths:
        out["teacher_max_tokens"] = lengths["teacher"]["cap_feats"]
    return out


@pytest.mark.parametrize("method,lora", [("sft", True), ("sft", False), ("dopsd", True), ("dopsd", False)])
def test_prediction_matches_the_trainer_on_tiny_zimage(tiny, tmp_path, method, lora):
    """Tiny Z-Image with the VLM teacher and gradient checkpointing (preset zimage-turbo)."""
    data = write_pairs(tmp_path / "data", CAPTIONS, 32, seed=7)
    cfg = train_config(
        "zimage-turbo",
        tmp_path,
        data,
        32,
        f"model.pretrained={tiny['zimage']}",
        f"model.teacher_encoder={tiny['vlm']}",
        f"method.name={method}",
        f"lora.enabled={lora}",
        "sample.health=false",
    )
    assert cfg.train.gradient_checkpointing
    check(cfg, tmp_path / "run", zimage_lengths)


@pytest.mark.parametrize("method,lora", [("sft", True), ("sft", False), ("dopsd", True), ("dopsd", False)])
def test_prediction_matches_the_trainer_on_tiny_klein(tiny, tmp_path, method, lora):
    """Tiny FLUX.2-klein with the reference-image teacher (its tokens appended after the noisy ones)."""
    data = write_pairs(tmp_path / "data", CAPTIONS, 64, seed=7)
    cfg = train_config(
        "flux2-klein-4b",
        tmp_path,
        data,
        64,
        f"model.pretrained={tiny['flux2']}",
        f"method.name={method}",
        f"lora.enabled={lora}",
        "sample.health=false",
    )
    check(cfg, tmp_path / "run")


@pytest.mark.parametrize("method", ["sft", "dopsd"])
def test_compute_follows_the_counted_flops_of_a_real_step(tmp_path, method):
    """The plan's FLOPs per step (its formula over the measured calls) against torch's FLOP counter around the
    trainer's real train_step (miniature, CPU)."""
    from dopsd.bench.cost import count_flops
    from dopsd.data.dataset import load_dataset
    from dopsd.models.registry import plan_spec
    from dopsd.planner.plan import Planner, choice_from_config, compute
    from dopsd.training.trainer import Trainer

    data = write_concept_folder(tmp_path / "data", n=8)
    cfg = mini_config(tmp_path, data, method, True)
    trainer = Trainer(cfg, tmp_path / "run", load_dataset(cfg.data, cfg.model))
    trainer.prepare()
    trainer.train_step()
    counted = count_flops(trainer.train_step)
    planner = Planner(cfg, plan_spec(cfg.model), target="cpu", exact=True)
    predicted = compute(planner, choice_from_config(cfg))["per_step_tflops"][method] * 1e12
    assert predicted == pytest.approx(counted, rel=0.02), (predicted, counted)


@pytest.mark.parametrize("preset", ["zimage-turbo", "flux2-klein-4b"])
def test_depth_extrapolation_matches_the_whole_network(preset):
    """Phases measured with 2 and 3 blocks and extrapolated equal the whole full-size network's (256², meta)."""
    from dopsd.models.registry import plan_spec
    from dopsd.planner.measure import Setting, measure

    cfg = load_config(preset)
    spec = plan_spec(cfg.model, preset)
    t = spec.lora_targets
    setting = Setting(256, 256, 1, 1, True, 16, 16.0, tuple(t) if isinstance(t, list) else t, "gpu", "no")
    parts = measure(spec, setting, exact=False, phases=("rollout", "sft"))
    whole = measure(spec, setting, exact=True, phases=("rollout", "sft"))
    for name in ("rollout", "sft"):
        assert parts[name].peak == pytest.approx(whole[name].peak, rel=0.01), name
        assert parts[name].flops == pytest.approx(whole[name].flops, rel=1e-6), name


def test_quantized_bytes_per_scheme():
    from dopsd.planner.resident import quantized_bytes

    shape = (10240, 3840)  # Z-Image's feed-forward w1
    n = 10240 * 3840
    assert quantized_bytes(shape, "none", torch.bfloat16) == 2 * n
    # torchao's storage (tests/test_quantize.py compares these with the quantized tensors themselves)
    assert quantized_bytes(shape, "int8", torch.bfloat16) == n + 10240 * 5  # fp32 scale + int8 zero point per row
    assert quantized_bytes(shape, "float8", torch.bfloat16) == n + 10240 * 4
    nf4 = quantized_bytes(shape, "nf4", torch.bfloat16)
    assert nf4 / n == pytest.approx(0.5 + 1 / 64 + 2 / (64 * 256), rel=1e-3)  # codes + block scales + 2nd level


def test_quantized_base_shrinks_the_frozen_weights_of_zimage():
    from dopsd.models.registry import plan_spec
    from dopsd.planner.plan import Choice, Planner

    cfg = load_config("zimage-turbo")
    planner = Planner(cfg, plan_spec(cfg.model, "zimage-turbo"))
    frozen = {q: planner.resident(Choice(1024, 1024, 1, True, 64, False, q)).frozen for q in ("none", "int8", "nf4")}
    assert 1.8 < frozen["none"] / frozen["int8"] < 2.0  # Linear weights 2 → 1 byte, the rest stays bf16
    assert 3.0 < frozen["none"] / frozen["nf4"] < 4.0
    eight_bit = planner.resident(Choice(1024, 1024, 1, True, 64, True, "none"))
    fp32 = planner.resident(Choice(1024, 1024, 1, True, 64, False, "none"))
    assert fp32.optimizer / eight_bit.optimizer == pytest.approx(4.0, rel=0.05)  # fp32 LoRA states → 8-bit


def test_cli_json_on_the_miniature(capsys):
    from dopsd.cli import main

    assert main(["plan", "mini", "--json", "--no-search"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"].startswith("miniature") and plan["resolution"] == [24, 24]
    for method in ("sft", "dopsd", "dopsd_prior"):
        entry = plan["methods"][method]
        assert entry["peak_gb"] > 0 and entry["tflops_per_step"] > 0 and set(entry["fits"]) == {"16", "24", "48", "80"}
    assert plan["methods"]["dopsd"]["peak_gb"] > plan["methods"]["sft"]["peak_gb"]  # + the EMA shadow
    assert plan["compute"]["ratio_dopsd_sft"] == pytest.approx(
        plan["compute"]["K"] * (1 + plan["compute"]["teacher_fwd_tflops"] / plan["compute"]["student_fwd_bwd_tflops"])
    )
    assert plan["unseen"]


def test_cli_refuses_bad_input_with_one_message(capsys):
    from dopsd.cli import main

    assert main(["plan", "zimage-turbo", "model.height=1000"]) != 0
    err = capsys.readouterr().err
    assert "model.height" in err and "internal error" not in err
    assert main(["plan", "mini", "--caption-tokens", "0"]) != 0
    err = capsys.readouterr().err
    assert "--caption-tokens" in err and "internal error" not in err
    assert main(["plan", "mini", "lora.enabled=false", "--quantize", "nf4"]) != 0
    err = capsys.readouterr().err
    assert "needs LoRA" in err and "internal error" not in err

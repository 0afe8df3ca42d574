"""`dopsd train` on the miniature: end to end (CLI + sample), caching, guards, equivalent gradient paths."""

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from safetensors.torch import load_file

import dopsd
from dopsd import cli
from dopsd.mini.adapter import tiny_random_adapter
from dopsd.training.api import OutputExistsError
from dopsd.training.trainer import TrainingAborted


def run_cli(tmp_path, data, model, name, *overrides):
    out = tmp_path / name
    args = [
        "train",
        "mini",
        f"data.path={data}",
        f"model.pretrained={model}",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "sample.seeds=[0,1]",
        "sample.control_steps=6",
        "log.progress=false",
        f"cache.dir={tmp_path / 'cache'}",
        "optim.lr=3e-2",
        "model.teacher_context=reference",
        "lora.rank=4",
        *overrides,
    ]
    assert cli.main(args) == 0
    return out


def pixels(path):
    return np.asarray(Image.open(path)).astype(int)


@pytest.mark.parametrize("method", ["dopsd", "sft"])
def test_train_cli_end_to_end_and_sample_uses_the_lora(tmp_path, concept_data, tiny_mini, method, capsys):
    out = run_cli(tmp_path, concept_data, tiny_mini, method, f"method.name={method}")
    printed = capsys.readouterr().out
    assert f"trained: {method} on mini" in printed and "loss:" in printed
    for name in (
        "config.yaml",
        "lora.safetensors",
        "lora_config.json",
        "summary.json",
        "losses.jsonl",
        "samples/step-0000000_4steps.png",
        "samples/final_4steps.png",
        "samples/final_6steps.png",
    ):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 4 and summary["data"]["images"] == 4
    assert 0.0 < summary["health"]["health"] < 2.0  # few-step health measured at the end (dopsd.training.health)
    records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    assert (method in records[0]) and ("sft" in records[0]) == (method == "sft")
    lora = load_file(str(out / "lora.safetensors"))
    assert lora and any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())  # it learned
    # `dopsd sample` with the run's LoRA reproduces the trainer's final grid; without it, the starting grid.
    assert cli.main(["sample", str(out), "--seeds", "0", "1", "--out", str(tmp_path / "with.png")]) == 0
    assert cli.main(["sample", str(out), "--no-lora", "--seeds", "0", "1", "--out", str(tmp_path / "without.png")]) == 0
    with_lora, without = pixels(tmp_path / "with.png"), pixels(tmp_path / "without.png")
    assert np.abs(with_lora - pixels(out / "samples/final_4steps.png")).max() <= 1
    assert np.abs(without - pixels(out / "samples/step-0000000_4steps.png")).max() <= 1
    assert np.abs(with_lora - without).mean() > 0.5  # the LoRA changes the samples
    assert (
        cli.main(["sample", str(out), "--lora-scale", "0", "--seeds", "0", "1", "--out", str(tmp_path / "s0.png")]) == 0
    )
    assert np.abs(pixels(tmp_path / "s0.png") - without).max() <= 1  # strength 0 = no LoRA


def test_cache_is_reused_keyed_by_content_and_encoders_are_released(tmp_path, concept_data):
    a = tiny_random_adapter(0, teacher_context="reference")
    seen = []
    first = dopsd.train(
        tiny_config(tmp_path, concept_data, **{"train.output_dir": tmp_path / "a"}),
        adapter=a,
        callback=lambda trainer, record: seen.append((trainer.step, record["step"])),
    )
    assert seen == [(1, 1), (2, 2), (3, 3), (4, 4)]  # the API's per-step hook
    assert first.summary["cache"]["misses"] > 0 and first.summary["cache"]["hits"] == 0
    assert a.encoder is None  # released before the loop
    with pytest.raises(RuntimeError, match="released"):
        a.student_contexts(["a red circle"])
    second = dopsd.train(
        tiny_config(tmp_path, concept_data, **{"train.output_dir": tmp_path / "b"}),
        adapter=tiny_random_adapter(0, teacher_context="reference"),
    )
    assert second.summary["cache"] == {"hits": first.summary["cache"]["misses"], "misses": 0}
    assert second.losses == first.losses  # cached features give the same training
    # Other encoder weights or another teacher path must not reuse these features.
    other = dopsd.train(
        tiny_config(tmp_path, concept_data, **{"train.output_dir": tmp_path / "c"}),
        adapter=tiny_random_adapter(1, teacher_context="reference"),
    )
    assert other.summary["cache"]["hits"] == 0
    vlm = dopsd.train(
        tiny_config(tmp_path, concept_data, **{"train.output_dir": tmp_path / "d"}),
        adapter=tiny_random_adapter(0, teacher_context="vlm"),
    )
    assert vlm.summary["cache"]["hits"] < first.summary["cache"]["misses"]  # student features shared, teacher not
    assert vlm.losses != first.losses


def test_existing_output_folder_is_not_overwritten(tmp_path, concept_data, capsys):
    cfg = tiny_config(tmp_path, concept_data, **{"train.max_steps": 2})
    dopsd.train(cfg, adapter=tiny_random_adapter(0, teacher_context="reference"))
    out = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputExistsError, match="--overwrite"):
        dopsd.train(cfg, adapter=tiny_random_adapter(0, teacher_context="reference"))
    assert cli.main(["train", str(out / "config.yaml")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    (out / "marker.txt").write_text("old run")
    dopsd.train(cfg, overwrite=True, adapter=tiny_random_adapter(0, teacher_context="reference"))
    assert not (out / "marker.txt").exists() and (out / "lora.safetensors").is_file()
    (aside,) = tmp_path.glob("run.replaced-*")  # the earlier run was moved aside, not deleted
    assert (aside / "marker.txt").read_text() == "old run"


def test_nonfinite_steps_are_skipped_then_the_run_aborts_keeping_the_last_good_checkpoint(tmp_path, concept_data):
    cfg = tiny_config(
        tmp_path,
        concept_data,
        **{
            "optim.lr": 1e30,
            "optim.grad_clip": 0.0,
            "train.max_steps": 20,
            "train.checkpoint_every": 1,
            "train.max_nonfinite": 3,
        },
    )
    with warnings.catch_warnings(record=True) as caught, pytest.raises(TrainingAborted, match="3 non-finite steps"):
        warnings.simplefilter("always")
        dopsd.train(cfg, adapter=tiny_random_adapter(0, teacher_context="reference"))
    skipped = [str(w.message) for w in caught if "non-finite" in str(w.message)]
    assert len(skipped) == 3 and "step skipped" in skipped[0]
    out = tmp_path / "run"
    records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    good = [r for r in records if not r["skipped"]]
    assert [r["skipped"] for r in records[-3:]] == [True, True, True] and good  # finite steps first, then the streak
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert checkpoints[-1] == f"step-{good[-1]['step']:07d}"  # nothing written during the bad streak
    assert not (out / "lora.safetensors").exists()


def _train(tmp_path, data, name, **overrides):
    cfg = tiny_config(
        tmp_path,
        data,
        **{
            "train.output_dir": tmp_path / name,
            "method.name": "hybrid",
            "method.prior_prompts": ["a red circle", "a blue square", "a green plus"],
            "method.prior_weight": 0.5,
            "train.max_steps": 3,
            "optim.eps": 1e-6,  # above float noise: tiny gradients must not flip signs
            **overrides,
        },
    )
    result = dopsd.train(cfg, adapter=tiny_random_adapter(0, teacher_context="reference"))
    return result, load_file(str(result.weights))


def test_per_step_backward_accumulated_backward_and_gradient_accumulation_agree(tmp_path, concept_data):
    ref, ref_w = _train(tmp_path, concept_data, "per_step", **{"method.prior_batch_size": 2})
    acc, acc_w = _train(
        tmp_path, concept_data, "accumulate", **{"method.per_step_backward": False, "method.prior_batch_size": 2}
    )
    micro, micro_w = _train(
        tmp_path, concept_data, "micro", **{"train.batch_size": 1, "train.gradient_accumulation": 2}
    )
    assert {"dopsd", "sft", "prior"} <= set(ref.history[0])
    for other, weights in ((acc, acc_w), (micro, micro_w)):
        np.testing.assert_allclose(other.losses, ref.losses, rtol=1e-4)
        for k in ref_w:
            torch.testing.assert_close(weights[k], ref_w[k], rtol=1e-4, atol=1e-6)
    changed = _train(tmp_path, concept_data, "other_seed", **{"train.seed": 1, "method.prior_batch_size": 2})[0]
    assert not np.allclose(changed.losses, ref.losses, rtol=1e-4)  # the comparison can fail


def test_teacher_modes_full_finetune_tensorboard_and_interval_samples(tmp_path, concept_data, tiny_mini):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ema, _ = _train(tmp_path, concept_data, "ema", **{"method.name": "dopsd", "method.teacher": "ema"})
    base, _ = _train(tmp_path, concept_data, "base", **{"method.name": "dopsd", "method.teacher": "base"})
    ema_t = load_file(str(ema.output_dir / "checkpoints/step-0000002/teacher.safetensors"))
    base_t = load_file(str(base.output_dir / "checkpoints/step-0000002/teacher.safetensors"))
    assert any(v.abs().max() > 0 for k, v in ema_t.items() if "lora_B" in k)  # the EMA follows the student
    assert all(v.abs().max() == 0 for k, v in base_t.items() if "lora_B" in k)  # base = the adapter off
    out = run_cli(
        tmp_path,
        concept_data,
        tiny_mini,
        "full",
        "lora.enabled=false",
        "sample.every=2",
        "optim.lr=1e-3",
        "method.teacher=base",
        "method.prior_prompts=[a red circle]",
        "method.prior_weight=1.0",
    )
    assert (out / "model.safetensors").is_file() and not (out / "lora.safetensors").exists()
    assert (out / "samples/step-0000002_4steps.png").is_file() and (out / "samples/step-0000002_6steps.png").is_file()
    events = EventAccumulator(str(out / "logs")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/grad_norm", "train/dopsd", "train/prior", "rollout/step0_gap"} <= tags
    assert len(events.Scalars("train/loss")) == 4 and events.Tags()["images"]
    assert cli.main(["sample", str(out), "--seeds", "0", "1", "--out", str(tmp_path / "full-grid.png")]) == 0
    assert np.abs(pixels(tmp_path / "full-grid.png") - pixels(out / "samples/final_4steps.png")).max() <= 1


def test_eight_bit_adam_needs_bitsandbytes(tmp_path, concept_data):
    import importlib.util

    from dopsd.config import ConfigError

    cfg = tiny_config(tmp_path, concept_data, **{"optim.eight_bit": True, "train.max_steps": 1})
    if importlib.util.find_spec("bitsandbytes") is None:
        with pytest.raises(ConfigError, match="pip install bitsandbytes"):
            dopsd.train(cfg, adapter=tiny_random_adapter(0, teacher_context="reference"))
    else:
        assert dopsd.train(cfg, adapter=tiny_random_adapter(0, teacher_context="reference")).steps == 1


def test_shipped_turbo_trains_from_the_example_config_and_samples(tmp_path, concept_data):
    """The documented example (shipped 4-step turbo, prior preservation) end to end on a folder of images."""
    from pathlib import Path

    example = Path(__file__).resolve().parent.parent / "dopsd" / "configs" / "mini.yaml"
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                str(example),
                f"data.path={concept_data}",
                f"train.output_dir={out}",
                "train.max_steps=3",
                "train.batch_size=4",
                "sample.control_steps=8",
                "sample.seeds=[0,1]",
                "log.progress=false",
                f"cache.dir={tmp_path / 'cache'}",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pretrained"] == "turbo" and "turbo" in summary["what"] and summary["steps"] == 3
    records = [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["dopsd"]) and np.isfinite(r["prior"]) for r in records)
    assert cli.main(["sample", str(out), "--seeds", "0", "1", "--out", str(tmp_path / "grid.png")]) == 0
    assert np.abs(pixels(tmp_path / "grid.png") - pixels(out / "samples/final_4steps.png")).max() <= 1

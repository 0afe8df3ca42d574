"""A run that did not succeed says so: summary.json `status`, a non-zero exit, and honest "last good checkpoint"s."""

import json
import warnings

import pytest
from conftest import tiny_config

import dopsd
from dopsd import cli
from dopsd.config import ConfigError
from dopsd.mini import world
from dopsd.mini.adapter import tiny_random_adapter
from dopsd.training.trainer import TrainingAborted


def test_a_diverged_run_that_samples_noise_is_unhealthy_and_exits_non_zero(tmp_path, capsys):
    """The shipped turbo at a learning rate 100× the preset's: the loss stays finite, the samples turn to noise."""
    data = tmp_path / "data"
    world.write_concept_dataset(data, "orange")
    out = tmp_path / "run"
    code = cli.main(
        [
            "train",
            "mini",
            f"data.path={data}",
            f"train.output_dir={out}",
            "optim.lr=0.05",
            "train.max_steps=40",
            "sample.every=20",
            "train.checkpoint_every=20",
            "sample.control_steps=0",
            "log.progress=false",
            "log.tensorboard=false",
            f"cache.dir={tmp_path / 'cache'}",
        ]
    )
    err = capsys.readouterr().err
    assert code == 4, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "unhealthy" and "structure" in summary["problem"]
    assert summary["health"]["broken"] is True and summary["skipped_steps"] == 0  # no non-finite step to blame
    assert "model is broken" in err and "last good checkpoint: none" in err
    assert json.loads((out / "progress.json").read_text())["status"] == "unhealthy"
    health = [json.loads(line) for line in (out / "health.jsonl").read_text().splitlines()]
    assert [r["step"] for r in health] == [0, 20, 40] and health[-1]["broken"] and health[-1]["warning"]
    for step in (20, 40):  # measured broken at both: neither checkpoint is good
        state = json.loads((out / f"checkpoints/step-{step:07d}/state.json").read_text())
        assert state["good"] is False and state["health"]["step"] == step and state["weights"]["ok"]
    # its weights are still usable (to look at), but every reader says where they come from
    from dopsd.lora.files import read_lora
    from dopsd.lora.trained import trained_meta

    with pytest.warns(UserWarning, match="ended unhealthy"):
        read_lora(out)
    with pytest.warns(UserWarning, match="ended unhealthy"):
        trained_meta(out / "lora.safetensors")


def test_an_aborted_run_writes_its_status_and_never_calls_exploded_weights_good(tmp_path, concept_data):
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
    with warnings.catch_warnings(), pytest.raises(TrainingAborted) as caught:
        warnings.simplefilter("ignore")
        dopsd.train(cfg, adapter=tiny_random_adapter(0, teacher_context="reference"))
    out = tmp_path / "run"
    written = sorted((out / "checkpoints").glob("step-*"))
    assert written  # finite steps were checkpointed before the streak, with weights ~1e30
    states = [json.loads((p / "state.json").read_text()) for p in written]
    assert all(not s["good"] and "exploded" in s["weights"]["problem"] for s in states), states
    assert "Last good checkpoint: none" in str(caught.value) and caught.value.exit_code == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "aborted" and "non-finite" in summary["problem"]
    assert summary["last_good_checkpoint"] is None and summary["weights"] is None
    progress = json.loads((out / "progress.json").read_text())
    assert progress["status"] == "aborted" and progress["step"] == summary["steps"] < 20
    assert not (out / "lora.safetensors").exists()


def test_a_sound_run_is_ok(tmp_path, concept_data):
    result = dopsd.train(
        tiny_config(tmp_path, concept_data), adapter=tiny_random_adapter(0, teacher_context="reference")
    )
    assert result.summary["status"] == "ok" and result.summary["problem"] is None
    assert result.summary["last_good_checkpoint"].endswith("step-0000004")
    assert json.loads((result.output_dir / "summary.json").read_text())["status"] == "ok"


def test_fsdp_on_the_cpu_is_refused_before_anything_is_written(tmp_path, concept_data):
    cfg = tiny_config(tmp_path, concept_data, **{"train.device": "cpu"})
    cfg.train.fsdp = {"sharding_strategy": "FULL_SHARD"}
    with pytest.raises(ConfigError, match="train.fsdp .* CPU"):
        dopsd.train(cfg, adapter=tiny_random_adapter(0, teacher_context="reference"))
    assert not (tmp_path / "run").exists()

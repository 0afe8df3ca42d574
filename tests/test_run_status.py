"""A run that did not succeed says so: summary.json `status`, a non-zero exit, and honest "last good checkpoint"s."""

import json
import warnings

import pytest
from conftest import tiny_config

import dopsd
from dopsd import cli
from dopsd.config import ConfigError
from dopsd.errors import NoSpaceError
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


def test_fsdp_of_a_lora_is_refused_before_anything_is_written(tmp_path, concept_data):
    cfg = tiny_config(tmp_path, concept_data, **{"train.device": "cpu"})
    with pytest.raises(ConfigError, match="train.fsdp.*lora.enabled=false"):
        dopsd.train(cfg, ["train.fsdp=true"], adapter=tiny_random_adapter(0, teacher_context="reference"))
    assert not (tmp_path / "run").exists()


def _cli_run(tmp_path, data, tiny, out, *extra):
    return [
        "train",
        "mini",
        f"data.path={data}",
        f"model.pretrained={tiny}",
        f"train.output_dir={out}",
        "train.max_steps=6",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "sample.every=0",
        "sample.seeds=[0]",
        "log.progress=false",
        "log.tensorboard=false",
        "lora.rank=4",
        "model.teacher_context=reference",
        f"cache.dir={tmp_path / 'cache'}",
        *extra,
    ]


def test_a_full_disk_says_where_what_is_kept_and_how_to_resume(tmp_path, concept_data, tiny_mini, monkeypatch, capsys):
    """The device fills while the second checkpoint is written (the writer's ENOSPC, as safetensors reports it):
    exit 5 with the device, the intact checkpoint and the resume command, never an internal error; the half
    written checkpoint is gone, and the resumed run is the uninterrupted one."""
    import safetensors.torch

    real = safetensors.torch.save_file
    out = tmp_path / "run"

    def fills_up(tensors, filename, metadata=None):
        if "step-0000004" in str(filename):
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 100)  # a partial file, then the device is full
            raise safetensors.SafetensorError(
                "Error while serializing: I/O error: No space left on device (os error 28)"
            )
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    code = cli.main(_cli_run(tmp_path, concept_data, tiny_mini, out))
    err = capsys.readouterr().err
    assert code == 5, err
    assert f"no space left on the device holding {out} (" in err, err
    assert f"the newest: {out / 'checkpoints/step-0000002'}" in err and f"{out / 'config.yaml'} --resume" in err
    assert "internal error" not in err and "Traceback" not in err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000002"]  # no half-written one
    monkeypatch.setattr(safetensors.torch, "save_file", real)  # space freed
    assert cli.main(_cli_run(tmp_path, concept_data, tiny_mini, out, "--resume")) == 0
    assert cli.main(_cli_run(tmp_path, concept_data, tiny_mini, tmp_path / "reference")) == 0
    losses = [
        [json.loads(line)["loss"] for line in (o / "losses.jsonl").read_text().splitlines()]
        for o in (out, tmp_path / "reference")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 6


def test_a_real_full_device_is_reported_the_same(tmp_path, concept_data, tiny_mini, capsys):
    """A real small device (a tmpfs, where this may mount one) filled after the first checkpoint: the loss trace's
    next line is the write that fails."""
    import subprocess

    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        out = mount / "run"
        filler = mount / "filler"
        cfg = tiny_config(
            tmp_path, concept_data, **{"model.pretrained": tiny_mini, "train.max_steps": 6, "train.output_dir": out}
        )

        def fill(trainer, record):
            if record["step"] == 3:
                with open(filler, "wb") as fh:
                    try:
                        while True:
                            fh.write(b"\0" * 65536)
                            fh.flush()
                    except OSError:
                        pass

        with pytest.raises(NoSpaceError) as caught:
            dopsd.train(cfg, callback=fill)
        message = str(caught.value)
        assert caught.value.exit_code == 5 and f"no space left on the device holding {out}" in message, message
        assert "step-0000002" in message and "--resume" in message
        assert json.loads((out / "checkpoints/step-0000002/state.json").read_text())["step"] == 2
        filler.unlink()
        resumed = dopsd.train(cfg, resume=True)
        reference = dopsd.train(cfg, [f"train.output_dir={tmp_path / 'reference'}"])
        assert resumed.losses == reference.losses
    finally:
        import gc

        gc.collect()  # the resumed optimizer's state may still map the checkpoint's file until collected
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_checkpoint_is_good_only_when_measured_good(tmp_path, capsys):
    """No sampling interval (sample.every=0) at a learning rate that turns the samples to noise by step 4: each
    checkpoint measures the few-step structure when written, so none is called good."""
    data = tmp_path / "data"
    world.write_concept_dataset(data, "orange")
    out = tmp_path / "run"
    settings = ["optim.lr=1", "train.max_steps=8", "sample.every=0", "train.checkpoint_every=4"]
    settings += ["sample.control_steps=0", "log.progress=false", "log.tensorboard=false"]
    code = cli.main(
        ["train", "mini", f"data.path={data}", f"train.output_dir={out}", f"cache.dir={tmp_path / 'c'}"] + settings
    )
    err = capsys.readouterr().err
    assert code == 4 and "last good checkpoint: none" in err, err
    assert json.loads((out / "summary.json").read_text())["last_good_checkpoint"] is None
    state = json.loads((out / "checkpoints/step-0000004/state.json").read_text())
    assert state["good"] is False and state["health"]["step"] == 4 and state["health"]["broken"], state
    assert "structure" in state["health"]["problem"] and state["weights"]["ok"]  # the weights alone look fine


def test_without_health_no_checkpoint_is_called_good_and_resume_still_works(tmp_path, concept_data):
    cfg = tiny_config(tmp_path, concept_data, **{"sample.health": False})
    result = dopsd.train(cfg, adapter=tiny_random_adapter(0, teacher_context="reference"))
    assert result.summary["status"] == "ok" and result.summary["last_good_checkpoint"] is None
    for step in (2, 4):
        assert json.loads((tmp_path / f"run/checkpoints/step-{step:07d}/state.json").read_text())["good"] is None
    extended = dopsd.train(
        cfg, ["train.max_steps=6"], resume=True, adapter=tiny_random_adapter(0, teacher_context="reference")
    )
    assert extended.summary["resumed_from"].endswith("step-0000004") and not any(
        "not a good" in n for n in extended.summary.get("notes", [])
    )

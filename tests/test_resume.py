"""Resume: an interrupted-and-resumed run reproduces the uninterrupted loss trace, also after SIGKILL."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file

import dopsd
from dopsd.errors import Interrupted
from dopsd.mini.adapter import tiny_random_adapter

# Everything that has state or randomness: EMA teacher, cosine LR with warm-up, LoRA dropout (global RNG),
# caption dropout and several captions per image, the hybrid objective and prior preservation.
STATEFUL = {
    "optim.schedule": "cosine",
    "optim.warmup_steps": 2,
    "lora.dropout": 0.1,
    "data.caption_dropout": 0.3,
    "method.name": "hybrid",
    "method.prior_prompts": ["a red circle", "a blue square"],
    "method.prior_weight": 0.5,
    "train.max_steps": 6,
    "train.checkpoint_every": 3,
    "sample.every": 3,
}


def adapter():
    return tiny_random_adapter(0, teacher_context="reference")


def test_resume_from_a_middle_checkpoint_reproduces_the_run(tmp_path, concept_data):
    full = dopsd.train(
        tiny_config(tmp_path, concept_data, **STATEFUL, **{"train.output_dir": tmp_path / "full"}), adapter=adapter()
    )
    cut = tmp_path / "cut"  # the same run as if it had stopped right after its step-3 checkpoint
    shutil.copytree(full.output_dir, cut)
    shutil.rmtree(cut / "checkpoints" / "step-0000006")
    for name in ("lora.safetensors", "lora_config.json", "summary.json"):
        (cut / name).unlink()
    # TensorBoard reads event files in name order (creation second, host, pid): give the copied file the next
    # second and a large pid, as when a killed run and its resume start within one second.
    for n, events in enumerate((cut / "logs").glob("events.out.tfevents.*")):
        events.rename(events.with_name(f"events.out.tfevents.{int(time.time()) + 1}.host.99999999.{n}"))
    cfg = tiny_config(tmp_path, concept_data, **STATEFUL, **{"train.output_dir": cut})
    resumed = dopsd.train(cfg, resume=True, adapter=adapter())
    assert resumed.summary["resumed_from"].endswith("step-0000003") and resumed.summary["steps_this_run"] == 3
    assert resumed.losses == full.losses  # bit-exact
    a, b = load_file(str(full.weights)), load_file(str(resumed.weights))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ta = load_file(str(full.output_dir / "checkpoints/step-0000006/teacher.safetensors"))
    tb = load_file(str(cut / "checkpoints/step-0000006/teacher.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)  # the EMA teacher resumed too
    lines = (cut / "losses.jsonl").read_text().splitlines()
    assert len(lines) == 6  # the trace file holds the whole run once
    # ... with every step's per-roll-out-step diagnostics, those before the checkpoint included
    assert [line for line in lines] == (full.output_dir / "losses.jsonl").read_text().splitlines()
    assert all(any(k.startswith("rollout/step") for k in json.loads(line)) for line in lines)
    # health.jsonl: the copied file ran to step 6 already; the resumed run measures step 6 again, once.
    health = [json.loads(line)["step"] for line in (cut / "health.jsonl").read_text().splitlines()]
    assert health == [0, 3, 6]
    assert json.loads((cut / "progress.json").read_text())["status"] == "ok"
    # TensorBoard: the copied logs ran to step 6 already; the resumed steps 4-6 replace those, not duplicate them.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = EventAccumulator(str(cut / "logs")).Reload().Scalars("train/loss")
    assert [p.step for p in points] == [1, 2, 3, 4, 5, 6]


def test_resume_extends_a_finished_run(tmp_path, concept_data):
    long = dopsd.train(
        tiny_config(tmp_path, concept_data, **{"train.output_dir": tmp_path / "long", "train.max_steps": 6}),
        adapter=adapter(),
    )
    cfg = tiny_config(tmp_path, concept_data, **{"train.output_dir": tmp_path / "short", "train.max_steps": 3})
    dopsd.train(cfg, adapter=adapter())
    extended = dopsd.train(cfg, ["train.max_steps=6"], resume=True, adapter=adapter())
    assert extended.losses == long.losses
    changed = tiny_config(tmp_path, concept_data, **{"train.output_dir": tmp_path / "short", "optim.lr": 0.5})
    try:
        dopsd.train(changed, resume=True, adapter=adapter())
    except ValueError as err:
        assert "optim.lr" in str(err)
    else:
        raise AssertionError("resuming with another learning rate must be refused")


def test_a_killed_process_resumes_exactly(tmp_path, concept_data, tiny_mini):
    settings = {
        "model.pretrained": tiny_mini,
        "train.max_steps": 400,
        "train.checkpoint_every": 2,
        "optim.schedule": "constant",
        "lora.dropout": 0.1,
        "data.caption_dropout": 0.3,
    }
    cfg = tiny_config(tmp_path, concept_data, **settings)
    config_file = tmp_path / "run.yaml"
    config_file.write_text(cfg.to_yaml())
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dopsd.cli", "train", str(config_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    checkpoints = tmp_path / "run" / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints / "step-0000002" / "state.json").is_file():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)  # mid-run: no cleanup, possibly mid-write of the next checkpoint
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    latest = max(int(p.name.split("-")[1]) for p in checkpoints.glob("step-*") if (p / "state.json").is_file())
    assert 2 <= latest < 12
    resumed = dopsd.train(config_file, ["train.max_steps=12"], resume=True)
    reference = dopsd.train(config_file, ["train.max_steps=12", f"train.output_dir={tmp_path / 'reference'}"])
    assert len(resumed.losses) == 12 and resumed.summary["steps_this_run"] == 12 - latest
    np.testing.assert_array_equal(resumed.losses, reference.losses)
    records = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13)) and all(
        any(k.endswith("_gap") for k in r) for r in records
    )
    # TensorBoard: one point per step, the killed run's points past its checkpoint dropped.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    points = EventAccumulator(str(tmp_path / "run" / "logs")).Reload().Scalars("train/loss")
    assert [p.step for p in points] == list(range(1, 13))
    np.testing.assert_allclose([p.value for p in points], reference.losses, rtol=1e-6)


def _wait_for(check, proc, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while not check():
        assert proc.poll() is None, f"the run ended before {what}: {proc.stderr.read().decode()}"
        assert time.time() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.02)


def test_sigint_and_sigterm_finish_the_step_checkpoint_it_and_resume_exactly(tmp_path, concept_data, tiny_mini):
    """Ctrl-C and SIGTERM (the web app's Stop) keep every step trained: the run finishes the step it is in, writes
    a checkpoint of it (no periodic checkpoint has come yet) and exits 130 / 143 saying how to resume."""
    settings = {
        "model.pretrained": tiny_mini,
        "train.max_steps": 400,
        "train.checkpoint_every": 100,
        "optim.schedule": "constant",
        "lora.dropout": 0.1,
        "data.caption_dropout": 0.3,
    }
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    stopped = {}
    for sig, code in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        out = tmp_path / sig.name
        config_file = tmp_path / f"{sig.name}.yaml"
        config_file.write_text(tiny_config(tmp_path, concept_data, **settings, **{"train.output_dir": out}).to_yaml())
        proc = subprocess.Popen(
            [sys.executable, "-m", "dopsd.cli", "train", str(config_file)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        losses = out / "losses.jsonl"
        _wait_for(lambda losses=losses: losses.is_file() and len(losses.read_text().splitlines()) >= 3, proc, "step 3")
        proc.send_signal(sig)
        err = proc.communicate(timeout=120)[1].decode()
        assert proc.returncode == code, err
        progress = json.loads((out / "progress.json").read_text())
        step = progress["step"]
        assert progress["status"] == "interrupted" and 3 <= step < 12, progress
        assert f"stopped by {sig.name} after step {step} of 400" in err and "--resume" in err
        assert "Traceback" not in err and "internal error" not in err
        assert [p.name for p in (out / "checkpoints").iterdir()] == [f"step-{step:07d}"]
        state = json.loads((out / f"checkpoints/step-{step:07d}/state.json").read_text())
        assert state["step"] == step and state["good"] is True and state["health"]["step"] == step
        assert len(losses.read_text().splitlines()) == step and not (out / "summary.json").exists()
        stopped[sig] = (config_file, step)
    reference = dopsd.train(
        stopped[signal.SIGINT][0], ["train.max_steps=12", f"train.output_dir={tmp_path / 'reference'}"]
    )
    for config_file, step in stopped.values():
        resumed = dopsd.train(config_file, ["train.max_steps=12"], resume=True)
        assert resumed.summary["steps_this_run"] == 12 - step
        np.testing.assert_array_equal(resumed.losses, reference.losses)  # bit-exact
        a, b = load_file(str(resumed.weights)), load_file(str(reference.weights))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once_and_the_handlers_are_restored(tmp_path, concept_data):
    """The first Ctrl-C asks for a checkpoint after the step; a second one before that stops at once (the steps
    since the last checkpoint are lost, the checkpoints are intact), and the caller's handlers come back."""

    def press_twice(trainer, record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs on return: a stop is asked for
            os.kill(os.getpid(), signal.SIGINT)  # at once again: the same request delivered twice (a launcher's)
            time.sleep(1.2)
            os.kill(os.getpid(), signal.SIGINT)  # a second press: KeyboardInterrupt, here, before the step's end

    cfg = tiny_config(tmp_path, concept_data, **{"train.max_steps": 6})
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        dopsd.train(cfg, adapter=adapter(), callback=press_twice)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    out = tmp_path / "run"
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    resumed = dopsd.train(cfg, resume=True, adapter=adapter())
    assert resumed.summary["resumed_from"].endswith("step-0000002") and resumed.steps == 6


def test_sigterm_delivered_twice_at_once_is_one_request(tmp_path, concept_data):
    """A launcher forwarding the signal its workers got already (torchrun, a job scheduler) must not turn the
    graceful stop into an immediate one: the run still checkpoints the step and exits 143."""

    def twice(trainer, record):
        if record["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)

    cfg = tiny_config(tmp_path, concept_data, **{"train.max_steps": 6})
    with pytest.raises(Interrupted) as caught:
        dopsd.train(cfg, adapter=adapter(), callback=twice)
    assert caught.value.exit_code == 143 and "stopped by SIGTERM after step 3 of 6" in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir()) == ["step-0000002", "step-0000003"]


def test_a_run_older_than_an_option_resumes_as_it_began(tmp_path, concept_data, capsys):
    """A run whose config.yaml predates method.train_states trained every roll-out state; resumed by a newer
    dopsd (default: one state per step) it must go on training every state, or the run changes method midway."""
    full = dopsd.train(
        tiny_config(tmp_path, concept_data, **{"train.output_dir": tmp_path / "long", "train.max_steps": 4}),
        ["method.train_states=0"],
        adapter=adapter(),
    )
    cfg = tiny_config(tmp_path, concept_data, **{"train.output_dir": tmp_path / "old", "train.max_steps": 2})
    dopsd.train(cfg, ["method.train_states=0"], adapter=adapter())
    saved = tmp_path / "old" / "config.yaml"  # as an older dopsd wrote it: no train_states key
    text = saved.read_text()
    assert "train_states: 0" in text
    saved.write_text("\n".join(line for line in text.splitlines() if "train_states" not in line) + "\n")
    resumed = dopsd.train(cfg, ["train.max_steps=4"], resume=True, adapter=adapter())
    assert "continues with method.train_states=0" in capsys.readouterr().out
    assert resumed.losses == full.losses

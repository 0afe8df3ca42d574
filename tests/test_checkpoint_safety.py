"""Checkpoints: nothing is loaded with pickle, a broken latest checkpoint is named and skipped, and a checkpoint
is only resumed on the data and global batch it was made with."""

import json
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
from conftest import tiny_config

import dopsd
from dopsd.errors import CheckpointError
from dopsd.mini.adapter import tiny_random_adapter
from dopsd.runs import checkpoint as ckpt


def adapter():
    return tiny_random_adapter(0, teacher_context="reference")


class Planted:
    """Unpickling this writes a file: what a crafted checkpoint could do with pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('code ran')",))


def plant(path, marker):
    torch.save(Planted(marker), path)  # the format the old checkpoints used
    torch.load(path, weights_only=False)  # the file is live: loading it as the old code did runs its code
    assert marker.exists()
    marker.unlink()


def test_state_files_round_trip_optimizer_and_rng_states_exactly(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    for _ in range(3):
        sum(p.square().sum() for p in params).backward()
        opt.step()
        sched.step()
    ckpt.save_state(tmp_path / "opt.safetensors", opt.state_dict())
    back = ckpt.load_state(tmp_path / "opt.safetensors")
    ref = opt.state_dict()
    assert back["param_groups"] == ref["param_groups"] and isinstance(back["param_groups"][0]["betas"], tuple)
    for i, state in ref["state"].items():
        assert all(torch.equal(back["state"][i][k], v) for k, v in state.items())
    ckpt.save_state(tmp_path / "sched.safetensors", sched.state_dict())
    assert ckpt.load_state(tmp_path / "sched.safetensors") == sched.state_dict()
    random.random(), np.random.rand(), torch.rand(1)
    ckpt.save_state(tmp_path / "rng.safetensors", ckpt.rng_state())
    expected = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    ckpt.set_rng_state(ckpt.load_state(tmp_path / "rng.safetensors"))
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3))
    assert expected[:3] == again[:3] and torch.equal(expected[3], again[3])
    with pytest.raises(CheckpointError, match="cannot be stored without pickle"):
        ckpt.save_state(tmp_path / "bad.safetensors", {"fn": lambda: None})


def test_a_planted_pickle_is_never_run_and_an_old_pickle_checkpoint_is_refused_clearly(tmp_path, concept_data):
    cfg = tiny_config(tmp_path, concept_data, **{"train.max_steps": 2, "train.checkpoint_every": 2})
    dopsd.train(cfg, adapter=adapter())
    step = tmp_path / "run" / "checkpoints" / "step-0000002"
    marker = tmp_path / "code_ran"
    for name in ("optimizer.pt", "scheduler.pt", "rng-rank0.pt"):  # next to the real state files: never read
        plant(step / name, marker)
    result = dopsd.train(cfg, ["train.max_steps=3"], resume=True, adapter=adapter())
    assert result.steps == 3 and not marker.exists()
    old = tmp_path / "run" / "checkpoints" / "step-0000003"  # made to look like an old-format checkpoint
    for name in ("optimizer", "scheduler", "rng-rank0"):
        (old / f"{name}.safetensors").unlink()
        plant(old / f"{name}.pt", marker)
    with pytest.raises(CheckpointError, match=r"step-0000003 was written by an earlier dopsd version .*pickle"):
        dopsd.train(cfg, ["train.max_steps=4"], resume=True, adapter=adapter())
    assert not marker.exists()


def test_a_corrupt_latest_checkpoint_is_named_and_the_previous_good_one_resumes_exactly(tmp_path, concept_data):
    settings = {"train.max_steps": 4, "train.checkpoint_every": 2, "lora.dropout": 0.1, "data.caption_dropout": 0.3}
    reference = dopsd.train(
        tiny_config(tmp_path, concept_data, **{**settings, "train.output_dir": tmp_path / "ref", "train.max_steps": 6}),
        adapter=adapter(),
    )
    cfg = tiny_config(tmp_path, concept_data, **settings)
    dopsd.train(cfg, adapter=adapter())
    broken = tmp_path / "run" / "checkpoints" / "step-0000004" / "optimizer.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])  # truncated, as by a full disk
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = dopsd.train(cfg, ["train.max_steps=6"], resume=True, adapter=adapter())
    said = " ".join(str(w.message) for w in caught)
    assert str(broken) in said and "resuming from" in said and "step-0000002" in said
    assert resumed.summary["resumed_from"].endswith("step-0000002")
    assert resumed.losses == reference.losses  # bit-exact from the earlier checkpoint


def test_resume_on_other_data_or_another_global_batch_is_refused(tmp_path, concept_data):
    cfg = tiny_config(tmp_path, concept_data, **{"train.max_steps": 2})
    dopsd.train(cfg, adapter=adapter())
    with pytest.raises(CheckpointError, match="global batch of 2"):
        dopsd.train(cfg, ["train.max_steps=3", "train.batch_size=1"], resume=True, adapter=adapter())
    # The same global batch in another shape is the same training: accepted.
    same = dopsd.train(
        cfg,
        ["train.max_steps=3", "train.batch_size=1", "train.gradient_accumulation=2"],
        resume=True,
        adapter=adapter(),
    )
    assert same.steps == 3
    (concept_data / "img02.txt").write_text("a sks circle on a gray background\n")
    with pytest.raises(CheckpointError, match=r"other data .*changed: img02.png"):
        dopsd.train(cfg, ["train.max_steps=4"], resume=True, adapter=adapter())
    shutil.copy(concept_data / "img01.png", concept_data / "img09.png")
    (concept_data / "img09.txt").write_text("a sks square\n")
    with pytest.raises(CheckpointError, match=r"4 → 5 images.*added: img09.png"):
        dopsd.train(cfg, ["train.max_steps=4"], resume=True, adapter=adapter())


def test_another_process_count_with_the_same_global_batch_is_accepted_with_a_note():
    state = {"processes": 2, "global_batch": 4, "dataset": None}
    same = {"sha256": "x", "images": 1, "examples": {}}
    notes = ckpt.check_fits(ckpt.Path("run/checkpoints/step-0000002"), state, dataset=same, processes=1, global_batch=4)
    assert len(notes) == 1 and "not bit-identical" in notes[0]
    with pytest.raises(CheckpointError, match="Resume with 2 process"):
        ckpt.check_fits(ckpt.Path("run/checkpoints/step-0000002"), state, dataset=same, processes=1, global_batch=2)


def test_checkpoints_record_whether_they_are_good(tmp_path, concept_data):
    dopsd.train(tiny_config(tmp_path, concept_data, **{"train.max_steps": 2}), adapter=adapter())
    state = json.loads((tmp_path / "run" / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert state["good"] is True and state["weights"]["ok"] and state["processes"] == 1 and state["global_batch"] == 2
    assert state["dataset"]["images"] == 4 and len(state["dataset"]["examples"]) == 4
    big = {"w": torch.full((2, 2), 5e6)}
    assert "exploded" in ckpt.weights_verdict(big, start_max=0.1)["problem"]
    assert ckpt.weights_verdict({"w": torch.tensor([float("nan")])}, 0.1)["finite"] is False
    assert ckpt.weights_verdict({"w": torch.full((2,), 50.0)}, start_max=1.0)["ok"]  # within 100× the start

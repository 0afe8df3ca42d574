"""Continual tuning (train.init_from / train.init_mode): round 2 starts exactly where round 1 ended, in both
modes, through a chain of runs, and for a full fine-tune; the lineage is recorded; bad sources are refused."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config, write_concept_folder
from PIL import Image

import dopsd
from dopsd.config import ConfigError
from dopsd.core.sampler import sample_euler, seed_noise
from dopsd.data.dataset import load_dataset
from dopsd.errors import RunFolderError
from dopsd.mini.adapter import tiny_random_adapter
from dopsd.training.trainer import Trainer

PROMPTS = ["a sks circle on a gray background", "a red square"]
FIXED = {"sample.prompts": PROMPTS, "train.max_steps": 3, "train.checkpoint_every": 0}


def adapter():
    return tiny_random_adapter(0, teacher_context="reference")


def samples(network, a) -> torch.Tensor:
    fresh = adapter()  # the trainer released `a`'s encoder; every tiny adapter has the same one
    ctx = fresh.collate(fresh.student_contexts(PROMPTS))
    with torch.no_grad():
        return sample_euler(
            lambda x, s, c: a.velocity(network, x, s, c),
            seed_noise((3, 24, 24), [5, 6]),
            a.inference_schedule(24, 24),
            ctx,
        )


def grid(run, tag):
    return np.asarray(Image.open(run / "samples" / f"{tag}_4steps.png"), dtype=np.int16)


def round_one(tmp_path, data, **extra):
    a = adapter()
    cfg = tiny_config(tmp_path, data, **FIXED, **{"train.output_dir": tmp_path / "r1"}, **extra)
    return dopsd.train(cfg, adapter=a), a


def started(tmp_path, data, name, **extra):
    """Round 2's trainer after its setup (nothing trained yet) and its adapter."""
    a = adapter()
    cfg = tiny_config(tmp_path, data, **FIXED, **{"train.output_dir": tmp_path / name}, **extra)
    trainer = Trainer(cfg, tmp_path / name, load_dataset(cfg.data, cfg.model), adapter=a)
    trainer.prepare()
    return trainer, a


@pytest.mark.parametrize("mode", ["continue", "merge"])
def test_round_two_starts_from_round_ones_final_model(tmp_path, concept_data, mode):
    r1, a1 = round_one(tmp_path, concept_data)
    final = samples(a1.network, a1)
    second = write_concept_folder(tmp_path / "teal", concept="teal", seed=1)
    init = {"train.init_from": str(r1.output_dir), "train.init_mode": mode}
    trainer, a2 = started(tmp_path, second, "probe2", **init)
    start = samples(trainer.network, a2)
    if mode == "continue":  # the same LoRA values on the same base: bit-exact
        assert torch.equal(start, final)
    else:  # base + ΔW vs base + LoRA: equal up to float rounding
        torch.testing.assert_close(start, final, rtol=0, atol=1e-5)
        assert not any(
            "lora_" in n and "default" in n and p.abs().sum() > 0
            for n, p in trainer.network.named_parameters()
            if "lora_B" in n
        )  # a fresh LoRA (B = 0)
    # The whole round 2 through `dopsd train`: its step-0 grid is round 1's final grid.
    r2 = dopsd.train(
        tiny_config(tmp_path, second, **FIXED, **{"train.output_dir": tmp_path / "r2"}, **init), adapter=adapter()
    )
    diff = np.abs(grid(r2.output_dir, "step-0000000") - grid(r1.output_dir, "final")).max()
    assert diff == 0 if mode == "continue" else diff <= 1
    summary = json.loads((r2.output_dir / "summary.json").read_text())
    assert summary["lineage"] == [
        {"from": str(r1.output_dir.resolve()), "mode": mode, "steps": 3, "method": "dopsd", "weights": "lora"}
    ]
    assert json.loads((r2.output_dir / "lora_config.json").read_text())["lineage"] == summary["lineage"]
    assert r2.summary["status"] == "ok" and len(r2.losses) == 3


def test_a_chain_of_merges_rebuilds_every_round(tmp_path, concept_data):
    r1, _ = round_one(tmp_path, concept_data)
    a2 = adapter()
    cfg2 = tiny_config(
        tmp_path,
        concept_data,
        **FIXED,
        **{"train.output_dir": tmp_path / "r2", "train.init_from": str(r1.output_dir), "method.name": "sft"},
    )
    r2 = dopsd.train(cfg2, adapter=a2)
    trainer, a3 = started(
        tmp_path, concept_data, "r3", **{"train.init_from": str(r2.output_dir), "train.init_mode": "continue"}
    )
    torch.testing.assert_close(samples(trainer.network, a3), samples(a2.network, a2), rtol=0, atol=1e-5)
    from dopsd.training.continual import lineage

    assert [link["mode"] for link in lineage(trainer.init)] == ["merge", "continue"]


def test_a_full_fine_tune_continues_from_its_weights(tmp_path, concept_data):
    full = {"lora.enabled": False, "optim.lr": 1e-4}
    r1, a1 = round_one(tmp_path, concept_data, **full)
    trainer, a2 = started(tmp_path, concept_data, "r2", **full, **{"train.init_from": str(r1.output_dir)})
    assert torch.equal(samples(trainer.network, a2), samples(a1.network, a1))
    # the EMA teacher starts from the current model
    assert all(torch.equal(trainer.teacher.shadow[k], p) for k, p in trainer.trainable.items())


def test_continue_needs_the_same_lora_and_a_finished_run(tmp_path, concept_data):
    r1, _ = round_one(tmp_path, concept_data)
    with pytest.raises(ConfigError, match="lora.rank"):
        dopsd.train(
            tiny_config(
                tmp_path,
                concept_data,
                **{
                    "train.output_dir": tmp_path / "x",
                    "lora.rank": 3,
                    "train.init_from": str(r1.output_dir),
                    "train.init_mode": "continue",
                },
            ),
            adapter=adapter(),
        )
    (r1.output_dir / "summary.json").unlink()
    with pytest.raises(RunFolderError, match="not a finished run"):
        dopsd.train(
            tiny_config(
                tmp_path, concept_data, **{"train.output_dir": tmp_path / "y", "train.init_from": str(r1.output_dir)}
            ),
            adapter=adapter(),
        )
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()

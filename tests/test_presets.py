"""The shipped example configs: each states its concept word and prior preservation as explicit choices; the
domain and style ones add no word to the captions and run on the miniature; train.threads is applied."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import dopsd
from dopsd.config import load_config
from dopsd.data.dataset import apply_trigger
from dopsd.mini import domains, world

CONFIGS = Path(__file__).resolve().parent.parent / "dopsd" / "configs"
UNNAMED = ["mini-domain", "mini-style", "zimage-turbo-domain", "zimage-turbo-style"]  # no concept word


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_example_states_its_word_and_prior_preservation(path):
    raw = yaml.safe_load(path.read_text())
    assert "trigger_word" in raw["data"], f"{path.name}: state data.trigger_word (a word, or null for none)"
    assert {"prior_prompts", "prior_weight"} <= set(raw.get("method", {})), (
        f"{path.name}: state method.prior_prompts and method.prior_weight (empty / 0 = off)"
    )
    config = load_config(path)  # loads and validates
    prior_on = bool(config.method.prior_prompts) and config.method.prior_weight > 0
    assert prior_on == (config.method.prior_weight > 0)  # never half on
    if path.stem in UNNAMED:
        assert config.data.trigger_word is None and not prior_on
        caption = "a red circle on a gray background"
        assert apply_trigger(caption, config.data) == caption  # no `sks` added to every caption
    else:
        assert config.data.trigger_word


def test_domain_is_a_full_fine_tune_and_style_a_lora():
    for name in ("mini-domain", "zimage-turbo-domain"):
        assert load_config(CONFIGS / f"{name}.yaml").lora.enabled is False
    for name in ("mini-style", "zimage-turbo-style"):
        assert load_config(CONFIGS / f"{name}.yaml").lora.enabled is True


@pytest.mark.parametrize("name", ["mini-domain", "mini-style"])
def test_miniature_domain_and_style_presets_train_a_few_steps(tmp_path, name):
    data = tmp_path / "data"
    if name == "mini-domain":
        captions = world.write_domain_dataset(data, n=8)
    else:  # a look: every scene under another tint
        targets, _ = domains.tint_pairs(domains.TEST_TINTS["mint 120°"], 8, seed=0)
        captions = world.write_pairs(data, targets)
    out = tmp_path / "run"
    result = dopsd.train(
        CONFIGS / f"{name}.yaml",
        [
            f"data.path={data}",
            f"train.output_dir={out}",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.checkpoint_every=0",
            "sample.control_steps=4",
            "sample.seeds=[0]",
            "log.progress=false",
            "log.tensorboard=false",
            f"cache.dir={tmp_path / 'cache'}",
        ],
    )
    assert result.summary["status"] == "ok" and result.steps == 2
    weights = "model.safetensors" if name == "mini-domain" else "lora.safetensors"
    assert (out / weights).is_file()
    prompts = json.loads((out / "lora_config.json").read_text())["prompts"]
    assert prompts and set(prompts) <= set(captions)  # the captions as written: no word was added
    assert not any(world.PLACEHOLDER in p for p in prompts)


def test_train_threads_is_applied_during_the_run_and_restored(tmp_path, concept_data):
    from conftest import tiny_config

    from dopsd.mini.adapter import tiny_random_adapter

    seen = []
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = tiny_config(tmp_path, concept_data, **{"train.threads": 1, "train.max_steps": 1})
        dopsd.train(
            cfg,
            adapter=tiny_random_adapter(0, teacher_context="reference"),
            callback=lambda trainer, record: seen.append(torch.get_num_threads()),
        )
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)

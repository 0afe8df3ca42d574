"""Config values: yes/no words, finite numbers, every declared range enforced and documented, FSDP keys."""

from __future__ import annotations

import dataclasses
import re

import pytest

from dopsd.config import SECTIONS, Config, ConfigError, load_config
from dopsd.config.validate import range_text


def test_yes_no_words_stay_text_for_text_and_choice_keys(tmp_path):
    assert load_config("zimage-turbo", ["train.mixed_precision=no"]).train.mixed_precision == "no"
    assert load_config("zimage-turbo", ["train.mixed_precision=off"]).train.mixed_precision == "no"
    assert load_config("zimage-turbo", ["train.mixed_precision=false"]).train.mixed_precision == "no"
    assert load_config("mini", ["data.trigger_word=yes"]).data.trigger_word == "yes"
    assert load_config("mini", ["train.output_dir=2024"]).train.output_dir == "2024"
    assert load_config("mini", ["lora.enabled=no"]).lora.enabled is False  # still false for true/false keys
    assert load_config("mini", ["lora.enabled=on"]).lora.enabled is True
    assert load_config("mini", ["train.max_steps=1e3"]).train.max_steps == 1000  # a whole number written as a float
    f = tmp_path / "c.yaml"
    f.write_text("preset: zimage-turbo\ntrain: {mixed_precision: no}\ndata: {trigger_word: on}\n")
    config = load_config(f)
    assert (config.train.mixed_precision, config.data.trigger_word) == ("no", "on")
    assert load_config({"train": {"mixed_precision": False}}).train.mixed_precision == "no"  # Python dicts too
    with pytest.raises(ConfigError, match="'train.mixed_precision': 'on' is not one of"):
        load_config("mini", ["train.mixed_precision=on"])  # two choices could mean yes: refused, not guessed


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", ".nan", "NaN"])
def test_every_float_must_be_finite(value):
    with pytest.raises(ConfigError, match=r"'optim.lr': .* is not a finite number; it must be > 0"):
        load_config("mini", [f"optim.lr={value}"])
    with pytest.raises(ConfigError, match=r"'model.shift'.*not a finite number"):
        load_config("mini", [f"model.shift={value}"])  # optional floats too
    with pytest.raises(ConfigError, match=r"'optim.betas\[0\]'.*not a finite number"):
        load_config("mini", [f"optim.betas=[{value}, 0.9]"])  # and list elements


def _bounded_fields():
    config = Config()
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(config, section)):
            if "bounds" in f.metadata:
                yield f"{section}.{f.name}", f


@pytest.mark.parametrize("key, f", list(_bounded_fields()), ids=[k for k, _ in _bounded_fields()])
def test_each_declared_range_is_enforced(key, f):
    """Just outside each bound is refused with the key, the value and the range; the bound itself as declared."""
    b = f.metadata["bounds"]
    is_list = f.type.startswith("list") if isinstance(f.type, str) else False
    wrap = (lambda v: f"[{v}]") if is_list else str
    where = f"{key}[0]" if is_list else key
    low = b.get("ge", b.get("gt"))
    if low is not None:
        bad = low - 1 if "int" in str(f.type) else low - 0.5
        with pytest.raises(ConfigError, match=re.escape(f"'{where}' must be {range_text(b)}, got ")):
            load_config("mini", [f"{key}={wrap(bad)}"])
        if "gt" in b:
            with pytest.raises(ConfigError, match=re.escape(f"'{where}' must be {range_text(b)}")):
                load_config("mini", [f"{key}={wrap(low)}"])
    high = b.get("le", b.get("lt"))
    if high is not None:
        bad = high + 1 if "int" in str(f.type) else high + 0.5
        with pytest.raises(ConfigError, match=re.escape(f"'{where}' must be {range_text(b)}")):
            load_config("mini", [f"{key}={wrap(bad)}"])
        if "lt" in b:
            with pytest.raises(ConfigError, match=re.escape(f"'{where}' must be {range_text(b)}")):
                load_config("mini", [f"{key}={wrap(high)}"])


def test_relations_between_options():
    with pytest.raises(ConfigError, match="'model.rollout_every' is 8 but model.inference_steps is 4"):
        load_config("mini", ["model.inference_steps=4", "model.rollout_every=8"])
    load_config("zimage-turbo")  # 8 steps, roll-out on every 2nd: fine
    with pytest.raises(ConfigError, match="method.prior_weight.*method.prior_prompts is empty"):
        load_config("mini", ["method.prior_weight=0.5"])
    with pytest.raises(ConfigError, match="train.output_dir"):
        load_config("mini", ["train.output_dir=' '"])


def test_fsdp_shards_full_fine_tunes_and_says_what_it_does_not_support():
    config = load_config("flux2-klein-4b", ["train.fsdp=true", "lora.enabled=false"])
    assert config.train.fsdp is True
    with pytest.raises(ConfigError, match="'train.fsdp'.*expected bool"):  # accelerate's plugin options are gone
        load_config("mini", ["train.fsdp={sharding_strategy: FULL_SHARD}"])
    with pytest.raises(ConfigError, match="'train.fsdp' is true but lora.enabled is true.*train.fsdp=false"):
        load_config("mini", ["train.fsdp=true"])
    full = ["train.fsdp=true", "lora.enabled=false"]
    with pytest.raises(ConfigError, match="'train.mixed_precision' is 'fp16' with train.fsdp.*bf16"):
        load_config("flux2-klein-4b", [*full, "train.mixed_precision=fp16"])
    with pytest.raises(ConfigError, match="'optim.eight_bit' is true with train.fsdp"):
        load_config("flux2-klein-4b", [*full, "optim.eight_bit=true"])


def test_a_full_fine_tune_of_a_bf16_model_needs_autocast():
    with pytest.raises(ConfigError, match="'train.mixed_precision' is 'no' but model.dtype is 'bfloat16'.*=bf16"):
        load_config("zimage-turbo", ["lora.enabled=false", "train.mixed_precision=no"])
    assert load_config("zimage-turbo", ["train.mixed_precision=no"]).lora.enabled  # a LoRA's weights are cast by peft

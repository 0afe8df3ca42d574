"""Config: presets, YAML, dotted overrides, rejected keys/types with the closest name, the docs stay current."""

from pathlib import Path

import pytest

from dopsd import cli
from dopsd.config import Config, ConfigError, load_config
from dopsd.config.docs import render_docs
from dopsd.config.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_and_their_example_files_load(name):
    config = load_config(name)
    assert config.preset == name
    example = load_config(ROOT / "dopsd" / "configs" / f"{name}.yaml")
    assert example.preset == name and example.data.path  # each example names a dataset
    assert example.model.family == config.model.family


def test_presets_carry_each_models_setting():
    z, k, m = load_config("zimage-turbo").model, load_config("flux2-klein-4b").model, load_config("mini").model
    assert (z.family, z.inference_steps, z.shift, z.rollout_every, z.teacher_context) == ("zimage", 8, 3.0, 2, "vlm")
    assert (k.family, k.inference_steps, k.teacher_context) == ("flux2", 4, "reference")
    assert k.teacher_instruction is None  # the model's own (dopsd.models.flux2_facts.teacher_instruction)
    assert (m.family, m.height, m.width) == ("mini", 24, 24)
    assert load_config("zimage-turbo").optim.lr == 1e-4 and load_config("flux2-klein-4b").optim.lr == 2e-5


def test_yaml_and_overrides_are_typed(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: mini\ndata: {path: imgs, caption_dropout: 0.1}\noptim: {lr: 3e-4}\n")
    config = load_config(
        f,
        [
            "optim.lr=2e-4",
            "train.max_steps=7",
            "lora.enabled=false",
            "sample.seeds=[3, 4]",
            "model.pretrained=null",
            "method.prior_prompts=[a red circle]",
        ],
    )
    assert config.optim.lr == pytest.approx(2e-4) and isinstance(config.optim.lr, float)  # YAML reads 2e-4 as text
    assert config.train.max_steps == 7 and config.lora.enabled is False and config.sample.seeds == [3, 4]
    assert config.model.pretrained is None and config.method.prior_prompts == ["a red circle"]
    assert config.data.caption_dropout == 0.1
    assert Path(config.data.path) == (tmp_path / "imgs").resolve()  # relative to the YAML file
    (tmp_path / "weights").mkdir()
    f.write_text("preset: mini\nmodel: {pretrained: weights, teacher_encoder: missing-folder}\n")
    config = load_config(f)
    assert config.model.pretrained == str((tmp_path / "weights").resolve())  # exists beside the YAML: resolved
    assert config.model.teacher_encoder == "missing-folder"  # left as given (its own error names it later)
    f.write_text("preset: mini\nmodel: {pretrained: turbo}\n")
    assert load_config(f).model.pretrained == "turbo"  # the keyword, while no folder of that name is there


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1e-4", "did you mean 'optim.lr'"),
        ("optm.lr=1e-4", "did you mean 'optim.lr'"),
        ("train.max_step=10", "did you mean 'train.max_steps'"),
        ("method.name=dops", "did you mean 'dopsd'"),
        ("optim.lr=fast", "'optim.lr': expected float"),
        ("train.batch_size=1.5", "'train.batch_size': expected int"),
        ("lora.enabled=maybe", "'lora.enabled': expected bool"),
        ("sample.seeds=3", "'sample.seeds': expected list[int]"),
        ("train.max_steps=0", "must be >= 1"),
        ("data.caption_dropout=1.5", "caption_dropout"),
        ("optim.lr", "section.key=value"),
    ],
)
def test_bad_overrides_are_rejected_with_a_hint(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("mini", [override])


def test_bad_yaml_keys_are_rejected_with_the_closest_name(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: mini\noptimizer:\n  lr: 1e-4\n")
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load_config(f)
    f.write_text("preset: mini\ntrain:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'train.batch_size'"):
        load_config(f)
    f.write_text("preset: zimage_turbo\n")
    with pytest.raises(ConfigError, match="did you mean 'zimage-turbo'"):
        load_config(f)
    f.write_text("preset: mini\ntrain: 5\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(f)
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_config(tmp_path / "missing.yaml")


def test_editing_needs_sources():
    with pytest.raises(ConfigError, match="data.source_dir"):
        load_config("flux2-klein-4b", ["model.editing=true"])


def test_docs_are_generated_from_the_fields_and_up_to_date():
    text = render_docs()
    for key in ("optim.lr", "method.teacher", "train.gradient_accumulation", "data.caption_dropout", "lora.targets"):
        assert f"`{key}`" in text
    assert (ROOT / "docs" / "configuration.md").read_text() == text, (
        "docs/configuration.md is stale: run `python -m dopsd.config.docs`"
    )


def test_round_trip_through_yaml(tmp_path):
    config = load_config("flux2-klein-4b", ["train.fsdp=true", "lora.enabled=false", "lora.targets=.*attn.*"])
    f = tmp_path / "saved.yaml"
    f.write_text(config.to_yaml())
    again = load_config(f)
    assert again == config and isinstance(again, Config)


def test_cli_train_rejects_a_typo_before_doing_anything(capsys, tmp_path):
    code = cli.main(["train", "mini", "optim.lrr=1e-4", f"train.output_dir={tmp_path / 'run'}"])
    assert code == 2
    assert "did you mean 'optim.lr'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--resume" in out and "--overwrite" in out and "optim.lr=2e-4" in out


def test_print_config_shows_the_resolved_values(capsys):
    assert cli.main(["train", "zimage-turbo", "optim.lr=5e-5", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "lr: 5.0e-05" in out and "family: zimage" in out


def test_import_dopsd_is_light_and_exposes_train():
    import subprocess
    import sys

    code = "import sys, dopsd; print('torch' in sys.modules, callable(dopsd.train), 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]  # torch loads only when dopsd.train is first used


def test_the_families_token_and_layer_settings_are_declared():
    """The settings the adapters read (and their error messages name) are typed config keys, checked like all."""
    m = load_config(
        "zimage-turbo",
        ["model.teacher_max_tokens=300", "model.teacher_image_tokens=64", "model.text_encoder_out_layers=[9, 18]"],
    ).model
    assert (m.teacher_max_tokens, m.teacher_image_tokens, m.text_encoder_out_layers) == (300, 64, [9, 18])
    d = load_config("flux2-klein-4b").model
    assert (d.teacher_max_tokens, d.teacher_image_tokens, d.text_encoder_out_layers) == (1024, 256, None)
    with pytest.raises(ConfigError, match="teacher_image_tokens"):
        load_config("zimage-turbo", ["model.teacher_image_tokens=0"])


def test_options_newer_than_run_folders_declare_the_value_of_older_runs():
    """opt(before=...) is the one place that says how a run begun before an option existed resumes: each such
    value is a valid setting of its option (train_states' differs from today's default: the reason for all this)."""
    from dopsd.config import as_before_the_options

    before = as_before_the_options()
    assert before == {"method.train_states": 0, "train.compile": False, "train.stop_when_done": False}
    default = load_config("mini", [])
    old = load_config("mini", [f"{key}={str(value).lower()}" for key, value in before.items()])
    for key, value in before.items():
        section, name = key.split(".")
        assert getattr(getattr(old, section), name) == value
    assert default.method.train_states != before["method.train_states"]

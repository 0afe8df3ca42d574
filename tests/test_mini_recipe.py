"""The recipe end to end on the tiny configuration, through the `dopsd mini` command line."""

import dataclasses
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from dopsd.cli import main
from dopsd.mini import world
from dopsd.mini.adapter import load
from dopsd.mini.recipe import sha256
from dopsd.mini.report import draw_noise, sample_many

torch.set_num_threads(1)


def test_tiny_recipe_cli_reproducible_and_loadable(tmp_path, capsys):
    out1, out2, out3 = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(["mini", "recipe", "--tiny", "--out", str(out1)]) == 0
    assert main(["mini", "recipe", "--tiny", "--out", str(out2)]) == 0
    assert main(["mini", "recipe", "--tiny", "--out", str(out3), "--seed", "1"]) == 0
    m1 = json.loads((out1 / "manifest.json").read_text())
    m2 = json.loads((out2 / "manifest.json").read_text())
    m3 = json.loads((out3 / "manifest.json").read_text())
    for name in ("base.safetensors", "turbo.safetensors"):
        assert m1["sha256"][name] == sha256(out1 / name)
    assert m1["sha256"] == m2["sha256"]  # fixed seeds reproduce the weights exactly
    assert m1["sha256"]["turbo.safetensors"] != m3["sha256"]["turbo.safetensors"]
    assert m1["sha256"]["turbo.safetensors"] != m1["sha256"]["base.safetensors"]  # distillation changed weights
    assert m1["config"]["dim"] == 32 and m1["wall_time_s"]["total"] > 0

    turbo = load(SimpleNamespace(pretrained=str(out1)))
    base = load(SimpleNamespace(pretrained=str(out1 / "base.safetensors")))
    assert (turbo.kind, turbo.default_steps, base.kind, base.default_steps) == ("turbo", 4, "base", 8)
    x = sample_many(turbo, world.unrelated_prompts(2), draw_noise(turbo, 2, 0))
    assert x.shape == (2, 3, 24, 24) and torch.isfinite(x).all()

    report = tmp_path / "report.md"
    assert (
        main(
            [
                "mini",
                "report",
                "--weights",
                str(out1),
                "--seeds",
                "2",
                "--samples",
                "8",
                "--out",
                str(report),
                "--premise-steps",
                "3",
            ]
        )
        == 0
    )
    text = report.read_text()
    assert "| turbo@4 |" in text and "| base@8 |" in text and "orange:caption+image(vlm)" in text
    # the tint check with both kinds of reference: another scene, and the target's own colours (D-OPSD's teacher)
    assert "reference image of another scene under the tint" in text
    assert "reference image in the target's colours and background" in text
    numbers = json.loads(report.with_suffix(".json").read_text())
    assert len(numbers) == 2 and 0.0 <= numbers[0]["turbo@4"]["acc_shape"] <= 1.0
    assert "| premise (`dopsd demo`, 4 steps) |" in text and set(numbers[1]["premise"]) == {
        "before",
        "sft",
        "dopsd",
        "sft, 6 steps",
        "dopsd, no new concept (red)",
        "sft without prior preservation",
        "dopsd without prior preservation",
    }
    assert numbers[0]["premise"]["before"]["drift"] == 0.0 and numbers[0]["premise"]["sft"]["drift"] > 0.0


def test_weights_that_do_not_fit_the_network_get_a_clear_error(tmp_path):
    """Weights that do not fit the network (here: built without the per-pixel gain), or that fit but come from
    another recipe version, get an error naming the file and the fix."""
    assert main(["mini", "recipe", "--tiny", "--out", str(tmp_path / "w")]) == 0
    old = tmp_path / "old"
    shutil.copytree(tmp_path / "w", old)
    manifest = json.loads((old / "manifest.json").read_text())
    manifest["config"]["pixel_gate"] = False
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"turbo.safetensors does not fit .*dopsd mini recipe --out"):
        load(SimpleNamespace(pretrained=str(old)))
    # weights that fit but come from another recipe version may compute something else: refused too
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    manifest["recipe_version"] = "mini-recipe-1"
    (old / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        ValueError,
        match=r"built by recipe mini-recipe-1, this dopsd's miniature reads mini-recipe-3, mini-recipe-4.*"
        r"dopsd mini recipe --out",
    ):
        load(SimpleNamespace(pretrained=str(old)))


def test_luma_highpass_gate_recipe_and_what_it_passes(tmp_path):
    """`--gate-input luma_highpass`: the manifest records it, the weights load with it, and the gate passes fine
    luminance detail only (a colour shift or a flat image gives it nothing)."""
    from dopsd.mini.nets import MiniConfig, luma_highpass

    out = tmp_path / "hp"
    assert main(["mini", "recipe", "--tiny", "--out", str(out), "--gate-input", "luma_highpass"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["gate_input"] == "luma_highpass" and "--gate-input luma_highpass" in manifest["command"]
    turbo = load(SimpleNamespace(pretrained=str(out)))
    assert turbo.network.cfg.gate_input == "luma_highpass"
    x = sample_many(turbo, world.unrelated_prompts(2), draw_noise(turbo, 2, 0))
    assert torch.isfinite(x).all()

    img = world.render([world.random_scene(torch.Generator().manual_seed(i)) for i in range(4)])
    shift = torch.tensor([0.3, -0.2, 0.1])[None, :, None, None]
    assert torch.allclose(luma_highpass(img + shift), luma_highpass(img + shift.mean()), atol=1e-6)
    assert luma_highpass(torch.full((1, 3, 8, 8), 0.4)).abs().max() < 1e-6
    assert luma_highpass(img).abs().mean() > 0.01  # the grain passes
    with pytest.raises(ValueError, match="gate_input"):
        MiniConfig(gate_input="chroma")


def test_pretrain_continues_from_given_weights_and_tint_references_in_the_targets_colours():
    from dopsd.mini.adapter import build
    from dopsd.mini.recipe import pretrain, sample_batch
    from dopsd.mini.recipe_config import tiny_recipe

    # every sample a tint sample; with p_tint_same_colours=1 the reference shares the target's background, so
    # their corners (background under the same tint) have the same chroma (the grain is grey); with 0 the
    # reference is another scene
    def corner_chroma(x: torch.Tensor) -> torch.Tensor:
        c = x[:, :, :2, :2].mean((2, 3))
        return c - c.mean(1, keepdim=True)

    for same, agree in ((1.0, True), (0.0, False)):
        rc = dataclasses.replace(tiny_recipe(), p_incontext=0.0, p_tint=1.0, p_tint_same_colours=same)
        b = sample_batch(rc, 16, torch.Generator().manual_seed(0))
        assert bool((b.path > 0).all())
        gap = (corner_chroma(b.x0) - corner_chroma(b.ref)).abs().amax(1)
        assert bool((gap < 0.05).all()) == agree

    rc = dataclasses.replace(tiny_recipe(), base_iters=3)
    torch.manual_seed(123)
    dit, enc = build(rc.model)
    start = [p.detach().clone() for p in dit.parameters()]
    continued, _ = pretrain(rc, log=lambda _: None, init=(dit, enc))
    scratch, _ = pretrain(rc, log=lambda _: None)
    assert all(torch.equal(a, p) for a, p in zip(start, dit.parameters()))  # the given modules are not changed

    def dist(net: torch.nn.Module) -> float:
        return float(sum((p - s).pow(2).sum() for p, s in zip(net.parameters(), start)))

    assert 0 < dist(continued) < 0.01 * dist(scratch)  # trained onward from the given weights, not from scratch


def test_staged_recipe_from_a_stored_base_builds_the_same_weights(tmp_path, capsys):
    """mini-recipe-4 (a context stage after the base) run whole equals the same recipe run in pieces: the first
    stage's stored base, the context stage continued from that file, then `--base` for the distillation. This is
    how a recipe can restart from an earlier run's base; a --base that is a turbo is refused before any work."""
    from dopsd.mini.adapter import build_from
    from dopsd.mini.recipe import half_state, pretrain
    from dopsd.mini.recipe_config import stage_config, tiny_staged_recipe

    whole, first, pieces = tmp_path / "whole", tmp_path / "first", tmp_path / "pieces"
    assert main(["mini", "recipe", "--tiny", "--recipe", "mini-recipe-4", "--out", str(whole)]) == 0
    assert main(["mini", "recipe", "--tiny", "--recipe", "mini-recipe-3", "--out", str(first)]) == 0
    m_whole = json.loads((whole / "manifest.json").read_text())
    m_first = json.loads((first / "manifest.json").read_text())
    assert (m_whole["recipe_version"], m_first["recipe_version"]) == ("mini-recipe-4", "mini-recipe-3")
    assert m_whole["wall_time_s"]["context_stage"] > 0 and "context_stage" not in m_first["wall_time_s"]
    assert m_whole["sha256"]["base.safetensors"] != m_first["sha256"]["base.safetensors"]  # the stage trained

    _, dit, enc, _ = build_from(first / "base.safetensors")
    dit, enc = pretrain(stage_config(tiny_staged_recipe()), log=lambda _: None, init=(dit, enc))
    from dopsd.files import atomic_save_safetensors

    (tmp_path / "staged").mkdir()
    staged = tmp_path / "staged" / "base.safetensors"
    atomic_save_safetensors(staged, half_state(dit, enc))
    shutil.copy(first / "manifest.json", tmp_path / "staged" / "manifest.json")
    argv = ["mini", "recipe", "--tiny", "--recipe", "mini-recipe-4", "--out", str(pieces), "--base", str(staged)]
    assert main(argv) == 0
    m_pieces = json.loads((pieces / "manifest.json").read_text())
    assert m_pieces["sha256"]["base.safetensors"] == m_whole["sha256"]["base.safetensors"]
    assert m_pieces["sha256"] == m_whole["sha256"]
    assert m_pieces["base_from"]["sha256"] == sha256(staged) and "--base" in m_pieces["command"]
    assert set(m_pieces["wall_time_s"]) == {"trajectories", "distil", "total"}

    capsys.readouterr()
    refused = tmp_path / "refused"
    argv = ["mini", "recipe", "--tiny", "--out", str(refused), "--base"]
    assert main(argv + [str(whole / "turbo.safetensors")]) == 2  # the default: the shipped recipe, mini-recipe-4
    err = capsys.readouterr().err
    assert "--base:" in err and "turbo.safetensors is a turbo" in err and "Traceback" not in err
    assert main(argv + [str(staged), "--recipe", "mini-recipe-3"]) == 2  # distils from a float32 base no file holds
    assert "--base needs --recipe mini-recipe-4" in capsys.readouterr().err
    assert main(argv + [str(tmp_path / "nowhere")]) == 2
    assert "--base: no miniature weights at" in capsys.readouterr().err
    assert main(argv + [str(staged), "--recipe", "mini-recipe-9"]) == 2
    err = capsys.readouterr().err
    assert "--recipe mini-recipe-9: this dopsd builds mini-recipe-3 or mini-recipe-4" in err and "Traceback" not in err
    assert not refused.exists()

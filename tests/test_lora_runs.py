"""The files of real training runs (`dopsd.train` on the tiny Z-Image and an editing FLUX.2-klein) as other tools and
people meet them: file modes, the float32 export, the checkpoints' LoRA-keyed files in diffusers and in ComfyUI's key
loading (tests/comfy_view.py), `dopsd sample` on every file and folder dopsd writes, editing LoRAs, the model card."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from comfy_view import comfy_apply, original_weights
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_encoders import build_qwen3_vl
from tiny_real import build_flux2, build_zimage, train_config, write_pairs

import dopsd
from dopsd.cli import main as cli
from dopsd.models import registry
from dopsd.tools import export

torch.set_num_threads(1)
ALPHA_OVER_RANK = 2.0  # lora.rank=4, lora.alpha=8 (tiny_real.train_config): scale 1 would be half strength


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two 2-step runs written under umask 022: Z-Image (VLM teacher, trigger word) and an editing FLUX.2."""
    root = tmp_path_factory.mktemp("runs")
    old = os.umask(0o022)
    try:
        zi = root / "zi"
        model, vl = build_zimage(zi / "model"), build_qwen3_vl(zi / "vl")
        data = write_pairs(zi / "data", ["a red cat", "a teapot"], 32, seed=7)
        extra = [f"model.pretrained={model}", f"model.teacher_encoder={vl}", "data.trigger_word=sks", "optim.lr=2e-2"]
        zi_run = dopsd.train(train_config("zimage-turbo", zi, data, 32, *extra)).output_dir
        fl = root / "fl"
        model = build_flux2(fl / "model")
        data = write_pairs(fl / "data", ["make it red", "make it blue"], 64, seed=7)
        sources = write_pairs(fl / "sources", ["unused", "unused"], 64, seed=8)
        extra = [f"model.pretrained={model}", "model.editing=true", f"data.source_dir={sources}", "optim.lr=2e-2"]
        fl_run = dopsd.train(train_config("flux2-klein-4b", fl, data, 64, *extra)).output_dir
    finally:
        os.umask(old)
    return SimpleNamespace(zi=zi_run, fl=fl_run, source=sources / "img0.png", root=root)


def _ckpt(run: Path) -> Path:
    return sorted((run / "checkpoints").iterdir())[-1]


def _pipe(run: Path):
    from dopsd.config import load_config

    model = load_config(str(run / "config.yaml")).model
    return registry.family_module(model.family).load(model).pipeline()


def _diffusers_delta(run: Path, folder: Path, name: str) -> dict[str, torch.Tensor]:
    """How much `pipe.load_lora_weights(folder, weight_name=name)` + fuse_lora changes each weight."""
    pipe = _pipe(run)
    base = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(str(folder), weight_name=name)
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    now = pipe.transformer.state_dict()
    return {k: now[k] - v for k, v in base.items() if not torch.equal(now[k], v)}


def test_every_safetensors_file_follows_the_umask(runs, tmp_path):
    from dopsd.files import atomic_save_safetensors

    written = [p for run in (runs.zi, runs.fl) for p in run.rglob("*.safetensors")]
    written += list((runs.root / "zi" / "cache").rglob("*.safetensors"))
    assert {"lora.safetensors", "trainable.safetensors", "optimizer.safetensors"} <= {p.name for p in written}
    modes = {str(p.relative_to(runs.root)): oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {"0o644"}, modes
    old = os.umask(0o027)  # another umask gives another mode: it is followed, not a fixed 0644
    try:
        out = atomic_save_safetensors(tmp_path / "x.safetensors", {"a": torch.zeros(2)})
        exported = export.export(runs.zi, tmp_path / "e.safetensors")
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(exported.stat().st_mode & 0o777) == "0o640"


def test_fp32_export_is_the_float32_state_with_the_run_metadata(runs, tmp_path):
    run, ckpt = runs.zi, _ckpt(runs.zi)
    written = export.export(run, tmp_path / "x.safetensors", dtype="fp32")
    state, run_file = load_file(written), load_file(run / "lora.safetensors")
    assert {v.dtype for v in state.values()} == {torch.float32} and state.keys() == run_file.keys()
    assert all(torch.equal(state[k].bfloat16(), run_file[k]) for k in state)  # the run file rounds this state
    assert any(not torch.equal(v, v.bfloat16().float()) for v in state.values())  # and it is not re-encoded bf16
    # ComfyUI's reading of the export applies exactly the trained float32 deltas (B·A·alpha/r of the checkpoint)
    pipe = _pipe(run)
    native, key_map = original_weights("zimage", pipe.transformer)
    patched, unloaded = comfy_apply(state, native, key_map)
    trained = load_file(ckpt / "trainable.safetensors")
    expected = {k: v.clone() for k, v in native.items()}
    for key in trained:
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0]
            delta = trained[key.replace("lora_A", "lora_B")] @ trained[key] * ALPHA_OVER_RANK
            target, row, rows = key_map[module]
            expected[target][row or 0 : (row or 0) + delta.shape[0]] += delta
    assert unloaded == [] and all(torch.allclose(patched[k], expected[k], atol=1e-6) for k in native)
    with safe_open(str(written), "pt") as fh:
        md = fh.metadata()
    assert md["modelspec.title"] == "run" and md["modelspec.trigger_phrase"] == "sks" and md["ss_steps"] == "2"
    assert json.loads(md["dopsd"])["dtype"] == "fp32" and md["ss_network_dim"] == "4"
    # a run that kept no checkpoint has no float32 weights: refused, not re-encoded
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("checkpoints"))
    with pytest.raises(export.ExportError, match="no checkpoint of step 2.*would only re-encode bf16"):
        export.export(bare, tmp_path / "y.safetensors", dtype="fp32")
    assert not (tmp_path / "y.safetensors").exists()


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_checkpoint_lora_files_load_at_trained_strength_or_not_at_all(runs, tmp_path, family):
    """diffusers: Z-Image's trainable.safetensors loads as trained (its lora_adapter_metadata gives alpha); FLUX.2's
    keys load nothing. ComfyUI's key loading takes none of their keys. The same tensors without the metadata are what
    diffusers applied at half strength before."""
    run = runs.zi if family == "zimage" else runs.fl
    ckpt = _ckpt(run)
    export.export(run, tmp_path / "x.safetensors", dtype="fp32")
    right = _diffusers_delta(run, tmp_path, "x.safetensors")
    assert right, "the LoRA changes the weights: the comparisons have power"
    delta = _diffusers_delta(run, ckpt, "trainable.safetensors")
    if family == "zimage":
        assert delta.keys() == right.keys() and all(torch.allclose(delta[k], right[k], atol=1e-6) for k in right)
    else:
        assert delta == {}
    native, key_map = original_weights(family, _pipe(run).transformer)
    for name in ("trainable.safetensors", "teacher.safetensors", "prior.safetensors"):
        if (ckpt / name).is_file():  # the shadows: the EMA teacher's and the prior's LoRA, keyed alike
            lora = load_file(ckpt / name)
            assert comfy_apply(lora, native, key_map)[1] == sorted(lora)  # every key left unloaded
    if family == "zimage":
        plain = tmp_path / "plain"
        plain.mkdir()
        save_file(load_file(ckpt / "trainable.safetensors"), str(plain / "t.safetensors"))
        half = _diffusers_delta(run, plain, "t.safetensors")
        k = next(iter(right))
        assert torch.allclose(half[k] * ALPHA_OVER_RANK, right[k], atol=1e-6)


def _sample(run: Path, out: Path, *extra: str) -> np.ndarray:
    assert cli(["sample", str(run), "--prompt", "make it red", "--seeds", "0", "--out", str(out), *extra]) == 0
    return np.asarray(Image.open(out.with_suffix("") / "p00-make-it-red-s0.png")).astype(int)


def test_sample_takes_every_file_and_folder_dopsd_writes_and_edits_a_source(runs, tmp_path, capsys):
    run, ckpt, src = runs.fl, _ckpt(runs.fl), ["--source", str(runs.source)]
    comfy = export.export(run, tmp_path / "comfy")  # bf16, named after the run
    export.export(run, tmp_path / "diffusers", fmt="diffusers")
    bf16 = {
        "run folder": _sample(run, tmp_path / "a.png", *src),
        "run file": _sample(run, tmp_path / "b.png", *src, "--lora", str(run / "lora.safetensors")),
        "comfyui export": _sample(run, tmp_path / "c.png", *src, "--lora", str(comfy)),
        "diffusers export folder": _sample(run, tmp_path / "d.png", *src, "--lora", str(tmp_path / "diffusers")),
    }
    fp32 = {
        "checkpoint folder": _sample(run, tmp_path / "e.png", *src, "--lora", str(ckpt)),
        "checkpoint file": _sample(run, tmp_path / "f.png", *src, "--lora", str(ckpt / "trainable.safetensors")),
    }
    base = _sample(run, tmp_path / "g.png", *src, "--no-lora")
    first = bf16["run folder"]
    assert all(np.array_equal(v, first) for v in bf16.values())
    assert np.array_equal(fp32["checkpoint file"], fp32["checkpoint folder"])
    rounding = int(np.abs(fp32["checkpoint file"] - first).max())  # bf16 file vs float32 state
    assert rounding <= 2 < int(np.abs(base - first).max()), (rounding, int(np.abs(base - first).max()))
    # the source image is an input: without it the same prompt and seed give another picture
    assert not np.array_equal(_sample(run, tmp_path / "h.png"), first)
    sidecar = json.loads((tmp_path / "a" / "p00-make-it-red-s0.json").read_text())
    assert sidecar["sources"] == [str(runs.source.resolve())] and "--source" in sidecar["reproduce"]
    with safe_open(str(run / "lora.safetensors"), "pt") as fh:
        md = fh.metadata()
    assert json.loads(md["dopsd"])["editing"] and "Editing LoRA" in md["modelspec.usage_hint"]
    assert "editing LoRA" in md["modelspec.description"]
    capsys.readouterr()
    assert cli(["sample", str(runs.zi), "--prompt", "x", "--out", str(tmp_path / "z.png"), *src]) == 2
    err = capsys.readouterr().err
    assert "--source" in err and "model.editing false" in err and "Traceback" not in err


def test_model_card_parses_and_names_base_trigger_and_samples(runs, tmp_path, capsys):
    from huggingface_hub import ModelCard

    from dopsd.lora.card import card_text
    from dopsd.lora.files import read_lora

    out = tmp_path / "hub"
    args = ["export", str(runs.zi), "--out", str(out), "--model-card", "--base-model", "Tongyi-MAI/Z-Image-Turbo"]
    assert cli(args) == 0
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == "Tongyi-MAI/Z-Image-Turbo" and data["instance_prompt"] == "sks"
    assert {"lora", "dopsd", "z-image", "text-to-image"} <= set(data["tags"])
    urls = [w["output"]["url"] for w in data["widget"]]
    assert urls and all((out / u).is_file() for u in urls) and "sks" in data["widget"][0]["text"]
    assert "run.safetensors" in card.text and "rank 4, alpha 8" in card.text
    assert cli(args) == 2 and "already exists" in capsys.readouterr().err  # nothing replaced without --overwrite
    # an editing LoRA's card says so; a size that is not a published model names no base_model
    editing = ModelCard(card_text(read_lora(runs.fl).facts, "x.safetensors")).data.to_dict()
    assert "image-to-image" in editing["tags"] and "base_model" not in editing

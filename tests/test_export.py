"""LoRA files other tools load: trained by dopsd → the run's lora.safetensors / `dopsd export` → the real
diffusers pipelines and an independent reading of ComfyUI's loader (tests/comfy_view.py) → the same samples."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from comfy_view import comfy_apply, original_weights, to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_encoders import build_qwen3_vl
from tiny_real import build_flux2, build_zimage, dopsd_lora_steps, images, model_config

from dopsd.cli import main as cli
from dopsd.core.sampler import sample_euler
from dopsd.lora.trained import apply_trained, save_trained
from dopsd.models import flux2, zimage
from dopsd.tools import export

torch.set_num_threads(1)
CAPTIONS = ["a red cat", "a [V] teapot on a wooden table"]
RANK, ALPHA = 4, 8.0
BF16_TOLERANCE = 0.02  # bf16 file vs float32 file: max sample difference / max LoRA effect (measured 0.0015-0.002)


def _trained(family: str, root):
    """A tiny model of the family with a LoRA trained for a few D-OPSD steps (alpha/r = 2), its own samples
    and a run folder written by save_trained (float32 and the bf16 default)."""
    if family == "zimage":
        cfg = model_config(
            "zimage",
            pretrained=str(build_zimage(root / "zi")),
            teacher_encoder=str(build_qwen3_vl(root / "vl")),
            height=32,
            width=32,
            max_caption_tokens=32,
        )
        adapter, size, kw = zimage.load(cfg), 32, {"guidance_scale": 0.0}
    else:
        cfg = model_config(
            "flux2", pretrained=str(build_flux2(root / "fl")), height=64, width=64, max_caption_tokens=32
        )
        adapter, size, kw = flux2.load(cfg), 64, {"guidance_scale": 1.0}
    out = dopsd_lora_steps(adapter, CAPTIONS, images(2, size), steps=3, lr=2e-2, rank=RANK, alpha=ALPHA)
    noise = torch.randn(2, *adapter.latent_shape(size, size), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ours = sample_euler(
            lambda x, s, c: adapter.velocity(adapter.network, x, s, c),
            noise,
            adapter.inference_schedule(size, size),
            out["student_ctx"],
        )
    if family == "flux2":
        ours = adapter.to_vae_latents(ours)
    call = dict(
        prompt=list(CAPTIONS),
        height=size,
        width=size,
        num_inference_steps=adapter.steps,
        latents=noise,
        output_type="latent",
        max_sequence_length=32,
        **kw,
    )
    lora = {"rank": RANK, "alpha": ALPHA, "targets": adapter.default_lora_targets()}
    meta = {
        "family": family,
        "model": {"pretrained": cfg.pretrained, "height": size, "width": size},
        "method": "dopsd",
        "steps": 3,
        "prompts": CAPTIONS,
        "trigger_word": "[V]",
    }
    runs = {}
    for dtype in ("fp32", "bf16"):
        runs[dtype] = root / f"run-{dtype}"
        runs[dtype].mkdir()
        save_trained(runs[dtype], adapter.network, lora, meta, **({"dtype": "fp32"} if dtype == "fp32" else {}))
    return SimpleNamespace(
        cfg=cfg,
        adapter=adapter,
        ours=ours,
        call=call,
        family=family,
        lora=lora,
        meta=meta,
        module=zimage if family == "zimage" else flux2,
        run=runs["fp32"],
        run_bf16=runs["bf16"],
    )


@pytest.fixture(scope="module", params=["zimage", "flux2"])
def trained(request, tmp_path_factory):
    return _trained(request.param, tmp_path_factory.mktemp(request.param))


def fresh_pipe(t):
    return t.module.load(t.cfg).pipeline()


def run(pipe, t):
    # ZImagePipeline rewrites the prompt list in place (chat template): pass a fresh copy every call.
    return pipe(**{**t.call, "prompt": list(t.call["prompt"])}).images


def diffusers_samples(t, path):
    pipe = fresh_pipe(t)
    pipe.load_lora_weights(str(path))
    return run(pipe, t)


def comfy_samples(t, path):
    """Samples of the diffusers pipeline whose weights ComfyUI's loader patched with the file at strength 1."""
    pipe = fresh_pipe(t)
    native, key_map = original_weights(t.family, pipe.transformer)
    patched, unloaded = comfy_apply(load_file(str(path)), native, key_map)
    missing, unexpected = pipe.transformer.load_state_dict(to_diffusers(t.family, patched), strict=False)
    assert not unexpected
    return run(pipe, t), unloaded


def test_run_lora_is_the_same_lora_in_diffusers_comfyui_and_dopsd(trained):
    t = trained
    path = t.run / "lora.safetensors"
    state = load_file(path)
    assert all(k.startswith("diffusion_model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    untouched = run(fresh_pipe(t), t)
    assert (untouched - t.ours).abs().max() > 1e-3  # the LoRA changes the output: the comparisons have power
    assert torch.allclose(diffusers_samples(t, path), t.ours, atol=1e-5)
    assert torch.allclose(diffusers_samples(t, t.run), t.ours, atol=1e-5)  # load_lora_weights(run folder)
    comfy, unloaded = comfy_samples(t, path)
    assert unloaded == [] and torch.allclose(comfy, t.ours, atol=1e-5), (comfy - t.ours).abs().max()
    own = t.module.load(t.cfg)  # `dopsd sample` / `dopsd eval` read the same file
    apply_trained(own.network, path)
    assert torch.allclose(run(own.pipeline(), t), t.ours, atol=1e-5)


def test_diffusers_layout_with_unfolded_alpha_fails_the_comfyui_check(trained, tmp_path):
    """What dopsd wrote before (diffusers keys, alpha/r only in diffusers' metadata): ComfyUI applies it at
    half strength here (alpha/r = 2). The check above would catch it."""
    t = trained
    from peft import get_peft_model_state_dict

    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(t.adapter.network).items()}
    t.adapter.pipeline_class.save_lora_weights(
        str(tmp_path),
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=t.adapter.network.peft_config["default"].to_dict(),
    )
    assert torch.allclose(diffusers_samples(t, tmp_path), t.ours, atol=1e-5)  # diffusers reads its metadata
    comfy, _ = comfy_samples(t, tmp_path / export.WEIGHTS_NAME)
    assert (comfy - t.ours).abs().max() > 1e-3
    fixed = export.export(tmp_path, tmp_path / "fixed.safetensors", dtype="fp32")  # `dopsd export` repairs it
    comfy, unloaded = comfy_samples(t, fixed)
    assert unloaded == [] and torch.allclose(comfy, t.ours, atol=1e-5)


def test_bf16_default_halves_the_file_and_keeps_the_samples(trained, tmp_path):
    t = trained
    fp32, bf16 = t.run / "lora.safetensors", t.run_bf16 / "lora.safetensors"
    a, b = load_file(fp32), load_file(bf16)
    assert {v.dtype for v in b.values()} == {torch.bfloat16} and a.keys() == b.keys()
    nbytes = lambda s: sum(v.numel() * v.element_size() for v in s.values())  # noqa: E731
    assert 2 * nbytes(b) == nbytes(a)
    effect = (run(fresh_pipe(t), t) - t.ours).abs().max()
    fp16 = export.export(t.run, tmp_path / "h.safetensors", dtype="fp16")
    assert {v.dtype for v in load_file(fp16).values()} == {torch.float16}
    for samples in (diffusers_samples(t, bf16), comfy_samples(t, bf16)[0], diffusers_samples(t, fp16)):
        assert (samples - t.ours).abs().max() <= BF16_TOLERANCE * effect, ((samples - t.ours).abs().max(), effect)


def test_file_metadata_names_the_model_and_the_training(trained):
    t = trained
    with safe_open(str(t.run_bf16 / "lora.safetensors"), "pt") as fh:
        md = fh.metadata()
    arch = {"zimage": "Z-Image/lora", "flux2": "Flux.2/lora"}[t.family]  # tiny models: not a published size
    assert md["modelspec.sai_model_spec"] == "1.0.0" and md["modelspec.architecture"] == arch
    assert md["modelspec.title"] == "run-bf16" and md["modelspec.trigger_phrase"] == "[V]"
    assert md["modelspec.resolution"] in ("32x32", "64x64") and md["modelspec.date"][:2] == "20"
    assert md["ss_network_dim"] == str(RANK) and md["ss_network_alpha"] == str(RANK)  # alpha folded: scale 1
    assert md["ss_steps"] == "3" and md["ss_sd_model_name"] in ("zi", "fl")
    assert md["ss_base_model_version"] == {"zimage": "z_image", "flux2": "flux_2"}[t.family]  # musubi-tuner ids
    dopsd = json.loads(md["dopsd"])
    assert dopsd["alpha"] == ALPHA and dopsd["rank"] == RANK and dopsd["method"] == "dopsd"
    assert dopsd["alpha_folded"] and dopsd["dtype"] == "bf16" and "not a published size" in dopsd["variant"]
    config = json.loads((t.run_bf16 / "lora_config.json").read_text())
    assert config["layout"] == "interchange" and config["alpha"] == ALPHA


def test_published_sizes_are_recognised():
    from diffusers import Flux2Transformer2DModel, ZImageTransformer2DModel

    from dopsd.models.registry import base_facts

    with torch.device("meta"):
        klein4 = Flux2Transformer2DModel(
            num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680
        )
        klein9 = Flux2Transformer2DModel(
            num_layers=8,
            num_single_layers=24,
            attention_head_dim=128,
            num_attention_heads=32,
            joint_attention_dim=12288,
        )
        zi = ZImageTransformer2DModel(
            dim=3840,
            n_layers=30,
            n_refiner_layers=2,
            n_heads=30,
            n_kv_heads=30,
            cap_feat_dim=2560,
            axes_dims=[32, 48, 48],
            axes_lens=[1536, 512, 512],
        )
    ids = lambda f: (f.variant, f.architecture)  # noqa: E731
    assert ids(base_facts("flux2", klein4)) == ("FLUX.2-klein 4B", "Flux.2-klein-4b")
    assert ids(base_facts("flux2", klein9)) == ("FLUX.2-klein 9B", "Flux.2-klein-9b")
    assert ids(base_facts("zimage", zi)) == ("Z-Image 6B", "Z-Image")
    assert base_facts("flux2", zi) is None and base_facts("zimage", klein4) is None  # another family's config


def test_export_cli_both_formats_load_everywhere(trained, tmp_path, capsys):
    t = trained
    assert cli(["export", str(t.run), "--out", str(tmp_path / "c"), "--dtype", "fp32", "--title", "teapot"]) == 0
    assert cli(["export", str(t.run), "--format", "diffusers", "--out", str(tmp_path / "d"), "--dtype", "fp32"]) == 0
    assert "loads in diffusers and ComfyUI" in capsys.readouterr().out
    comfy_file, diffusers_file = tmp_path / "c" / "run-fp32.safetensors", tmp_path / "d" / export.WEIGHTS_NAME
    a, b = load_file(comfy_file), load_file(diffusers_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.allclose(diffusers_samples(t, tmp_path / "d"), t.ours, atol=1e-5)
    comfy, unloaded = comfy_samples(t, comfy_file)
    assert unloaded == [] and torch.allclose(comfy, t.ours, atol=1e-5)
    with safe_open(str(comfy_file), "pt") as fh:
        assert fh.metadata()["modelspec.title"] == "teapot" and json.loads(fh.metadata()["dopsd"])["steps"] == 3


def test_older_run_files_still_export_exactly(trained, tmp_path):
    """Runs written before this layout: bare peft keys + lora_config.json, and diffusers' transformer.* file."""
    t = trained
    from dopsd.lora.inject import lora_state_dict

    old = tmp_path / "old"
    old.mkdir()
    save_file(lora_state_dict(t.adapter.network), str(old / "lora.safetensors"), metadata={"format": "dopsd-lora"})
    (old / "lora_config.json").write_text(json.dumps({"format": "dopsd-lora", **t.lora, **t.meta}))
    written = export.export(old, tmp_path / "x.safetensors", dtype="fp32")
    assert torch.allclose(diffusers_samples(t, written), t.ours, atol=1e-5)
    own = t.module.load(t.cfg)
    apply_trained(own.network, old / "lora.safetensors")
    assert torch.allclose(run(own.pipeline(), t), t.ours, atol=1e-5)


def test_export_refuses_what_does_not_fit(trained, tmp_path, capsys):
    t = trained
    other = {"zimage": "flux2", "flux2": "zimage"}[t.family]
    assert cli(["export", str(t.run), "--out", str(tmp_path / "o.safetensors"), "--model", other]) == 2
    assert f"is a {t.family} LoRA" in capsys.readouterr().err
    (tmp_path / "exists.safetensors").write_bytes(b"mine")
    assert cli(["export", str(t.run), "--out", str(tmp_path / "exists.safetensors")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "exists.safetensors").read_bytes() == b"mine"
    assert cli(["export", str(t.run), "--out", str(tmp_path / "o.safetensors"), "--alpha", "3"]) == 2
    assert "--alpha is only for" in capsys.readouterr().err
    assert cli(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "no LoRA file" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_bad_lora_files_are_refused(tmp_path):
    from dopsd.errors import DopsdError

    save_file({"layers.0.attention.to_q.weight": torch.zeros(2, 2)}, str(tmp_path / "full.safetensors"))
    with pytest.raises(DopsdError, match="not a LoRA weight"):
        export.export(tmp_path / "full.safetensors", tmp_path / "o.safetensors", alpha=1.0)
    save_file(
        {
            "layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 2),
            "layers.0.attention.to_q.lora_B.weight": torch.zeros(2, 2),
        },
        str(tmp_path / "bare.safetensors"),
    )
    with pytest.raises(DopsdError, match="pass --alpha"):
        export.export(tmp_path / "bare.safetensors", tmp_path / "o.safetensors")
    save_file(
        {
            "norm_out.linear.lora_A.weight": torch.zeros(2, 2),
            "norm_out.linear.lora_B.weight": torch.zeros(2, 2),
            "single_transformer_blocks.0.attn.to_out.lora_A.weight": torch.zeros(2, 2),
            "single_transformer_blocks.0.attn.to_out.lora_B.weight": torch.zeros(2, 2),
        },
        str(tmp_path / "odd.safetensors"),
    )
    with pytest.raises(DopsdError, match="norm_out.linear.*drop it from lora.targets"):
        export.export(tmp_path / "odd.safetensors", tmp_path / "o.safetensors", alpha=2.0)
    assert not (tmp_path / "o.safetensors").exists()


def test_unexportable_targets_keep_the_weights_in_dopsds_layout(trained, tmp_path, capsys):
    """A run whose LoRA has a module no other tool maps (FLUX.2's norm_out.linear) is refused by the adapter's
    target check (the trainer's call right after injecting the LoRA); weights written anyway are kept in dopsd's own
    layout, with a warning, and `dopsd export` names the module."""
    t = trained
    if t.family != "flux2":
        pytest.skip("every Z-Image Linear has an interchange name")
    from dopsd.config import ConfigError
    from dopsd.lora.inject import add_lora, lora_module_names

    default = t.module.load(t.cfg)
    add_lora(default.network, default.default_lora_targets(), RANK, ALPHA)
    default.check_lora_targets(lora_module_names(default.network))  # the default targets all export
    adapter = t.module.load(t.cfg)
    targets = flux2.LORA_TARGETS + r"|norm_out\.linear"
    add_lora(adapter.network, targets, RANK, ALPHA)
    with pytest.raises(
        ConfigError, match=r"lora.targets: 1 LoRA module\(s\) of FLUX.2-klein .*: norm_out.linear; drop"
    ):
        adapter.check_lora_targets(lora_module_names(adapter.network))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.warns(UserWarning, match="dopsd's own layout"):
        written = save_trained(run_dir, adapter.network, {**t.lora, "targets": targets}, t.meta)
    assert not any(k.startswith("diffusion_model.") for k in load_file(written))
    assert json.loads((run_dir / "lora_config.json").read_text())["layout"] == "dopsd-peft"
    apply_trained(t.module.load(t.cfg).network, written)  # dopsd itself still loads it
    assert cli(["export", str(run_dir), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "norm_out.linear" in capsys.readouterr().err

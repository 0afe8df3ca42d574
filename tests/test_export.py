"""LoRA export round trips: trained by dopsd → diffusers / ComfyUI files → a fresh diffusers pipeline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from dopsd import export
from dopsd.cli import main as cli
from dopsd.models import flux2, zimage
from dopsd.schedules import sample_euler
from tiny_real import build_flux2, build_qwen3_vl, build_zimage, dopsd_lora_steps, images

torch.set_num_threads(1)
CAPTIONS = ["a red cat", "a [V] teapot on a wooden table"]
RANK, ALPHA = 4, 8.0


def _trained(family: str, root):
    """A tiny model of the family with a LoRA trained for a few D-OPSD steps (alpha/r = 2)."""
    if family == "zimage":
        cfg = SimpleNamespace(pretrained=str(build_zimage(root / "zi")), teacher_encoder=str(build_qwen3_vl(root / "vl")),
                              height=32, width=32, max_caption_tokens=32)
        adapter, size, kw = zimage.load(cfg), 32, {"guidance_scale": 0.0}
    else:
        cfg = SimpleNamespace(pretrained=str(build_flux2(root / "fl")), height=64, width=64, max_caption_tokens=32)
        adapter, size, kw = flux2.load(cfg), 64, {"guidance_scale": 1.0}
    out = dopsd_lora_steps(adapter, CAPTIONS, images(2, size), steps=3, lr=2e-2, rank=RANK, alpha=ALPHA)
    noise = torch.randn(2, *adapter.latent_shape(size, size), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        ours = sample_euler(lambda x, s, c: adapter.velocity(adapter.network, x, s, c), noise,
                            adapter.inference_schedule(size, size), out["student_ctx"])
    if family == "flux2":
        ours = adapter.to_vae_latents(ours)
    call = dict(prompt=list(CAPTIONS), height=size, width=size, num_inference_steps=adapter.steps, latents=noise,
                output_type="latent", max_sequence_length=32, **kw)
    return SimpleNamespace(cfg=cfg, adapter=adapter, ours=ours, call=call, module=zimage if family == "zimage" else flux2)


@pytest.fixture(scope="module", params=["zimage", "flux2"])
def trained(request, tmp_path_factory):
    return request.param, _trained(request.param, tmp_path_factory.mktemp(request.param))


def fresh_pipe(t):
    return t.module.load(t.cfg).pipeline()


def run(pipe, t):
    # ZImagePipeline rewrites the prompt list in place (chat template): pass a fresh copy every call.
    return pipe(**{**t.call, "prompt": list(t.call["prompt"])}).images


def test_diffusers_format_round_trip_is_exact(trained, tmp_path):
    family, t = trained
    written = export.save_diffusers(t.adapter.network, tmp_path / "lora")
    assert written.name == "pytorch_lora_weights.safetensors"
    assert all(k.startswith("transformer.") and ".lora_" in k for k in load_file(written))
    pipe = fresh_pipe(t)
    untouched = run(pipe, t)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    loaded = run(pipe, t)
    own = run(t.adapter.pipeline(), t)  # the pipeline around dopsd's own trained network
    assert torch.equal(loaded, own)  # bit-identical: same weights, same arithmetic
    assert torch.allclose(loaded, t.ours, atol=1e-5), (loaded - t.ours).abs().max()  # == dopsd's sampler
    assert (untouched - t.ours).abs().max() > 1e-3  # the LoRA changes the output: the comparison has power


def _expected_comfy_names(family: str, modules: list[str]) -> set[str]:
    if family == "zimage":  # ComfyUI's Z-Image loader maps diffusers module names under diffusion_model.
        return {f"diffusion_model.{m}" for m in modules}
    names = set()
    for m in modules:
        b = m.split(".")[1]
        rest = m.split(".", 2)[2]
        if m.startswith("single_transformer_blocks."):
            names.add(f"diffusion_model.single_blocks.{b}." + {"attn.to_qkv_mlp_proj": "linear1", "attn.to_out": "linear2"}[rest])
        elif rest in ("attn.to_q", "attn.to_k", "attn.to_v"):
            names.add(f"diffusion_model.double_blocks.{b}.img_attn.qkv")
        elif rest in ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"):
            names.add(f"diffusion_model.double_blocks.{b}.txt_attn.qkv")
        else:
            names.add(f"diffusion_model.double_blocks.{b}." + {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj"}[rest])
    return names


def test_comfyui_format_names_and_round_trip(trained, tmp_path):
    family, t = trained
    export.save_diffusers(t.adapter.network, tmp_path / "lora")
    path = export.export(tmp_path / "lora", tmp_path / "comfy.safetensors", "comfyui")
    state = load_file(path)
    modules = sorted({k.split(".lora_")[0] for k in load_file(tmp_path / "lora" / export.WEIGHTS_NAME)})
    modules = [m.removeprefix("transformer.") for m in modules]
    names = {k.rsplit(".lora_", 1)[0] for k in state}
    assert names == _expected_comfy_names(family, modules)
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)  # no alpha: scale folded into B
    if family == "flux2":
        qkv_a = state["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"]
        qkv_b = state["diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight"]
        inner = t.adapter.network.inner_dim
        assert qkv_a.shape == (3 * RANK, inner) and qkv_b.shape == (3 * inner, 3 * RANK)
        # diffusers' own converter for original (BFL) checkpoints maps these names back onto our modules
        from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

        fake = {f"{n.removeprefix('diffusion_model.')}.weight": torch.zeros(3, 3) for n in names}
        back = {k.removesuffix(".weight") for k in convert_flux2_transformer_checkpoint_to_diffusers(fake)}
        assert back == set(modules)
    else:
        net = dict(t.adapter.network.named_modules())
        assert all(isinstance(net[n.removeprefix("diffusion_model.")].base_layer, torch.nn.Linear) for n in names)
    # The folded scale is exact: B_comfy = (alpha / r) · B for an unfused module.
    key = next(k for k in state if k.endswith("lora_B.weight") and ".qkv." not in k)
    module = key.removeprefix("diffusion_model.").removesuffix(".lora_B.weight")
    src = next(m for m in modules if export._flux2_name(m)[0] == module) if family == "flux2" else module
    original = load_file(tmp_path / "lora" / export.WEIGHTS_NAME)[f"transformer.{src}.lora_B.weight"]
    assert torch.equal(state[key], original * (ALPHA / RANK))
    # diffusers reads the ComfyUI file too, and it reproduces dopsd's samples
    pipe = fresh_pipe(t)
    pipe.load_lora_weights(str(path))
    assert torch.allclose(run(pipe, t), t.ours, atol=1e-5)


def test_export_cli_on_a_training_run(trained, tmp_path, capsys):
    from dopsd.sample import save_trained

    family, t = trained
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_trained(run_dir, t.adapter.network, {"rank": RANK, "alpha": ALPHA, "targets": t.adapter.default_lora_targets()}, {})
    assert cli(["export", str(run_dir), "--format", "comfyui", "--out", str(tmp_path / "c.safetensors")]) == 0
    assert cli(["export", str(run_dir), "--format", "diffusers", "--out", str(tmp_path / "d")]) == 0
    assert "wrote" in capsys.readouterr().out
    pipe = fresh_pipe(t)
    pipe.load_lora_weights(str(tmp_path / "d"))
    assert torch.allclose(run(pipe, t), t.ours, atol=1e-5)
    comfy = load_file(tmp_path / "c.safetensors")
    assert all(k.startswith("diffusion_model.") for k in comfy)
    assert cli(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")]) == 2
    assert "no LoRA file" in capsys.readouterr().out


def test_bad_inputs_are_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"layers.0.attention.to_q.weight": torch.zeros(2, 2)}, str(tmp_path / "full.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA A/B weight"):
        export.export(tmp_path / "full.safetensors", tmp_path / "o.safetensors", "comfyui", alpha=1.0)
    save_file({"layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 2),
               "layers.0.attention.to_q.lora_B.weight": torch.zeros(2, 2)}, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="pass --alpha"):
        export.export(tmp_path / "bare.safetensors", tmp_path / "o.safetensors", "comfyui")
    save_file({"norm_out.linear.lora_A.weight": torch.zeros(2, 2), "norm_out.linear.lora_B.weight": torch.zeros(2, 2),
               "single_transformer_blocks.0.attn.to_out.lora_A.weight": torch.zeros(2, 2),
               "single_transformer_blocks.0.attn.to_out.lora_B.weight": torch.zeros(2, 2)},
              str(tmp_path / "odd.safetensors"))
    with pytest.raises(ValueError, match="norm_out.linear.*no ComfyUI name"):
        export.export(tmp_path / "odd.safetensors", tmp_path / "o.safetensors", "comfyui", alpha=2.0)

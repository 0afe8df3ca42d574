"""Z-Image-Turbo adapter on a tiny random model of the real architecture, against diffusers' own pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_encoders import build_qwen3_vl
from tiny_real import build_flux2, build_zimage, dopsd_lora_steps, images, model_config

from dopsd.core.sampler import sample_euler
from dopsd.core.schedules import shifted_schedule, training_schedule
from dopsd.models import zimage
from dopsd.models.local import ModelFolderError

torch.set_num_threads(1)
SIZE = 32
CAPTIONS = ["a red cat", "a [V] teapot on a wooden table"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("zimage")
    return SimpleNamespace(root=root, model=build_zimage(root / "zi"), vlm=build_qwen3_vl(root / "vl"))


def config(folders, **kw):
    base = dict(
        pretrained=str(folders.model), teacher_encoder=str(folders.vlm), height=SIZE, width=SIZE, max_caption_tokens=64
    )
    return model_config("zimage", **{**base, **kw})


@pytest.fixture(scope="module")
def adapter(folders):
    return zimage.load(config(folders))


def test_sampling_reproduces_the_pipeline(adapter):
    """velocity + sample_euler on the adapter's schedule == ZImagePipeline (timestep 1−σ, negation, lists)."""
    pipe = adapter.pipeline()
    noise = torch.randn(2, *adapter.latent_shape(SIZE, SIZE), generator=torch.Generator().manual_seed(0))
    kw = dict(height=SIZE, width=SIZE, num_inference_steps=8, guidance_scale=0.0, max_sequence_length=64)
    # The pipeline rewrites the prompt list in place (chat template): give it a copy.
    ref = pipe(list(CAPTIONS), latents=noise.clone(), output_type="latent", **kw).images
    ctx = adapter.collate(adapter.student_contexts(CAPTIONS))
    with torch.no_grad():
        ours = sample_euler(
            lambda x, s, c: adapter.velocity(adapter.network, x, s, c),
            noise,
            adapter.inference_schedule(SIZE, SIZE),
            ctx,
        )
        flipped = sample_euler(
            lambda x, s, c: -adapter.velocity(adapter.network, x, s, c),
            noise,
            adapter.inference_schedule(SIZE, SIZE),
            ctx,
        )
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    assert (flipped - ref).abs().max() > 0.1  # the comparison can tell a wrong sign apart
    pixels = pipe(list(CAPTIONS), latents=noise.clone(), output_type="pt", **kw).images
    assert torch.allclose(adapter.decode(ours) * 0.5 + 0.5, pixels, atol=1e-4)


def test_schedule_is_turbo_8_steps_shift_3(adapter, folders):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = adapter.inference_schedule(SIZE, SIZE)
    assert torch.allclose(sched, shifted_schedule(8, 3.0))
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folders.model, subfolder="scheduler")
    scheduler.set_timesteps(sigmas=torch.linspace(1, 1 / 8, 8).tolist(), mu=0.5)
    assert torch.allclose(sched, scheduler.sigmas, atol=1e-6)
    assert torch.allclose(training_schedule(sched, 2), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]), atol=1e-6)


def test_student_features_are_hidden_states_minus_2_without_padding(adapter):
    ctx = adapter.student_contexts(CAPTIONS)
    text = adapter.tokenizer.apply_chat_template(
        [{"role": "user", "content": CAPTIONS[1]}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    ids = adapter.tokenizer(text, return_tensors="pt").input_ids
    hidden = adapter.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2][0]
    assert ctx[1]["cap_feats"].shape == hidden.shape  # padding removed: one row per real token
    assert torch.allclose(ctx[1]["cap_feats"], hidden, atol=1e-5)
    assert ctx[0]["cap_feats"].shape[0] < ctx[1]["cap_feats"].shape[0]


def test_vlm_teacher_transplants_the_text_encoder_and_sees_the_image(adapter, capsys):
    ims = images(2, SIZE, seed=3)
    teacher = adapter.teacher_contexts(CAPTIONS, ims)
    assert "24/24 language-model tensors transplanted" in capsys.readouterr().out
    vlm = adapter.vlm()
    assert (vlm.report.matched, vlm.report.total) == (24, 24)
    te = adapter.text_encoder.state_dict()
    for name, tensor in vlm.model.language_model.state_dict().items():
        assert torch.equal(tensor, te[name]), name
    student = adapter.student_contexts(CAPTIONS)
    for t, s in zip(teacher, student):
        assert t["cap_feats"].shape[1] == s["cap_feats"].shape[1]  # same width: the DiT reads it as a caption
        assert t["cap_feats"].shape[0] > s["cap_feats"].shape[0]  # image tokens come first
    other = adapter.teacher_contexts(CAPTIONS[:1], images(1, SIZE, seed=9))[0]["cap_feats"]
    assert other.shape == teacher[0]["cap_feats"].shape
    assert (other - teacher[0]["cap_feats"]).abs().max() > 1e-3  # the target image changes the teacher context
    # ... and the teacher's prediction, not the student's (the student context has no image at all)
    x = torch.randn(1, *adapter.latent_shape(SIZE, SIZE))
    s = torch.tensor([0.7])
    with torch.no_grad():
        v1 = adapter.velocity(adapter.network, x, s, adapter.collate(teacher[:1]))
        v2 = adapter.velocity(adapter.network, x, s, adapter.collate([{"cap_feats": other}]))
    assert (v1 - v2).abs().max() > 1e-4


def test_vlm_of_the_wrong_size_is_refused(folders):
    wide = build_qwen3_vl(folders.root / "vl_wide", text_hidden=32)
    with pytest.raises(ModelFolderError, match=r"differ in shape .*layers\.0\.|does not fit"):
        zimage.load(config(folders, teacher_encoder=str(wide))).teacher_contexts(CAPTIONS[:1], images(1, SIZE))
    deep = build_qwen3_vl(folders.root / "vl_deep", text_layers=3)
    with pytest.raises(ModelFolderError, match="no text-encoder counterpart"):
        zimage.load(config(folders, teacher_encoder=str(deep))).teacher_contexts(CAPTIONS[:1], images(1, SIZE))
    with pytest.raises(ModelFolderError, match="teacher_encoder is not set"):
        zimage.load(config(folders, teacher_encoder=None)).teacher_contexts(CAPTIONS[:1], images(1, SIZE))


def test_reference_teacher_and_editing_are_refused(folders):
    with pytest.raises(ValueError, match="no reference-image input"):
        zimage.load(config(folders, teacher_context="reference"))
    with pytest.raises(ValueError, match="editing"):
        zimage.load(config(folders, editing=True))


def test_dopsd_step_gives_finite_gradients_on_lora_only(folders):
    adapter = zimage.load(config(folders))
    out = dopsd_lora_steps(adapter, CAPTIONS, images(2, SIZE), steps=2, every=2)
    grads = out["grads"]
    lora = {n: g for n, g in grads.items() if "lora_" in n}
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    assert lora and all(g is not None and torch.isfinite(g).all() for g in lora.values())
    b_grads = [g for n, g in lora.items() if "lora_B" in n]
    assert sum(float(g.abs().sum()) for g in b_grads) > 0
    targeted = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora}
    assert {"to_q", "to_k", "to_v", "0", "w1", "w2", "w3"} <= targeted
    assert all(torch.isfinite(torch.tensor(out["losses"])))
    # Gradient checkpointing (the memory feature) gives the same gradients.
    net = adapter.network
    params = {n: p for n, p in net.named_parameters() if p.requires_grad}
    x = torch.randn(2, *adapter.latent_shape(SIZE, SIZE), generator=torch.Generator().manual_seed(5))
    sigma = torch.tensor([0.9, 0.4])

    def grad_once():
        for p in params.values():
            p.grad = None
        adapter.velocity(net, x, sigma, out["student_ctx"]).pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in params.items()}

    plain = grad_once()
    net.enable_gradient_checkpointing()
    ckpt = grad_once()
    net.disable_gradient_checkpointing()
    assert all(torch.allclose(plain[n], ckpt[n], atol=1e-6) for n in plain)


def test_release_encoders_frees_them(folders):
    adapter = zimage.load(config(folders))
    adapter.student_contexts(CAPTIONS[:1])
    adapter.release_encoders()
    assert adapter.text_encoder is None
    with pytest.raises(RuntimeError, match="released"):
        adapter.student_contexts(CAPTIONS[:1])


def test_encode_images_follows_each_image_size(adapter):
    lat = adapter.encode_images(images(2, SIZE))
    assert lat.shape == (2, *adapter.latent_shape(SIZE, SIZE))
    mixed = adapter.encode_images(images(1, SIZE) + images(1, 2 * SIZE))
    assert [tuple(x.shape) for x in mixed] == [
        adapter.latent_shape(SIZE, SIZE),
        adapter.latent_shape(2 * SIZE, 2 * SIZE),
    ]
    with pytest.raises(ValueError, match="multiples of 4"):
        adapter.latent_shape(30, 32)


def test_missing_or_wrong_folder_is_a_clear_error(folders, tmp_path):
    with pytest.raises(ModelFolderError, match="does not exist"):
        zimage.load(config(folders, pretrained=str(tmp_path / "nowhere")))
    with pytest.raises(ModelFolderError, match="pretrained is not set"):
        zimage.load(config(folders, pretrained=None))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelFolderError, match="no model_index.json"):
        zimage.load(config(folders, pretrained=str(empty)))
    broken = tmp_path / "broken"
    shutil.copytree(folders.model, broken)
    shutil.rmtree(broken / "vae")
    (broken / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(ModelFolderError, match=r"missing: transformer/ weights.*vae/ \(folder missing\)"):
        zimage.load(config(folders, pretrained=str(broken)))
    flux = build_flux2(tmp_path / "flux")
    with pytest.raises(ModelFolderError, match="'Flux2KleinPipeline' pipeline"):
        zimage.load(config(folders, pretrained=str(flux)))
    meta = json.loads((folders.model / "model_index.json").read_text())
    assert meta["_class_name"] == "ZImagePipeline"


def test_bf16_sampling_reproduces_the_bf16_pipeline(folders):
    """bf16 weights (the GPU setting): still identical to the pipeline (timestep kept in float32 like it)."""
    adapter = zimage.load(config(folders), "cpu", torch.bfloat16)
    assert next(adapter.network.parameters()).dtype == torch.bfloat16
    noise = torch.randn(2, *adapter.latent_shape(SIZE, SIZE), generator=torch.Generator().manual_seed(1))
    ref = adapter.pipeline()(
        list(CAPTIONS),
        height=SIZE,
        width=SIZE,
        num_inference_steps=8,
        guidance_scale=0.0,
        max_sequence_length=64,
        latents=noise.clone(),
        output_type="latent",
    ).images
    with torch.no_grad():
        ours = sample_euler(
            lambda x, s, c: adapter.velocity(adapter.network, x, s, c),
            noise,
            adapter.inference_schedule(SIZE, SIZE),
            adapter.collate(adapter.student_contexts(CAPTIONS)),
        )
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()


def test_caption_lengths_stay_within_the_rope_table(folders):
    """Caption + VLM tokens are capped at axes_lens[0] − 32 (tiny: 256 → 224) so image positions stay in range."""
    adapter = zimage.load(config(folders, teacher_max_tokens=100000, max_caption_tokens=100000))
    assert adapter.caption_limit == 224 and adapter.teacher_max_tokens == 224 and adapter.max_tokens == 224
    long = " ".join(["a [V] teapot on a wooden table"] * 40)
    ctx = adapter.teacher_contexts([long], images(1, SIZE)) + adapter.student_contexts([long])
    assert [c["cap_feats"].shape[0] for c in ctx] == [224, 224]
    x = torch.randn(2, *adapter.latent_shape(SIZE, SIZE))
    with torch.no_grad():
        assert torch.isfinite(
            adapter.velocity(adapter.network, x, torch.tensor([0.5, 0.5]), adapter.collate(ctx))
        ).all()


def test_full_dopsd_train_run_with_the_vlm_teacher(folders, tmp_path):
    """`dopsd.train` end to end on the tiny Z-Image (preset zimage-turbo: VLM teacher, 4-step roll-out,
    gradient checkpointing); diffusers loads the run folder's lora.safetensors (the only LoRA file written) and
    reproduces the LoRA's samples in the pipeline; its metadata names the trigger word and the run."""
    from tiny_real import train_config, write_pairs

    import dopsd
    from dopsd.lora.trained import apply_trained

    data = write_pairs(tmp_path / "data", CAPTIONS, SIZE, seed=7)
    cfg = train_config(
        "zimage-turbo",
        tmp_path,
        data,
        SIZE,
        f"model.pretrained={folders.model}",
        f"model.teacher_encoder={folders.vlm}",
        "data.trigger_word=sks",
        "train.gradient_checkpointing=true",  # the preset's auto resolves to off on the CPU
    )
    assert cfg.train.gradient_checkpointing is True and cfg.model.rollout_every == 2
    result = dopsd.train(cfg)
    assert result.steps == 2 and all(l == l and l > 0 for l in result.losses)
    assert result.weights == result.output_dir / "lora.safetensors"
    assert not (result.output_dir / "pytorch_lora_weights.safetensors").exists()  # no second copy
    assert [p.name for p in result.output_dir.glob("*.safetensors")] == ["lora.safetensors"]
    from safetensors import safe_open

    with safe_open(str(result.weights), "pt") as fh:
        meta = fh.metadata()
    assert meta["modelspec.trigger_phrase"] == "sks" and meta["modelspec.title"] == result.output_dir.resolve().name
    fresh = zimage.load(config(folders))
    apply_trained(fresh.network, result.weights)
    noise = torch.randn(1, *fresh.latent_shape(SIZE, SIZE), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = sample_euler(
            lambda x, s, c: fresh.velocity(fresh.network, x, s, c),
            noise,
            fresh.inference_schedule(SIZE, SIZE),
            fresh.collate(fresh.student_contexts(CAPTIONS[:1])),
        )
    pipe = zimage.load(config(folders)).pipeline()
    pipe.load_lora_weights(str(result.output_dir))
    ref = pipe(
        list(CAPTIONS[:1]),
        height=SIZE,
        width=SIZE,
        num_inference_steps=8,
        guidance_scale=0.0,
        max_sequence_length=32,
        latents=noise.clone(),
        output_type="latent",
    ).images
    assert torch.allclose(ours, ref, atol=1e-5)


def test_a_missing_vlm_teacher_is_named_before_the_model_loads(folders, tmp_path):
    """D-OPSD with the VLM teacher and no model.teacher_encoder: refused by the checks before any work (not
    after the VAE and text encoder loaded, when the features are cached), nothing written; SFT needs no VLM."""
    from tiny_real import train_config, write_pairs

    import dopsd

    data = write_pairs(tmp_path / "data", CAPTIONS, SIZE, seed=7)
    cfg = train_config("zimage-turbo", tmp_path, data, SIZE, f"model.pretrained={folders.model}")
    with pytest.raises(ModelFolderError, match="model.teacher_encoder is not set") as err:
        dopsd.train(cfg)
    assert not any(entry.name == "prepare" for entry in err.traceback)  # the trainer never started loading
    assert not Path(cfg.train.output_dir).exists()
    cfg.method.name = "sft"
    assert dopsd.train(cfg).steps == 2


def test_protocol_members(adapter):
    """What callers read of the adapter is declared by the protocol and answered by Z-Image itself."""
    from diffusers import ZImagePipeline

    from dopsd.models.base import ModelAdapter

    assert isinstance(adapter, ModelAdapter) and adapter.name == "zimage" and adapter.kind is None
    assert adapter.teacher_context_kinds == ("vlm",) and adapter.teacher_context == "vlm"
    assert adapter.lora_layout is zimage.lora_layout() and adapter.pipeline_class is ZImagePipeline
    assert adapter.health_quality(CAPTIONS) is None and adapter.probe_scorer() is None
    assert adapter.unseen_prompts("ohwx")[0] == "a photo of ohwx on a beach"
    assert zimage.owns_network(adapter.network) and not zimage.owns_network(torch.nn.Linear(2, 2))
    facts = zimage.base_facts(adapter.network)  # a tiny transformer: no published size
    assert facts.architecture == "Z-Image" and "not a published size" in facts.variant
    assert adapter.cache_fingerprint()["teacher_max_tokens"] == adapter.teacher_max_tokens

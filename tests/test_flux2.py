"""FLUX.2-klein adapter on a tiny random model of the real architecture, against diffusers' own pipeline."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_encoders import build_qwen3_vl
from tiny_real import build_flux2, build_zimage, dopsd_lora_steps, images, model_config

from dopsd.core.sampler import sample_euler
from dopsd.models import flux2, flux2_facts
from dopsd.models.local import ModelFolderError

torch.set_num_threads(1)
SIZE = 64
TOKENS = 32
CAPTIONS = ["a red cat", "a [V] teapot on a wooden table"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2")
    return SimpleNamespace(root=root, model=build_flux2(root / "fl"))


def config(folders, **kw):
    base = dict(pretrained=str(folders.model), height=SIZE, width=SIZE, max_caption_tokens=TOKENS)
    return model_config("flux2", **{**base, **kw})


@pytest.fixture(scope="module")
def adapter(folders):
    return flux2.load(config(folders))


def sample(adapter, ctx, noise, steps=None):
    with torch.no_grad():
        return sample_euler(
            lambda x, s, c: adapter.velocity(adapter.network, x, s, c),
            noise,
            adapter.inference_schedule(SIZE, SIZE, steps),
            ctx,
        )


def run_pipe(adapter, noise, **kw):
    pipe = adapter.pipeline()
    return pipe(
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        guidance_scale=1.0,
        max_sequence_length=TOKENS,
        latents=noise.clone(),
        output_type="latent",
        **kw,
    ).images


def noise_for(adapter, n, seed=0):
    return torch.randn(n, *adapter.latent_shape(SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def test_text_to_image_reproduces_the_pipeline(adapter):
    """Packing, 4-D ids, σ as timestep, no negation, BN-normalised patchified latents, dynamic shift."""
    noise = noise_for(adapter, 2)
    ref = run_pipe(adapter, noise, prompt=list(CAPTIONS))
    ours = adapter.to_vae_latents(sample(adapter, adapter.collate(adapter.student_contexts(CAPTIONS)), noise))
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    wrong = sample(adapter, adapter.collate(adapter.student_contexts(CAPTIONS)), noise, steps=2)
    assert (adapter.to_vae_latents(wrong) - ref).abs().max() > 1e-2  # the comparison has power


def test_schedule_is_klein_dynamic_shift(adapter, folders):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(folders.model, subfolder="scheduler")
    seq = (SIZE // 16) ** 2
    scheduler.set_timesteps(sigmas=torch.linspace(1, 1 / 4, 4).tolist(), mu=compute_empirical_mu(seq, 4))
    assert torch.allclose(adapter.inference_schedule(SIZE, SIZE), scheduler.sigmas, atol=1e-6)


def test_reference_teacher_is_kleins_editing_path(adapter):
    """Teacher = the target as a reference image + the instruction: equals the pipeline called with image=target."""
    target = images(1, SIZE, seed=4)[0]
    teacher = adapter.teacher_contexts(CAPTIONS[:1], [target])
    assert torch.equal(teacher[0]["ref_ids"][:, 0], torch.full((16,), 10))  # T = 10 for the first reference
    noise = noise_for(adapter, 1, seed=2)
    prompt = f"{CAPTIONS[0]} {flux2_facts.REFERENCE_INSTRUCTION}"
    ref = run_pipe(adapter, noise, prompt=prompt, image=target)
    ours = adapter.to_vae_latents(sample(adapter, adapter.collate(teacher), noise))
    assert torch.allclose(ours, ref, atol=1e-5), (ours - ref).abs().max()
    # The target changes the teacher's prediction; the student's context never contains it.
    other = adapter.teacher_contexts(CAPTIONS[:1], images(1, SIZE, seed=8))
    x, s = noise, torch.tensor([0.6])
    with torch.no_grad():
        vt1 = adapter.velocity(adapter.network, x, s, adapter.collate(teacher))
        vt2 = adapter.velocity(adapter.network, x, s, adapter.collate(other))
    assert (vt1 - vt2).abs().max() > 1e-4
    student = adapter.student_contexts(CAPTIONS[:1])[0]
    assert set(student) == {"prompt_embeds"}
    assert (student["prompt_embeds"] - teacher[0]["prompt_embeds"]).abs().max() > 1e-4  # instruction appended


def test_editing_mode_student_sees_sources_teacher_also_the_output(folders):
    adapter = flux2.load(config(folders, editing=True))
    source, target = images(2, SIZE, seed=6)
    instruction = "turn the sky orange"
    student = adapter.student_contexts([instruction], [[source]])
    teacher = adapter.teacher_contexts([instruction], [target], [[source]])
    assert sorted(set(student[0]["ref_ids"][:, 0].tolist())) == [10]
    assert sorted(set(teacher[0]["ref_ids"][:, 0].tolist())) == [10, 20]  # the ground truth is the last reference
    noise = noise_for(adapter, 1, seed=3)
    ref_s = run_pipe(adapter, noise, prompt=instruction, image=[source])
    ref_t = run_pipe(adapter, noise, prompt=f"{instruction} {flux2_facts.EDIT_INSTRUCTION}", image=[source, target])
    assert torch.allclose(adapter.to_vae_latents(sample(adapter, adapter.collate(student), noise)), ref_s, atol=1e-5)
    assert torch.allclose(adapter.to_vae_latents(sample(adapter, adapter.collate(teacher), noise)), ref_t, atol=1e-5)
    with pytest.raises(ValueError, match="source image"):
        adapter.student_contexts([instruction], [[]])
    assert set(adapter.student_contexts([instruction], None)[0]) == {"prompt_embeds"}  # prompts without sources: t2i


def test_collate_refuses_batches_with_different_references(adapter):
    a = adapter.teacher_contexts(CAPTIONS[:1], images(1, SIZE))
    b = adapter.teacher_contexts(CAPTIONS[:1], images(1, 2 * SIZE))
    with pytest.raises(ValueError, match="same number and size of reference images"):
        adapter.collate(a + b)
    with pytest.raises(ValueError, match="same number and size"):
        adapter.collate(a + adapter.student_contexts(CAPTIONS[:1]))


def test_vlm_teacher_option_uses_layers_9_18_27(folders):
    vl = build_qwen3_vl(folders.root / "vl", text_hidden=32, text_layers=27)
    adapter = flux2.load(config(folders, teacher_context="vlm", teacher_encoder=str(vl), teacher_max_tokens=48))
    ctx = adapter.teacher_contexts(CAPTIONS, images(2, SIZE))
    assert adapter._vlm.report.matched == 27 * 11 + 2
    assert [tuple(c["prompt_embeds"].shape) for c in ctx] == [(48, 96)] * 2  # padded, 3 layers × width 32
    batch = adapter.collate(ctx)
    with torch.no_grad():
        v = adapter.velocity(adapter.network, noise_for(adapter, 2), torch.tensor([0.5, 0.5]), batch)
    assert torch.isfinite(v).all()


def test_dopsd_step_gives_finite_gradients_on_lora_only(folders):
    adapter = flux2.load(config(folders))
    out = dopsd_lora_steps(adapter, CAPTIONS, images(2, SIZE), steps=2)
    grads = out["grads"]
    lora = {n: g for n, g in grads.items() if "lora_" in n}
    assert all(g is None for n, g in grads.items() if "lora_" not in n)
    assert lora and all(g is not None and torch.isfinite(g).all() for g in lora.values())
    assert sum(float(g.abs().sum()) for n, g in lora.items() if "lora_B" in n) > 0
    modules = {n.split(".lora_")[0] for n in lora}
    assert "transformer_blocks.0.attn.to_out.0" in modules  # the ModuleList's Linear, via the regex
    assert "single_transformer_blocks.1.attn.to_out" in modules
    assert "single_transformer_blocks.0.attn.to_qkv_mlp_proj" in modules
    assert "transformer_blocks.0.attn.add_k_proj" in modules
    assert out["losses"][0] > 0  # the reference teacher disagrees with the caption-only student


def test_wrong_folder_is_a_clear_error(folders, tmp_path):
    zi = build_zimage(tmp_path / "zi")
    with pytest.raises(ModelFolderError, match="'ZImagePipeline' pipeline, but model family 'flux2'"):
        flux2.load(config(folders, pretrained=str(zi)))
    with pytest.raises(ModelFolderError, match="does not exist"):
        flux2.load(config(folders, pretrained=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="teacher_context"):
        flux2.load(config(folders, teacher_context="bogus"))


def test_bf16_weights_sample_like_the_bf16_pipeline(folders):
    """bf16 weights: close to the pipeline, which keeps its latents in bf16 between steps (we keep float32)."""
    adapter = flux2.load(config(folders), "cpu", torch.bfloat16)
    noise = noise_for(adapter, 2, seed=5)
    ref = run_pipe(adapter, noise, prompt=list(CAPTIONS)).float()
    ours = adapter.to_vae_latents(sample(adapter, adapter.collate(adapter.student_contexts(CAPTIONS)), noise))
    assert ours.dtype == torch.float32
    assert (ours - ref).abs().max() < 0.1 * ref.abs().mean(), (ours - ref).abs().max()


@pytest.mark.parametrize("mode", ["reference", "vlm", "editing"])
def test_full_dopsd_train_run(folders, tmp_path, mode):
    """`dopsd.train` end to end on the tiny FLUX.2-klein for each teacher mode (preset flux2-klein-4b)."""
    from tiny_real import train_config, write_pairs

    import dopsd

    data = write_pairs(tmp_path / "data", CAPTIONS, SIZE, seed=7)
    extra = [f"model.pretrained={folders.model}"]
    if mode == "vlm":
        vl = build_qwen3_vl(tmp_path / "vl", text_hidden=32, text_layers=27)
        extra += ["model.teacher_context=vlm", f"model.teacher_encoder={vl}"]
    if mode == "editing":
        write_pairs(tmp_path / "sources", ["unused", "unused"], SIZE, seed=8)
        extra += ["model.editing=true", f"data.source_dir={tmp_path / 'sources'}"]
    result = dopsd.train(train_config("flux2-klein-4b", tmp_path, data, SIZE, *extra))
    assert result.steps == 2 and all(l == l and l > 0 for l in result.losses)
    assert [p.name for p in result.output_dir.glob("*.safetensors")] == ["lora.safetensors"]  # no second copy
    assert (result.output_dir / "lora_config.json").is_file()


def test_eval_samples_training_prompts_as_edits_of_their_sources(folders, tmp_path):
    """`dopsd eval` on an editing LoRA: each training prompt is an edit of its own source image(s)."""
    import math

    from tiny_real import train_config, write_pairs

    import dopsd
    from dopsd.tools.evaluate import evaluate

    data = write_pairs(tmp_path / "data", CAPTIONS, SIZE, seed=7)
    write_pairs(tmp_path / "sources", ["unused", "unused"], SIZE, seed=8)
    write_pairs(tmp_path / "other", ["unused", "unused"], SIZE, seed=9)

    def cfg(sources):
        return train_config(
            "flux2-klein-4b",
            tmp_path,
            data,
            SIZE,
            f"model.pretrained={folders.model}",
            "model.editing=true",
            f"data.source_dir={tmp_path / sources}",
        )

    weights = dopsd.train(cfg("sources")).weights
    report = evaluate(cfg("sources"), weights, tmp_path / "eval", unseen=["a red cat"], seeds=[0], control_steps=0)
    assert report["editing"] and (tmp_path / "eval" / "sources.png").is_file()
    # each target against its own source, with the fallback features eval used (pixels): the change the data asks for
    from PIL import Image

    from dopsd.tools.features import PixelFeatures, cosine_distance

    pix = PixelFeatures()
    own = [Image.open(tmp_path / folder / f"img{i}.png") for folder in ("data", "sources") for i in range(2)]
    expected = float(torch.diagonal(cosine_distance(pix(own[:2]), pix(own[2:]))).mean())
    assert report["dino_d_source_target"] == pytest.approx(expected, abs=1e-6) and expected > 0.01
    for variant in ("base", "lora"):
        assert {"dino_d_train", "dino_d_unseen_nearest", "dino_d_source"} <= set(report[variant])
        assert all(math.isfinite(v) for v in report[variant].values())
    # the sources reach the sampler: the same prompts and noise with other source images give other edits
    other = evaluate(cfg("other"), None, tmp_path / "eval_other", unseen=["a red cat"], seeds=[0], control_steps=0)
    assert other["base"]["dino_d_train"] != pytest.approx(report["base"]["dino_d_train"], abs=1e-6)
    assert other["base"]["dino_d_unseen_nearest"] == pytest.approx(report["base"]["dino_d_unseen_nearest"])


def test_protocol_members(adapter):
    """What callers read of the adapter is declared by the protocol and answered by FLUX.2 itself."""
    from diffusers import Flux2KleinPipeline

    from dopsd.models.base import ModelAdapter

    assert isinstance(adapter, ModelAdapter) and adapter.name == "flux2" and adapter.kind is None
    assert adapter.teacher_context_kinds == ("reference", "vlm") and adapter.teacher_context == "reference"
    assert adapter.lora_layout is flux2.lora_layout() and adapter.pipeline_class is Flux2KleinPipeline
    assert adapter.health_quality(CAPTIONS) is None and adapter.probe_scorer() is None
    assert flux2.owns_network(adapter.network) and not flux2.owns_network(torch.nn.Linear(2, 2))
    facts = flux2.base_facts(adapter.network)  # a tiny transformer: no published size
    assert facts.architecture == "Flux.2" and "not a published size" in facts.variant


def test_text_encoder_layers_are_a_declared_setting(folders):
    """model.text_encoder_out_layers (typed in ModelConfig) picks the concatenated hidden layers."""
    from dopsd.config import load_config

    cfg = load_config(
        "flux2-klein-4b",
        [
            f"model.pretrained={folders.model}",
            "model.text_encoder_out_layers=[1, 2]",
            f"model.height={SIZE}",
            f"model.width={SIZE}",
            f"model.max_caption_tokens={TOKENS}",
        ],
    )
    two = flux2.load(cfg.model)
    three = flux2.load(config(folders))
    width = lambda a: a.student_contexts(CAPTIONS[:1])[0]["prompt_embeds"].shape[-1]  # noqa: E731
    assert two.layers == (1, 2) and width(two) * 3 == width(three) * 2
    with pytest.raises(ModelFolderError, match="text_encoder_out_layers"):
        flux2.load(config(folders, text_encoder_out_layers=[9, 99]))


def test_text_encoder_is_the_bare_qwen3_with_the_pipelines_features(adapter, folders):
    """The adapter loads Qwen3Model (no lm_head) from the folder's Qwen3ForCausalLM: the pipeline's own prompt
    features, computed with the causal LM it loads itself, are equal bit for bit."""
    from diffusers import Flux2KleinPipeline
    from transformers import Qwen3ForCausalLM, Qwen3Model

    assert type(adapter.text_encoder) is Qwen3Model
    assert not any(name.startswith("lm_head") for name in adapter.text_encoder.state_dict())
    pipe = Flux2KleinPipeline.from_pretrained(str(folders.model), local_files_only=True)
    assert type(pipe.text_encoder) is Qwen3ForCausalLM
    ref, _ = pipe.encode_prompt(list(CAPTIONS), device="cpu", max_sequence_length=TOKENS)
    ours = torch.stack([c["prompt_embeds"] for c in adapter.student_contexts(CAPTIONS)])
    assert ours.shape == ref.shape and torch.equal(ours, ref)

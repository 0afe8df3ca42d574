"""The miniature adapter: protocol, contexts, LoRA targets, and the shipped weights' real behaviour."""

import json
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from dopsd.data.images import to_pil
from dopsd.lora.inject import add_lora, lora_state_dict
from dopsd.mini import metrics as M
from dopsd.mini import world
from dopsd.mini.adapter import WEIGHTS_DIR, default_lora_targets, load, tiny_random_adapter
from dopsd.mini.recipe import sha256
from dopsd.mini.report import draw_noise, sample_many
from dopsd.models.base import ModelAdapter

torch.set_num_threads(1)


class Wrapper(nn.Module):  # stands in for DDP: forwards everything to the wrapped module
    def __init__(self, inner):
        super().__init__()
        self.module = inner

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def scenes(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [world.random_scene(g) for _ in range(n)]


def test_protocol_contexts_and_images():
    a = tiny_random_adapter()
    assert isinstance(a, ModelAdapter) and a.name == "mini"
    sc = scenes(3)
    caps, imgs = [s.caption() for s in sc], to_pil(world.render(sc))
    student = a.student_contexts(caps)
    assert student[0]["feats"].shape == (world.MAX_TOKENS, a.cfg.enc_dim)
    assert student[0]["feats_mask"].sum() == len(caps[0].split())
    vlm = a.teacher_contexts(caps, imgs)
    assert not torch.allclose(vlm[0]["feats"], student[0]["feats"])  # the image changes the features
    a.teacher_context = "reference"
    ref = a.teacher_contexts(caps, imgs)
    assert torch.allclose(ref[0]["feats"], student[0]["feats"]) and ref[0]["ref"].shape == (3, 24, 24)
    a.teacher_context = "text"  # control: the image is ignored
    assert torch.equal(a.teacher_contexts(caps, imgs)[1]["feats"], student[1]["feats"])
    batch = a.collate(student + ref)  # mixed batch: absent references are masked
    assert batch["ref_on"].tolist() == [False] * 3 + [True] * 3
    with pytest.raises(ValueError, match="not an editing model"):
        a.student_contexts(caps, sources=[[imgs[0]]] * 3)
    with pytest.raises(ValueError, match="vocabulary"):
        a.student_contexts(["a orange circle"])
    # images: any size is resized to 24×24; round trip through PIL is exact at 24×24
    x = world.render(sc)
    assert torch.allclose(a.encode_images(to_pil(x)), x, atol=1 / 127.5)
    big = imgs[0].resize((48, 48), Image.Resampling.NEAREST)
    assert torch.allclose(a.encode_images([big]), a.encode_images([imgs[0]]), atol=1 / 127.5)
    assert a.decode(torch.full((1, 3, 24, 24), 3.0)).max() == 1.0
    assert a.latent_shape(24, 24) == (3, 24, 24)
    with pytest.raises(ValueError, match="24×24"):
        a.latent_shape(512, 512)
    a.release_encoders()
    with pytest.raises(RuntimeError, match="released"):
        a.student_contexts(caps)


def test_velocity_calls_only_the_network_and_matches_x_prediction():
    a = tiny_random_adapter(seed=1)
    ctx = a.collate(a.student_contexts(["a red circle", "a sks plus on a gray background"]))
    x, sigma = torch.randn(2, 3, 24, 24), torch.tensor([0.9, 0.3])
    v = a.velocity(a.network, x, sigma, ctx)
    assert torch.allclose(v, a.velocity(Wrapper(a.network), x, sigma, ctx))
    x0 = a.network(x, sigma, **ctx)
    assert torch.allclose(x - sigma.reshape(-1, 1, 1, 1) * v, x0, atol=1e-5)


def test_lora_targets_cover_every_block_linear():
    a = tiny_random_adapter()
    add_lora(a.network, default_lora_targets(), rank=2, alpha=2)
    trainable = [n for n, p in a.network.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(lora_state_dict(a.network)) == 2 * 4 * a.cfg.layers
    ctx = a.collate(a.student_contexts(["a blue square"]))
    a.velocity(a.network, torch.randn(1, 3, 24, 24), torch.tensor([0.5]), ctx).pow(2).mean().backward()
    assert all(p.grad is not None for n, p in a.network.named_parameters() if "lora_B" in n)


def test_load_validation(tmp_path):
    from dopsd.models.local import ModelFolderError

    with pytest.raises(ModelFolderError, match="model.pretrained: no miniature weights.*dopsd mini recipe"):
        load(SimpleNamespace(pretrained=str(tmp_path)))
    with pytest.raises(ValueError, match="24×24"):
        load(SimpleNamespace(pretrained="turbo", height=512, width=512))
    with pytest.raises(ValueError, match="teacher_context"):
        load(SimpleNamespace(pretrained="turbo", teacher_context="clip"))


def test_shipped_weights_manifest():
    manifest = json.loads((WEIGHTS_DIR / "manifest.json").read_text())
    for name, digest in manifest["sha256"].items():
        assert sha256(WEIGHTS_DIR / name) == digest, f"{name} does not match its manifest hash"
    assert manifest["recipe_version"] and manifest["wall_time_s"]["total"] > 0
    turbo, base = load(SimpleNamespace(pretrained=None)), load(SimpleNamespace(pretrained="base"))
    assert turbo.kind == "turbo" and base.kind == "base"
    assert turbo.inference_schedule(24, 24).tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert len(base.inference_schedule(24, 24)) - 1 == manifest["config"]["base_steps"]


def test_shipped_turbo_renders_captions_and_copies_context():
    turbo = load(SimpleNamespace(pretrained="turbo"))
    caps = world.unrelated_prompts(48, seed=7)
    x = sample_many(turbo, caps, draw_noise(turbo, 48, seed=7))
    acc = M.attribute_accuracy(x, caps)
    assert min(acc.values()) >= 0.85, acc
    assert M.fewstep_quality(x, caps) > 0.8
    # teacher check: the held-out colour appears with the target image in context, not from the caption alone
    g = torch.Generator().manual_seed(3)
    sc = [world.concept_scene("orange", g) for _ in range(32)]
    caps = [s.caption() for s in sc]
    noise = draw_noise(turbo, 32, seed=3)
    with_image = sample_many(turbo, caps, noise, contexts=turbo.teacher_contexts(caps, to_pil(world.render(sc))))
    assert M.concept_fidelity(with_image, "orange") >= 0.8
    assert M.concept_fidelity(sample_many(turbo, caps, noise), "orange") <= 0.3

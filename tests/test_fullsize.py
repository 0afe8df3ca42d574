"""The supported models at full size, on the meta device (no weights, no memory): sizes, LoRA targets, export
key maps, the Qwen3 → Qwen3-VL transplant and sequence limits, from the bundled public configs."""

from __future__ import annotations

import io
import logging
import re
import warnings

import pytest
import torch
from torch import nn

from dopsd.config import load_config
from dopsd.lora.inject import add_lora
from dopsd.models.registry import fullsize_config, plan_spec
from dopsd.planner.fake import build_meta

PRESETS = {"zimage-turbo": "zimage-turbo", "flux2-klein-4b": "flux2-klein-4b", "flux2-klein-9b": "flux2-klein-9b"}


def spec_of(name: str):
    return plan_spec(load_config(PRESETS[name]).model, name)


def part(name: str, which: str) -> nn.Module:
    spec = spec_of(name)
    return build_meta(lambda: spec.parts[which]({}), torch.bfloat16)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())


@pytest.mark.parametrize(
    "name,which,key",
    [
        ("zimage-turbo", "transformer", "transformer"),
        ("zimage-turbo", "text_encoder", "text_encoder"),
        ("flux2-klein-4b", "transformer", "transformer"),
        ("flux2-klein-4b", "text_encoder", "text_encoder"),
        ("flux2-klein-9b", "transformer", "transformer"),
        ("flux2-klein-9b", "text_encoder", "text_encoder"),
        ("zimage-turbo", "vlm", "qwen3-vl-4b-instruct"),
    ],
)
def test_parameter_counts_match_the_published_sizes(name, which, key):
    published = fullsize_config(key if key.startswith("qwen3-vl") else name)["published_params"]
    entry = published["model" if key.startswith("qwen3-vl") else key]
    count = n_params(part(name, which))
    te = fullsize_config(name).get("text_encoder", {})
    if which == "text_encoder" and not te.get("tie_word_embeddings", True):
        count += te["vocab_size"] * te["hidden_size"]  # published with its LM head; the adapters load the bare model
    assert abs(count - entry["value"]) <= entry["tolerance"] * entry["value"], (count, entry)


def test_text_encoders_fit_their_transformers():
    """Z-Image reads one Qwen3-4B layer (cap_feat_dim = hidden); klein stacks three layers of Qwen3-4B (4B) or
    Qwen3-8B (9B): joint_attention_dim = 3 × hidden."""
    z = fullsize_config("zimage-turbo")
    assert z["transformer"]["cap_feat_dim"] == z["text_encoder"]["hidden_size"] == 2560
    for name, hidden, layers in (("flux2-klein-4b", 2560, 36), ("flux2-klein-9b", 4096, 36)):
        k = fullsize_config(name)
        assert k["text_encoder"]["hidden_size"] == hidden and k["text_encoder"]["num_hidden_layers"] == layers
        assert k["transformer"]["joint_attention_dim"] == 3 * hidden


def lora_modules(name: str, rank: int = 4) -> tuple[nn.Module, dict[str, tuple[int, int]]]:
    spec = spec_of(name)
    net = build_meta(lambda: spec.parts["transformer"]({}), torch.bfloat16)
    add_lora(net, spec.lora_targets, rank, rank)
    wrapped = {
        n: tuple(m.base_layer.weight.shape)
        for n, m in net.named_modules()
        if hasattr(m, "base_layer") and isinstance(m.base_layer, nn.Linear)
    }
    return net, wrapped


def test_zimage_lora_targets_cover_every_block_and_both_refiners():
    c = fullsize_config("zimage-turbo")["transformer"]
    _, mods = lora_modules("zimage-turbo")
    blocks = c["n_layers"] + 2 * c["n_refiner_layers"]
    assert len(mods) == 7 * blocks == 238
    d, hidden = c["dim"], int(c["dim"] / 3 * 8)
    expected = {
        "attention.to_q": (d, d),
        "attention.to_k": (d, d),
        "attention.to_v": (d, d),
        "attention.to_out.0": (d, d),
        "feed_forward.w1": (hidden, d),
        "feed_forward.w2": (d, hidden),
        "feed_forward.w3": (hidden, d),
    }
    for prefix, count in (
        ("layers", c["n_layers"]),
        ("noise_refiner", c["n_refiner_layers"]),
        ("context_refiner", c["n_refiner_layers"]),
    ):
        for i in range(count):
            for suffix, shape in expected.items():
                assert mods[f"{prefix}.{i}.{suffix}"] == shape
    assert not [n for n in mods if "adaLN" in n or "embedder" in n or "final_layer" in n]


@pytest.mark.parametrize("name", ["flux2-klein-4b", "flux2-klein-9b"])
def test_klein_lora_targets_are_the_attention_of_every_block(name):
    c = fullsize_config(name)["transformer"]
    _, mods = lora_modules(name)
    inner = c["num_attention_heads"] * c["attention_head_dim"]
    mlp = int(inner * c["mlp_ratio"])
    assert len(mods) == 8 * c["num_layers"] + 2 * c["num_single_layers"]
    for i in range(c["num_layers"]):
        for s in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            assert mods[f"transformer_blocks.{i}.attn.{s}"] == (inner, inner)
    for i in range(c["num_single_layers"]):
        assert mods[f"single_transformer_blocks.{i}.attn.to_qkv_mlp_proj"] == (3 * inner + 2 * mlp, inner)
        assert mods[f"single_transformer_blocks.{i}.attn.to_out"] == (inner, inner + mlp)


def _interchange(name: str, rank: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """The LoRA file dopsd writes for every default target of the full-size model (zeros of the right shapes)."""
    from dopsd.lora.layout import to_interchange

    _, mods = lora_modules(name)
    family = "zimage" if name.startswith("zimage") else "flux2"
    pairs = {m: (torch.zeros(rank, shape[1]), torch.zeros(shape[0], rank)) for m, shape in mods.items()}
    return to_interchange(pairs, family), mods


@pytest.mark.parametrize("name", ["zimage-turbo", "flux2-klein-4b", "flux2-klein-9b"])
def test_comfyui_names_map_every_module_onto_the_original_architecture(name):
    """Every module of the interchange file, read back by diffusers' own converter of original (BFL / ComfyUI)
    checkpoints, lands on a distinct LoRA-targeted Linear of the model with the right shape, and all of them are
    covered (fused q/k/v included)."""
    from diffusers.loaders import single_file_utils as sfu

    convert = (
        sfu.convert_z_image_transformer_checkpoint_to_diffusers
        if name.startswith("zimage")
        else sfu.convert_flux2_transformer_checkpoint_to_diffusers
    )
    out, mods = _interchange(name)
    original: dict[str, dict[str, torch.Size]] = {}
    for key, value in out.items():
        m = re.fullmatch(r"diffusion_model\.(.+)\.lora_([AB])\.weight", key)
        assert m, key
        original.setdefault(m.group(1), {})[m.group(2)] = value.shape
    ckpt = {f"{m}.weight": torch.empty(ab["B"][0], ab["A"][1], device="meta") for m, ab in original.items()}
    converted = convert(dict(ckpt))  # raises on a name the original architecture does not have
    assert len(ckpt) == len(original)
    back = {k[: -len(".weight")]: tuple(v.shape) for k, v in converted.items()}
    assert back == mods


@pytest.mark.parametrize("name", ["zimage-turbo", "flux2-klein-4b"])
def test_diffusers_loads_the_lora_file_into_every_targeted_module(name, tmp_path):
    """The file as dopsd writes it (rank 1 so that it is small) is read by the pipeline's LoRA loader into a fresh
    full-size transformer: every targeted module gets its LoRA, no key is left over."""
    from diffusers import Flux2KleinPipeline, ZImagePipeline
    from safetensors.torch import save_file

    out, mods = _interchange(name)
    save_file({k: v.contiguous() for k, v in out.items()}, str(tmp_path / "pytorch_lora_weights.safetensors"))
    pipe = ZImagePipeline if name.startswith("zimage") else Flux2KleinPipeline
    loaded = pipe.lora_state_dict(str(tmp_path))
    loaded = loaded[0] if isinstance(loaded, tuple) else loaded
    spec = spec_of(name)
    fresh = build_meta(lambda: spec.parts["transformer"]({}), torch.bfloat16)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("diffusers").addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # copying into meta parameters is a no-op, as intended here
            fresh.load_lora_adapter(dict(loaded), prefix="transformer", adapter_name="check")
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert "unexpected" not in log.getvalue().lower(), log.getvalue()
    injected = {n.rsplit(".lora_A", 1)[0] for n, _ in fresh.named_parameters() if ".lora_A.check" in n}
    assert injected == set(mods)


def test_qwen3_to_qwen3_vl_transplant_matches_every_tensor():
    """Z-Image's Qwen3-4B (and klein 4B's, both the bare Qwen3Model) fit Qwen3-VL-4B tensor for tensor: 398 of 398
    (36 layers × 11 + embeddings + final norm); klein 9B's Qwen3-8B does not, and is refused."""
    from dopsd.models.local import ModelFolderError
    from dopsd.models.qwen_vl import transplant_language_weights

    vlm = part("zimage-turbo", "vlm")
    layers = fullsize_config("qwen3-vl-4b-instruct")["model"]["text_config"]["num_hidden_layers"]
    report = transplant_language_weights(vlm.language_model, part("zimage-turbo", "text_encoder"))
    assert report.matched == report.total == 11 * layers + 2 == 398
    report = transplant_language_weights(vlm.language_model, part("flux2-klein-4b", "text_encoder"))
    assert report.matched == report.total == 398 and report.ignored == []
    with pytest.raises(ModelFolderError, match="differ in shape"):
        transplant_language_weights(vlm.language_model, part("flux2-klein-9b", "text_encoder"))


def test_zimage_rope_tables_cover_the_student_and_teacher_sequences():
    """Captions (512) and the VLM teacher context (up to 1024 tokens, image included) sit on the frame axis of
    Z-Image's RoPE before the image; axes_lens[0] = 1536 covers both at 1024² — and the check can fail."""
    spec = spec_of("zimage-turbo")
    checks = {c.what: c for c in spec.checks(1024, 1024)}
    assert all(c.ok for c in checks.values()), checks
    assert "frame index 1025" in checks["RoPE frame axis, teacher context"].detail
    c = fullsize_config("zimage-turbo")["transformer"]
    net = part("zimage-turbo", "transformer")
    tables = net.rope_embedder.precompute_freqs_cis(c["axes_dims"], c["axes_lens"], theta=c["rope_theta"])
    assert [len(t) for t in tables] == c["axes_lens"] and 1025 < len(tables[0])
    too_big = {x.what: x for x in spec.checks(16384, 16384)}
    assert not too_big["RoPE height/width axes"].ok  # 1024 patches per side > the 512-entry tables


@pytest.mark.parametrize("name", ["flux2-klein-4b", "flux2-klein-9b"])
def test_klein_rope_handles_reference_tokens_at_1024(name):
    """klein's RoPE has no table: it is computed from the 4-D position ids on every call, so the teacher's
    target-as-reference tokens (T = 10) appended after the 4096 noisy tokens need nothing more."""
    from dopsd.models.flux2_facts import position_ids

    spec = spec_of(name)
    teacher = spec.teacher(1024, 1024)
    assert teacher.tokens == {"image": 4096, "text": 512, "reference": 4096}
    net = part(name, "transformer")
    assert not list(net.pos_embed.buffers()) and not list(net.pos_embed.parameters())
    ids = torch.cat([position_ids(0, 64, 64), position_ids(10, 64, 64)])
    cos, sin = net.pos_embed(ids)
    c = fullsize_config(name)["transformer"]
    assert tuple(cos.shape) == (8192, sum(c["axes_dims_rope"])) and torch.isfinite(cos).all()

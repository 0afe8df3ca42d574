"""model.quantize: the frozen base quantized (torchao) under a LoRA, on tiny real-architecture models (CPU, int8 and
nf4 — the modes that run here), and the combinations that are refused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny_real import build_flux2, build_zimage, model_config, train_config, write_pairs
from torch import nn

from dopsd.config import ConfigError, load_config
from dopsd.core.sampler import sample_euler
from dopsd.models import flux2, zimage
from dopsd.models.quantize import (
    QuantizeUnavailable,
    check_available,
    quantize_network,
    quantized_linear_count,
    tensor_bytes,
)
from dopsd.planner.resident import quantized_bytes

torch.set_num_threads(1)
SIZE = 32
CAPTIONS = ["a red cat", "a [V] teapot on a wooden table"]
FAMILIES = {"zimage": (zimage, build_zimage, "zimage-turbo"), "flux2": (flux2, build_flux2, "flux2-klein-4b")}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return SimpleNamespace(
        root=root,
        zimage=build_zimage(root / "zi"),
        flux2=build_flux2(root / "fx"),
        data=write_pairs(root / "data", CAPTIONS, SIZE, seed=7),
    )


def train(folders, family: str, quantize: str, tmp):
    """Two hybrid steps (D-OPSD with the preset's EMA teacher + SFT) of the family's preset on its tiny model.
    Z-Image's VLM teacher is replaced by the caption-only one (no Qwen3-VL needed: quantization is the subject
    here); its D-OPSD term is then zero at first, and the SFT term makes the LoRA move."""
    import dopsd

    _, _, preset = FAMILIES[family]
    extra = [
        f"model.pretrained={getattr(folders, family)}",
        f"model.quantize={quantize}",
        "optim.lr=1e-2",
        "method.name=hybrid",
    ]
    if family == "zimage":
        extra.append("model.teacher_context=text")
    return dopsd.train(train_config(preset, tmp, folders.data, SIZE, *extra))


def unquantized(folders, family: str):
    module, _, _ = FAMILIES[family]
    return module.load(
        model_config(
            family,
            pretrained=str(getattr(folders, family)),
            height=SIZE,
            width=SIZE,
            max_caption_tokens=32,
            teacher_context="text",
        )
    )


def noise_for(adapter) -> torch.Tensor:
    return torch.randn(2, *adapter.latent_shape(SIZE, SIZE), generator=torch.Generator().manual_seed(3))


def samples(folders, family: str, lora) -> torch.Tensor:
    """Few-step samples of the unquantized adapter with a trained LoRA file applied (None: the bare base)."""
    from dopsd.lora.trained import apply_trained

    adapter = unquantized(folders, family)
    if lora is not None:
        apply_trained(adapter.network, lora)
    ctx = adapter.collate(adapter.student_contexts(CAPTIONS))
    with torch.no_grad():
        return sample_euler(
            lambda x, s, c: adapter.velocity(adapter.network, x, s, c),
            noise_for(adapter),
            adapter.inference_schedule(SIZE, SIZE),
            ctx,
        )


def pipeline_samples(folders, family: str, run_dir) -> torch.Tensor:
    """The same samples from the family's diffusers pipeline with the run folder's LoRA loaded by diffusers."""
    adapter = unquantized(folders, family)
    pipe = adapter.pipeline()
    pipe.load_lora_weights(str(run_dir))
    noise = noise_for(adapter)
    if family == "zimage":
        return pipe(
            list(CAPTIONS),
            height=SIZE,
            width=SIZE,
            num_inference_steps=8,
            guidance_scale=0.0,
            max_sequence_length=32,
            latents=noise.clone(),
            output_type="latent",
        ).images
    out = pipe(
        prompt=list(CAPTIONS),
        height=SIZE,
        width=SIZE,
        num_inference_steps=4,
        guidance_scale=1.0,
        max_sequence_length=32,
        latents=noise.clone(),
        output_type="latent",
    ).images
    return out


@pytest.mark.parametrize("family", ["zimage", "flux2"])
def test_int8_base_trains_a_lora_that_loads_into_the_unquantized_model(folders, tmp_path, family, capsys):
    """int8 base: training runs, the loss is finite, only the LoRA is saved, the LoRA loads into the unquantized
    adapter and diffusers pipeline, and its samples are close to those of the same run on the unquantized base.

    Tolerance: the two LoRAs may differ only through the int8 rounding of the base during their two steps
    (|error| <= absmax/254 per row, about 0.4 %), so the samples they give the same unquantized model must differ
    far less than the LoRAs moved the samples: at most a tenth of the change training made (and the run trained
    hard enough, lr 1e-2, that this change is not zero). Measured: about 1-2 % (Z-Image 0.0096 of 0.59, FLUX.2
    0.00026 of 0.023), so 10 % leaves room for other CPUs' rounding and still fails if the base were wrong."""
    from safetensors.torch import load_file

    quant = train(folders, family, "int8", tmp_path / "int8")
    assert "base quantized to int8" in capsys.readouterr().out
    plain = train(folders, family, "none", tmp_path / "none")
    assert quant.steps == 2 and all(torch.isfinite(torch.tensor(quant.losses)))
    assert [p.name for p in quant.output_dir.glob("*.safetensors")] == ["lora.safetensors"]
    q_keys, p_keys = load_file(str(quant.weights)), load_file(str(plain.weights))
    assert sorted(q_keys) == sorted(p_keys)  # same layout as on an unquantized base
    assert all(q_keys[k].shape == p_keys[k].shape and q_keys[k].dtype == p_keys[k].dtype for k in q_keys)
    for part in ("trainable", "teacher"):  # checkpoints: the LoRA's values only (the teacher is a LoRA swap)
        q_ckpt, p_ckpt = (
            load_file(str(r.output_dir / "checkpoints/step-0000002" / f"{part}.safetensors")) for r in (quant, plain)
        )
        assert sorted(q_ckpt) == sorted(p_ckpt) and all("lora_" in k for k in q_ckpt)
    base, with_plain, with_quant = (samples(folders, family, w) for w in (None, plain.weights, quant.weights))
    moved = (with_plain - base).abs().max()
    gap = (with_quant - with_plain).abs().max()
    assert moved > 1e-3, moved
    print(f"{family}: LoRA moved the samples by {moved:.4g}, int8 vs unquantized base LoRAs differ by {gap:.4g}")
    assert gap < 0.1 * moved, (gap, moved)
    # diffusers loads the int8-trained LoRA into its unquantized pipeline and samples what the adapter samples
    ref = pipeline_samples(folders, family, quant.output_dir)
    ours = with_quant if family == "zimage" else unquantized(folders, family).to_vae_latents(with_quant)
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_the_quantized_base_sits_under_a_peft_lora(folders):
    """What a run builds: int8 weights in the blocks (the family's skip list kept), peft LoRA layers on top whose
    factors alone take gradients, a finite step, and checkpoints with only LoRA tensors."""
    from dopsd.lora.inject import add_lora, lora_state_dict

    cfg = model_config(
        "zimage",
        pretrained=str(folders.zimage),
        height=SIZE,
        width=SIZE,
        max_caption_tokens=32,
        teacher_context="text",
        quantize="int8",
    )
    adapter = zimage.load(cfg)
    ctx = adapter.collate(adapter.student_contexts(CAPTIONS))
    net = adapter.network
    linears = {n: m for n, m in net.named_modules() if type(m) is nn.Linear}
    assert quantized_linear_count(net) == sum(1 for n in linears if not n.startswith(zimage.QUANTIZE_SKIP))
    assert all(type(m.weight) is nn.Parameter for n, m in linears.items() if n.startswith(zimage.QUANTIZE_SKIP))
    add_lora(net, adapter.default_lora_targets(), 4, 4)
    kinds = {type(m).__name__ for m in net.modules()}
    assert "TorchaoLoraLinear" in kinds
    x = torch.randn(2, *adapter.latent_shape(SIZE, SIZE))
    loss = adapter.velocity(net, x, torch.tensor([0.3, 0.7]), ctx).square().mean()
    loss.backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n and g is not None and torch.isfinite(g).all() for n, g in grads.items())
    assert all("lora_" in k for k in lora_state_dict(net))


def test_float8_bytes_in_the_planner_are_torchaos():
    """float8 is refused on the CPU, but torchao's own call builds its storage here: the planner counts that."""
    from torchao.quantization import Float8WeightOnlyConfig, quantize_

    for dtype in (torch.float32, torch.bfloat16):
        layer = nn.Linear(512, 256).to(dtype)
        quantize_(layer, Float8WeightOnlyConfig())
        assert tensor_bytes(layer.weight) == quantized_bytes((256, 512), "float8", dtype)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_the_planners_bytes_are_torchaos(mode):
    """dopsd plan counts a quantized weight at the bytes torchao actually stores."""
    for dtype in (torch.float32, torch.bfloat16):
        net = nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 512), nn.Linear(64, 32)).to(dtype)
        shapes = [tuple(m.weight.shape) for m in net]
        report = quantize_network(net, mode)
        stored = [tensor_bytes(m.weight) for m in net]
        fits = [mode == "int8" or (r * c) % (64 * 256) == 0 for r, c in shapes]
        assert report.quantized == sum(fits) and report.bytes_after == sum(b for b, f in zip(stored, fits) if f)
        for shape, b, fit in zip(shapes, stored, fits):
            expect = quantized_bytes(shape, mode, dtype) if fit else quantized_bytes(shape, "none", dtype)
            assert b == expect, (mode, dtype, shape, b, expect)


def test_nf4_base_trains_on_the_cpu(folders):
    """nf4 (torchao NF4Tensor) runs on the CPU: a LoRA over nf4 weights gets finite gradients."""
    from dopsd.lora.inject import add_lora

    net = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 128))
    assert quantize_network(net, "nf4").quantized == 2
    add_lora(net, ["0", "2"], 4, 4)
    x = torch.randn(3, 256, requires_grad=True)
    net(x).square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None for n, p in net.named_parameters() if "lora_" in n)


def test_refusals_name_model_quantize(folders, tmp_path):
    with pytest.raises(ConfigError, match=r"model\.quantize.*lora\.enabled is false"):
        load_config("zimage-turbo", ["model.quantize=int8", "lora.enabled=false"])
    with pytest.raises(QuantizeUnavailable, match=r"model\.quantize=float8 needs a CUDA GPU"):
        check_available("float8", "cpu")
    with pytest.raises(ConfigError, match=r"model\.quantize"):
        load_config("zimage-turbo", ["model.quantize=int4"])
    import dopsd

    with pytest.raises(QuantizeUnavailable, match="float8"):  # before the model folder or the run folder is touched
        dopsd.train(
            train_config(
                "zimage-turbo", tmp_path, folders.data, SIZE, "model.pretrained=/nowhere", "model.quantize=float8"
            )
        )
    assert not (tmp_path / "run").exists()


def test_a_quantized_run_resumes_from_its_checkpoint(folders, tmp_path):
    """Resume on an int8 base: the checkpoint (LoRA values only) loads back and the run continues."""
    import dopsd

    first = train(folders, "flux2", "int8", tmp_path)
    cfg = train_config(
        "flux2-klein-4b",
        tmp_path,
        folders.data,
        SIZE,
        f"model.pretrained={folders.flux2}",
        "model.quantize=int8",
        "optim.lr=1e-2",
        "method.name=hybrid",
        "train.max_steps=3",
    )
    resumed = dopsd.train(cfg, resume=True)
    assert (
        resumed.steps == 3 and resumed.losses[:2] == first.losses and torch.isfinite(torch.tensor(resumed.losses)).all()
    )


def test_the_miniature_trains_on_a_quantized_base_too(tmp_path, capsys):
    """Quantization knows no family: the shipped miniature trains on an int8 base as well."""
    from PIL import Image

    import dopsd

    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate(["red", "blue"]):
        Image.new("RGB", (24, 24), (200 * (i == 0), 0, 200 * (i == 1))).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"a {colour} circle")
    result = dopsd.train(
        "mini",
        [
            f"data.path={data}",
            "model.quantize=int8",
            "train.max_steps=2",
            f"train.output_dir={tmp_path / 'run'}",
            "log.progress=false",
            "log.tensorboard=false",
            "sample.every=0",
            f"cache.dir={tmp_path / 'cache'}",
        ],
    )
    assert "base quantized to int8" in capsys.readouterr().out
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.losses)).all()

"""`dopsd plan` against the real trainer: predicted vs measured peak memory on the CPU (within 15 %), FLOPs vs
torch's counter on a real step, the depth extrapolation vs the whole network, quantization bytes, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_concept_folder
from tiny_encoders import build_qwen3_vl
from tiny_real import build_flux2, build_zimage, train_config, write_pairs

from dopsd.config import load_config
from dopsd.planner.validate import error, measured_peak, predicted_peak

TOLERANCE = 0.15
CAPTIONS = ["a red cat", "a [V] teapot on a wooden table"]


def mini_config(root: Path, data: Path, method: str, lora: bool):
    extra = [
        f"data.path={data}",
        f"train.output_dir={root / 'run'}",
        f"cache.dir={root / 'cache'}",
        "log.progress=false",
        "log.tensorboard=false",
        "sample.every=0",
        "sample.health=false",
        "train.checkpoint_every=0",
        f"lora.enabled={str(lora).lower()}",
        f"method.name={'sft' if method == 'sft' else 'dopsd'}",
    ]
    if method == "dopsd_prior":
        extra += ["method.prior_prompts=['a red circle', 'a blue square']", "method.prior_weight=1.0"]
    return load_config("mini", extra)


def check(cfg, out: Path, overrides=None) -> float:
    measured, lengths = measured_peak(cfg, out)
    predicted = predicted_peak(cfg, overrides(lengths) if overrides else None)
    err = error(predicted, measured)
    print(
        f"{cfg.model.family} {cfg.method.name} lora={cfg.lora.enabled}: measured {measured / 2**20:.3f} MiB, "
        f"predicted {predicted / 2**20:.3f} MiB ({err:+.1%})"
    )
    assert abs(err) <= TOLERANCE, (predicted, measured)
    return err


@pytest.mark.parametrize(
    "method,lora", [("sft", True), ("sft", False), ("dopsd", True), ("dopsd", False), ("dopsd_prior", True)]
)
def test_prediction_matches_the_trainer_on_the_miniature(tmp_path, method, lora):
    """The shipped turbo, preset mini (batch 8, 4-step roll-out), one real train_step measured on the CPU."""
    data = write_concept_folder(tmp_path / "data", n=8)
    check(mini_config(tmp_path, data, method, lora), tmp_path / "run")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_plan")
    return {
        "root": root,
        "zimage": build_zimage(root / "zi"),
        "vlm": build_qwen3_vl(root / "vl"),
        "flux2": build_flux2(root / "fl"),
    }


def zimage_lengths(lengths):
    """Z-Image's contexts have the captions' own lengths: plan for the ones the run had."""
    out = {"max_caption_tokens": lengths["student"]["cap_feats"]}
    if "teacher" in lengths:
        out["teacher_max_tokens"] = lengths["teacher"]["cap_feats"]
    return out


@pytest.mark.parametrize("method,lora", [("sft", True), ("sft", False), ("dopsd", True), ("dopsd", False)])
def test_prediction_matches_the_trainer_on_tiny_zimage(tiny, tmp_path, method, lora):
    """Tiny Z-Image with the VLM teacher and gradient checkpointing (preset zimage-turbo)."""
    data = write_pairs(tmp_path / "data", CAPTIONS, 32, seed=7)
    cfg = train_config(
        "zimage-turbo",
        tmp_path,
        data,
        32,
        f"model.pretrained={tiny['zimage']}",
        f"model.teacher_encoder={tiny['vlm']}",
        f"method.name={method}",
        f"lora.enabled={lora}",
        "sample.health=false",
        "train.gradient_checkpointing=true",  # the preset's auto resolves to off on the CPU
    )
    assert cfg.train.gradient_checkpointing is True
    check(cfg, tmp_path / "run", zimage_lengths)


@pytest.mark.parametrize("method,lora", [("sft", True), ("sft", False), ("dopsd", True), ("dopsd", False)])
def test_prediction_matches_the_trainer_on_tiny_klein(tiny, tmp_path, method, lora):
    """Tiny FLUX.2-klein with the reference-image teacher (its tokens appended after the noisy ones)."""
    data = write_pairs(tmp_path / "data", CAPTIONS, 64, seed=7)
    cfg = train_config(
        "flux2-klein-4b",
        tmp_path,
        data,
        64,
        f"model.pretrained={tiny['flux2']}",
        f"method.name={method}",
        f"lora.enabled={lora}",
        "sample.health=false",
    )
    check(cfg, tmp_path / "run")


@pytest.mark.parametrize("method", ["sft", "dopsd"])
def test_compute_follows_the_counted_flops_of_a_real_step(tmp_path, method):
    """The plan's FLOPs per step (its formula over the measured calls) against torch's FLOP counter around the
    trainer's real train_step (miniature, CPU)."""
    from dopsd.bench.cost import count_flops
    from dopsd.data.dataset import load_dataset
    from dopsd.models.registry import plan_spec
    from dopsd.planner.plan import Planner, choice_from_config, compute
    from dopsd.training.trainer import Trainer

    data = write_concept_folder(tmp_path / "data", n=8)
    cfg = mini_config(tmp_path, data, method, True)
    trainer = Trainer(cfg, tmp_path / "run", load_dataset(cfg.data, cfg.model))
    trainer.prepare()
    trainer.train_step()
    counted = count_flops(trainer.train_step)
    planner = Planner(cfg, plan_spec(cfg.model), target="cpu", exact=True)
    predicted = compute(planner, choice_from_config(cfg))["per_step_tflops"][method] * 1e12
    assert predicted == pytest.approx(counted, rel=0.02), (predicted, counted)


@pytest.mark.parametrize("preset", ["zimage-turbo", "flux2-klein-4b"])
def test_depth_extrapolation_matches_the_whole_network(preset):
    """Phases measured with 2 and 3 blocks and extrapolated equal the whole full-size network's (256², meta)."""
    from dopsd.models.registry import plan_spec
    from dopsd.planner.measure import Setting, measure

    cfg = load_config(preset)
    spec = plan_spec(cfg.model, preset)
    t = spec.lora_targets
    setting = Setting(256, 256, 1, 1, True, 16, 16.0, tuple(t) if isinstance(t, list) else t, "gpu", "no")
    parts = measure(spec, setting, exact=False, phases=("rollout", "sft"))
    whole = measure(spec, setting, exact=True, phases=("rollout", "sft"))
    for name in ("rollout", "sft"):
        assert parts[name].peak == pytest.approx(whole[name].peak, rel=0.01), name
        assert parts[name].flops == pytest.approx(whole[name].flops, rel=1e-6), name


def test_quantized_bytes_per_scheme():
    from dopsd.planner.resident import quantized_bytes

    shape = (10240, 3840)  # Z-Image's feed-forward w1
    n = 10240 * 3840
    assert quantized_bytes(shape, "none", torch.bfloat16) == 2 * n
    # torchao's storage (tests/test_quantize.py compares these with the quantized tensors themselves)
    assert quantized_bytes(shape, "int8", torch.bfloat16) == n + 10240 * 5  # fp32 scale + int8 zero point per row
    assert quantized_bytes(shape, "float8", torch.bfloat16) == n + 10240 * 4
    nf4 = quantized_bytes(shape, "nf4", torch.bfloat16)
    assert nf4 / n == pytest.approx(0.5 + 1 / 64 + 2 / (64 * 256), rel=1e-3)  # codes + block scales + 2nd level


def test_quantized_base_shrinks_the_frozen_weights_of_zimage(zimage_plan):
    from dopsd.planner.plan import Choice

    planner, _ = zimage_plan
    frozen = {q: planner.resident(Choice(1024, 1024, 1, True, 64, False, q)).frozen for q in ("none", "int8", "nf4")}
    assert 1.8 < frozen["none"] / frozen["int8"] < 2.0  # Linear weights 2 → 1 byte, the rest stays bf16
    assert 3.0 < frozen["none"] / frozen["nf4"] < 4.0
    eight_bit = planner.resident(Choice(1024, 1024, 1, True, 64, True, "none"))
    fp32 = planner.resident(Choice(1024, 1024, 1, True, 64, False, "none"))
    assert fp32.optimizer / eight_bit.optimizer == pytest.approx(4.0, rel=0.05)  # fp32 LoRA states → 8-bit


def test_cli_json_on_the_miniature(capsys):
    from dopsd.cli import main

    assert main(["plan", "mini", "--json", "--no-search"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"].startswith("miniature") and plan["resolution"] == [24, 24]
    for method in ("sft", "dopsd", "dopsd_prior"):
        entry = plan["methods"][method]
        assert entry["peak_gb"] > 0 and entry["tflops_per_step"] > 0 and set(entry["fits"]) == {"16", "24", "48", "80"}
    assert plan["methods"]["dopsd"]["peak_gb"] > plan["methods"]["sft"]["peak_gb"]  # + the EMA shadow
    c = plan["compute"]  # k of the K roll-out states trained (method.train_states), the others a forward
    k, s_fb = c["trained_states"], c["student_fwd_bwd_tflops"]
    assert c["ratio_dopsd_sft"] == pytest.approx(
        (k * (s_fb + c["teacher_fwd_tflops"]) + (c["K"] - k) * c["student_fwd_tflops"]) / s_fb
    )
    assert plan["unseen"]


def test_cli_refuses_bad_input_with_one_message(capsys):
    from dopsd.cli import main

    assert main(["plan", "zimage-turbo", "model.height=1000"]) != 0
    err = capsys.readouterr().err
    assert "model.height" in err and "internal error" not in err
    assert main(["plan", "mini", "--caption-tokens", "0"]) != 0
    err = capsys.readouterr().err
    assert "--caption-tokens" in err and "internal error" not in err
    assert main(["plan", "mini", "lora.enabled=false", "--quantize", "nf4"]) != 0
    err = capsys.readouterr().err
    assert "needs LoRA" in err and "internal error" not in err


# --- quantized layers in a step: what torchao's own layers hold, against the planner's counts -----------------


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(256, 1024, bias=False), torch.nn.Linear(1024, 256, bias=False)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class _Blocks(torch.nn.Module):
    """Repeated blocks in an nn.ModuleList, each checkpointed (non-reentrant) under gradient checkpointing, as
    diffusers' transformers do; weights large next to the activations so their dequantized copies dominate."""

    def __init__(self, checkpointing: bool) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block() for _ in range(6))
        self.checkpointing = checkpointing

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.checkpointing else block(x)
        return x


def _tensor_leaves(t):
    """The plain tensors behind a (possibly quantized, subclass) tensor: the storages it already holds."""
    if hasattr(t, "__tensor_flatten__"):
        for name in t.__tensor_flatten__()[0]:
            yield from _tensor_leaves(getattr(t, name))
    else:
        yield t


def _lora_blocks(quantize: str, checkpointing: bool):
    from dopsd.lora.inject import add_lora
    from dopsd.models.quantize import quantize_network

    torch.manual_seed(0)
    net = _Blocks(checkpointing).to(torch.bfloat16).requires_grad_(False)
    quantize_network(net, quantize)
    add_lora(net, ["up", "down"], 2, 2.0)
    for p in net.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return net


def _step_peak(quantize: str, checkpointing: bool) -> int:
    """Most bytes alive at once beyond the weights during a real forward+backward of the LoRA on quantized blocks."""
    from dopsd.planner.fake import LiveBytes

    net = _lora_blocks(quantize, checkpointing)
    held = [leaf for t in list(net.parameters()) + list(net.buffers()) for leaf in _tensor_leaves(t.detach())]
    # The input needs a gradient, as every layer's does after the first LoRA layer of a real network.
    x = torch.randn(2, 256, dtype=torch.bfloat16, requires_grad=True)
    with LiveBytes(held) as live:
        net(x).float().pow(2).mean().backward()
    return live.peak


@pytest.mark.parametrize("quantize", ["int8", "nf4"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_dequantized_weights_in_a_step_as_torchao_holds_them(quantize, checkpointing):
    """int8 saves every dequantized weight for the backward (one checkpointed block's under checkpointing); NF4
    saves none but its dequantization peaks at 7x the weight it makes. The planner's extra bytes for a student
    forward+backward (max(quant_scratch, dequant_saved), dopsd.planner.plan.Planner.peaks) against the measured
    difference to the same step on the unquantized blocks."""
    from dopsd.planner.resident import count

    measured = _step_peak(quantize, checkpointing) - _step_peak("none", checkpointing)
    with torch.device("meta"):
        net = _Blocks(checkpointing).to(torch.bfloat16).requires_grad_(False)
    from dopsd.lora.inject import add_lora

    add_lora(net, ["up", "down"], 2, 2.0)
    r = count(net, torch.bfloat16, quantize, False, "ema", False, 0, checkpointing)
    predicted = max(r.quant_scratch, r.dequant_saved)
    weight = 256 * 1024 * 2  # one dequantized bf16 weight
    print(f"{quantize} checkpointing={checkpointing}: measured {measured}, predicted {predicted}")
    assert measured > weight  # more than the one dequantized weight the planner used to count
    assert abs(predicted - measured) <= 0.05 * measured, (predicted, measured)


@pytest.fixture(scope="module")
def zimage_plan():
    """The Z-Image-Turbo preset at 1024², LoRA r64 (its defaults) with gradient checkpointing (what its `auto`
    picks on the cards that need it), planned once for the tests below."""
    from dopsd.models.registry import plan_spec
    from dopsd.planner.plan import Planner, choice_from_config

    cfg = load_config("zimage-turbo", ["train.gradient_checkpointing=true"])
    planner = Planner(cfg, plan_spec(cfg.model, "zimage-turbo"))
    return planner, choice_from_config(cfg)


def test_zimage_int8_without_checkpointing_holds_its_dequantized_weights(zimage_plan):
    from dataclasses import replace

    from dopsd.planner.resident import GiB

    planner, c = zimage_plan
    off = planner.resident(replace(c, quantize="int8", gradient_checkpointing=False))
    on = planner.resident(replace(c, quantize="int8", gradient_checkpointing=True))
    assert 11.0 < off.dequant_saved / GiB < 11.6  # every block's Linear weights in bf16
    assert 0.25 < on.dequant_saved / GiB < 0.45  # one transformer block's, recomputed
    assert off.dequant_saved > 10 * on.dequant_saved
    assert planner.resident(replace(c, quantize="nf4")).dequant_saved == 0
    # outside the blocks only the final layer takes an input that needs a gradient (embedders are fed frozen)
    outside = {n for n in planner.grad_linears(c) if not n.startswith(("layers.", "noise_refiner.", "context_"))}
    assert outside == {"all_final_layer.2-1.linear"}


def test_sampling_is_bounded_and_under_the_training_peak_of_zimage_at_1024(zimage_plan, monkeypatch):
    """Grids and health sample one 1024² image per batch and the VAE decodes one at a time: the sampling phase
    (resident + gradients + its largest call) stays below the training peak, with a bf16 and an int8 base. The
    grid's eight images in one VAE call, as before the bound, needed ~12 GiB and would have set the run peak."""
    from dataclasses import replace

    from dopsd.models import zimage
    from dopsd.planner.plan import METHODS
    from dopsd.planner.resident import GiB
    from dopsd.planner.sampling import decode_peak

    planner, c = zimage_plan
    parts = planner.sampling_parts(c)
    assert parts["grid_batch"] == parts["health_batch"] == 1
    assert 1.0 < parts["decode"] / GiB < 2.0  # one 1024² image through the decoder
    for q in ("none", "int8"):
        cq = replace(c, quantize=q)
        sampling, peaks = planner.sampling(cq), planner.peaks(cq)
        for method in METHODS:
            print(f"{q} {method}: sampling {sampling[method] / GiB:.2f}, training {peaks[method]['peak'] / GiB:.2f}")
            assert peaks[method]["resident"] < sampling[method] < peaks[method]["peak"]
    monkeypatch.setattr(zimage, "DECODE_PIXELS", 8 * 1024 * 1024)
    unbounded = decode_peak(planner.spec, planner.setting(c), 8)
    assert unbounded > 7 * parts["decode"]
    peaks, r = planner.peaks(c)["dopsd"], planner.resident(c)
    assert peaks["resident"] + r.grads + unbounded > peaks["peak"] + 8 * GiB


@pytest.mark.parametrize("family,size", [("zimage", 32), ("flux2", 64)])
def test_adapters_decode_in_bounded_batches(tiny, family, size, monkeypatch):
    """The adapters' decode makes VAE calls of at most DECODE_PIXELS (at least one image each), with the images
    of one call; `dopsd plan` runs this same decode (PlanSpec.decode)."""
    from tiny_real import model_config

    from dopsd.models import flux2, zimage

    module = {"zimage": zimage, "flux2": flux2}[family]
    kw = {"teacher_encoder": str(tiny["vlm"])} if family == "zimage" else {}
    adapter = module.load(model_config(family, pretrained=str(tiny[family]), height=size, width=size, **kw))
    latents = torch.randn(3, *adapter.latent_shape(size, size), generator=torch.Generator().manual_seed(0))
    whole = adapter.decode(latents)
    calls = []
    adapter.vae.decoder.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    monkeypatch.setattr(module, "DECODE_PIXELS", 2 * size * size)
    bounded = adapter.decode(latents)
    assert calls == [2, 1] and bounded.shape == whole.shape == (3, 3, size, size)
    assert torch.allclose(bounded, whole, atol=1e-5), (bounded - whole).abs().max()


def test_the_run_peak_counts_sampling(capsys):
    """A miniature run whose training step is small (batch 1) next to its sampling (8 grid images per batch):
    the run peak, which the card verdicts use, is the sampling phase's."""
    from dopsd.cli import main

    assert main(["plan", "mini", "train.batch_size=1", "--json", "--no-search"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["sampling"]["batches"] == {"grid": 8, "health": 8}
    for method, entry in plan["methods"].items():
        assert entry["sampling_peak_gb"] > entry["peak_gb"], method
        assert entry["run_peak_gb"] == max(entry["peak_gb"], entry["caching_peak_gb"], entry["sampling_peak_gb"])
    assert plan["methods"]["dopsd"]["run_peak_gb"] == plan["methods"]["dopsd"]["sampling_peak_gb"]

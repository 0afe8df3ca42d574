"""Training at a random subset of the roll-out states (method.train_states), automatic gradient checkpointing
and torch.compile of the denoiser: the speed options of a D-OPSD step."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from dopsd.config import ConfigError, load_config
from dopsd.core.objective import dopsd_loss
from dopsd.core.schedules import shifted_schedule
from dopsd.training import speed

K = 4


class Counting(torch.nn.Module):
    """A tiny velocity model that counts its calls with and without a graph."""

    def __init__(self, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = torch.nn.Parameter(torch.randn(3, 3, generator=g) * 0.3)
        self.b = torch.nn.Parameter(torch.randn(3, generator=g) * 0.1)
        self.calls = {"grad": 0, "no_grad": 0}

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        self.calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        h = torch.einsum("ij,bjhw->bihw", self.a, x) + self.b.view(1, 3, 1, 1)
        return torch.tanh(h) * (1 + sigma.view(-1, 1, 1, 1)) + context.view(-1, 1, 1, 1)


def _grads(states, per_step: bool, rollout: str = "student"):
    student, teacher = Counting(0), Counting(1)
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    ctx = torch.tensor([0.1, -0.2])
    out = dopsd_loss(
        student,
        teacher,
        noise,
        shifted_schedule(K, 3.0),
        ctx,
        ctx * 2,
        backward=(lambda loss: loss.backward()) if per_step else None,
        states=states,
        rollout=rollout,
        step_weights=[1.0, 2.0, 0.5, 1.5],
    )
    if not per_step:
        out.loss.backward()
    return torch.cat([student.a.grad.flatten(), student.b.grad.flatten()]), out, student, teacher


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_uniform_subset_is_an_unbiased_estimate_of_the_full_gradient_and_loss(k):
    """The mean over every k-subset of the K states (what a uniform draw averages to) equals the full roll-out's
    gradient and loss: the K/k rescaling keeps the expected scale, whatever the per-state weights."""
    full, full_out, _, _ = _grads(None, per_step=True)
    subsets = list(itertools.combinations(range(K), k))
    runs = [_grads(list(s), per_step=True) for s in subsets]
    mean_grad = torch.stack([g for g, *_ in runs]).mean(0)
    mean_loss = sum(float(o.loss) for _, o, *_ in runs) / len(runs)
    torch.testing.assert_close(mean_grad, full, rtol=1e-5, atol=1e-7)
    assert math.isclose(mean_loss, float(full_out.loss), rel_tol=1e-5)
    assert not torch.allclose(runs[0][0], full)  # one subset alone is not the full gradient


def test_per_step_backward_and_one_backward_agree_on_a_subset():
    per_step, out_a, *_ = _grads([0, 2], per_step=True)
    whole, out_b, *_ = _grads([0, 2], per_step=False)
    torch.testing.assert_close(per_step, whole, rtol=1e-5, atol=1e-7)
    assert math.isclose(float(out_a.loss), float(out_b.loss), rel_tol=1e-6)


@pytest.mark.parametrize("rollout", ["student", "teacher"])
def test_untrained_states_cost_one_forward_without_a_graph(rollout):
    """k of K states: k student forwards with a graph and k teacher forwards; each other state is one forward
    without a graph of the model that drives the roll-out. The states visited are the full roll-out's."""
    _, out, student, teacher = _grads([1], per_step=True, rollout=rollout)
    assert student.calls["grad"] == 1 and teacher.calls["grad"] == 0
    if rollout == "student":
        assert student.calls["no_grad"] == K - 1 and teacher.calls["no_grad"] == 1
    else:
        assert student.calls["no_grad"] == 0 and teacher.calls["no_grad"] == K
    assert [math.isnan(s.loss) for s in out.steps] == [True, False, True, True]
    _, full, *_ = _grads(None, per_step=True, rollout=rollout)
    torch.testing.assert_close(out.final, full.final)


def test_bad_subsets_are_refused():
    for states in ([], [4], [-1]):
        with pytest.raises(ValueError, match="states"):
            _grads(states, per_step=True)


def test_trainer_trains_a_subset_and_the_option_is_checked(tmp_path: Path, concept_data: Path, tiny_mini: Path):
    """A real step of the trainer with train_states=1 (per-step backward, and with one backward): the same
    draw of states on a rerun, a gradient, and the log's per-state loss only where a state was trained."""
    assert load_config("mini", []).method.train_states == 1  # the default (docs/time-to-fidelity.md)
    from dopsd.data.dataset import load_dataset
    from dopsd.training.trainer import Trainer

    def step(per_step: bool, folder: str) -> dict:
        cfg = tiny_config(
            tmp_path / folder,
            concept_data,
            **{
                "model.pretrained": str(tiny_mini),
                "method.train_states": 1,
                "method.per_step_backward": per_step,
                "train.gradient_accumulation": 1,
            },
        )
        trainer = Trainer(cfg, tmp_path / folder / "run", load_dataset(cfg.data, cfg.model))
        trainer.prepare()
        assert trainer.speed.startswith("off")  # the miniature has no gradient checkpointing
        return trainer.train_step()

    a, b, c = step(True, "a"), step(True, "b"), step(False, "c")
    trained = [k for k in range(K) if f"rollout/step{k}_loss" in a]
    assert len(trained) == 1 and math.isfinite(a[f"rollout/step{trained[0]}_loss"])
    assert [f"rollout/step{k}_loss" in b for k in range(K)] == [k in trained for k in range(K)]
    assert a["loss"] == b["loss"] and a["grad_norm"] > 0
    assert math.isclose(a["loss"], c["loss"], rel_tol=1e-5) and math.isclose(
        a["grad_norm"], c["grad_norm"], rel_tol=1e-4
    )
    with pytest.raises(ConfigError, match="train_states"):
        load_config("mini", ["method.train_states=-1"])


def test_planned_flops_count_the_untrained_states_as_forwards():
    from dopsd.planner import plan

    full = plan(load_config("mini", ["method.train_states=0"]), search=False)["compute"]
    sub = plan(load_config("mini", ["method.train_states=1"]), search=False)["compute"]
    s_fb, t_f, s_f = full["student_fwd_bwd_tflops"], full["teacher_fwd_tflops"], full["student_fwd_tflops"]
    assert sub["trained_states"] == 1 and full["trained_states"] == K
    assert math.isclose(full["per_step_tflops"]["dopsd"], K * (s_fb + t_f), rel_tol=1e-9)
    assert math.isclose(sub["per_step_tflops"]["dopsd"], s_fb + t_f + (K - 1) * s_f, rel_tol=1e-9)
    assert sub["ratio_dopsd_sft"] < full["ratio_dopsd_sft"]
    assert "k=1 trained" in sub["formula"]


def test_auto_checkpointing_resolves(tmp_path: Path):
    """In the trainer: off without checkpointing or on the CPU, on for an accelerator when unresolved."""
    from dopsd.mini.adapter import tiny_random_adapter
    from dopsd.planner.auto import resolve

    class WithGC(torch.nn.Linear):
        def enable_gradient_checkpointing(self) -> None:
            self.gc = True

    net, mini = WithGC(2, 2), tiny_random_adapter(0).network
    assert speed.checkpointing("auto", net, torch.device("cpu"))[0] is False
    assert speed.checkpointing("auto", net, torch.device("cuda"))[0] is True
    assert speed.checkpointing(False, net, torch.device("cuda"))[0] is False
    assert speed.checkpointing("auto", mini, torch.device("cuda"))[0] is False
    assert load_config("mini", []).train.gradient_checkpointing == "auto"
    assert resolve(load_config("mini", []))[0] is False  # the mini preset trains on the CPU


@pytest.mark.slow
def test_auto_checkpointing_follows_the_plan(tmp_path: Path):
    """With the plan (tiny Z-Image, which has checkpointing): off when the card holds the run without it, on
    when it does not."""
    from tiny_encoders import build_qwen3_vl
    from tiny_real import build_zimage, train_config, write_pairs

    from dopsd.planner.auto import resolve, resolved

    data = write_pairs(tmp_path / "data", ["a red cat", "a [V] teapot"], 32, seed=7)
    cfg = train_config(
        "zimage-turbo",
        tmp_path,
        data,
        32,
        f"model.pretrained={build_zimage(tmp_path / 'zi')}",
        f"model.teacher_encoder={build_qwen3_vl(tmp_path / 'vl')}",
        "train.gradient_checkpointing=auto",
        "train.device=null",
    )
    big, why_big = resolve(cfg, device_bytes=80 * 2**30)
    small_cfg, why_small = resolved(cfg, device_bytes=2**30)  # nothing fits beside the 1 GiB CUDA context
    assert big is False and "fits" in why_big
    assert small_cfg.train.gradient_checkpointing is True and "does not fit" in why_small
    assert cfg.train.gradient_checkpointing == "auto"  # `resolved` returns a copy


@pytest.mark.slow
def test_compiled_denoiser_matches_the_eager_one():
    """torch.compile (in place, as train.compile does) gives the eager outputs and gradients to float tolerance,
    and keeps the parameter names (LoRA state-dict keys)."""
    from dopsd.lora.inject import add_lora
    from dopsd.mini.adapter import tiny_random_adapter

    torch.manual_seed(0)
    eager = tiny_random_adapter(0)
    compiled = tiny_random_adapter(0)
    for a in (eager, compiled):
        torch.manual_seed(1)
        add_lora(a.network, a.default_lora_targets(), 4, 4.0)
        a.network.train()
    names = [n for n, _ in compiled.network.named_parameters()]
    speed.setup(compiled.network, load_config("mini", ["train.compile=true"]).train, torch.device("cpu"))
    assert [n for n, _ in compiled.network.named_parameters()] == names
    ctx = eager.collate(eager.student_contexts(["a red circle", "a blue square"]))
    x = torch.randn(2, *eager.latent_shape(24, 24), generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.9, 0.4])
    outs = []
    for a in (eager, compiled):
        v = a.velocity(a.network, x, sigma, ctx)
        v.pow(2).mean().backward()
        grads = [p.grad.clone() for p in a.network.parameters() if p.grad is not None]
        outs.append((v.detach(), grads))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-4, atol=1e-5)
    for g1, g0 in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(g1, g0, rtol=1e-3, atol=1e-6)

"""Few-step health on the shipped miniature turbo: flat for the untouched model, falls when SFT blurs it."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dopsd.health import FewStepHealth, relative_gap, sharpness
from dopsd.mini import world
from dopsd.models.mini import load
from dopsd.objective import sample_training_sigmas, sft_loss

torch.set_num_threads(1)
PROMPTS = [
    "a red circle on a gray background",
    "a blue square on a black background",
    "a yellow triangle on a navy background",
    "a white plus on a brown background",
]


@pytest.fixture(scope="module")
def turbo():
    return load(SimpleNamespace(pretrained="turbo"))


def monitor(adapter, **kw) -> FewStepHealth:
    return FewStepHealth(adapter, PROMPTS, height=24, width=24, seeds=(0, 1), **kw)


def test_signals_see_blur():
    g = torch.Generator().manual_seed(0)
    images = world.render([world.random_scene(g) for _ in range(8)])
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    assert (sharpness(blurred) < 0.7 * sharpness(images)).all()
    assert float(relative_gap(images, images).max()) == 0.0
    assert (relative_gap(blurred, images) > 0.05).all()


def test_untouched_model_stays_at_one(turbo):
    health = monitor(turbo)
    start = health.reference(turbo.network)
    assert set(start) == {"sharpness", "gap", "quality"}  # the mini's decoder quality is picked up by default
    turbo.network.train()
    for _ in range(2):
        out = health.measure(turbo.network)
        assert out["health"] == 1.0 and out["warning"] is None
        assert out["sharpness"] == out["gap"] == out["quality"] == 1.0
    assert turbo.network.training  # measure() restores the mode it found
    turbo.network.eval()
    assert health.last_images.shape == (len(PROMPTS) * 2, 3, 24, 24)
    scalars = health.scalars(out)
    assert scalars["health/health"] == 1.0 and "health/warning" not in scalars


def test_the_undistilled_base_at_few_steps_scores_low(turbo):
    """The shipped base sampled at the turbo's 4 steps is what "lost its distillation" looks like."""
    base = load(SimpleNamespace(pretrained="base"))
    health = monitor(turbo)
    health.reference(turbo.network)
    out = health.measure(base.network)
    assert out["health"] < health.threshold and "few-step health" in out["warning"]
    assert out["sharpness"] < 0.95


def test_health_falls_during_a_blurring_sft_run(turbo):
    """SFT (flow matching on multimodal scenes) pulls the turbo back toward a multi-step model: few-step blur."""
    health = monitor(turbo)
    health.reference(turbo.network)
    net = copy.deepcopy(turbo.network).train()
    opt = torch.optim.AdamW(net.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)
    trace = []
    for step in range(1, 61):
        scenes = [world.random_scene(g) for _ in range(16)]
        x0 = world.render(scenes)
        context = turbo.collate(turbo.student_contexts([s.caption() for s in scenes]))
        sigma = sample_training_sigmas(16, "shifted", shift=3.0, generator=g)
        loss = sft_loss(lambda x, s, c: turbo.velocity(net, x, s, c), x0, context, sigma, torch.randn(x0.shape, generator=g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0:
            trace.append(health.measure(net))
    values = [t["health"] for t in trace]
    assert values[-1] < health.threshold, values
    assert trace[-1]["warning"] is not None and "SFT" in trace[-1]["warning"]
    # The untouched network measured after the run is still exactly where it started.
    assert health.measure(turbo.network)["health"] == 1.0


def test_errors_are_clear(turbo):
    health = monitor(turbo, quality_fn=None, control_steps=0)
    with pytest.raises(RuntimeError, match="before reference"):
        health.measure(turbo.network)
    assert set(health.reference(turbo.network)) == {"sharpness"}
    with pytest.raises(ValueError, match="threshold"):
        monitor(turbo, threshold=1.5)
    with pytest.raises(ValueError, match="prompt"):
        FewStepHealth(turbo, [], height=24, width=24)

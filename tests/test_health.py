"""Few-step health on the shipped miniature turbo: flat for the untouched model, falls for a blurring denoiser."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dopsd.health import FewStepHealth, relative_gap, sharpness
from dopsd.mini import world
from dopsd.models.mini import load

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


class BlurredOutput(torch.nn.Module):
    """The turbo with its x̂0 blurred: a denoiser that lost its few-step sharpness, by construction.

    In the shipped miniature neither the multi-step base at 4 steps nor a short SFT run blurs few-step samples
    measurably (README, "what holds and what does not"), so the blur the monitor must catch is built here.
    """

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, sigma, **context):
        x0 = self.inner(x, sigma, **context)
        return F.avg_pool2d(F.pad(x0, (1, 1, 1, 1), mode="replicate"), 3, stride=1)


def test_health_falls_for_a_blurring_denoiser_and_stays_for_the_untouched_one(turbo):
    health = monitor(turbo)
    health.reference(turbo.network)
    out = health.measure(BlurredOutput(turbo.network))
    assert out["health"] < health.threshold, out
    assert out["sharpness"] < 0.95 and out["warning"] is not None and "few-step health" in out["warning"]
    # The untouched network measured afterwards is still exactly where it started.
    again = health.measure(turbo.network)
    assert again["health"] == 1.0 and again["warning"] is None


def test_errors_are_clear(turbo):
    health = monitor(turbo, quality_fn=None, control_steps=0)
    with pytest.raises(RuntimeError, match="before reference"):
        health.measure(turbo.network)
    assert set(health.reference(turbo.network)) == {"sharpness"}
    with pytest.raises(ValueError, match="threshold"):
        monitor(turbo, threshold=1.5)
    with pytest.raises(ValueError, match="prompt"):
        FewStepHealth(turbo, [], height=24, width=24)

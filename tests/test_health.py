"""Few-step health on the shipped miniature turbo: flat for the untouched model, falls during an SFT run
(which blurs the turbo's few-step samples in the miniature world) and for a denoiser blurred by construction; the
alarm fires for SFT with prior preservation and stays quiet for D-OPSD with it (real runs)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dopsd.mini import world
from dopsd.mini.adapter import load
from dopsd.training.health import FewStepHealth, relative_gap, sharpness

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


def test_sampling_batches_are_bounded_by_their_pixels(turbo):
    """One 1024² image per sampling batch, four at 512²; small images all at once (the miniature's health check
    samples its prompts × seeds in one batch, as it always did, so its numbers stay the same)."""
    from dopsd.core.sampler import sample_batch

    assert sample_batch(1024, 1024, 8) == sample_batch(2048, 1024, 8) == 1
    assert sample_batch(512, 512, 8) == 4 and sample_batch(512, 512, 2) == 2
    assert sample_batch(24, 24, 8) == 8 and sample_batch(24, 24, 200) == 200
    assert monitor(turbo).batch == len(PROMPTS) * 2


def test_untouched_model_stays_at_one(turbo):
    health = monitor(turbo)
    start = health.reference(turbo.network)
    assert set(start) == {
        "sharpness",
        "structure",
        "gap",
        "quality",
    }  # the mini's decoder quality is picked up by default
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

    A second, model-free check of the monitor besides the real SFT run below.
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


class ManyStepOnly(torch.nn.Module):
    """The turbo with its x̂0 shrunk by a quarter below σ = 0.2, where the 4-step schedule (1, .75, .5, .25, 0) never evaluates
    it: the few-step samples stay exactly the turbo's, only the 32-step control moves (as in sound D-OPSD runs,
    whose few-step vs many-step gap grows while their few-step quality holds)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x, sigma, **context):
        x0 = self.inner(x, sigma, **context)
        return 0.75 * x0 if float(sigma.max()) < 0.2 else x0


def test_a_moved_many_step_control_alone_does_not_alarm(turbo):
    health = monitor(turbo)
    health.reference(turbo.network)
    out = health.measure(ManyStepOnly(turbo.network))
    assert 0.5 < out["gap"] < 0.93, out  # the control moved as far as the old alarm reacted to ...
    assert out["sharpness"] == out["quality"] == 1.0  # ... the few-step samples did not
    assert out["health"] == 1.0 and out["warning"] is None and not out["broken"], out
    # The cheap check (no control) gives the same health: the gap is not part of it.
    assert health.measure(ManyStepOnly(turbo.network), control=False)["health"] == out["health"]


def test_errors_are_clear(turbo):
    health = monitor(turbo, quality_fn=None, control_steps=0)
    with pytest.raises(RuntimeError, match="before reference"):
        health.measure(turbo.network)
    assert set(health.reference(turbo.network)) == {"sharpness", "structure"}
    with pytest.raises(ValueError, match="threshold"):
        monitor(turbo, threshold=1.5)
    with pytest.raises(ValueError, match="prompt"):
        FewStepHealth(turbo, [], height=24, width=24)


def test_health_falls_during_a_real_sft_run(tmp_path):
    """SFT on a held-out concept pulls the turbo toward posterior means: its few-step samples lose the world's
    fine grain. The trainer's health signal (on unrelated prompts) must see it and warn."""
    import dopsd
    from dopsd.config import load_config

    data = tmp_path / "data"
    world.write_concept_dataset(data, "orange")
    cfg = load_config(
        "mini",
        [
            f"data.path={data}",
            f"train.output_dir={tmp_path / 'sft'}",
            "method.name=sft",
            "train.max_steps=80",
            "sample.every=40",
            "sample.control_steps=0",
            "train.checkpoint_every=0",
            "log.tensorboard=false",
        ],
    )
    cfg.sample.health_prompts = PROMPTS
    with pytest.warns(UserWarning, match="few-step health"):
        result = dopsd.train(cfg)
    final = result.summary["health"]  # measured on the final model, against the starting turbo
    assert final["health"] < 0.85 and final["quality"] < 0.9, final


def _train_with_prior_preservation(tmp_path, method: str, steps: int):
    """A run of the shipped example config (prior preservation on, health on its prior prompts) on the demo's data."""
    import warnings

    import dopsd

    data = tmp_path / "data"
    if not data.exists():
        world.write_concept_dataset(data, "orange")
    example = Path(__file__).resolve().parent.parent / "dopsd" / "configs" / "mini.yaml"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = dopsd.train(
            example,
            [
                f"data.path={data}",
                f"train.output_dir={tmp_path / method}",
                f"method.name={method}",
                f"train.max_steps={steps}",
                "sample.every=0",
                "train.checkpoint_every=0",
                "log.tensorboard=false",
                "log.progress=false",
                f"cache.dir={tmp_path / 'cache'}",
            ],
        )
    alarms = [str(w.message) for w in caught if "few-step health" in str(w.message)]
    return result.summary["health"], alarms


def test_alarm_fires_for_sft_with_prior_preservation_and_not_for_dopsd(tmp_path):
    """SFT with on-policy prior preservation on the health prompts themselves loses 10–12% of its few-step quality
    by step 50 (the bench's metric on unrelated prompts; docs/measured/health-calibration.json) and scores
    0.86–0.89; D-OPSD with the same term keeps it and scores 0.979–0.991. Both measured here on real runs of the
    example config."""
    from dopsd.training.health import HEALTH_THRESHOLD

    sft, sft_alarms = _train_with_prior_preservation(tmp_path, "sft", 50)
    assert sft["health"] < HEALTH_THRESHOLD and sft_alarms, sft
    assert sft["health"] > 0.5 and not sft["broken"]  # degraded, not broken
    dopsd_health, dopsd_alarms = _train_with_prior_preservation(tmp_path, "dopsd", 50)
    assert dopsd_health["health"] >= HEALTH_THRESHOLD + 0.03 and not dopsd_alarms, dopsd_health

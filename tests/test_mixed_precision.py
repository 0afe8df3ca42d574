"""bf16 autocast, where every real preset trains: each forward uses the weights that are swapped in at that moment.

Autocast caches the low-precision cast of each float32 parameter that requires a gradient, keyed by the parameter
object. The teacher (EMA), the prior (the base) and the baselines' reference models swap other values into the
same parameters (`ParamShadow.swapped_in`), which such a cache cannot see: a stale cast would give the teacher
the student's LoRA values, or the student the teacher's. These tests record every velocity call of real training
steps under bf16 autocast, with the trainable values the network held at that moment, and replay each call alone
(its own autocast region): the step must have computed exactly what those values give.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from dopsd.data.dataset import load_dataset
from dopsd.training.trainer import Trainer


class Recorder:
    """Wraps an adapter's `velocity`: keeps each call's inputs, output and the trainable values it ran with."""

    def __init__(self, adapter, trainable):
        self.adapter, self.trainable, self.calls = adapter, trainable, []
        self.velocity = adapter.velocity
        adapter.velocity = self

    def __call__(self, network, x, sigma, context):
        out = self.velocity(network, x, sigma, context)
        values = {n: p.detach().clone() for n, p in self.trainable.items()}
        self.calls.append((network, x.detach().clone(), sigma.detach().clone(), context, out.detach().clone(), values))
        return out

    def replay(self) -> list[float]:
        """Each call again, alone in its own bf16 autocast region with its recorded values: max |difference|."""
        diffs = []
        live = {n: p.data for n, p in self.trainable.items()}
        try:
            for network, x, sigma, context, out, values in self.calls:
                for n, p in self.trainable.items():
                    p.data = values[n]
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    again = self.velocity(network, x, sigma, context)
                diffs.append(float((again.float() - out.float()).abs().max()))
        finally:
            for n, p in self.trainable.items():
                p.data = live[n]
        return diffs


def bf16_trainer(tmp_path, data, **overrides):
    cfg = tiny_config(tmp_path, data, **{"train.mixed_precision": "bf16", "train.checkpoint_every": 0, **overrides})
    trainer = Trainer(cfg, tmp_path / "run", load_dataset(cfg.data, cfg.model))
    trainer.prepare()
    with torch.no_grad():  # a student unlike its teacher and its prior (both start as the untouched model)
        g = torch.Generator().manual_seed(1)
        for p in trainer.trainable.values():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return trainer


PRIOR = {"method.prior_prompts": ["a red circle", "a blue square"], "method.prior_weight": 1.0}


@pytest.mark.parametrize(
    "overrides",
    [
        {"method.name": "dopsd"},  # EMA teacher
        {"method.name": "dopsd", "method.teacher": "base"},
        {"method.name": "dopsd", **PRIOR},  # teacher and prior swaps in one step
        {"method.name": "sft", **PRIOR},
        {"method.name": "pso", "method.pso_form": "dpo"},  # the reference model
        {"method.name": "dreambooth", "method.class_images": 2, "method.class_prompts": ["a circle"]},
        {"method.name": "sft_teacher"},
    ],
    ids=["dopsd-ema", "dopsd-base", "dopsd-prior", "sft-prior", "pso-reference", "dreambooth", "sft-teacher"],
)
def test_every_forward_uses_the_values_swapped_in_at_that_moment(tmp_path, concept_data, overrides):
    trainer = bf16_trainer(tmp_path, concept_data, **overrides)
    rec = Recorder(trainer.adapter, trainer.trainable)
    trainer.train_step()
    trainer.train_step()
    assert len(rec.calls) >= 2
    diffs = rec.replay()
    assert max(diffs) <= 1e-6, f"calls whose output is not that of the weights swapped in: {diffs}"
    distinct = {tuple(float(v.sum()) for v in c[5].values()) for c in rec.calls}
    if any(t.teacher or t.prior for t in trainer.terms) and trainer.method.teacher != "live":
        assert len(distinct) >= 2  # the step did run forwards with other values swapped in


def test_student_and_teacher_velocities_are_their_own_weights_within_one_region(tmp_path, concept_data):
    """The trainer's autocast region around student, teacher, student: each sees its own weights."""
    trainer = bf16_trainer(tmp_path, concept_data)
    ctx = trainer.contexts([trainer.feats.student[(0, 0)]])
    x = torch.randn(1, *trainer.adapter.latent_shape(24, 24), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.75])
    student = trainer.velocity(trainer.student)
    teacher = trainer.teacher.wrap(trainer.velocity(trainer.network))

    def alone(fn):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            return fn(x, sigma, ctx)

    want_student = alone(student)
    want_teacher = alone(teacher)
    assert (want_student - want_teacher).abs().max() > 1e-3  # the two weights differ visibly in bf16
    with trainer.acc.autocast():
        got_student = student(x, sigma, ctx)  # with a gradient, as in a roll-out
        got_teacher = teacher(x, sigma, ctx)
        got_again = student(x, sigma, ctx)
    torch.testing.assert_close(got_student.detach(), want_student, rtol=0, atol=0)
    torch.testing.assert_close(got_teacher, want_teacher, rtol=0, atol=0)
    torch.testing.assert_close(got_again.detach(), want_student, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dopsd", "sft"])
def test_every_trainable_tensor_gets_a_gradient_under_bf16(tmp_path, concept_data, name):
    trainer = bf16_trainer(tmp_path, concept_data, **{"method.name": name})
    seen = {}
    for n, p in trainer.trainable.items():
        p.register_hook(lambda g, n=n: seen.__setitem__(n, float(g.abs().sum())))
    trainer.train_step()
    zero = sorted(n for n in trainer.trainable if seen.get(n, 0.0) == 0.0)
    assert not zero, f"{len(zero)} of {len(trainer.trainable)} trainable tensors got no gradient: {zero[:4]}"

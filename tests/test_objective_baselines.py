"""The baselines' losses (PSO, off-policy distillation) on tiny analytic and neural velocity fields.

The expected gradients are derived by hand in each test's comment and compared with autograd through the real
functions; SFT gradients (`sft_loss`) serve as the reference directions ∇L_w and ∇L_l.
"""

import math

import pytest
import torch
from torch import nn

from dopsd.core.objective import dopsd_loss, per_sample_error, pso_loss, sample_schedule_sigmas, sft_loss
from dopsd.core.sampler import sample_euler
from dopsd.core.schedules import shifted_schedule, training_schedule
from dopsd.core.weights import ParamShadow, trainable_parameters

torch.set_num_threads(1)
DIM, CTX, B = 6, 3, 4
SCHEDULE = training_schedule(shifted_schedule(8, 3.0), every=2)  # 1, .9, .75, .5 → 0
RELEASED = dict(beta=5.0, ref_weight=0.1, prior_weight=0.5)  # the PSO scripts' constants


class Denoiser(nn.Module):
    """v(x, σ, c) from an MLP over [x, σ, c]; records the states it is called at."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(DIM + 1 + CTX, 32), nn.Tanh(), nn.Linear(32, DIM))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, sigma, context):
        self.seen.append(x)
        return self.net(torch.cat([x, sigma[:, None], context], dim=1))


def grad_of(model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
    """The flat gradient of `loss` w.r.t. the model's parameters (the .grad fields are left untouched)."""
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


def pair_batch(seed: int = 1, ref_scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x_w = torch.randn(B, DIM, generator=g)
    x_l = ref_scale * torch.randn(B, DIM, generator=g)
    ctx = torch.randn(B, CTX, generator=g)
    noise = torch.randn(B, DIM, generator=g)
    sigma = sample_schedule_sigmas(B, SCHEDULE, generator=g)
    return x_w, x_l, ctx, noise, sigma


def moved(model: nn.Module, by: float = 0.2, seed: int = 5) -> None:
    """Move the weights away from where a base shadow was taken (the student after some training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by * torch.randn(p.shape, generator=g))


def per_pair_sft_grads(model, x0, ctx, noise, sigma):
    """∇ℓ_i for each pair i alone (sft_loss on one sample = that sample's per-sample error)."""
    return [
        grad_of(model, sft_loss(model, x0[i : i + 1], ctx[i : i + 1], sigma[i : i + 1], noise[i : i + 1]))
        for i in range(len(x0))
    ]


# --- PSO, hinge form (the released scripts' `pso_db`) --------------------------------------------------


def test_pso_hinge_with_released_constants_is_five_times_sft_on_the_targets():
    # Active hinge: ∇ = β∇L_w − βγ∇L_l + λ∇L_l = 5∇L_w + (0.5 − 0.5)∇L_l = 5∇L_w (L = batch means).
    model = Denoiser()
    x_w, x_l, ctx, noise, sigma = pair_batch()
    out = pso_loss(model, x_w, x_l, ctx, sigma, noise, **RELEASED)
    assert bool((1 - 5.0 * out.margin > 0).all())  # the hinge is active on every pair
    got = grad_of(model, out.loss)
    want = 5.0 * grad_of(model, sft_loss(model, x_w, ctx, sigma, noise))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    # the reference images do enter the loss value, only their gradient cancels
    torch.testing.assert_close(out.loss, torch.relu(1 - 5 * out.margin).mean() + 0.5 * out.reference_error.mean())
    assert not torch.allclose(grad_of(model, sft_loss(model, x_l, ctx, sigma, noise)), torch.zeros_like(got))


def test_pso_hinge_gradient_algebra_active_and_inactive():
    beta, gamma, lam = 2.0, 0.3, 0.2
    model = Denoiser()
    x_w, x_l, ctx, noise, sigma = pair_batch()
    out = pso_loss(model, x_w, x_l, ctx, sigma, noise, beta=beta, ref_weight=gamma, prior_weight=lam)
    assert bool((1 - beta * out.margin > 0).all())
    g_w = grad_of(model, sft_loss(model, x_w, ctx, sigma, noise))
    g_l = grad_of(model, sft_loss(model, x_l, ctx, sigma, noise))
    torch.testing.assert_close(grad_of(model, out.loss), beta * g_w + (lam - beta * gamma) * g_l, rtol=1e-5, atol=1e-7)
    # References far from anything the model predicts: L_l ≫ L_w, margin > 1/β, the hinge is off and only the
    # prior term λ·L_l is left.
    x_w, x_l, ctx, noise, sigma = pair_batch(ref_scale=20.0)
    out = pso_loss(model, x_w, x_l, ctx, sigma, noise, beta=beta, ref_weight=gamma, prior_weight=lam)
    assert bool((1 - beta * out.margin < 0).all())
    g_l = grad_of(model, sft_loss(model, x_l, ctx, sigma, noise))
    torch.testing.assert_close(grad_of(model, out.loss), lam * g_l, rtol=1e-5, atol=1e-7)


# --- PSO, DPO form (the code's `pso`, against the frozen initial model) ---------------------------------


@pytest.mark.parametrize("prior_weight", [0.0, 0.5])
def test_pso_dpo_gradient_is_sigmoid_weighted_pair_of_sft_gradients(prior_weight):
    # loss = mean_i −log σ(β m_i) + λ mean_i L_l,i,  m_i = (R_w,i − γR_l,i) − (L_w,i − γL_l,i), s_i = σ(−β m_i):
    # ∇ = (1/B) Σ_i [ β s_i ∇L_w,i + (λ − βγ s_i) ∇L_l,i ].  With λ = 0: +∇L_w (pushes the target's error
    # down), −∇L_l (pushes the reference's error up).
    beta, gamma = 5.0, 0.1
    model = Denoiser()
    base = ParamShadow(trainable_parameters(model), mode="base")
    moved(model)
    x_w, x_l, ctx, noise, sigma = pair_batch()
    out = pso_loss(
        model,
        x_w,
        x_l,
        ctx,
        sigma,
        noise,
        beta=beta,
        ref_weight=gamma,
        prior_weight=prior_weight,
        form="dpo",
        reference_model=base.wrap(model),
    )
    s = torch.sigmoid(-beta * out.margin)
    assert bool((out.margin.abs() > 1e-3).all())  # away from the reference model: s_i differ from 1/2
    gw, gl = per_pair_sft_grads(model, x_w, ctx, noise, sigma), per_pair_sft_grads(model, x_l, ctx, noise, sigma)
    want = sum(beta * s[i] * gw[i] + (prior_weight - beta * gamma * s[i]) * gl[i] for i in range(B)) / B
    torch.testing.assert_close(grad_of(model, out.loss), want, rtol=1e-4, atol=1e-7)
    if prior_weight == 0.0:
        assert bool((beta * s > 0).all() and (-beta * gamma * s < 0).all())


def test_pso_dpo_step_lowers_target_error_and_raises_reference_error_on_a_closed_form_field():
    # v(x, σ, c) = b (a constant field): ∇_b ℓ(x0) = 2(b − ε + x0)/D. Target and reference on disjoint
    # coordinates with ε = 0 give orthogonal ∇L_w ⟂ ∇L_l, so a gradient step moves each error by its own sign.
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Parameter(torch.zeros(DIM))

        def forward(self, x, sigma, context):
            return self.b.expand_as(x)

    model = Constant()
    base = ParamShadow(trainable_parameters(model), mode="base")
    x_w, x_l = torch.zeros(1, DIM), torch.zeros(1, DIM)
    x_w[0, :3], x_l[0, 3:] = 1.0, 1.0
    noise, sigma, ctx = torch.zeros(1, DIM), torch.tensor([0.5]), None
    for form, kw in (("dpo", {"reference_model": base.wrap(model)}), ("hinge", {})):
        with torch.no_grad():
            model.b.zero_()
        out = pso_loss(model, x_w, x_l, ctx, sigma, noise, beta=5.0, ref_weight=0.1, prior_weight=0.0, form=form, **kw)
        out.loss.backward()
        with torch.no_grad():
            model.b -= 0.1 * model.b.grad
        model.b.grad = None
        after_w = per_sample_error(model, x_w, ctx, sigma, noise)
        after_l = per_sample_error(model, x_l, ctx, sigma, noise)
        assert after_w < out.target_error and after_l > out.reference_error, form


def test_pso_dpo_at_the_reference_model_and_with_equal_margins():
    model = Denoiser()
    base = ParamShadow(trainable_parameters(model), mode="base")
    x_w, x_l, ctx, noise, sigma = pair_batch()
    out = pso_loss(model, x_w, x_l, ctx, sigma, noise, form="dpo", reference_model=base.wrap(model), **RELEASED)
    # θ = θ0: the reference errors are the student's, the margins are 0, the loss is log 2 + λ·L_l
    assert torch.equal(out.frozen_target_error, out.target_error) and float(out.margin.abs().max()) == 0.0
    assert out.implicit_accuracy == 0.0
    torch.testing.assert_close(out.loss, math.log(2) + 0.5 * out.reference_error.mean())
    # … but the gradient is not 0: s = 1/2 gives (β/2)∇L_w + (λ − βγ/2)∇L_l = 2.5∇L_w + 0.25∇L_l
    g_w = grad_of(model, sft_loss(model, x_w, ctx, sigma, noise))
    g_l = grad_of(model, sft_loss(model, x_l, ctx, sigma, noise))
    torch.testing.assert_close(grad_of(model, out.loss), 2.5 * g_w + 0.25 * g_l, rtol=1e-5, atol=1e-7)
    assert all(not t.requires_grad for t in base.shadow.values())
    # Equal margins for every θ (target = reference, γ = 1, λ = 0): the margin is identically 0, no gradient,
    # in both forms and also away from the reference model.
    moved(model)
    for form in ("dpo", "hinge"):
        out = pso_loss(
            model,
            x_w,
            x_w.clone(),
            ctx,
            sigma,
            noise,
            beta=5.0,
            ref_weight=1.0,
            prior_weight=0.0,
            form=form,
            reference_model=base.wrap(model),
        )
        assert float(out.margin.abs().max()) == 0.0
        assert float(grad_of(model, out.loss).abs().max()) == 0.0


def test_pso_swapping_target_and_reference_flips_the_margin():
    model = Denoiser()
    base = ParamShadow(trainable_parameters(model), mode="base")
    moved(model)
    x_w, x_l, ctx, noise, sigma = pair_batch()
    kw = dict(beta=5.0, ref_weight=1.0, prior_weight=0.0, form="dpo", reference_model=base.wrap(model))
    a = pso_loss(model, x_w, x_l, ctx, sigma, noise, **kw)
    b = pso_loss(model, x_l, x_w, ctx, sigma, noise, **kw)
    torch.testing.assert_close(a.margin, -b.margin)
    assert float(a.margin.abs().min()) > 0
    assert a.implicit_accuracy + b.implicit_accuracy == 1.0


def test_pso_shares_noise_and_sigma_per_pair_and_uses_one_context():
    model = Denoiser()
    x_w, x_l, ctx, noise, sigma = pair_batch()
    seen_ctx = []

    def student(x, s, c):
        seen_ctx.append(c)
        return model(x, s, c)

    pso_loss(student, x_w, x_l, ctx, sigma, noise)
    target_state, reference_state = model.seen
    s = sigma[:, None]
    torch.testing.assert_close(target_state, (1 - s) * x_w + s * noise)
    torch.testing.assert_close(reference_state, (1 - s) * x_l + s * noise)
    assert all(c is ctx for c in seen_ctx)


def test_per_sample_error_weightings_and_pso_validation():
    model = Denoiser()
    x_w, x_l, ctx, noise, sigma = pair_batch()
    vel = per_sample_error(model, x_w, ctx, sigma, noise)
    torch.testing.assert_close(sft_loss(model, x_w, ctx, sigma, noise), vel.mean())
    # the ε-MSE of the PSO code, computed directly: ε̂ = x_σ + (1 − σ)·v̂
    x = (1 - sigma[:, None]) * x_w + sigma[:, None] * noise
    eps_hat = x + (1 - sigma[:, None]) * model(x, sigma, ctx)
    torch.testing.assert_close(
        per_sample_error(model, x_w, ctx, sigma, noise, "noise"), (eps_hat - noise).pow(2).mean(1)
    )
    with pytest.raises(ValueError, match="reference_model"):
        pso_loss(model, x_w, x_l, ctx, sigma, noise, form="dpo")
    with pytest.raises(ValueError, match="form"):
        pso_loss(model, x_w, x_l, ctx, sigma, noise, form="sigmoid")
    with pytest.raises(ValueError, match="equal shapes"):
        pso_loss(model, x_w, x_l[:2], ctx, sigma, noise)
    with pytest.raises(ValueError, match="weighting"):
        per_sample_error(model, x_w, ctx, sigma, noise, "x0")


def test_schedule_sigmas_are_the_schedules_nonzero_levels():
    s = sample_schedule_sigmas(2000, SCHEDULE, generator=torch.Generator().manual_seed(0))
    levels = SCHEDULE[:-1]
    assert set(s.tolist()) == set(levels.tolist())  # every level, never σ = 0
    counts = torch.stack([(s == v).sum() for v in levels])
    assert int(counts.min()) > 400  # uniform: 500 each in expectation
    with pytest.raises(ValueError, match="decrease"):
        sample_schedule_sigmas(1, torch.tensor([0.5, 1.0, 0.0]))


# --- off-policy distillation: the teacher's roll-out ----------------------------------------------------


def distill_setup(mode="ema"):
    model = Denoiser()
    shadow = ParamShadow(trainable_parameters(model), mode=mode, decay=0.9)
    moved(model, by=0.3)  # the teacher (shadow) differs from the student
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(B, DIM, generator=g)
    target_ctx = torch.randn(B, CTX, generator=g)  # stands in for caption + target image
    return model, shadow, noise, target_ctx, torch.zeros(B, CTX)


def test_teacher_rollout_visits_the_teachers_own_euler_states():
    model, shadow, noise, t_ctx, s_ctx = distill_setup()
    teacher = shadow.wrap(model)
    model.seen.clear()
    out = dopsd_loss(model, teacher, noise, SCHEDULE, s_ctx, t_ctx, rollout="teacher")
    teacher_inputs, student_inputs = model.seen[0::2], model.seen[1::2]
    model.seen.clear()
    sample = sample_euler(teacher, noise, SCHEDULE, t_ctx)
    for got_t, got_s, want in zip(teacher_inputs, student_inputs, model.seen, strict=True):
        torch.testing.assert_close(got_t, want)
        torch.testing.assert_close(got_s, want)
    torch.testing.assert_close(out.final, sample)  # the teacher's sample: an SFT-on-teacher-samples target
    # the on-policy roll-out visits other states from the second step on (so the check above can fail)
    model.seen.clear()
    on = dopsd_loss(model, teacher, noise, SCHEDULE, s_ctx, t_ctx)
    assert not torch.allclose(model.seen[3], student_inputs[1])
    assert not torch.allclose(on.final, out.final)


def test_teacher_rollout_loss_is_zero_when_student_equals_teacher():
    model, _, noise, t_ctx, s_ctx = distill_setup()
    live = ParamShadow(trainable_parameters(model), mode="live")
    out = dopsd_loss(model, live.wrap(model), noise, SCHEDULE, s_ctx, s_ctx, rollout="teacher")
    assert float(out.loss.detach()) == 0.0 and all(s.gap == 0.0 for s in out.steps)
    out = dopsd_loss(model, live.wrap(model), noise, SCHEDULE, s_ctx, t_ctx, rollout="teacher")
    assert float(out.loss.detach()) > 0  # the teacher's context alone makes it non-zero


@pytest.mark.parametrize("space", ["x0", "velocity"])
def test_teacher_rollout_per_step_backward_equals_one_backward(space):
    model, shadow, noise, t_ctx, s_ctx = distill_setup()
    model.seen.clear()
    out = dopsd_loss(
        model,
        shadow.wrap(model),
        noise,
        SCHEDULE,
        s_ctx,
        t_ctx,
        space=space,
        rollout="teacher",
        step_weights=[1.0, 0.5, 2.0, 1.5],
    )
    assert not any(x.requires_grad for x in model.seen)
    out.loss.backward()
    accumulated = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    out2 = dopsd_loss(
        model,
        shadow.wrap(model),
        noise,
        SCHEDULE,
        s_ctx,
        t_ctx,
        space=space,
        rollout="teacher",
        step_weights=[1.0, 0.5, 2.0, 1.5],
        backward=lambda l: l.backward(),
    )
    assert not out2.loss.requires_grad
    for a, p in zip(accumulated, model.parameters()):
        torch.testing.assert_close(a, p.grad)
    torch.testing.assert_close(out.loss.detach(), out2.loss)


@pytest.mark.parametrize("rollout", ["student", "teacher"])
def test_step_context_wraps_every_forward_and_backward(rollout):
    model, shadow, noise, t_ctx, s_ctx = distill_setup()
    flags, inside, calls = [], [False], []

    class Recorder:
        def __init__(self, last):
            flags.append(last)

        def __enter__(self):
            inside[0] = True

        def __exit__(self, *exc):
            inside[0] = False

    def student(x, s, c):
        calls.append(("student", inside[0]))
        return model(x, s, c)

    teacher_fn = shadow.wrap(model)

    def teacher(x, s, c):
        calls.append(("teacher", inside[0]))
        return teacher_fn(x, s, c)

    def backward(loss):
        calls.append(("backward", inside[0]))
        loss.backward()

    dopsd_loss(
        student, teacher, noise, SCHEDULE, s_ctx, t_ctx, rollout=rollout, backward=backward, step_context=Recorder
    )
    assert flags == [False, False, False, True]
    assert len(calls) == 3 * 4 and all(ok for _, ok in calls)


def test_rollout_default_is_unchanged_and_bad_rollout_is_refused():
    model, shadow, noise, t_ctx, s_ctx = distill_setup()
    a = dopsd_loss(model, shadow.wrap(model), noise, SCHEDULE, s_ctx, t_ctx)
    b = dopsd_loss(model, shadow.wrap(model), noise, SCHEDULE, s_ctx, t_ctx, rollout="student")
    assert torch.equal(a.loss, b.loss) and torch.equal(a.final, b.final)
    with pytest.raises(ValueError, match="rollout"):
        dopsd_loss(model, shadow.wrap(model), noise, SCHEDULE, s_ctx, t_ctx, rollout="ema")

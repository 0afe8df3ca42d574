"""The D-OPSD objective on tiny analytic and neural models (real code paths, no mocks)."""

import pytest
import torch
from torch import nn

from dopsd.core.objective import dopsd_loss, sample_training_sigmas, sft_loss, step_weights_for, to_x0
from dopsd.core.sampler import sample_euler
from dopsd.core.schedules import shifted_schedule, training_schedule
from dopsd.core.weights import ParamShadow, trainable_parameters

torch.set_num_threads(1)
DIM, CTX = 6, 3


class TinyDenoiser(nn.Module):
    """v(x, σ, c) from an MLP over [x, σ, c]; c is (B, CTX) and may carry a 'target image' summary."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(DIM + 1 + CTX, 32), nn.Tanh(), nn.Linear(32, DIM))
        self.seen: list[torch.Tensor] = []

    def forward(self, x, sigma, context):
        self.seen.append(x)
        return self.net(torch.cat([x, sigma[:, None], context], dim=1))


def grads(model):
    return [p.grad.clone() for p in model.parameters()]


def setup(seed=0, mode="ema"):
    model = TinyDenoiser(seed)
    shadow = ParamShadow(trainable_parameters(model), mode=mode, decay=0.9)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(4, DIM, generator=g)
    target = torch.randn(4, CTX, generator=g)  # stands in for the target image's features
    student_ctx = torch.zeros(4, CTX)
    return model, shadow, noise, target, student_ctx


SCHEDULE = training_schedule(shifted_schedule(8, 3.0), every=2)


def test_training_schedule_matches_zimage_turbo():
    assert torch.allclose(SCHEDULE, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]), atol=1e-6)


def test_teacher_gets_no_gradient_and_target_enters_only_through_teacher_context():
    model, shadow, noise, target, student_ctx = setup()
    with torch.no_grad():  # make the teacher differ from the student
        for p in model.parameters():
            p.add_(0.1)
    target.requires_grad_(True)
    contexts = []

    def student(x, s, c):
        contexts.append(c)
        return model(x, s, c)

    out = dopsd_loss(student, shadow.wrap(model), noise, SCHEDULE, student_ctx, target)
    assert out.loss > 0
    assert all(c is student_ctx for c in contexts)  # the student never sees the target
    out.loss.backward()
    assert target.grad is None  # not a regression target, no gradient path from the loss to it
    assert all(p.grad is not None for p in model.parameters())
    assert all(not t.requires_grad and t.grad is None for t in shadow.shadow.values())


def test_rollout_states_equal_inference_sampler_states():
    model, shadow, noise, target, student_ctx = setup()
    with torch.no_grad():
        reference = sample_euler(model, noise, SCHEDULE, student_ctx)
    model.seen.clear()
    out = dopsd_loss(model, shadow.wrap(model), noise, SCHEDULE, student_ctx, target)
    sampled_states = model.seen[1::2]  # teacher, student, teacher, student, …: the student's inputs
    model.seen.clear()
    with torch.no_grad():
        sample_euler(model, noise, SCHEDULE, student_ctx)
    for got, want in zip(sampled_states, model.seen):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(out.final, reference)


@pytest.mark.parametrize("space", ["x0", "velocity"])
def test_per_step_backward_equals_accumulated_backward_and_no_cross_step_gradient(space):
    model, shadow, noise, target, student_ctx = setup()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.3)
    model.seen.clear()
    out = dopsd_loss(model, shadow.wrap(model), noise, SCHEDULE, student_ctx, target, space=space)
    assert not any(x.requires_grad for x in model.seen)  # every visited state is detached
    out.loss.backward()
    accumulated = grads(model)
    model.zero_grad()
    out2 = dopsd_loss(
        model, shadow.wrap(model), noise, SCHEDULE, student_ctx, target, space=space, backward=lambda l: l.backward()
    )
    assert not out2.loss.requires_grad
    for a, b in zip(accumulated, grads(model)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out.loss.detach(), out2.loss)


def test_loss_is_zero_for_same_weights_and_context():
    model, _, noise, _, student_ctx = setup()
    live = ParamShadow(trainable_parameters(model), mode="live")
    out = dopsd_loss(model, live.wrap(model), noise, SCHEDULE, student_ctx, student_ctx)
    assert float(out.loss.detach()) == 0.0 and all(s.gap == 0.0 for s in out.steps)
    # and it is not zero once the teacher sees the target (the test can fail)
    out = dopsd_loss(model, live.wrap(model), noise, SCHEDULE, student_ctx, torch.ones(4, CTX))
    assert float(out.loss.detach()) > 0


def test_x0_loss_equals_sigma_squared_weighted_velocity_loss():
    model, shadow, noise, target, student_ctx = setup()
    teacher = shadow.wrap(model)
    x0 = dopsd_loss(model, teacher, noise, SCHEDULE, student_ctx, target, space="x0")
    vel = dopsd_loss(
        model,
        teacher,
        noise,
        SCHEDULE,
        student_ctx,
        target,
        space="velocity",
        step_weights=(SCHEDULE[:-1] ** 2).tolist(),
    )
    torch.testing.assert_close(x0.loss, vel.loss)
    # and the x0 loss is literally the MSE of x0 predictions at the first state
    x = noise
    s = torch.ones(4)
    with torch.no_grad():
        direct = (to_x0(x, s, model(x, s, student_ctx)) - to_x0(x, s, teacher(x, s, target))).pow(2).mean()
    assert abs(x0.steps[0].loss - float(direct)) < 1e-6


def test_step_weights_and_validation():
    model, shadow, noise, target, student_ctx = setup()
    w = step_weights_for("sigma", SCHEDULE)
    assert len(w) == 4 and abs(sum(w) / 4 - 1) < 1e-9 and w[0] > w[-1]
    with pytest.raises(ValueError, match="step_weights"):
        dopsd_loss(model, shadow.wrap(model), noise, SCHEDULE, student_ctx, target, step_weights=[1.0])
    with pytest.raises(ValueError, match="decrease"):
        dopsd_loss(model, shadow.wrap(model), noise, torch.tensor([0.5, 1.0, 0.0]), student_ctx, target)


def test_ema_math_and_base_teacher_stays_at_initial_weights():
    model = TinyDenoiser()
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = ParamShadow(trainable_parameters(model), mode="ema", decay=0.9)
    base = ParamShadow(trainable_parameters(model), mode="base")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    expected = {n: t.clone() for n, t in init.items()}
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, DIM), torch.rand(2), torch.randn(2, CTX)).pow(2).sum().backward()
        opt.step()
        ema.update()
        base.update()
        for n, p in model.named_parameters():
            expected[n] = 0.9 * expected[n] + 0.1 * p.detach()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ema.shadow[n], expected[n])
        torch.testing.assert_close(base.shadow[n], init[n])
        assert not torch.allclose(p, init[n])  # the student moved
    # swapping in restores the live weights afterwards
    live = {n: p.detach().clone() for n, p in model.named_parameters()}
    with base.swapped_in():
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), init[n])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), live[n])


class PerSigmaAffine(nn.Module):
    """v(x, σ_k) = a_k ⊙ x + b_k with free parameters per σ level: can represent the exact optimum."""

    def __init__(self, levels):
        super().__init__()
        self.levels = levels
        self.a = nn.Parameter(torch.zeros(len(levels), DIM))
        self.b = nn.Parameter(torch.zeros(len(levels), DIM))

    def forward(self, x, sigma, context=None):
        idx = torch.stack([torch.argmin((self.levels - s).abs()) for s in sigma])
        return self.a[idx] * x + self.b[idx]


def test_sft_converges_to_closed_form_velocity_on_linear_gaussian():
    torch.manual_seed(0)
    mu, std = torch.linspace(-1, 1, DIM), 0.5
    levels = torch.tensor([0.2, 0.5, 0.8])
    model = PerSigmaAffine(levels)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 1500)
    for _ in range(1500):
        x0 = mu + std * torch.randn(512, DIM)
        sigma = levels[torch.randint(0, 3, (512,))]
        opt.zero_grad()
        sft_loss(model, x0, None, sigma, torch.randn(512, DIM)).backward()
        opt.step()
        sched.step()
    # E[ε − x0 | x_σ] for x0 ~ N(μ, s²), x_σ = (1−σ)x0 + σε:  a(σ)·(x − (1−σ)μ) − μ
    for k, s in enumerate(levels):
        var = (1 - s) ** 2 * std**2 + s**2
        a = (s - (1 - s) * std**2) / var
        torch.testing.assert_close(model.a[k].detach(), torch.full((DIM,), float(a)), atol=0.03, rtol=0)
        torch.testing.assert_close(model.b[k].detach(), -a * (1 - s) * mu - mu, atol=0.03, rtol=0)


def test_training_sigma_samplers():
    g = torch.Generator().manual_seed(0)
    for mode in ("uniform", "logit_normal", "shifted"):
        s = sample_training_sigmas(4000, mode, generator=g)
        assert s.min() > 0 and s.max() <= 1
    assert sample_training_sigmas(4000, "shifted", shift=3.0, generator=g).mean() > 0.6  # shift favours noise
    with pytest.raises(ValueError, match="timestep sampling"):
        sample_training_sigmas(1, "cosine")

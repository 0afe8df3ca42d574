"""Cost of each method's optimizer step in one setting, measured with the trainer's own `train_step`.

Every method gets a fresh trainer on the same data and batch; `dopsd.bench.cost.measure_costs` then times
their steps interleaved in this one process (so machine load hits them alike), counts FLOPs and peak memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dopsd.bench.cost import CostProbe, count_flops, implied_flops, measure_costs, state_tensors
from dopsd.bench.jobs import METHODS, Job, build_trainer, make_adapter, trainer_config
from dopsd.bench.suite import add_deltas
from dopsd.data.dataset import load_dataset, load_example_images


def _per_call_flops(adapter: Any, trainer_cfg: Any, data_dir: str) -> tuple[Any, Any, Any]:
    """Student and teacher contexts for one training batch (built before the trainer releases the encoder)."""
    examples = load_dataset(trainer_cfg.data, trainer_cfg.model)
    b = trainer_cfg.train.batch_size
    picked = [examples[i % len(examples)] for i in range(b)]
    captions = [e.captions[0] for e in picked]
    images = [load_example_images(e)[0] for e in picked]
    student = adapter.collate(adapter.student_contexts(captions))
    teacher = adapter.collate(adapter.teacher_contexts(captions, images))
    return student, teacher, adapter.encode_images(images)


def trainer_probe(job: Job, method: str, dedistill: str | None) -> tuple[CostProbe, dict[str, float]]:
    from safetensors.torch import load_file

    adapter = make_adapter(job.model)
    if method == "sft_adapter" and dedistill:
        add_deltas(adapter.network, load_file(dedistill), +1.0)
    s_ctx, t_ctx, x0 = _per_call_flops(adapter, trainer_config(job, METHODS[method]), job.data_dir)
    trainer = build_trainer(job, adapter, method)
    net = trainer.network
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((x0.shape[0],), 0.5)

    def student_fwd_bwd() -> None:
        adapter.velocity(net, noise, sigma, s_ctx).pow(2).mean().backward()

    fwd_bwd = count_flops(student_fwd_bwd)
    net.zero_grad(set_to_none=True)
    with torch.no_grad():
        teacher_fwd = count_flops(lambda: adapter.velocity(net, noise, sigma, t_ctx))
        student_fwd = count_flops(lambda: adapter.velocity(net, noise, sigma, s_ctx))
    size = (trainer.m.height, trainer.m.width)
    k = len(trainer.schedule(size)) - 1
    steps = len(adapter.inference_schedule(*size, trainer.m.inference_steps)) - 1
    m = trainer.cfg.method
    prior = m.prior_batch_size / trainer.cfg.train.batch_size if m.prior_weight > 0 and m.prior_prompts else 0.0
    implied = implied_flops(
        m.name,
        fwd_bwd,
        teacher_fwd,
        roll_out_steps=k,
        student_fwd=student_fwd,
        sample_steps=steps,
        trained_states=m.train_states or k,  # 0: every state
        prior_share=prior,
        sft_weight=m.sft_weight,
    )

    def resident() -> list[torch.Tensor]:
        tensors = list(net.parameters()) + [p.grad for p in net.parameters() if p.grad is not None]
        tensors += state_tensors(trainer.optimizer.state_dict()["state"])
        for shadow in {id(x): x for x in (trainer.teacher, trainer.prior) if x is not None}.values():
            tensors += list(shadow.shadow.values())
        return tensors

    calls = {"student_fwd_bwd_flops": float(fwd_bwd), "teacher_fwd_flops": float(teacher_fwd)}
    return CostProbe(step=trainer.train_step, resident=resident, implied_flops=implied), calls


def measure_setting_costs(
    cfg: Any, setting: Any, folders: dict[str, str], out: Path, methods: list[str]
) -> dict[str, Any]:
    """{method: cost dict} for the trained methods of one setting; ratios against `sft` (if measured)."""
    if not methods:
        return {}
    torch.set_num_threads(1)  # as in the training workers; every method alike
    target = setting.targets[0]
    dedistill = str(out / "work" / "dedistill_delta.safetensors")
    probes, calls = {}, {}
    for method in methods:
        job = Job(
            setting=setting.name,
            target=target,
            method=method,
            seed=0,
            data_dir=folders[f"{setting.name}/{target}"],
            work_dir=str(out / "work" / "cost" / method),
            overrides=setting.overrides_for(method),
            steps=10**6,
            curve_every=10**6,
            curve_n=0,
            suite={},
            model=cfg.model,
        )
        probes[method], calls[method] = trainer_probe(job, method, dedistill if Path(dedistill).is_file() else None)
    reference = "sft" if "sft" in probes else next(iter(probes))
    costs = measure_costs(probes, reference=reference, repeats=cfg.cost_repeats, warmup=cfg.cost_warmup)
    return {m: {**c.as_dict(), **calls[m], "reference": reference} for m, c in costs.items()}

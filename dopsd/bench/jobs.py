"""One bench job = one (setting, target, method, seed) run, trained by `dopsd.training.api.train` (the loop `dopsd train`
runs) in its own run folder.

A job builds the evaluation suite with a fresh miniature adapter (before the trainer releases its encoder),
trains that adapter on the shared dataset folder, evaluates a curve point every `curve_every` steps from the
training loop's per-step callback and the final network after, and returns plain data (metrics, curves, a few
images) so that jobs can run in worker processes.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dopsd.training.api
from dopsd.bench.suite import add_deltas, build_suite, lora_deltas, without_deltas
from dopsd.config import load_config
from dopsd.data.dataset import load_dataset
from dopsd.files import save_safetensors
from dopsd.lora.inject import lora_state_dict
from dopsd.mini import adapter as mini
from dopsd.training.done import earliest_as_good
from dopsd.training.trainer import Trainer, TrainingUnhealthy

# The unrelated prompts on-policy prior preservation keeps (dopsd_prior, and the continual setting's *_prior).
PRIOR_PROMPTS = [
    "a red circle on a gray background",
    "a blue square on a black background",
    "a green triangle on a navy background",
    "a white plus on a brown background",
    "a yellow circle",
    "a purple square on a gray background",
    "a red plus on a navy background",
    "a blue triangle",
]


def prior_prompts_override(prompts: list[str]) -> str:
    return f"method.prior_prompts=[{', '.join(prompts)}]"


# method -> trainer overrides (the objective, teacher and loss space); `base` trains nothing.
METHODS: dict[str, list[str]] = {
    "base": [],
    "sft": ["method.name=sft"],
    "sft_adapter": ["method.name=sft"],  # + the de-distillation adapter merged while training, removed after
    "dopsd": ["method.name=dopsd", "method.teacher=ema", "method.loss_space=x0"],
    "dopsd_base_teacher": ["method.name=dopsd", "method.teacher=base", "method.loss_space=x0"],
    "dopsd_live_teacher": ["method.name=dopsd", "method.teacher=live", "method.loss_space=x0"],
    "dopsd_velocity": ["method.name=dopsd", "method.teacher=ema", "method.loss_space=velocity"],
    # not in the paper: D-OPSD plus dopsd's on-policy prior preservation (unrelated prompts kept at the original
    # turbo's predictions). Concept setting only: in the domain setting the "unrelated" prompts are the domain's.
    # the paper's baselines (dopsd.methods.baselines): online PSO against the frozen starting model; DreamBooth with
    # class images of the starting model (class prompts: the captions without `sks`); the training-strategy
    # ablation's off-policy distillation and SFT on the teacher's samples (same teacher as dopsd)
    "pso": ["method.name=pso"],
    "dreambooth": ["method.name=dreambooth", "data.trigger_word=sks"],
    "offpolicy": ["method.name=offpolicy", "method.teacher=ema", "method.loss_space=x0"],
    "sft_teacher": ["method.name=sft_teacher", "method.teacher=ema"],
    "dopsd_prior": [
        "method.name=dopsd",
        "method.teacher=ema",
        "method.loss_space=x0",
        "method.prior_weight=1.0",
        prior_prompts_override(PRIOR_PROMPTS),
    ],
}
CONCEPT_ONLY = {"dopsd_prior"}
REFERENCE_ROW = "ref_undistilled_4step"  # the multi-step base model sampled at the turbo's 4 steps (not a method)


@dataclass
class Job:
    setting: str
    target: str  # a held-out concept name, or "domain"
    method: str
    seed: int
    data_dir: str
    work_dir: str
    overrides: list[str]  # the setting's trainer overrides (LoRA/full, lr, batch, steps …)
    steps: int
    curve_every: int
    curve_n: int
    suite: dict[str, int]  # n_train, n_unseen, n_unrelated, many_steps, n_many
    model: str = "turbo"  # "turbo" (shipped weights), a recipe folder, or "tiny-random" (tests)
    dedistill: str | None = None  # safetensors of ΔW per module (sft_adapter)
    keep_images: bool = False
    threads: int = 1
    budgets: list[int] = field(default_factory=list)  # steps measured on the whole prompt sets (a domain's budgets)
    extra: dict[str, Any] = field(default_factory=dict)


def make_adapter(model: str, kind: str = "turbo") -> Any:
    """A fresh miniature adapter (each job mutates its network). kind='base' loads the undistilled base."""
    if model == "tiny-random":
        adapter = mini.tiny_random_adapter(seed=0, teacher_context="reference")  # "vlm" barely sees the image
        adapter.kind = "turbo"  # its own few-step setting stands in for the turbo's
        return adapter

    class _Cfg:
        pretrained = ("base" if kind == "base" else "turbo") if model == "turbo" else model
        teacher_context = "vlm"

    if model != "turbo" and kind == "base":
        _Cfg.pretrained = str(Path(model) / "base.safetensors") if Path(model).is_dir() else model
    return mini.load(_Cfg())


def trainer_config(job: Job, method_overrides: list[str]) -> Any:
    # A diverged run is a result too (the report shows its numbers): never abort one on non-finite steps.
    # One sample grid image before and after training: the bench evaluates with its own suite.
    common = [
        f"data.path={job.data_dir}",
        f"train.output_dir={job.work_dir}",
        f"train.seed={job.seed}",
        f"train.max_steps={job.steps}",
        "train.checkpoint_every=0",
        f"train.max_nonfinite={job.steps + 1}",
        "cache.enabled=false",
        "sample.health=false",
        "sample.num_prompts=1",
        "sample.seeds=[0]",
        "sample.control_steps=0",
        "log.progress=false",
        "log.tensorboard=false",
        "train.device=cpu",
    ]
    return load_config("mini", common + job.overrides + method_overrides)


def build_trainer(job: Job, adapter: Any, method: str) -> Any:
    """A prepared trainer that is not run (the cost probe times its steps)."""
    cfg = trainer_config(job, METHODS[method])
    trainer = Trainer(cfg, Path(job.work_dir), load_dataset(cfg.data, cfg.model), adapter=adapter)
    trainer.prepare()
    return trainer


def _suite(job: Job, adapter: Any) -> Any:
    cfg = load_config("mini", [f"data.path={job.data_dir}"])
    examples = load_dataset(cfg.data, cfg.model)
    captions = [c for ex in examples for c in ex.captions]
    images: dict[str, list[Path]] = {}
    for ex in examples:
        for c in ex.captions:
            images.setdefault(c, []).append(ex.image)
    s = job.suite
    return build_suite(
        adapter,
        job.target,
        captions,
        s["n_train"],
        s["n_unseen"],
        s["n_unrelated"],
        s["many_steps"],
        s["n_many"],
        train_images=images,
    )


def train(job: Job, adapter: Any, method: str, on_step: Any = None) -> list[dict[str, Any]]:
    """Train `adapter` as `method` in the job's run folder (moving an earlier attempt's folder aside); returns
    the step records. `on_step(trainer, record)`: the training loop's per-step callback."""
    records: list[dict[str, Any]] = []

    def step(trainer: Any, record: dict[str, Any]) -> None:
        records.append(record)
        if on_step is not None:
            on_step(trainer, record)

    # What `dopsd train` prints per run stays out of the bench's log; the run folder's summary.json has it.
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            dopsd.training.api.train(
                trainer_config(job, METHODS[method]), adapter=adapter, callback=step, overwrite=True
            )
        except TrainingUnhealthy:
            pass  # a diverged run is a result too: the report shows its numbers
    return records


def _budget_measures(final: dict[str, float]) -> dict[str, float]:
    """What a budget records, from an evaluation's metrics (a domain's; Suite.budget_point measures the same)."""
    return {k: final[k] for k in ("strict_fidelity", "unseen_strict_fidelity", "fewstep_quality") if k in final}


def _keep(imgs: dict[str, torch.Tensor], n: int = 8) -> dict[str, torch.Tensor]:
    return {k: v[:n].clone() for k, v in imgs.items()}


def run_job(job: Job) -> dict[str, Any]:
    """Train (or not, for `base`) and evaluate; returns {'job', 'final', 'curve', 'images', 'seconds', …}."""
    from safetensors.torch import load_file

    torch.set_num_threads(job.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    adapter = make_adapter(job.model)
    suite = _suite(job, adapter)
    suite.set_reference(adapter.network)  # the untouched turbo, same noise
    result: dict[str, Any] = {"job": job.__dict__.copy()}
    if job.method == REFERENCE_ROW:
        base = make_adapter(job.model, kind="base")
        final, imgs = suite.evaluate(base.network)
        result.update(final=final, curve=None, train_seconds=0.0, steps=0)
    elif job.method == "base":
        final, imgs = suite.evaluate(adapter.network)
        if suite.domain:  # the reference a domain's strict fidelity is read against
            final.update(suite.tinted_ceiling(imgs))
        result["budgets"] = {b: _budget_measures(final) for b in job.budgets}
        point = suite.curve_point(adapter.network, job.curve_n)
        points = list(range(0, job.steps + 1, job.curve_every))
        result.update(
            final=final,
            curve={"steps": points, **{k: [v] * len(points) for k, v in point.items()}},
            train_seconds=0.0,
            steps=0,
        )
    else:
        deltas = None
        if job.method == "sft_adapter":
            if not job.dedistill:
                raise ValueError("bench: sft_adapter needs the de-distillation adapter (job.dedistill)")
            deltas = load_file(job.dedistill)
            add_deltas(adapter.network, deltas, +1.0)  # merged while training (ai-toolkit's recipe)
        net = adapter.network  # the trainer adds its LoRA to this network in place
        curve: dict[str, list[float]] = {"steps": []}

        def record(step: int) -> None:
            with without_deltas(net, deltas):  # evaluated as used: the adapter removed
                point = suite.curve_point(net, job.curve_n)
            curve["steps"].append(step)
            for k, v in point.items():
                curve.setdefault(k, []).append(v)

        budgets: dict[int, dict[str, float]] = {}

        def on_step(trainer: Any, rec: dict[str, Any]) -> None:
            if trainer.step % job.curve_every == 0 or trainer.step == job.steps:
                record(trainer.step)
            if trainer.step in job.budgets and trainer.step < job.steps:  # the last one: the final evaluation's
                with without_deltas(net, deltas):
                    budgets[trainer.step] = suite.budget_point(net)

        record(0)
        records = train(job, adapter, job.method, on_step)
        with without_deltas(net, deltas):
            final, imgs = suite.evaluate(net)
        if job.steps in job.budgets and len(records) == job.steps:  # trained to the end: measured on the same sets
            budgets[job.steps] = _budget_measures(final)
        result.update(
            final=final,
            curve=curve,
            train_seconds=sum(r["seconds"] for r in records),
            steps=len(records),
            losses=[r["loss"] for r in records],
            budgets=budgets,
            skipped=sum(1 for r in records if r["skipped"]),
        )
    result["done_as_good_step"] = _as_good(result["curve"])
    result["images"] = _keep(imgs) if job.keep_images else None
    result["captions"] = {k: ps.captions[:8] for k, ps in suite.sets.items()} if job.keep_images else None
    result["seconds"] = time.perf_counter() - started
    result["cpu_seconds"] = time.process_time() - cpu_started  # ≈ wall time on an idle core (1 thread)
    return result


def _as_good(curve: dict[str, Any] | None) -> int | None:
    """The done signal's earliest step as good as its lowest (dopsd.training.done.earliest_as_good), from the
    curve's per-sample distances, which are then dropped (results.json keeps the mean); None without them or
    where a sample diverged."""
    per_sample = curve.pop("done_per_sample", None) if curve else None
    if not per_sample or not all(map(math.isfinite, (d for point in per_sample for d in point))):
        return None
    return earliest_as_good(curve["steps"][: len(per_sample)], per_sample)


def train_dedistill(job: Job, out_file: str) -> dict[str, Any]:
    """ai-toolkit's de-distillation adapter: an SFT LoRA on ordinary in-domain pairs of the turbo.

    Saved as ΔW = scale·B·A per module so it can be merged into any network (LoRA or full fine-tune).
    """
    torch.set_num_threads(job.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    adapter = make_adapter(job.model)
    records = train(job, adapter, "sft")
    cfg = trainer_config(job, METHODS["sft"])
    deltas = lora_deltas(lora_state_dict(adapter.network), cfg.lora.alpha / cfg.lora.rank)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(out_file, {k: v.contiguous() for k, v in deltas.items()})
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
        "steps": len(records),
        "file": out_file,
        "final_loss": records[-1]["loss"] if records else None,
    }

"""The bench's continual setting: targets learned one after another, each round a `dopsd train` run that starts
from the previous round's run folder (train.init_from, merge: its LoRA folded in, a fresh LoRA trained).

A sequence is a list of targets: held-out concepts (each bound to `sks` on its own shape, so that every earlier
concept keeps prompts of its own: round r trains shape r) or "domain" (the tinted domain, a full fine-tune).
After every round the trained network is measured: the new target's fidelity on its training prompts, every
earlier target's retention (its fidelity on its own prompts), few-step quality, preservation against the
untouched turbo and unrelated-prompt accuracy on unrelated prompts (bench/suite.py). One job per (sequence,
method, seed) runs its rounds in order in one worker process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import dopsd.training.api
from dopsd.bench.jobs import METHODS, PRIOR_PROMPTS, Job, make_adapter, prior_prompts_override, trainer_config
from dopsd.bench.suite import agreement, build_suite, quality, unrelated_accuracy
from dopsd.config import load_config
from dopsd.data.dataset import load_dataset
from dopsd.mini import metrics, world
from dopsd.training.trainer import TrainingUnhealthy

PRIOR = [o for o in METHODS["dopsd_prior"] if o.startswith("method.prior")]
KEPT_PER_ROUND = 4  # earlier rounds' training captions the *_prior methods add to their prior prompts, per round
# method -> trainer overrides: the paper's baselines and D-OPSD, each with and without prior preservation.
CONTINUAL_METHODS: dict[str, list[str]] = {
    "sft": METHODS["sft"],
    "sft_prior": METHODS["sft"] + PRIOR,
    "pso": METHODS["pso"],
    "dopsd": METHODS["dopsd"],
    "dopsd_prior": METHODS["dopsd_prior"],
}
METRICS = ("new_fidelity", "retention", "fewstep_quality", "preservation", "unrelated_accuracy", "drift")
DESCRIPTION = (
    "Continual tuning: held-out targets learned one after another, each round started from the previous "
    "round's run (`train.init_from`, merge mode: its LoRA folded into the base, a fresh LoRA trained; a "
    "domain round is a full fine-tune). Concept r is bound to `sks` on shape r (2 backgrounds), so every "
    "earlier concept keeps prompts of its own; the methods with prior preservation add up to "
    f"{KEPT_PER_ROUND} training captions of each earlier round to their prior prompts (kept on-policy "
    "against the round's starting model: how a user keeps an earlier concept while tuning the next). "
    "Measured after each round: the new target's fidelity, each earlier target's retention (its fidelity "
    "on its own prompts), few-step quality, preservation and unrelated-prompt accuracy on unrelated prompts."
)


@dataclass
class ContinualSetting:
    sequences: list[list[str]]
    pairs: int  # training pairs per concept round
    domain_pairs: int  # training pairs of a domain round
    concept_overrides: list[str]
    domain_overrides: list[str]
    steps: int
    methods: list[str] = field(default_factory=lambda: list(CONTINUAL_METHODS))
    seeds: int = 1
    name: str = "continual"
    description: str = DESCRIPTION


def sequence_name(sequence: list[str]) -> str:
    return ">".join(sequence)


def data_folders(cs: ContinualSetting, out: Path) -> dict[str, list[str]]:
    return {
        sequence_name(seq): [
            str(out / "data" / "continual" / sequence_name(seq).replace(">", "-") / f"{r}-{t}")
            for r, t in enumerate(seq)
        ]
        for seq in cs.sequences
    }


def write_data(cs: ContinualSetting, out: Path) -> dict[str, list[str]]:
    folders = data_folders(cs, out)
    for seq in cs.sequences:
        for r, (target, folder) in enumerate(zip(seq, folders[sequence_name(seq)])):
            if target == "domain":
                world.write_domain_dataset(folder, n=cs.domain_pairs, seed=r)
                continue
            g = torch.Generator().manual_seed(50_000 + r)
            bgs = world.CONCEPT_TRAIN_BACKGROUNDS
            scenes = [
                world.concept_scene(target, g, bg=bgs[i % len(bgs)], shape=r % len(world.SHAPES))
                for i in range(cs.pairs)
            ]
            world.write_pairs(folder, scenes)
    return folders


def jobs(cs: ContinualSetting, out: Path, model: str, suite: dict[str, int]) -> list[Job]:
    folders = data_folders(cs, out)
    found = []
    for seq in cs.sequences:
        name = sequence_name(seq)
        for method in cs.methods:
            for seed in range(cs.seeds):
                found.append(
                    Job(
                        setting=cs.name,
                        target=name,
                        method=method,
                        seed=seed,
                        data_dir=folders[name][0],
                        work_dir=str(out / "work" / cs.name / f"{name.replace('>', '-')}-{method}-{seed}"),
                        overrides=[],
                        steps=cs.steps,
                        curve_every=cs.steps,
                        curve_n=0,
                        suite=suite,
                        model=model,
                        extra={
                            "sequence": list(seq),
                            "folders": folders[name],
                            "concept": cs.concept_overrides,
                            "domain": cs.domain_overrides,
                        },
                    )
                )
    return found


def _captions(folder: str) -> list[str]:
    cfg = load_config("mini", [f"data.path={folder}"])
    return [c for ex in load_dataset(cfg.data, cfg.model) for c in ex.captions]


def method_overrides(method: str, earlier_captions: list[list[str]]) -> list[str]:
    """The round's method overrides: with prior preservation, the prior prompts also hold up to KEPT_PER_ROUND
    distinct training captions of every earlier round (their outputs at the round's start are what is kept)."""
    overrides = list(CONTINUAL_METHODS[method])
    if not any(o.startswith("method.prior_prompts=") for o in overrides) or not earlier_captions:
        return overrides
    kept = [p for captions in earlier_captions for p in sorted(set(captions))[:KEPT_PER_ROUND]]
    return overrides + [prior_prompts_override(PRIOR_PROMPTS + kept)]


def _suites(job: Job, adapter: Any, captions: list[list[str]]) -> list[Any]:
    s = job.suite
    return [
        build_suite(adapter, target, caps, s["n_train"], s["n_unseen"], s["n_unrelated"], s["many_steps"], s["n_many"])
        for target, caps in zip(job.extra["sequence"], captions)
    ]


def measure(suites: list[Any], network: Any, done: int) -> dict[str, Any]:
    """After `done` rounds (0 = the untouched model): the metrics of METRICS."""
    first = suites[0]
    fid = [s.fidelity(s.sample(network, "train", s.few_steps)) for s in suites[: max(done, 1)]]
    unrelated = first.sample(network, "unrelated", first.few_steps)
    dec = metrics.decode(unrelated)
    captions = first.sets["unrelated"].captions
    earlier = fid[:-1] if done else []
    return {
        "new_fidelity": fid[-1] if done else fid[0],
        "retention": statistics.fmean(earlier) if earlier else None,
        "retention_by_target": {s.target: f for s, f in zip(suites, earlier)},
        "fewstep_quality": quality(unrelated, captions, dec, any(s.domain for s in suites[:done])),
        "preservation": agreement(dec, first.reference_decoded["unrelated"]),
        "unrelated_accuracy": unrelated_accuracy(dec, captions),
        "drift": metrics.drift(unrelated, first.reference["unrelated"]),
    }


def run_continual(job: Job) -> dict[str, Any]:
    """Every round of one (sequence, method, seed); returns {'job', 'rounds': [...], 'seconds', …}."""
    torch.set_num_threads(job.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    evaluator = make_adapter(job.model)  # contexts and the untouched turbo's references, kept for every round
    captions = [_captions(folder) for folder in job.extra["folders"]]  # each round's training captions
    suites = _suites(job, evaluator, captions)
    for s in suites:
        s.set_reference(evaluator.network)
    rounds = [{"round": 0, "target": None, **measure(suites, evaluator.network, 0), "seconds": 0.0}]
    previous = None
    for r, (target, folder) in enumerate(zip(job.extra["sequence"], job.extra["folders"]), start=1):
        overrides = list(job.extra["domain" if target == "domain" else "concept"])
        if previous is not None:
            overrides.append(f"train.init_from={previous}")
        work = str(Path(job.work_dir) / f"round{r}-{target}")
        round_job = dataclasses.replace(job, data_dir=folder, work_dir=work, overrides=overrides)
        adapter = make_adapter(job.model)  # the pristine model: train.init_from rebuilds the earlier rounds on it
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                method = method_overrides(job.method, captions[: r - 1])
                dopsd.training.api.train(trainer_config(round_job, method), adapter=adapter, overwrite=True)
            except TrainingUnhealthy:
                pass  # a broken round is a result too; the next round starts from it all the same
        seconds = time.perf_counter() - t0
        rounds.append({"round": r, "target": target, **measure(suites[:r], adapter.network, r), "seconds": seconds})
        previous = work
    return {
        "job": job.__dict__.copy(),
        "rounds": rounds,
        "seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }


def _mean_std(values: list[Any]) -> tuple[float | None, float | None]:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def aggregate(results: list[dict[str, Any]], cs: ContinualSetting) -> dict[str, Any]:
    """{method: {sequence: {"rounds": [{round, target, METRIC, METRIC_std, retention_by_target}]}}}."""
    out: dict[str, Any] = {}
    for method in cs.methods:
        for seq in cs.sequences:
            runs = [r for r in results if r["job"]["method"] == method and r["job"]["target"] == sequence_name(seq)]
            if not runs:
                continue
            rounds = []
            for i in range(len(seq) + 1):
                row: dict[str, Any] = {"round": i, "target": runs[0]["rounds"][i]["target"], "seeds": len(runs)}
                for key in METRICS + ("seconds",):
                    row[key], row[f"{key}_std"] = _mean_std([run["rounds"][i][key] for run in runs])
                targets = runs[0]["rounds"][i]["retention_by_target"]
                row["retention_by_target"] = {
                    t: _mean_std([run["rounds"][i]["retention_by_target"][t] for run in runs])[0] for t in targets
                }
                rounds.append(row)
            out.setdefault(method, {})[sequence_name(seq)] = {"rounds": rounds}
    return out


def check_claim(rows: dict[str, Any], cs: ContinualSetting, min_effect: float) -> list[dict[str, str]]:
    """SFT's few-step damage compounds round after round; D-OPSD's does not. Damage after round r = the untouched
    model's few-step quality − after round r; it compounds when the last round's damage exceeds the first
    round's by more than `min_effect` (the criterion of every claim), on the first sequence of concepts."""
    seq = next((s for s in cs.sequences if "domain" not in s), cs.sequences[0])
    name = sequence_name(seq)
    if len(seq) < 2 or any(name not in rows.get(m, {}) for m in ("sft", "dopsd")):
        return []

    def damages(method: str) -> list[float]:
        q = [r["fewstep_quality"] for r in rows[method][name]["rounds"]]
        return [q[0] - x for x in q[1:]]

    sft, dopsd = damages("sft"), damages("dopsd")
    compounds = {m: d[-1] - d[0] > min_effect for m, d in (("sft", sft), ("dopsd", dopsd))}
    shown = "; ".join(
        f"{m}: few-step quality damage after rounds 1..{len(d)}: " + ", ".join(f"{x:+.3f}" for x in d)
        for m, d in (("sft", sft), ("dopsd", dopsd))
    )
    return [
        {
            "setting": cs.name,
            "claim": "SFT's few-step damage compounds round after round; D-OPSD's does not",
            "source": "paper (title: continuously tuning step-distilled models)",
            "evidence": f"{name}: {shown} (criterion: last − first > {min_effect})",
            "verdict": "reproduced" if compounds["sft"] and not compounds["dopsd"] else "not reproduced",
        }
    ]

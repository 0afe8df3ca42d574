"""The bench's configuration: a setting (targets, data, trainer overrides, steps), the whole bench (settings ×
methods × seeds, evaluation sizes, workers), and the presets.

Presets: `tiny` (tests, seconds, tiny random model), `quick` (under 10 min on 2 idle CPU cores, what the README
quotes), `full` (the documented full run). Same data, optimizer budget (steps, batch, lr) and seeds for
every method of a setting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dopsd.bench.aggregate import ALL_METHODS
from dopsd.bench.continual import ContinualSetting
from dopsd.bench.jobs import CONCEPT_ONLY


@dataclass
class Setting:
    name: str  # "concept_lora" | "domain_full"
    targets: list[str]  # held-out concepts, or ["domain"]
    pairs: int  # training pairs per target
    overrides: list[str]  # trainer overrides shared by every method (LoRA/full, lr, batch)
    steps: int
    curve_every: int
    description: str = ""  # what the setting trains and evaluates (the report's text)
    dopsd_overrides: list[str] = field(default_factory=list)  # extra trainer overrides of the D-OPSD methods only
    # steps at which a domain's strict fidelity (training and unseen prompts) and few-step quality are measured on
    # the whole prompt sets: does the domain stop at the data, or grow past it the longer it trains
    budgets: tuple[int, ...] = ()

    def runs(self, method: str) -> bool:
        return self.name == "concept_lora" or method not in CONCEPT_ONLY

    def overrides_for(self, method: str) -> list[str]:
        return self.overrides + (self.dopsd_overrides if method.startswith("dopsd") else [])


@dataclass
class BenchConfig:
    name: str
    settings: list[Setting]
    methods: list[str]
    seeds: int
    curve_n: int  # samples per prompt set at each curve point
    n_train: int
    n_unseen: int
    n_unrelated: int
    many_steps: int
    n_many: int  # unrelated prompts sampled at many steps too (the control)
    cost_repeats: int
    cost_warmup: int
    dedistill_pairs: int
    dedistill_steps: int
    dedistill_overrides: list[str]
    workers: int
    model: str = "turbo"
    reference_row: bool = True  # evaluate the undistilled base at 4 steps as a reference line
    ablation_seeds: int | None = None  # seeds for the teacher/loss ablations and the baselines (None = `seeds`)
    continual: ContinualSetting | None = None  # targets learned one after another (dopsd.bench.continual)

    def override(
        self,
        settings: list[str] | None = None,
        methods: list[str] | None = None,
        seeds: int | None = None,
        steps: int | None = None,
    ) -> "BenchConfig":
        cfg = dataclasses.replace(self)
        if settings:
            known = {s.name for s in self.settings} | ({"continual"} if self.continual else set())
            unknown = sorted(set(settings) - known)
            if unknown:
                raise ValueError(f"bench: unknown settings {unknown}; choose from {sorted(known)}")
            cfg.settings = [s for s in self.settings if s.name in settings]
            cfg.continual = self.continual if "continual" in settings else None
        if methods:
            unknown = sorted(set(methods) - set(ALL_METHODS))
            if unknown:
                raise ValueError(f"bench: unknown methods {unknown}; choose from {ALL_METHODS}")
            cfg.methods = [m for m in ALL_METHODS if m in methods]
            if cfg.continual:  # its own method list; sft_prior runs with sft
                keep = [m for m in cfg.continual.methods if m in methods or (m == "sft_prior" and "sft" in methods)]
                cfg.continual = dataclasses.replace(cfg.continual, methods=keep) if keep else None
        if seeds is not None:
            if seeds < 1:
                raise ValueError(f"bench: --seeds must be >= 1, got {seeds}")
            cfg.seeds = seeds
            cfg.ablation_seeds = None
        if steps is not None:
            cfg.settings = [
                dataclasses.replace(
                    s,
                    steps=steps,
                    curve_every=max(1, steps // 5),
                    budgets=(max(1, steps // 2), steps) if s.budgets else (),
                )
                for s in cfg.settings
            ]
            cfg.continual = cfg.continual and dataclasses.replace(cfg.continual, steps=steps)
        return cfg


DESCRIPTIONS = {
    "concept_lora": "Concept LoRA: a few pairs of a held-out colour (never named in any caption) bound to the "
    "placeholder word `sks`, on 2 shapes × 2 backgrounds; evaluated on the training prompts and on the "
    "12 unseen shape × background combinations; preservation on unrelated named-colour prompts.",
    "domain_full": "Domain full fine-tune: many pairs of ordinary scenes under the held-out sepia tint, plain "
    "captions; evaluated on the training captions, on unseen captions (incl. captions without a "
    "background), and retention of the original content on unrelated prompts.",
}


def preset(name: str) -> BenchConfig:
    """The bench configurations. Learning rates and steps are the mini preset's; see the report for numbers."""
    if name == "tiny":
        settings = [
            Setting(
                "concept_lora",
                ["orange"],
                4,
                ["lora.rank=2", "lora.alpha=2", "train.batch_size=2"],
                4,
                2,
                DESCRIPTIONS["concept_lora"],
            ),
            Setting(
                "domain_full",
                ["domain"],
                8,
                ["lora.enabled=false", "optim.lr=1e-4", "train.batch_size=2"],
                4,
                2,
                DESCRIPTIONS["domain_full"],
                budgets=(2, 4),
            ),
        ]
        tiny = ["lora.rank=2", "lora.alpha=2", "train.batch_size=2", "method.class_images=4"]
        continual = ContinualSetting(
            [["orange", "teal"]], 4, 8, tiny, ["lora.enabled=false", "optim.lr=1e-4", "train.batch_size=2"], steps=2
        )
        return BenchConfig(
            "tiny",
            settings,
            ALL_METHODS,
            seeds=3,
            curve_n=4,
            n_train=4,
            n_unseen=4,
            n_unrelated=4,
            many_steps=6,
            n_many=4,
            cost_repeats=2,
            cost_warmup=1,
            dedistill_pairs=8,
            dedistill_steps=2,
            dedistill_overrides=["lora.rank=2", "lora.alpha=2", "train.batch_size=2"],
            workers=1,
            model="tiny-random",
            reference_row=False,
            ablation_seeds=1,
            continual=continual,
        )
    concept = ["lora.rank=8", "lora.alpha=8", "optim.lr=5e-4", "train.batch_size=8"]
    domain = ["lora.enabled=false", "optim.lr=1e-4", "train.batch_size=8"]
    dedistill = ["lora.rank=16", "lora.alpha=16", "optim.lr=5e-4", "train.batch_size=8"]
    if name == "quick":
        settings = [
            Setting("concept_lora", ["orange"], 6, concept, 48, 12, DESCRIPTIONS["concept_lora"]),
            Setting("domain_full", ["domain"], 128, domain, 48, 12, DESCRIPTIONS["domain_full"], budgets=(24, 48)),
        ]
        # 48 steps (24 per continual round), 2 cost repeats and 16 many-step controls: what keeps the quick run
        # under 10 minutes on 2 idle cores with every method and setting in it (80/40 steps took 624 s, 64/32
        # steps 600 s, and 56/28 steps with 3 cost repeats 585-669 s over five runs: at the limit).
        continual = ContinualSetting([["orange", "teal"]], 6, 128, concept, domain, steps=24)
        return BenchConfig(
            "quick",
            settings,
            ALL_METHODS,
            seeds=3,
            curve_n=32,
            n_train=32,
            n_unseen=48,
            n_unrelated=48,
            many_steps=32,
            n_many=16,
            cost_repeats=2,
            cost_warmup=1,
            dedistill_pairs=256,
            dedistill_steps=100,
            dedistill_overrides=dedistill,
            workers=2,
            ablation_seeds=1,
            continual=continual,
        )
    if name == "full":
        settings = [
            Setting("concept_lora", ["orange", "teal", "pink"], 6, concept, 200, 25, DESCRIPTIONS["concept_lora"]),
            # 400 steps: the domain's strict fidelity is read at 200 (the concept's budget) and at 400
            Setting("domain_full", ["domain"], 256, domain, 400, 25, DESCRIPTIONS["domain_full"], budgets=(200, 400)),
        ]
        continual = ContinualSetting(
            [["orange", "teal", "pink"], ["domain", "orange"]], 6, 256, concept, domain, steps=200
        )
        return BenchConfig(
            "full",
            settings,
            ALL_METHODS,
            seeds=3,
            curve_n=32,
            n_train=64,
            n_unseen=96,
            n_unrelated=128,
            many_steps=32,
            n_many=64,
            cost_repeats=9,
            cost_warmup=2,
            dedistill_pairs=512,
            dedistill_steps=300,
            dedistill_overrides=dedistill,
            workers=2,
            continual=continual,
        )
    raise ValueError(f"bench: unknown preset {name!r}; choose tiny, quick or full")


__all__ = ["BenchConfig", "DESCRIPTIONS", "Setting", "preset"]

"""The recipe's configuration: its versions, the full-size presets and the tiny ones (tests), and the
configurations its stages derive from it (`dopsd.mini.recipe` runs them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from dopsd.mini.nets import MiniConfig, tiny_config

# The recipes this dopsd builds and reads: the same world and network, trained differently. Add a version
# whenever the recipe changes the weights; drop the older ones when the world or the network changes.
RECIPES = ("mini-recipe-3", "mini-recipe-4")
SHIPPED_RECIPE = "mini-recipe-4"  # dopsd/mini/weights


@dataclass
class ContextStage:
    """A second pretraining stage (mini-recipe-4; iters = 0: none). A fresh optimizer and its own seed
    (the recipe's + 1); its shares replace the first stage's. The distillation's trajectories are then drawn
    with the `distil_*` shares and the stage's same-colour references, so the turbo learns that path too."""

    iters: int = 0
    lr: float = 4e-4
    warmup: int = 50
    p_incontext: float = 0.14
    p_tint: float = 0.5
    p_tint_same_colours: float = 1.0
    distil_p_incontext: float = 0.35
    distil_p_tint: float = 0.25


@dataclass
class RecipeConfig:
    seed: int = 0
    threads: int = 1
    batch: int = 64
    base_iters: int = 4500
    base_lr: float = 1.2e-3
    warmup: int = 200
    ema: float = 0.999
    sigma_sampling: str = "logit_normal"  # or "uniform"
    sigma_mean: float = 0.8  # logit-normal over σ: mostly noisy states
    sigma_std: float = 0.8
    p_uniform_sigma: float = 0.3  # this share of σ uniform in [0, 1]: low σ (where grain is decided) gets trained
    loss: str = "velocity"  # or "x0"
    loss_sigma_min: float = 0.05
    p_incontext: float = 0.40
    p_tint: float = 0.12
    p_tint_same_colours: float = 0.0  # of the tint samples: reference in the target's named colours
    p_sks_plain: float = 0.07
    p_no_background: float = 0.2
    p_reference_path: float = 0.5
    trajectories: int = 4096
    traj_batch: int = 256
    distil_iters: int = 1500
    distil_lr: float = 2e-4
    context_stage: ContextStage = field(default_factory=ContextStage)
    model: MiniConfig = field(default_factory=lambda: MiniConfig(gate_input="luma_highpass"))

    @property
    def version(self) -> str:
        return "mini-recipe-4" if self.context_stage.iters else "mini-recipe-3"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d


def recipe_config(version: str = SHIPPED_RECIPE, seed: int = 0, tiny: bool = False) -> RecipeConfig:
    """The configuration of a recipe version: full size, or tiny (tests) in the same shape."""
    if version not in RECIPES:
        raise ValueError(f"{version}: this dopsd builds {' or '.join(RECIPES)}; choose one of them")
    staged = version == "mini-recipe-4"
    if tiny:
        return (tiny_staged_recipe if staged else tiny_recipe)(seed)
    return RecipeConfig(seed=seed, context_stage=ContextStage(iters=6000) if staged else ContextStage())


def stage_config(rc: RecipeConfig) -> RecipeConfig:
    """What the context stage trains with: `pretrain` of this continues the first stage's base."""
    st = rc.context_stage
    return replace(
        rc,
        seed=rc.seed + 1,
        base_iters=st.iters,
        base_lr=st.lr,
        warmup=st.warmup,
        p_incontext=st.p_incontext,
        p_tint=st.p_tint,
        p_tint_same_colours=st.p_tint_same_colours,
    )


def trajectory_config(rc: RecipeConfig) -> RecipeConfig:
    """The shares the distillation's trajectories are drawn with (the first stage's, without a context stage)."""
    st = rc.context_stage
    if not st.iters:
        return rc
    return replace(
        rc, p_incontext=st.distil_p_incontext, p_tint=st.distil_p_tint, p_tint_same_colours=st.p_tint_same_colours
    )


def tiny_recipe(seed: int = 0) -> RecipeConfig:
    return RecipeConfig(
        seed=seed,
        threads=1,
        batch=16,
        base_iters=30,
        warmup=5,
        trajectories=32,
        traj_batch=32,
        distil_iters=20,
        model=tiny_config(),
    )


def tiny_staged_recipe(seed: int = 0) -> RecipeConfig:
    """The tiny configuration with a few context-stage steps (mini-recipe-4's shape)."""
    return replace(tiny_recipe(seed), context_stage=ContextStage(iters=6, warmup=2))

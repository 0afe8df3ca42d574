"""The recipe that builds the shipped miniature weights: pretrain a multi-step base with in-context examples,
then distil a 4-step turbo from the base's ODE trajectories (in-context conditions included).

Training samples (per batch, by probability):
  * plain       – a named-colour scene; caption with (80%) or without its background; 7% of them write the
                  colour as `sks` (so `sks` caption-only means "some named colour": the "before" behaviour);
  * in-context  – caption colour `sks`, the target's colour drawn from the continuous RGB cube, plus a clean
                  reference image of another scene with the same colour (so colours never named, such as the
                  held-out concepts, are rendered from context);
  * tint        – a named-colour scene under a random global tint, with a reference sharing the tint (so the
                  held-out domain can be carried by the teacher context): another scene, or (share
                  p_tint_same_colours) one in the target's named colours, as D-OPSD's teacher sees its target.
In-context references reach the model through the encoder ("vlm") or the DiT sequence ("reference"), 50/50.
mini-recipe-4 adds a context stage (`ContextStage`): the base continues from its stored (float16) weights with
half of the samples tint samples whose references are in the target's named colours, the condition D-OPSD's
teacher has (the training image of its caption); with other-scene references alone the tint is ambiguous and
the base learns to hedge (benchmarks/mini_tint_teacher.py measures it).
Distillation: the base samples 32-step Euler trajectories; the student (initialised from the base, encoder
frozen) learns one Euler step from each turbo boundary σ_k to the trajectory's state at σ_{k+1}.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from dopsd.core.schedules import shifted_schedule
from dopsd.files import atomic_save_safetensors, atomic_write_json
from dopsd.mini import world
from dopsd.mini.nets import MiniConfig, MiniDiT, MiniEncoder, build
from dopsd.mini.recipe_config import SHIPPED_RECIPE, RecipeConfig, stage_config, trajectory_config

VLM, REFERENCE = 1, 2  # context paths of a sample (0 = caption only)


# --- data ----------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    x0: torch.Tensor  # (B, 3, R, R)
    tokens: torch.Tensor  # (B, T)
    ref: torch.Tensor  # (B, 3, R, R), zeros where path == 0
    path: torch.Tensor  # (B,) 0 caption only, 1 vlm, 2 reference


def _reference_for(g: torch.Generator, fg, tint) -> world.Scene:
    bg = world.random_scene(g).bg
    while world.colour_distance(torch.tensor(fg), torch.tensor(world.BACKGROUNDS[bg])) < 0.35:
        bg = world.random_scene(g).bg
    s = world.random_scene(g, bg=bg)
    return replace(s, fg=fg, tint=tint)


def sample_batch(rc: RecipeConfig, n: int, g: torch.Generator) -> Batch:
    targets, refs, paths, captions = [], [], [], []
    blank = world.Scene(0, 12.0, 12.0, 14.0, (0.0, 0.0, 0.0), "black", "red")
    for _ in range(n):
        u = float(torch.rand(1, generator=g))
        s = world.random_scene(g)
        with_bg = float(torch.rand(1, generator=g)) >= rc.p_no_background
        ref_path = REFERENCE if float(torch.rand(1, generator=g)) < rc.p_reference_path else VLM
        if u < rc.p_incontext:
            fg = world.random_colour(g, world.BACKGROUNDS[s.bg])
            s = replace(s, fg=fg, colour=world.PLACEHOLDER)
            targets.append(s), refs.append(_reference_for(g, fg, None)), paths.append(ref_path)
        elif u < rc.p_incontext + rc.p_tint:
            s = replace(s, tint=world.random_tint(g))
            ref = world.random_scene(g)
            # drawn only when used: at share 0 the random stream, hence mini-recipe-3's weights, stays the same
            if rc.p_tint_same_colours and float(torch.rand(1, generator=g)) < rc.p_tint_same_colours:
                ref = world.in_colours_of(ref, s)
            targets.append(s), refs.append(replace(ref, tint=s.tint))
            paths.append(ref_path)
        else:
            if float(torch.rand(1, generator=g)) < rc.p_sks_plain:
                s = replace(s, colour=world.PLACEHOLDER)
            targets.append(s), refs.append(blank), paths.append(0)
        captions.append(s.caption(with_bg))
    path = torch.tensor(paths)
    ref = world.render(refs) * (path > 0).float()[:, None, None, None]
    return Batch(world.render(targets), torch.stack([world.tokenize(c) for c in captions]), ref, path)


def features(encoder: MiniEncoder, tokens: torch.Tensor, ref: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """Encoder features per sample: the reference goes through the encoder only on the vlm path."""
    feats = encoder(tokens)
    vlm = path == VLM
    if vlm.any():
        feats = feats.clone()
        feats[vlm] = encoder(tokens[vlm], ref[vlm])
    return feats


def predict_x0(dit: MiniDiT, x, sigma, feats, tokens, ref, path) -> torch.Tensor:
    """x̂0 for a mixed batch: samples on the reference path get the reference patches in the sequence."""
    out = torch.empty_like(x)
    on = path == REFERENCE
    mask = tokens != 0
    for sel, use_ref in ((~on, False), (on, True)):
        if sel.any():
            r = ref[sel] if use_ref else None
            out[sel] = dit(x[sel], sigma[sel], feats[sel], mask[sel], r)
    return out


def base_sigmas(rc: RecipeConfig, n: int, g: torch.Generator) -> torch.Tensor:
    uniform = torch.rand(n, generator=g)
    if rc.sigma_sampling == "uniform":
        return uniform
    sigma = torch.sigmoid(rc.sigma_mean + rc.sigma_std * torch.randn(n, generator=g))  # logit-normal
    # logit-normal alone almost never draws σ < 0.1, where the last sampling steps (and fine grain) live
    mix = torch.rand(n, generator=g) < rc.p_uniform_sigma
    return torch.where(mix, uniform, sigma)


def base_loss(rc: RecipeConfig, err: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 error, or velocity error (x0 error / σ, as in JiT: x-prediction with a v-loss) with σ clamped."""
    if rc.loss == "x0":
        return err.pow(2).mean()
    return (err / sigma.clamp_min(rc.loss_sigma_min)[:, None, None, None]).pow(2).mean()


def _lr(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _ema_update(ema: torch.nn.Module, live: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), live.parameters()):
            e.lerp_(p, 1 - decay)


Log = Callable[[str], None]


def pretrain(
    rc: RecipeConfig, log: Log = print, on_step: Callable | None = None, init: tuple[MiniDiT, MiniEncoder] | None = None
) -> tuple[MiniDiT, MiniEncoder]:
    """Flow matching (x-prediction, v-loss by default), jointly training the encoder; returns the EMA weights.

    on_step(step, ema_dit, ema_enc) is called after every step (progress hooks, checkpoint evaluation). `init`:
    start from these weights (copied; a fresh optimizer) instead of a new network."""
    torch.manual_seed(rc.seed)
    g = torch.Generator().manual_seed(rc.seed)
    if init is None:
        dit, enc = MiniDiT(rc.model), MiniEncoder(rc.model)
    else:
        dit, enc = (copy.deepcopy(m).train().requires_grad_(True) for m in init)
    ema_dit, ema_enc = copy.deepcopy(dit).requires_grad_(False), copy.deepcopy(enc).requires_grad_(False)
    params = list(dit.parameters()) + list(enc.parameters())
    opt = torch.optim.AdamW(params, lr=rc.base_lr, weight_decay=0.0)
    t0, run = time.time(), 0.0
    for step in range(rc.base_iters):
        b = sample_batch(rc, rc.batch, g)
        sigma = base_sigmas(rc, rc.batch, g)
        noise = torch.randn(b.x0.shape, generator=g)
        s = sigma[:, None, None, None]
        x = (1 - s) * b.x0 + s * noise
        feats = features(enc, b.tokens, b.ref, b.path)
        err = predict_x0(dit, x, sigma, feats, b.tokens, b.ref, b.path) - b.x0
        loss = base_loss(rc, err, sigma)
        for group in opt.param_groups:
            group["lr"] = _lr(step, rc.base_iters, rc.base_lr, rc.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(rc.ema, (1 + step) / (10 + step))  # short runs: the average must not lag far behind
        _ema_update(ema_dit, dit, decay)
        _ema_update(ema_enc, enc, decay)
        run = 0.98 * run + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if on_step is not None:
            on_step(step, ema_dit, ema_enc)
        if step % 100 == 0 or step == rc.base_iters - 1:
            log(f"base {step}/{rc.base_iters} loss {run:.4f} ({time.time() - t0:.0f}s)")
    return ema_dit.eval(), ema_enc.eval()


@torch.no_grad()
def trajectories(rc: RecipeConfig, dit: MiniDiT, enc: MiniEncoder, log: Log = print) -> dict[str, torch.Tensor]:
    """Base Euler trajectories (rc.model.base_steps) recorded at the turbo's boundaries, with their contexts
    (drawn with `trajectory_config`'s shares)."""
    g = torch.Generator().manual_seed(rc.seed + 1)
    shares = trajectory_config(rc)
    cfg = rc.model
    fine = shifted_schedule(cfg.base_steps, cfg.shift)
    coarse = shifted_schedule(cfg.turbo_steps, cfg.shift)
    keep = [int((fine - c).abs().argmin()) for c in coarse]
    if not torch.allclose(fine[keep], coarse, atol=1e-6):
        raise ValueError(f"turbo boundaries {coarse.tolist()} are not on the base's {cfg.base_steps}-step grid")
    out: dict[str, list[torch.Tensor]] = {"states": [], "tokens": [], "ref": [], "path": []}
    t0 = time.time()
    for start in range(0, rc.trajectories, rc.traj_batch):
        n = min(rc.traj_batch, rc.trajectories - start)
        b = sample_batch(shares, n, g)
        feats = features(enc, b.tokens, b.ref, b.path)
        x = torch.randn(b.x0.shape, generator=g)
        states = [x]
        for i in range(cfg.base_steps):
            sigma = torch.full((n,), float(fine[i]))
            x0 = predict_x0(dit, x, sigma, feats, b.tokens, b.ref, b.path)
            v = (x - x0) / sigma.clamp_min(cfg.sigma_min)[:, None, None, None]
            x = x + float(fine[i + 1] - fine[i]) * v
            if i + 1 in keep:
                states.append(x)
        out["states"].append(torch.stack(states, 1))
        out["tokens"].append(b.tokens), out["ref"].append(b.ref), out["path"].append(b.path)
        log(f"trajectories {start + n}/{rc.trajectories} ({time.time() - t0:.0f}s)")
    return {k: torch.cat(v) for k, v in out.items()}


def distil(
    rc: RecipeConfig, base: MiniDiT, enc: MiniEncoder, data: dict[str, torch.Tensor], log: Log = print
) -> MiniDiT:
    """Trajectory distillation: from x_k at σ_k, one Euler step of the student must land on x_{k+1}."""
    g = torch.Generator().manual_seed(rc.seed + 2)
    cfg = rc.model
    coarse = shifted_schedule(cfg.turbo_steps, cfg.shift)
    student = copy.deepcopy(base).train().requires_grad_(True)
    opt = torch.optim.AdamW(student.parameters(), lr=rc.distil_lr, weight_decay=0.0)
    with torch.no_grad():
        feats_all = torch.cat(
            [
                features(enc, data["tokens"][i : i + 512], data["ref"][i : i + 512], data["path"][i : i + 512])
                for i in range(0, len(data["tokens"]), 512)
            ]
        )
    n, t0, run = len(feats_all), time.time(), 0.0
    for step in range(rc.distil_iters):
        idx = torch.randint(n, (rc.batch,), generator=g)
        k = torch.randint(cfg.turbo_steps, (rc.batch,), generator=g)
        x = data["states"][idx, k]
        x_next = data["states"][idx, k + 1]
        s, s_next = coarse[k], coarse[k + 1]
        sb = s[:, None, None, None]
        # the x̂0 that makes one Euler step from (x, σ_k) land exactly on x_next
        target = x - sb * (x - x_next) / (s - s_next)[:, None, None, None]
        pred = predict_x0(student, x, s, feats_all[idx], data["tokens"][idx], data["ref"][idx], data["path"][idx])
        loss = (pred - target).pow(2).mean()
        for group in opt.param_groups:
            group["lr"] = _lr(step, rc.distil_iters, rc.distil_lr, min(rc.warmup, rc.distil_iters // 10))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        run = 0.98 * run + 0.02 * float(loss.detach()) if step else float(loss.detach())
        if step % 100 == 0 or step == rc.distil_iters - 1:
            log(f"distil {step}/{rc.distil_iters} loss {run:.5f} ({time.time() - t0:.0f}s)")
    return student.eval().requires_grad_(False)


def half_state(dit: MiniDiT, enc: MiniEncoder) -> dict[str, torch.Tensor]:
    """float16 on disk (half the size; the adapter loads into float32)."""
    state = {f"dit.{k}": v.detach().half().contiguous() for k, v in dit.state_dict().items()}
    state.update({f"encoder.{k}": v.detach().half().contiguous() for k, v in enc.state_dict().items()})
    return state


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _stored(dit: MiniDiT, enc: MiniEncoder, cfg: MiniConfig) -> tuple[MiniDiT, MiniEncoder]:
    """The weights as the recipe stores them (float16 on disk, float32 in memory): a stage that continues from
    these builds the same weights when a run restarts from the stored file."""
    return build(cfg, half_state(dit, enc))


def run_recipe(
    rc: RecipeConfig, out: Path, log: Log = print, base: tuple[MiniDiT, MiniEncoder, dict] | None = None
) -> dict:
    """Pretrain (both stages), distil, write base/turbo safetensors and manifest.json into `out`; returns the
    manifest. `base`: (DiT, encoder, provenance) of an already trained base (this recipe's, both stages): only
    the distillation runs, and the manifest records where the base came from."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(rc.threads)
    times: dict[str, float] = {}
    try:
        t0 = time.time()
        if base is None:
            dit, enc = pretrain(rc, log)
            times["base"] = time.time() - t0
            if rc.context_stage.iters:
                t = time.time()
                stage = stage_config(rc)
                dit, enc = pretrain(stage, lambda line: log("context stage: " + line), init=_stored(dit, enc, rc.model))
                times["context_stage"] = time.time() - t
                # from mini-recipe-4 on every stage starts from the stored weights (mini-recipe-3 distilled from
                # the float32 base, and its shipped turbo stays reproducible)
                dit, enc = _stored(dit, enc, rc.model)
        else:
            dit, enc, _ = base
        t = time.time()
        data = trajectories(rc, dit, enc, log)
        times["trajectories"] = time.time() - t
        t = time.time()
        turbo = distil(rc, dit, enc, data, log)
        times["distil"] = time.time() - t
        times["total"] = time.time() - t0
    finally:
        torch.set_num_threads(prev_threads)
    atomic_save_safetensors(out / "base.safetensors", half_state(dit, enc))
    atomic_save_safetensors(out / "turbo.safetensors", half_state(turbo, enc))
    manifest = {
        "recipe_version": rc.version,
        "config": rc.model.to_dict(),
        "recipe": rc.to_dict(),
        "sha256": {f: sha256(out / f) for f in ("base.safetensors", "turbo.safetensors")},
        "wall_time_s": {k: round(v, 1) for k, v in times.items()},
        "torch": torch.__version__,
        "command": f"dopsd mini recipe --out {out} --seed {rc.seed}"
        + (f" --recipe {rc.version}" if rc.version != SHIPPED_RECIPE else "")
        + (f" --gate-input {rc.model.gate_input}" if rc.model.gate_input != "rgb" else ""),
    }
    if base is not None:
        manifest["base_from"] = base[2]
        manifest["command"] += f" --base {base[2]['file']}"
    atomic_write_json(out / "manifest.json", manifest)
    return manifest

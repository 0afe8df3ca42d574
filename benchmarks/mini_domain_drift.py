"""Does a domain stop at the data? The tint amount of D-OPSD domain runs over training steps, per teacher.

A domain run (`dopsd/configs/mini-domain.yaml`: full fine-tune, lr 1e-4, batch 8, EMA teacher at the mini
preset's decay 0.999) on the miniature, on pairs of ordinary scenes under one tint: the bench's domain (sepia,
`world.DOMAIN_TINT`, amount 0.40) and a cool tint (COOL, amount 0.35; like every named tint, never used as such
in the base's training, whose tints are drawn from the RGB cube). At every `--every` steps it measures, on fixed
noise at the turbo's 4 steps:

* the fitted tint (`metrics.fit_tint`) of samples of the training captions and of unseen captions: mean amount,
  strict fidelity (`metrics.shows_tint`: amount ±0.10, hue, chroma) and the fraction over-tinted (amount above
  the tolerance);
* few-step quality on unrelated named-colour prompts, as the bench's domain setting measures it (a sample whose
  background carries the tint is compared with a clean render under the target tint);
* the teacher: its target at the student's own roll-out states (mean fitted amount of the teacher's x̂0 minus the
  student's, with the target image in the teacher's context), its own samples with that context, and its
  samples caption-only (the tint its weights carry).

    python benchmarks/mini_domain_drift.py --out /tmp/x/drift.json [--tints sepia,cool]
        [--candidates ema,base,hybrid] [--seeds 0,1,2] [--steps 400 --every 100]
    python benchmarks/mini_domain_drift.py --out /tmp/x/drift.json --ceiling   # the untouched turbo, tinted

Each candidate is a list of trainer overrides on the domain preset (CANDIDATES). Several invocations can write
several files; `--merge A.json B.json --out C.json` merges them and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import dopsd.training.api
from dopsd.bench.suite import _repeat, domain_prompts
from dopsd.config import load_config
from dopsd.data.dataset import load_dataset
from dopsd.files import atomic_write_json
from dopsd.mini import metrics as M
from dopsd.mini import world
from dopsd.mini.adapter import load as load_adapter

PRESET = Path(__file__).resolve().parents[1] / "dopsd" / "configs" / "mini-domain.yaml"
COOL = ((0.45, 0.72, 1.00), 0.35)  # sepia's saturation and value at hue 210° (a cool blue), amount 0.35
TINTS = {"sepia": world.DOMAIN_TINT, "cool": COOL}
# name -> trainer overrides on top of the preset (the preset's own method is whatever it says now: the baseline
# rows name their teacher explicitly so that they stay the same rows if the preset's default changes)
CANDIDATES: dict[str, list[str]] = {
    "ema": ["method.name=dopsd", "method.teacher=ema"],
    "base": ["method.name=dopsd", "method.teacher=base"],
    # the frozen teacher at a third and three times mini-domain.yaml's learning rate
    "base_lr3e-5": ["method.name=dopsd", "method.teacher=base", "optim.lr=3e-5"],
    "base_lr3e-4": ["method.name=dopsd", "method.teacher=base", "optim.lr=3e-4"],
    "ema_slow": ["method.name=dopsd", "method.teacher=ema", "method.ema_decay=0.9999"],
    "offpolicy": ["method.name=offpolicy", "method.teacher=ema"],
    "hybrid": ["method.name=hybrid", "method.teacher=ema", "method.sft_weight=0.1"],
    "base_hybrid": ["method.name=hybrid", "method.teacher=base", "method.sft_weight=0.1"],
    "base_anchor": ["method.name=hybrid", "method.teacher=base", "method.sft_weight=0.03"],
    "sft": ["method.name=sft"],
    # the frozen teacher training a LoRA (the concept preset's rank and lr) instead of every weight
    "base_lora": [
        "method.name=dopsd",
        "method.teacher=base",
        "lora.enabled=true",
        "lora.rank=8",
        "lora.alpha=8",
        "optim.lr=5e-4",
    ],
    # the frozen teacher on data whose caption files also hold each caption without its background (one
    # variant drawn per sample, as the authors draw short/medium/detailed captions)
    "base_variants": ["method.name=dopsd", "method.teacher=base"],
    "preset": [],  # the preset as shipped
}


def quality(images: torch.Tensor, captions: list[str], tint) -> float:
    """The bench's domain few-step quality (`dopsd.bench.suite.quality`) for any tint: sharpness over that of
    clean renders of the decoded layouts in the captions' colours, under `tint` where the sample carries it."""
    dec = M.decode(images)
    fg, bg = dec.fg.clone(), dec.bg.clone()
    for i, caption in enumerate(captions):
        colour, _, background = M.parse_caption(caption)
        fg[i] = torch.tensor(world.COLOURS[colour])
        if background is not None:
            bg[i] = torch.tensor(world.BACKGROUNDS[background])
    n = len(captions)
    mix = (torch.tensor(tint[0]).expand(n, 3), M.in_tint(dec, tint).float() * tint[1])
    grain = 2 * world.grain_texture(list(range(n)))[:, None]
    ref = (world.composite(dec.mask, fg, bg, mix) + grain).clamp(-1, 1)
    ratio = M.sharpness_per_sample(images).sum() / M.sharpness_per_sample(ref).sum().clamp_min(1e-6)
    return float(ratio.clamp(max=1.0))


def tint_stats(images: torch.Tensor, captions: list[str], tint) -> dict[str, float]:
    fit = M.fit_tint(images, M.decode(images), captions)
    over = fit.amount > tint[1] + M.TINT_AMOUNT_TOL
    return {
        "amount": float(fit.amount.mean()),
        "strict": float(M.shows_tint(fit, tint).float().mean()),
        "over": float(over.float().mean()),
        "under": float((fit.amount < tint[1] - M.TINT_AMOUNT_TOL).float().mean()),
    }


class Probe:
    """Fixed prompts, noise and contexts (built before the trainer releases the encoder)."""

    def __init__(self, adapter: Any, train_captions: list[str], pairs: list[world.Scene], tint, n: int):
        self.adapter, self.tint = adapter, tint
        res = adapter.resolution
        distinct = list(dict.fromkeys(train_captions))
        unseen = [p for p in domain_prompts() if p not in distinct]
        self.sets = {
            "train": _repeat(distinct, n),
            "unseen": _repeat(unseen, n),
            "unrelated": world.unrelated_prompts(n, seed=0),
        }
        self.noise = {
            k: torch.randn(n, 3, res, res, generator=torch.Generator().manual_seed(7_000 + i))
            for i, k in enumerate(self.sets)
        }
        self.ctx = {k: adapter.collate(adapter.student_contexts(v)) for k, v in self.sets.items()}
        # the teacher probe: 32 training pairs, caption-only and with their target image in the teacher's context
        few = pairs[:32]
        self.t_captions = [s.caption() for s in few]
        self.t_student = adapter.collate(adapter.student_contexts(self.t_captions))
        self.t_teacher = adapter.collate(adapter.teacher_contexts_from_tensors(self.t_captions, world.render(few)))
        self.t_noise = torch.randn(len(few), 3, res, res, generator=torch.Generator().manual_seed(9_000))
        self.sched = adapter.inference_schedule(res, res)

    def _sample(self, net: Any, noise: torch.Tensor, ctx: dict[str, torch.Tensor]) -> torch.Tensor:
        x = noise.clone()
        for k in range(len(self.sched) - 1):
            s = self.sched[k].expand(len(x))
            x = x + (self.sched[k + 1] - self.sched[k]) * self.adapter.velocity(net, x, s, ctx)
        return x.nan_to_num(0.0, 1.0, -1.0).clamp(-1, 1)

    @torch.no_grad()
    def measure(self, net: Any, teacher: Any = None) -> dict[str, float]:
        was = net.training
        net.eval()
        try:
            out: dict[str, float] = {}
            for name in ("train", "unseen"):
                imgs = self._sample(net, self.noise[name], self.ctx[name])
                out.update({f"{name}_{k}": v for k, v in tint_stats(imgs, self.sets[name], self.tint).items()})
            # unseen captions without a background (the data's captions all name one) apart from those with one
            nobg = [i for i, c in enumerate(self.sets["unseen"]) if " on a " not in c]
            if nobg:
                caps = [self.sets["unseen"][i] for i in nobg]
                out["unseen_nobg_strict"] = tint_stats(imgs[nobg], caps, self.tint)["strict"]
            imgs = self._sample(net, self.noise["unrelated"], self.ctx["unrelated"])
            out["quality"] = quality(imgs, self.sets["unrelated"], self.tint)
            out.update(self._teacher(net, teacher))
        finally:
            net.train(was)
        return out

    def _teacher(self, net: Any, teacher: Any) -> dict[str, float]:
        """The teacher's target at the student's roll-out states: fitted amount of its x̂0 minus the student's
        (mean over the roll-out steps at σ ≤ 0.5, where the layout is set and the fit is reliable); its own
        samples with the target image in context; its samples caption-only."""
        caps, tint = self.t_captions, self.tint
        amount = lambda imgs: M.fit_tint(imgs.clamp(-1, 1), M.decode(imgs.clamp(-1, 1)), caps).amount  # noqa: E731

        def teacher_v(x, s, ctx):
            if teacher is None or teacher.mode == "live":
                return self.adapter.velocity(net, x, s, ctx)
            with teacher.swapped_in():
                return self.adapter.velocity(net, x, s, ctx)

        x, push = self.t_noise.clone(), []
        for k in range(len(self.sched) - 1):
            sig = self.sched[k]
            s = sig.expand(len(x))
            v_s = self.adapter.velocity(net, x, s, self.t_student)
            if float(sig) <= 0.5:
                v_t = teacher_v(x, s, self.t_teacher)
                push.append(float((amount(x - sig * v_t) - amount(x - sig * v_s)).mean()))
            x = x + (self.sched[k + 1] - sig) * v_s

        class _T(torch.nn.Module):  # the network with the teacher's weights, as `_sample` calls it
            def forward(_, *a, **kw):  # noqa: N805
                if teacher is None or teacher.mode == "live":
                    return net(*a, **kw)
                with teacher.swapped_in():
                    return net(*a, **kw)

        t_net = _T()
        own = self._sample(t_net, self.t_noise, self.t_teacher)
        plain = self._sample(t_net, self.t_noise, self.t_student)
        return {
            "teacher_push": statistics.fmean(push),
            "teacher_amount": float(amount(own).mean()),
            "teacher_strict": float(M.shows_tint(M.fit_tint(own, M.decode(own), caps), tint).float().mean()),
            "teacher_caption_only_amount": float(amount(plain).mean()),
        }


@torch.no_grad()
def ceiling(tint_name: str, args: argparse.Namespace) -> dict[str, float]:
    """What a fine-tune that adds exactly the tint and changes nothing else scores: the untouched turbo's samples
    of the probe's prompts (same noise), tinted in pixel space, scored like the runs."""
    tint = TINTS[tint_name]
    scenes = write_data(args.work / f"data-{tint_name}", tint, args.pairs)
    cfg = load_config(PRESET, [f"data.path={args.work / f'data-{tint_name}'}"])
    adapter = load_adapter(cfg.model)
    probe = Probe(adapter, [ex.captions[0] for ex in load_dataset(cfg.data, cfg.model)], scenes, tint, args.n)
    adapter.network.eval()
    out = {}
    for name in ("train", "unseen"):
        x = world.add_tint(probe._sample(adapter.network, probe.noise[name], probe.ctx[name]), tint)
        out[f"{name}_strict"] = tint_stats(x, probe.sets[name], tint)["strict"]
        if name == "unseen":
            nobg = [i for i, c in enumerate(probe.sets[name]) if " on a " not in c]
            caps = [probe.sets[name][i] for i in nobg]
            out["unseen_nobg_strict"] = tint_stats(x[nobg], caps, tint)["strict"]
    return out


def write_data(folder: Path, tint, pairs: int, variants: bool = False) -> list[world.Scene]:
    g = torch.Generator().manual_seed(30_000)
    scenes = [replace(world.random_scene(g), tint=tint) for _ in range(pairs)]
    if not folder.exists():
        world.write_pairs(folder, scenes)
        if variants:
            for i, scene in enumerate(scenes):
                (folder / f"{i:04d}.txt").write_text(f"{scene.caption()}\n{scene.caption(False)}\n")
    return scenes


def run(tint_name: str, cand: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    tint = TINTS[tint_name]
    variants = cand.endswith("_variants")
    data = args.work / (f"data-{tint_name}" + ("-variants" if variants else ""))
    scenes = write_data(data, tint, args.pairs, variants)
    overrides = [
        f"data.path={data}",
        f"train.output_dir={args.work / f'run-{tint_name}-{cand}-{seed}'}",
        f"train.seed={seed}",
        f"train.max_steps={args.steps}",
        "train.checkpoint_every=0",
        "cache.enabled=false",
        "sample.health=false",
        "sample.every=0",
        "log.progress=false",
        "log.tensorboard=false",
        *CANDIDATES[cand],
    ]
    cfg = load_config(PRESET, overrides)
    adapter = load_adapter(cfg.model)
    # the captions that name a background (each example's first): unseen = the rest, as for the plain data
    captions = [ex.captions[0] for ex in load_dataset(cfg.data, cfg.model)]
    probe = Probe(adapter, captions, scenes, tint, args.n)
    curve: dict[int, dict[str, float]] = {0: probe.measure(adapter.network)}

    def on_step(trainer: Any, record: dict[str, Any]) -> None:
        if trainer.step % args.every == 0:
            curve[trainer.step] = probe.measure(trainer.network, trainer.teacher)

    t0 = time.time()
    dopsd.training.api.train(cfg, adapter=adapter, callback=on_step, overwrite=True)
    return {"seconds": round(time.time() - t0, 1), "overrides": CANDIDATES[cand], "curve": curve}


def _cell(values: list[float], digits: int = 2) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} [{min(values):.{digits}f}–{max(values):.{digits}f}]"


def table(results: dict[str, Any]) -> str:
    """Per tint and candidate: mean [min–max] over seeds of each measure at each step."""
    cols = [
        ("train_amount", "amount"),
        ("train_strict", "strict (train)"),
        ("unseen_strict", "strict (unseen)"),
        ("unseen_nobg_strict", "unseen, no background"),
        ("train_over", "over-tinted"),
        ("quality", "few-step quality"),
        ("teacher_push", "teacher push"),
        ("teacher_amount", "teacher amount"),
        ("teacher_caption_only_amount", "teacher caption-only"),
    ]
    lines = []
    for tint_name, by_cand in results["runs"].items():
        tint = TINTS[tint_name]
        lines += ["", f"{tint_name} (target amount {tint[1]}):", ""]
        lines += [
            "| candidate | step | " + " | ".join(c[1] for c in cols) + " | seeds |",
            "|---" * (len(cols) + 3) + "|",
        ]
        for cand, by_seed in by_cand.items():
            steps = sorted({int(s) for r in by_seed.values() for s in r["curve"]})
            for step in steps:
                rows = [r["curve"][str(step)] for r in by_seed.values() if str(step) in r["curve"]]
                cells = [_cell([r[k] for r in rows if k in r], 3 if k == "quality" else 2) for k, _ in cols]
                lines.append(f"| {cand} | {step} | " + " | ".join(cells) + f" | {len(rows)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="JSON results (read first if it exists: runs add up)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mini_domain_drift"), help="data and run folders")
    ap.add_argument("--tints", default="sepia,cool")
    ap.add_argument("--candidates", default="ema,base,hybrid")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--pairs", type=int, default=256, help="training pairs per tint (the bench's full setting)")
    ap.add_argument("--n", type=int, default=64, help="samples per prompt set and measurement")
    ap.add_argument("--merge", nargs="*", type=Path, default=[], help="merge these result files into --out")
    ap.add_argument("--ceiling", action="store_true", help="only the untouched turbo's samples with the tint added")
    args = ap.parse_args()
    torch.set_num_threads(1)
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    if args.ceiling:
        for tint_name in args.tints.split(","):
            results.setdefault("ceiling", {})[tint_name] = found = ceiling(tint_name, args)
            print(f"{tint_name}: the untouched turbo, tinted: " + ", ".join(f"{k} {v:.3f}" for k, v in found.items()))
        atomic_write_json(args.out, results)
        return
    for other in args.merge:
        data = json.loads(other.read_text())
        results.setdefault("setup", data.get("setup"))
        for t, by_cand in data["runs"].items():
            for c, by_seed in by_cand.items():
                results["runs"].setdefault(t, {}).setdefault(c, {}).update(by_seed)
    if not args.merge:
        unknown = sorted(set(args.candidates.split(",")) - set(CANDIDATES)) + sorted(
            set(args.tints.split(",")) - set(TINTS)
        )
        if unknown:
            raise SystemExit(
                f"mini_domain_drift: unknown {unknown}; candidates {list(CANDIDATES)}, tints {list(TINTS)}"
            )
        results["setup"] = {
            "preset": "dopsd/configs/mini-domain.yaml",
            "tints": {k: {"colour": v[0], "amount": v[1]} for k, v in TINTS.items()},
            "candidates": CANDIDATES,
            "steps": args.steps,
            "pairs": args.pairs,
            "samples_per_set": args.n,
        }
        for seed in [int(s) for s in args.seeds.split(",")]:
            for cand in args.candidates.split(","):
                for tint_name in args.tints.split(","):
                    r = run(tint_name, cand, seed, args)
                    results["runs"].setdefault(tint_name, {}).setdefault(cand, {})[str(seed)] = r
                    last = r["curve"][max(r["curve"])]
                    print(
                        f"{tint_name} {cand} seed {seed}: {r['seconds']} s; at {max(r['curve'])}: amount "
                        f"{last['train_amount']:.3f} strict {last['train_strict']:.2f}/{last['unseen_strict']:.2f} "
                        f"quality {last['quality']:.3f} push {last['teacher_push']:+.3f}",
                        flush=True,
                    )
                    atomic_write_json(args.out, json.loads(json.dumps(results)))
    atomic_write_json(args.out, json.loads(json.dumps(results)))
    print(table(json.loads(json.dumps(results))))


if __name__ == "__main__":
    main()

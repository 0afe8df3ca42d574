"""What does D-OPSD's teacher render on captions without a background?

A student can only be taught what its teacher shows. For a domain, the frozen teacher (`method.teacher: base`,
`dopsd/configs/mini-domain.yaml`) is the untouched turbo with a tinted image in its context. This measures its own
4-step samples, scored with the domain-drift probe's strict tint fidelity (`mini_domain_drift.tint_stats`: the
fitted tint's amount within ±0.10, hue within 15°, chroma within 50%), on the probe's prompts and noise:

* captions that name a background (the training captions), the reference a tinted scene in the caption's colours
  and background: what the teacher sees in training;
* captions without a background (the unseen set's), with four references:
  - the untouched turbo's own sample of the same caption and noise, tinted in pixel space: the reference that
    agrees with the student in everything but the tint (the best a reference can do);
  - a tinted scene in the caption's colours on a random background;
  - the training image nearest to that untouched sample (8×8 average-pooled pixels): what a teacher whose
    reference is chosen on-policy (nearest to the student's own sample) sees at the start of training;
  - a random training image (another colour and background).

For comparison it prints the ceiling row of mini_domain_drift (`--ceiling`): the untouched samples tinted in pixel
space, scored directly.

    python benchmarks/mini_domain_teacher.py --out teacher.json [--tints sepia,cool --n 256]

About a minute per tint on one core.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mini_domain_drift import PRESET, TINTS, Probe, tint_stats, write_data

from dopsd.config import load_config
from dopsd.data.dataset import load_dataset
from dopsd.files import atomic_write_json
from dopsd.mini import metrics as M
from dopsd.mini import world
from dopsd.mini.adapter import load as load_adapter


@torch.no_grad()
def measure(tint_name: str, n: int, work: Path, pairs: int) -> dict[str, Any]:
    tint = TINTS[tint_name]
    data = work / f"data-{tint_name}"
    scenes = write_data(data, tint, pairs)
    cfg = load_config(PRESET, [f"data.path={data}"])
    adapter = load_adapter(cfg.model)
    net = adapter.network.eval()
    probe = Probe(adapter, [ex.captions[0] for ex in load_dataset(cfg.data, cfg.model)], scenes, tint, n)
    g = torch.Generator().manual_seed(5)

    def teacher(captions: list[str], refs: torch.Tensor, noise: torch.Tensor) -> dict[str, float]:
        ctx = adapter.collate(adapter.teacher_contexts_from_tensors(captions, refs))
        return tint_stats(probe._sample(net, noise, ctx), captions, tint)

    def in_caption_colours(captions: list[str], named_background: bool) -> torch.Tensor:
        refs = []
        for caption in captions:
            colour, _, background = M.parse_caption(caption)
            scene = world.random_scene(g, colour=colour, bg=background if named_background else None)
            refs.append(replace(scene, tint=tint))
        return world.render(refs)

    out: dict[str, Any] = {}
    train = probe.sets["train"]
    out["background named: reference in its colours and background"] = teacher(
        train, in_caption_colours(train, True), probe.noise["train"]
    )
    nobg = [i for i, c in enumerate(probe.sets["unseen"]) if " on a " not in c]
    captions, noise = [probe.sets["unseen"][i] for i in nobg], probe.noise["unseen"][nobg]
    own = probe._sample(net, noise, adapter.collate(adapter.student_contexts(captions)))
    out["no background: the ceiling (untouched sample, tinted, scored directly)"] = tint_stats(
        world.add_tint(own, tint), captions, tint
    )
    out["no background: reference = untouched sample, tinted"] = teacher(captions, world.add_tint(own, tint), noise)
    out["no background: reference in its colours, random background"] = teacher(
        captions, in_caption_colours(captions, False), noise
    )
    images = world.render(scenes)
    pooled = F.adaptive_avg_pool2d(images, 8).flatten(1)
    nearest = torch.cdist(F.adaptive_avg_pool2d(own, 8).flatten(1), pooled).argmin(1)
    out["no background: reference = nearest training image"] = teacher(captions, images[nearest], noise)
    others = torch.randint(len(scenes), (len(captions),), generator=g)
    out["no background: reference = random training image"] = teacher(captions, images[others], noise)
    out["samples"] = {"background named": len(train), "no background": len(captions)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="JSON results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mini_domain_drift"), help="data folders (shared)")
    ap.add_argument("--tints", default="sepia,cool")
    ap.add_argument("--n", type=int, default=256, help="samples per prompt set")
    ap.add_argument("--pairs", type=int, default=256, help="training pairs per tint (the bench's full setting)")
    args = ap.parse_args()
    unknown = sorted(set(args.tints.split(",")) - set(TINTS))
    if unknown:
        raise SystemExit(f"mini_domain_teacher: unknown tints {unknown}; known {list(TINTS)}")
    torch.set_num_threads(1)
    results = {t: measure(t, args.n, args.work, args.pairs) for t in args.tints.split(",")}
    atomic_write_json(args.out, {"n": args.n, "pairs": args.pairs, "tints": results})
    for tint_name, rows in results.items():
        print(f"\n{tint_name} (amount {TINTS[tint_name][1]}; samples {rows['samples']}):\n")
        print(
            "| the frozen teacher's own samples | strict | amount | over-tinted | under-tinted |\n|---|---|---|---|---|"
        )
        for name, s in rows.items():
            if name != "samples":
                print(f"| {name} | {s['strict']:.2f} | {s['amount']:.2f} | {s['over']:.2f} | {s['under']:.2f} |")


if __name__ == "__main__":
    main()

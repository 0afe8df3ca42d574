"""The miniature world's renderer, vocabulary, datasets and ground-truth metrics (no model needed)."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dopsd.mini import metrics as M
from dopsd.mini import world

torch.set_num_threads(1)


def scenes(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [world.random_scene(g) for _ in range(n)]


def blur(x):
    return F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)


def test_tokenize_vocabulary_and_errors():
    ids = world.tokenize("a sks circle on a gray background")
    assert ids.shape == (world.MAX_TOKENS,) and int(ids[-1]) == 0 and int(ids[1]) == world.VOCAB.index("sks")
    with pytest.raises(ValueError, match="vocabulary.*orange.*Known words: .*sks"):
        world.tokenize("a orange circle")
    with pytest.raises(ValueError, match="allows 8"):
        world.tokenize("a red circle on a gray background on a")
    for name in world.CONCEPTS:  # held-out concepts are never words of the vocabulary
        assert name not in world.VOCAB


def test_render_ranges_and_multimodal_captions():
    sc = scenes(400)
    x = world.render(sc)
    assert x.shape == (400, 3, world.RES, world.RES) and x.min() >= -1 and x.max() <= 1
    by_caption: dict[str, list] = {}
    for s in sc:
        by_caption.setdefault(s.caption(), []).append((s.cx, s.cy, s.size))
    spread = max(torch.tensor(v).std(0).min() for v in by_caption.values() if len(v) > 3)
    assert spread > 1.0  # position and size vary under one caption: they are never captioned
    k = len(world.SHAPES)
    m = world.shape_masks(torch.arange(k), torch.full((k,), 12.0), torch.full((k,), 12.0), torch.full((k,), 14.0))
    m = m.reshape(k, -1)  # each shape covers a clearly different set of pixels at the same position and size
    diffs = torch.cdist(m, m, p=1)
    assert float(diffs[~torch.eye(len(world.SHAPES), dtype=torch.bool)].min()) > 15


def test_decoder_recovers_ground_truth_and_continuous_colours():
    sc = scenes(300)
    x = world.render(sc)
    dec = M.decode(x)
    assert dec.shape.tolist() == [s.shape for s in sc]
    assert (dec.cx - torch.tensor([s.cx for s in sc])).abs().max() <= 0.5
    assert (dec.size - torch.tensor([s.size for s in sc])).abs().max() <= 1.0
    assert M.attribute_accuracy(x, [s.caption() for s in sc], dec) == {"shape": 1.0, "colour": 1.0, "background": 1.0}
    g = torch.Generator().manual_seed(1)
    orange = world.render([world.concept_scene("orange", g) for _ in range(50)])
    assert M.concept_fidelity(orange, "orange") == 1.0
    assert M.concept_fidelity(orange, "teal") == 0.0 and M.concept_fidelity(x, "orange") == 0.0


def test_quality_metrics_rank_clean_above_blurred_and_blank():
    sc = scenes(200)
    caps = [s.caption() for s in sc]
    x = world.render(sc)
    q_clean = M.fewstep_quality(x, caps)
    q_blur = M.fewstep_quality(blur(x), caps)
    assert q_clean > 0.9 and q_blur < 0.6 and M.fewstep_quality(blur(blur(x)), caps) < q_blur
    assert M.fewstep_quality(torch.zeros_like(x), caps) < 0.05  # missing objects are not "sharp"
    flat = world.render([replace(s, grain=None) for s in sc])  # grain-free: only the edges differ
    assert M.render_psnr(flat) > M.render_psnr(blur(flat)) + 3
    assert M.fewstep_quality(flat, caps) < 0.5  # losing the fine grain texture counts as lost detail
    assert M.sharpness(blur(x)) < M.sharpness(x)
    assert M.drift(x, x) == 0.0 and M.drift(blur(x), x) > 0


def test_domain_and_datasets(tmp_path):
    dom = world.render(world.domain_scenes(64))
    assert M.domain_fidelity(dom) == 1.0 and M.domain_fidelity(world.render(scenes(64))) == 0.0
    caps = world.write_concept_dataset(tmp_path / "c", "teal", n=8)
    assert len(caps) == 8 and all(c.split()[1] == world.PLACEHOLDER for c in caps)
    img = Image.open(tmp_path / "c" / "0003.png")
    assert img.size == (world.RES, world.RES)
    assert (tmp_path / "c" / "0003.txt").read_text().strip() == caps[3]
    trained = {(c.split()[2], c.split()[5]) for c in caps}
    unseen = [p for p in world.concept_prompts() if (p.split()[2], p.split()[5]) not in trained]
    assert len(trained) == 4 and len(unseen) == 12  # concept prompts include unseen combinations
    dcaps = world.write_domain_dataset(tmp_path / "d", n=20)
    assert len(list((tmp_path / "d").glob("*.png"))) == 20 and world.PLACEHOLDER not in " ".join(dcaps)
    prompts = world.unrelated_prompts(30, seed=1)
    assert prompts == world.unrelated_prompts(30, seed=1) and prompts != world.unrelated_prompts(30, seed=2)
    assert all(world.PLACEHOLDER not in p for p in prompts)


def test_tint_fit_says_amount_and_hue():
    """The per-sample tint test recovers a tint's amount and hue from clean renders (any caption colours, with or
    without a background in the caption) and tells apart tints the hue-blind `domain_fidelity` confuses."""
    from dopsd.mini import domains

    sc = scenes(120, seed=3)
    caps = [s.caption() for s in sc]
    tints = domains.TEST_TINTS
    for name, tint in tints.items():
        x = world.render([replace(s, tint=tint) for s in sc])
        dec = M.decode(x)
        fit = M.fit_tint(x, dec, caps)
        assert (fit.amount - tint[1]).abs().max() < 0.07 and M.hue_error(fit.colour, tint[0]).max() < 8, name
        assert M.tint_fidelity(x, caps, tint, dec) == 1.0
        assert M.tint_fidelity(x, [s.caption(False) for s in sc], tint, dec) >= 0.9  # background inferred
        for other, t in tints.items():  # another test hue (≥ 24° away) never passes for this one
            if other != name:
                assert M.tint_fidelity(x, caps, t, dec) == 0.0, (name, other)
    plain = world.render(sc)
    assert all(M.tint_fidelity(plain, caps, t) == 0.0 for t in tints.values())
    lemon = world.render([replace(s, tint=tints["lemon 60°"]) for s in sc])
    assert M.domain_fidelity(lemon) > 0.5  # the old test cannot see the hue ...
    assert M.tint_fidelity(lemon, caps) == 0.0  # ... the tint fit can (default: the held-out domain)
    half = world.render([replace(s, tint=(tints["sepia (domain)"][0], 0.2)) for s in sc])
    assert M.tint_fidelity(half, caps) == 0.0  # right hue, half the amount
    grey = world.render([replace(s, tint=((0.78, 0.78, 0.78), 0.4)) for s in sc])
    assert M.tint_fidelity(grey, caps) == 0.0  # right amount, no colour cast
    with pytest.raises(ValueError, match="named colour"):
        M.fit_tint(plain[:1], M.decode(plain[:1]), ["a sks circle on a gray background"])


def test_hue():
    rgb = torch.tensor([[1.0, 0, 0], [1, 1, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1], [1, 0, 1], [1, 0.5, 0]])
    assert M.hue(rgb).tolist() == [0.0, 60.0, 120.0, 180.0, 240.0, 300.0, 30.0]
    assert M.hue_error(torch.tensor([[1.0, 0, 0.1]]), (1.0, 0.1, 0)).item() == pytest.approx(12.0)  # across 0°

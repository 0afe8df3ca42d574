"""`dopsd probe` on the shipped miniature turbo: it must tell a pair the teacher carries from one it cannot."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from dopsd.cli import main as cli_main
from dopsd.data.images import to_pil
from dopsd.mini import world
from dopsd.mini.adapter import load, tiny_random_adapter
from dopsd.mini.scoring import MiniScorer
from dopsd.tools.probe.run import Thresholds, _verdict, probe
from dopsd.tools.probe.scorers import PixelScorer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def turbo():
    return load(SimpleNamespace(pretrained="turbo", teacher_context="vlm"))


def carried_pairs(n: int = 3, seed: int = 0) -> list[tuple[Image.Image, str]]:
    """A held-out colour concept (orange, never named): the in-context teacher copies colours."""
    g = torch.Generator().manual_seed(seed)
    scenes = [world.concept_scene("orange", g) for _ in range(n)]
    return list(zip(to_pil(world.render(scenes)), [s.caption() for s in scenes]))


def uncarried_pairs(n: int = 3, seed: int = 1) -> list[tuple[Image.Image, str]]:
    """A structural concept: the image shows a different shape than the caption names. The teacher learned to
    copy appearance (colour, tint) from context, not shape, so it renders the caption's shape: it cannot carry
    this pair, and D-OPSD would teach the caption's shape, not the image's."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for k in range(n):
        scene = world.random_scene(g, shape=3)  # a plus …
        shown = world.SHAPES[(k % 3)]  # … captioned as a circle / square / triangle
        pairs.append((to_pil(world.render([scene]))[0], f"a {scene.colour} {shown} on a {scene.bg} background"))
    return pairs


def write_folder(folder: Path, pairs: list[tuple[Image.Image, str]]) -> Path:
    folder.mkdir(parents=True)
    for i, (img, caption) in enumerate(pairs):
        img.save(folder / f"p{i}.png")
        (folder / f"p{i}.txt").write_text(caption)
    return folder


def test_probe_ranks_a_carried_concept_above_one_the_teacher_cannot_carry(turbo):
    carried, uncarried = carried_pairs(), uncarried_pairs()
    report = probe(turbo, carried + uncarried, seeds=(0, 1, 2), scorer=MiniScorer())
    good, bad = report.pairs[: len(carried)], report.pairs[len(carried) :]
    assert min(p.relative_gain for p in good) > max(p.relative_gain for p in bad) + 0.3, report.table()
    assert all(p.verdict == "carries" for p in good), report.table()
    assert all(p.verdict == "fails" for p in bad), report.table()
    # The decoders agree: the teacher shows the orange concept, the student (caption only) mostly does not.
    teacher_hits, student_hits = (sum(getattr(p, k) for p in good) / len(good) for k in ("teacher_hit", "student_hit"))
    assert teacher_hits >= student_hits + 0.4 and student_hits <= 0.25, report.table()
    # Student and teacher both render the caption's shape for the contradicting pairs: no hits either way.
    assert all(p.teacher_hit == 0 for p in bad)
    assert report.counts() == {"carries": 3, "weak": 0, "fails": 3} and not report.passed
    recs = " ".join(report.recommendations())
    assert "#3" in recs and "model.teacher_context=reference" in recs and "drop the pair" in recs
    assert "#0" not in recs


def test_probe_cli_strict_gates_on_failing_pairs(tmp_path, capsys):
    good = write_folder(tmp_path / "good", carried_pairs(2))
    bad = write_folder(tmp_path / "bad", carried_pairs(1) + uncarried_pairs(2))
    common = ["model.pretrained=turbo", "train.output_dir=" + str(tmp_path / "run"), "--seeds", "2"]

    assert cli_main(["probe", "mini", f"data.path={good}", *common, "--strict", "--out", str(tmp_path / "g")]) == 0
    data = json.loads((tmp_path / "g" / "probe.json").read_text())
    assert data["counts"]["carries"] == 2 and data["passed"]

    out = tmp_path / "b"
    assert cli_main(["probe", "mini", f"data.path={bad}", *common, "--strict", "--out", str(out)]) == 1
    assert "fail" in capsys.readouterr().err
    data = json.loads((out / "probe.json").read_text())
    assert [p["verdict"] for p in data["pairs"]] == ["carries", "fails", "fails"]
    assert data["teacher_context"] == "vlm" and data["fail_fraction"] == pytest.approx(2 / 3)
    grid = Image.open(out / "probe_grid.png")
    assert grid.width > 3 * 96 and grid.height > 3 * 96  # target | student | teacher, one row per pair
    # Without --strict, or with a looser gate, the same probe exits 0; a broken dataset exits 2.
    assert cli_main(["probe", "mini", f"data.path={bad}", *common, "--out", str(out)]) == 0
    assert (
        cli_main(["probe", "mini", f"data.path={bad}", *common, "--strict", "--max-fail", "0.7", "--out", str(out)])
        == 0
    )
    assert cli_main(["probe", "mini", f"data.path={tmp_path / 'missing'}", *common, "--out", str(out)]) == 2


def test_verdict_thresholds_and_pixel_fallback():
    t = Thresholds(carry=0.25, weak=0.1, min_win=0.5)
    assert _verdict(0.3, 1.0, t) == "carries"
    assert _verdict(0.3, 0.3, t) == "weak"  # large mean gain from one lucky seed is not "carries"
    assert _verdict(0.15, 1.0, t) == "weak"
    assert _verdict(0.05, 1.0, t) == "fails"
    with pytest.raises(ValueError, match="weak <= carry"):
        Thresholds(carry=0.1, weak=0.2)
    # The pixel fallback is a distance: zero for the target itself, larger for a different image.
    img = to_pil(world.render([world.random_scene(torch.Generator().manual_seed(3))]))[0]
    x = torch.from_numpy(__import__("numpy").asarray(img, dtype="float32")).permute(2, 0, 1)[None] / 127.5 - 1
    d = PixelScorer().distance(torch.cat([x, -x]), [img, img])
    assert d[0] < 1e-3 < d[1]


def test_probe_runs_on_any_adapter_with_the_pixel_fallback():
    adapter = tiny_random_adapter(0, teacher_context="reference")
    report = probe(adapter, carried_pairs(2), seeds=(0,), scorer=PixelScorer())
    assert report.metric == "pixel-palette" and report.steps == 4 and len(report.images) == 2
    assert all(p.student_hit is None for p in report.pairs)
    assert all(p.student_distance > 0 and p.teacher_distance > 0 for p in report.pairs)


def test_probe_frees_the_encoders_before_sampling_and_scores_the_same():
    """`dopsd probe` builds every context first and frees the encoders before the denoiser samples: a full-size
    model's encoders and transformer do not fit in memory together. The scores must not change."""
    pairs = carried_pairs(2)
    kept = probe(tiny_random_adapter(0, teacher_context="reference"), pairs, seeds=(0, 1), scorer=PixelScorer())
    adapter = tiny_random_adapter(0, teacher_context="reference")
    freed = probe(adapter, pairs, seeds=(0, 1), scorer=PixelScorer(), release_encoders=True, batch_size=1)
    assert adapter.encoder is None
    for a, b in zip(kept.pairs, freed.pairs):
        assert a.student_distance == pytest.approx(b.student_distance, abs=1e-6)
        assert a.teacher_distance == pytest.approx(b.teacher_distance, abs=1e-6)

"""`dopsd caption` on the tiny random Qwen3-VL: captions for uncaptioned images, written beside them, greedily.

A random model answers with gibberish tokens; what is checked is the plumbing: the image reaches the model,
the answer is decoded to one line of text, existing captions stay unless --overwrite, and reruns agree.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image
from tiny_encoders import build_dinov2, build_qwen3_vl

from dopsd import cli
from dopsd.data.scan import scan_folder
from dopsd.tools.caption import CaptionInputError, plan_captions

COLOURS = ("red", "blue", "green")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory) -> Path:
    return build_qwen3_vl(tmp_path_factory.mktemp("caption") / "vl")


def images(folder: Path, captioned: dict[str, str] | None = None) -> Path:
    """Three plain images of different colours; `captioned` maps image stems to captions written beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, colour in enumerate(COLOURS):
        Image.new("RGB", (48, 40), colour).save(folder / f"img{i}.png")
    for stem, text in (captioned or {}).items():
        (folder / f"{stem}.txt").write_text(text)
    return folder


def caption(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["caption", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def texts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))}


def test_uncaptioned_images_get_captions_and_existing_ones_are_kept(vlm, tmp_path, capsys):
    data = images(tmp_path / "data", {"img2": "my own caption\n"})
    mine = (data / "img2.txt").stat().st_mtime_ns
    code, out, err = caption(capsys, data, "--vlm", vlm, "--max-new-tokens", "8")
    assert code == 0, err
    written = texts(data)
    assert sorted(written) == ["img0.txt", "img1.txt", "img2.txt"]
    assert written["img2.txt"] == "my own caption\n" and (data / "img2.txt").stat().st_mtime_ns == mine
    for name in ("img0.txt", "img1.txt"):
        text = written[name]
        assert text.endswith("\n") and text.count("\n") == 1 and text.strip(), repr(text)  # one caption line
        assert "<|" not in text  # decoded words, not the prompt's special tokens
        assert f"{name}: {text.strip()}" in out  # shown as written, to be read and edited
    assert written["img0.txt"] != written["img1.txt"]  # a red and a blue image: the picture reaches the model
    assert "wrote 2 caption(s), kept 1 existing" in out
    assert not list(data.glob(".*.tmp"))  # atomic writes leave no temporary files
    problems: list[str] = []  # the folder now reads as a dataset with one caption per image
    rows = scan_folder(data, problems, [])
    assert not problems and [(r.name, len(r.captions or [])) for r in rows] == [(f"img{i}.png", 1) for i in range(3)]


def test_same_run_twice_gives_the_same_captions_and_overwrite_replaces(vlm, tmp_path, capsys):
    first, second = images(tmp_path / "a"), images(tmp_path / "b")
    for folder in (first, second):
        code, _, err = caption(capsys, folder, "--vlm", vlm, "--max-new-tokens", "8")
        assert code == 0, err
    assert texts(first) == texts(second) and len(texts(first)) == 3  # greedy decoding: reruns agree

    (first / "img0.txt").write_text("edited by hand\n")
    code, out, _ = caption(capsys, first, "--vlm", vlm, "--max-new-tokens", "8")
    assert code == 0 and "wrote 0 caption(s), kept 3 existing" in out and "--overwrite" in out
    assert (first / "img0.txt").read_text() == "edited by hand\n"

    code, out, _ = caption(capsys, first, "--vlm", vlm, "--max-new-tokens", "8", "--overwrite", "--trigger-word", "sks")
    assert code == 0 and "wrote 3 caption(s), kept 0 existing" in out
    replaced = texts(first)
    assert all(text.startswith("sks ") for text in replaced.values()), replaced
    assert {k: v.removeprefix("sks ") for k, v in replaced.items()} == texts(second)


def test_a_caption_cut_at_the_token_limit_is_named(vlm, tmp_path, capsys):
    data = images(tmp_path / "data")
    code, out, _ = caption(capsys, data, "--vlm", vlm, "--max-new-tokens", "2")
    assert code == 0
    assert len(texts(data)) == 3
    # the random model does not end its answer within 2 tokens (it ends one in about 400): all three are named
    assert "3 caption(s) stopped at --max-new-tokens before their end (img0.txt, img1.txt, img2.txt)" in out, out


def _bad(capsys, *argv) -> str:
    code, out, err = caption(capsys, *argv)
    assert code == 2 and "Traceback" not in err and "internal error" not in err, err
    return err


def test_bad_inputs_are_refused_before_the_model_loads(vlm, tmp_path, capsys):
    err = _bad(capsys, tmp_path / "nowhere", "--vlm", vlm)
    assert "nowhere does not exist" in err and "dataset folder" in err

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no images here")
    err = _bad(capsys, tmp_path / "empty", "--vlm", vlm)
    assert "empty holds no images" in err

    data = images(tmp_path / "data")
    err = _bad(capsys, data, "--vlm", tmp_path / "no-vlm")
    assert "--vlm" in err and "no-vlm does not exist" in err

    dino = build_dinov2(tmp_path / "dino")
    err = _bad(capsys, data, "--vlm", dino)
    assert "--vlm" in err and "'dinov2'" in err and "Qwen3-VL" in err

    err = _bad(capsys, data, "--vlm", vlm, "--trigger-word", "  ")
    assert "--trigger-word is blank" in err

    (data / "img1.png").write_bytes(b"not a png")
    err = _bad(capsys, data, "--vlm", vlm)
    assert "img1.png" in err and "cannot be read" in err

    (data / "img1.png").unlink()
    (data / "metadata.jsonl").write_text('{"file_name": "img0.png", "text": "a red square"}\n')
    err = _bad(capsys, data, "--vlm", vlm)
    assert "metadata.jsonl" in err
    assert not list(data.glob("*.txt"))  # nothing was written by any refused run


def test_images_sharing_a_caption_name_are_refused(vlm, tmp_path):
    data = images(tmp_path / "data")
    shutil.copy(data / "img0.png", data / "img0.jpg")
    with pytest.raises(CaptionInputError, match=r"img0\.jpg, img0\.png"):
        plan_captions(data, vlm)

"""The dataset check beyond single images: captions (placeholder, trigger, each family's caption hook), prompts,
text encodings, folder layouts, and the one summary of what training does to the data, printed once."""

import codecs
import json
import os

import numpy as np
import pytest
from conftest import save_tiny_mini
from PIL import Image

from dopsd import cli
from dopsd.config import load_config
from dopsd.data.dataset import DatasetError, apply_trigger, check_dataset, load_dataset
from dopsd.data.image_files import detail_lost
from dopsd.errors import PromptError
from dopsd.mini.adapter import tiny_random_adapter
from dopsd.models.local import ModelFolderError, chat_token_counts, chat_tokens
from dopsd.models.registry import FAMILIES, caption_problems, family_module


def png(path, size=(24, 24), seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def cfg(path, *overrides, preset="mini"):
    return load_config(preset, [f"data.path={path}", *overrides])


def pairs(folder, captions, size=(24, 24)):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(captions):
        png(folder / f"img{i}.png", size, seed=i)
        (folder / f"img{i}.txt").write_text(text)
    return folder


# --- captions through the family hook ----------------------------------------------------------------------


def test_every_bad_miniature_caption_is_listed_with_file_line_and_closest_words(tmp_path):
    data = pairs(
        tmp_path / "data",
        [
            "a red circle\na red squre on a grey background",
            "a sks kitty",
            "a red circle on a gray background on a navy background",
        ],
    )
    (data / "img3.png").write_bytes((data / "img0.png").read_bytes())
    (data / "img3.txt").write_text("a sks kitty\n")  # the same bad caption in a second file: one line, both places
    c = cfg(data, f"train.output_dir={tmp_path / 'run'}")
    with pytest.raises(DatasetError) as err:
        load_dataset(c.data, c.model)
    text = str(err.value)
    assert (
        '"a red squre on a grey background" (img0.txt line 2): uses words outside the miniature world\'s '
        "vocabulary: 'squre' (closest: square); 'grey' (closest: gray, green)"
    ) in text
    assert '"a sks kitty" (img1.txt line 1, img3.txt line 1)' in text and "'kitty' (no close word)" in text
    assert "(img2.txt line 1): has 11 words; the miniature world allows 8" in text
    assert len(err.value.problems) == 3 and text.count("the miniature's words: a an on") == 1
    assert cli.main(["train", "mini", f"data.path={data}", f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert not (tmp_path / "run").exists()  # found before anything started, not in feature building


def test_metadata_captions_are_checked_by_line_and_list_position(tmp_path):
    png(tmp_path / "x.png")
    rows = [{"file_name": "x.png", "text": ["a red circle", "a red dog"]}]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DatasetError, match=r'"a red dog" \(metadata.jsonl line 1 caption 2 \(x.png\)\).*\'dog\''):
        load_dataset(cfg(tmp_path).data, cfg(tmp_path).model)


def test_every_family_declares_the_hooks():
    for family in FAMILIES:
        module = family_module(family)
        assert callable(module.load) and callable(module.caption_problems), family


@pytest.fixture(scope="module")
def real_folders(tmp_path_factory):
    from tiny_real import build_flux2, build_zimage

    root = tmp_path_factory.mktemp("real")
    return {"zimage-turbo": build_zimage(root / "zi"), "flux2-klein-4b": build_flux2(root / "fl")}


@pytest.mark.parametrize("preset, thinking", [("zimage-turbo", True), ("flux2-klein-4b", False)])
def test_real_families_count_tokens_like_the_encoder_and_report_cut_captions_as_notices(
    tmp_path, real_folders, preset, thinking
):
    from transformers import AutoTokenizer

    folder = real_folders[preset]
    short, long = "a red cat", " ".join(["a photo of a red cat on a mat"] * 8)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
    counts = chat_token_counts(tokenizer, [short, long], thinking)
    _, mask = chat_tokens(tokenizer, [short, long], 4096, thinking, "cpu")
    assert counts == mask.sum(1).tolist()  # the very count the encoder sees before its cut
    c = cfg(
        pairs(tmp_path / "data", [short, long]),
        f"model.pretrained={folder}",
        "model.max_caption_tokens=40",
        "model.height=32",
        "model.width=32",
        "data.trigger_word=null",
        preset=preset,
    )
    found = caption_problems(c.model, [short, long])
    assert [p.index for p in found if p.index is not None] == [1] and all(p.notice for p in found)
    report = check_dataset(c.data, c.model)  # a cut caption is said, not refused
    note = next(n for n in report.notes if "will not be read whole" in n)
    assert f"(img1.txt line 1): {counts[1]} tokens with the chat template" in note and "first 40" in note
    bad = cfg(tmp_path / "data", "model.pretrained=/nowhere", "model.height=32", "model.width=32", preset=preset)
    with pytest.raises(ModelFolderError, match="/nowhere"):
        check_dataset(bad.data, bad.model)


def test_flux2_says_when_the_teacher_instruction_is_cut(real_folders):
    c = load_config(
        "flux2-klein-4b", [f"model.pretrained={real_folders['flux2-klein-4b']}", "model.max_caption_tokens=40"]
    )
    found = caption_problems(c.model, ["a red cat", "a photo of a red cat on a mat " * 2])
    assert any(p.index == 1 and "teacher loses the end of the instruction" in p.message for p in found)
    assert not any(p.index == 0 for p in found)


# --- prompts -----------------------------------------------------------------------------------------------


def test_unreadable_prompts_raise_one_prompt_error_naming_each(tmp_path, capsys):
    adapter = tiny_random_adapter()
    with pytest.raises(PromptError) as err:
        adapter.student_contexts(["a red circle", "a photo of sks on a beach", "a blu square"])
    text = str(err.value)
    assert "2 prompt(s)" in text and "'a photo of sks on a beach'" in text and "'beach' (closest: black)" in text
    assert "'blu' (closest: blue)" in text and "the miniature's words:" in text
    with pytest.raises(PromptError):
        adapter.teacher_contexts(["a kitty"], [Image.new("RGB", (24, 24))])
    model = save_tiny_mini(tmp_path / "mini")
    code = cli.main(
        [
            "sample",
            "mini",
            f"model.pretrained={model}",
            "--prompt",
            "a cute kitty",
            "--seeds",
            "0",
            "--out",
            str(tmp_path / "s.png"),
        ]
    )
    err_text = capsys.readouterr().err
    assert code == 2 and "'kitty' (no close word)" in err_text
    assert "internal error" not in err_text and "Traceback" not in err_text and not (tmp_path / "s.png").exists()


# --- the summary of what loading does -----------------------------------------------------------------------


def test_the_summary_says_once_what_is_downscaled_cropped_and_upscaled(tmp_path):
    png(tmp_path / "big.png", (512, 512))
    png(tmp_path / "huge.jpg", (1024, 768))
    png(tmp_path / "wide.png", (96, 48))
    png(tmp_path / "small.png", (16, 16))
    png(tmp_path / "exact.png", (24, 24))
    for name in ("big", "huge", "wide", "small", "exact"):
        (tmp_path / f"{name}.txt").write_text("a sks circle")
    report = check_dataset(cfg(tmp_path).data, cfg(tmp_path).model)
    notes = report.notes
    assert "3 of 5 images are downscaled to 24×24: from 96×48 … 1024×768 (up to 32.0× smaller per side)" in notes
    assert "1 of 5 images are upscaled to 24×24: from 16×16 (up to 1.5× larger per side)" in " ".join(notes)
    crop = next(n for n in notes if "centre-cropped" in n)
    assert crop.startswith("2 of 5 images are centre-cropped") and "up to 50% (wide.png, 96×48)" in crop
    grain = next(n for n in notes if "is tiny" in n)
    assert f"loses {detail_lost(24, 24, 16):.0%} of its variance" in grain and "at exactly 24×24" in grain
    assert "40%" in grain  # measured on the miniature's renders too (test_image_files)
    summary = report.summary()
    assert summary.startswith(f"dataset {tmp_path}: 5 images (4 PNG, 1 JPEG), 5 captions.")
    assert summary.count("downscaled") == 1 and "exact.png" not in summary


def test_data_already_at_the_training_size_is_used_as_it_is(tmp_path):
    pairs(tmp_path, ["a red circle", "a sks square"])
    assert check_dataset(cfg(tmp_path).data, cfg(tmp_path).model).summary().endswith("2 captions; used as they are")


def test_train_and_probe_print_the_summary_once_before_they_start(tmp_path, capsys):
    data = pairs(tmp_path / "data", ["a sks circle", "a sks square"], size=(48, 48))
    model = save_tiny_mini(tmp_path / "mini")
    common = [f"model.pretrained={model}", "model.teacher_context=reference"]
    assert (
        cli.main(
            [
                "train",
                "mini",
                f"data.path={data}",
                *common,
                f"train.output_dir={tmp_path / 'run'}",
                "train.max_steps=1",
                "sample.every=0",
                "sample.control_steps=0",
                "sample.health=false",
                "log.progress=false",
                "log.tensorboard=false",
                f"cache.dir={tmp_path / 'cache'}",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("2 of 2 images are downscaled to 24×24: from 48×48") == 1
    assert out.index("What training will do") < out.index("trained:")
    assert (
        cli.main(
            [
                "probe",
                "mini",
                f"data.path={data}",
                *common,
                "--seeds",
                "1",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "probe"),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("2 of 2 images are downscaled to 24×24") == 1 and out.index("dataset") < out.index("teacher probe")


# --- text files, trigger words, layouts ---------------------------------------------------------------------


def test_byte_order_marks_are_dropped_and_other_encodings_refused_by_name(tmp_path):
    meta = tmp_path / "meta"
    meta.mkdir()
    png(meta / "x.png")
    (meta / "metadata.jsonl").write_bytes(codecs.BOM_UTF8 + b'{"file_name": "x.png", "text": "a red circle"}\n')
    assert [e.captions for e in load_dataset(cfg(meta).data, cfg(meta).model)] == [["a red circle"]]
    folder = pairs(tmp_path / "folder", ["a red circle", "x", "x"])
    (folder / "img0.txt").write_bytes(codecs.BOM_UTF8 + b"a red circle\r\n")
    (folder / "img1.txt").write_bytes("a red circle".encode("utf-16"))
    (folder / "img2.txt").write_bytes("a red circle café".encode("latin-1"))
    with pytest.raises(DatasetError) as err:
        load_dataset(cfg(folder).data, cfg(folder).model)
    text = str(err.value)
    assert "img1.txt: caption is UTF-16 (or UTF-32) text; save it as UTF-8" in text
    assert "img2.txt: caption is not UTF-8 text (byte 0xe9 at offset 16)" in text and len(err.value.problems) == 2
    (folder / "img1.txt").write_text("a red circle")
    (folder / "img2.txt").write_text("a red circle")
    assert load_dataset(cfg(folder).data, cfg(folder).model)[0].captions == ["a red circle"]  # no U+FEFF kept
    (meta / "metadata.jsonl").write_bytes('{"file_name": "x.png", "text": "a"}'.encode("utf-16"))
    with pytest.raises(DatasetError, match="metadata.jsonl is UTF-16"):
        load_dataset(cfg(meta).data, cfg(meta).model)


def test_trigger_words_match_whole_words_and_phrases():
    c = load_config("zimage-turbo", ["data.trigger_word=' ohwx   man '"]).data
    assert apply_trigger("ohwx man, smiling", c) == "ohwx man, smiling"
    assert apply_trigger("a photo of [V] on a beach", c) == "a photo of ohwx man on a beach"
    assert apply_trigger("a man", c) == "ohwx man a man"
    c = load_config("zimage-turbo", ["data.trigger_word=ohwx"]).data
    assert apply_trigger("ohwx, a dog", c) == "ohwx, a dog" and apply_trigger("ohwxy dog", c) == "ohwx ohwxy dog"


def test_placeholder_and_trigger_word_rules_are_said(tmp_path, real_folders):
    data = pairs(tmp_path, ["a [V] teapot", "[V]", "a red teapot"], size=(32, 32))
    real = [f"model.pretrained={real_folders['zimage-turbo']}", "model.height=32", "model.width=32"]
    notes = " ".join(
        check_dataset(cfg(data, *real, preset="zimage-turbo").data, cfg(data, *real, preset="zimage-turbo").model).notes
    )
    assert (
        "2 caption(s) use the placeholder '[V]' as a word of their own, since data.trigger_word is not set "
        "(img0.txt line 1, img1.txt line 1)" in notes
    )
    assert "1 caption(s) are only the concept's word '[V]' (img1.txt line 1)" in notes
    c = cfg(data, *real, "data.trigger_word=ohwx", preset="zimage-turbo")
    notes = " ".join(check_dataset(c.data, c.model).notes)
    assert "as a word of their own" not in notes and "only the concept's word 'ohwx' (img1.txt line 1)" in notes
    c = cfg(data, *real, "data.trigger_word=' '", preset="zimage-turbo")
    with pytest.raises(DatasetError, match=r"data.trigger_word is blank \(' '\): set a word, or null for none"):
        load_dataset(c.data, c.model)


def test_links_hidden_files_and_unread_types_are_reported(tmp_path):
    data = pairs(tmp_path / "data", ["a red circle", "a red circle"])
    os.symlink(tmp_path / "missing.png", data / "gone.png")
    (data / "gone.txt").write_text("a red circle")
    outside = pairs(tmp_path / "elsewhere", ["a blue square"])
    os.symlink(outside / "img0.png", data / "linked.png")
    (data / "linked.txt").write_text("a blue square")
    (data / "._img0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (data / "photo.heic").write_bytes(b"not read")
    (data / "photo.txt").write_text("a red circle")
    (data / "spare.txt").write_text("a red circle")
    with pytest.raises(DatasetError) as err:
        load_dataset(cfg(data).data, cfg(data).model)
    text = str(err.value)
    assert f"gone.png: broken symbolic link (to {tmp_path / 'missing.png'})" in text
    assert "photo.heic: has the caption photo.txt, but .heic files are not images dopsd reads" in text
    assert len(err.value.problems) == 2 and "._img0" not in text
    (data / "gone.png").unlink()
    (data / "photo.txt").unlink()
    report = check_dataset(cfg(data).data, cfg(data).model)
    assert [e.name for e in report.examples] == ["img0.png", "img1.png", "linked.png"]
    joined = " ".join(report.notes)
    assert "skipped 1 hidden file(s) (._img0.png)" in joined and "nor captions: photo.heic" in joined
    assert "have no image beside them and are unused: gone.txt, spare.txt" in joined


def test_data_path_mistakes_and_subfolder_layouts_get_a_direct_message(tmp_path):
    data = pairs(tmp_path / "data", ["a red circle"])
    (data / "metadata.jsonl").write_text('{"file_name": "img0.png", "caption": "a red circle"}\n')
    for path, expected in (
        (data / "metadata.jsonl", "is the metadata.jsonl file itself"),
        (data / "img0.png", "data.path is one image"),
        (data / "img0.txt", "is a file"),
        (tmp_path / "nope", "does not exist"),
    ):
        with pytest.raises(DatasetError, match=expected):
            load_dataset(cfg(path).data, cfg(path).model)
    with pytest.raises(DatasetError, match=r'no "text" field \(found "caption": rename it to "text"'):
        load_dataset(cfg(data).data, cfg(data).model)
    (data / "metadata.jsonl").unlink()
    kohya = tmp_path / "kohya"
    pairs(kohya / "10_sks", ["a sks circle", "a sks square"])
    with pytest.raises(DatasetError, match=r"no images in .*kohya itself, but its subfolders hold some \(10_sks/ \(2 "):
        load_dataset(cfg(kohya).data, cfg(kohya).model)

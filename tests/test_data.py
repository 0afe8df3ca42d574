"""Datasets: both layouts, several captions, trigger words, buckets, data order; whole-dataset validation."""

import io
import json

import numpy as np
import pytest
from PIL import Image

import dopsd
from dopsd import cli
from dopsd.config import load_config
from dopsd.data.dataset import BatchOrder, DatasetError, apply_trigger, bucket_sizes, choose_bucket, load_dataset


def png(path, size=(32, 32), colour=(200, 30, 30)):
    Image.new("RGB", size, colour).save(path)


def cfg(path, *overrides):
    return load_config("mini", [f"data.path={path}", *overrides])


def test_folder_with_multiline_captions_and_trigger(tmp_path):
    png(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a [V] circle\n\n a [V] circle on a gray background \n")
    png(tmp_path / "b.jpg", (40, 30))
    (tmp_path / "b.txt").write_text("a square")
    (tmp_path / "notes.md").write_text("ignored")
    c = cfg(tmp_path, "data.trigger_word=sks")
    examples = load_dataset(c.data, c.model)
    assert [e.name for e in examples] == ["a.png", "b.jpg"]
    assert examples[0].captions == ["a sks circle", "a sks circle on a gray background"]
    assert examples[1].captions == ["sks a square"]  # no placeholder: the trigger word is prepended
    assert examples[0].bucket == (24, 24) and examples[1].size == (40, 30)
    assert len({e.digest for e in examples}) == 2


def test_metadata_jsonl_with_list_text(tmp_path):
    png(tmp_path / "x.png")
    png(tmp_path / "y.png", colour=(0, 0, 255))
    rows = [
        {"file_name": "x.png", "text": ["a red circle", "a red circle on a navy background"]},
        {"file_name": "y.png", "text": "a blue square"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    c = cfg(tmp_path)
    examples = load_dataset(c.data, c.model)
    assert [e.captions for e in examples] == [["a red circle", "a red circle on a navy background"], ["a blue square"]]


def test_every_bad_file_is_reported_in_one_message_and_nothing_starts(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    png(data / "good.png")
    (data / "good.txt").write_text("a red circle")
    (data / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (data / "corrupt.txt").write_text("a red circle")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (data / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (data / "truncated.txt").write_text("a red circle")
    png(data / "nocaption.png")
    png(data / "empty.png")
    (data / "empty.txt").write_text("  \n")
    png(data / "tiny.png", (8, 8))
    (data / "tiny.txt").write_text("a red circle")
    png(data / "twin.png")
    png(data / "twin.jpg")
    (data / "twin.txt").write_text("a red circle")
    c = cfg(data, f"train.output_dir={tmp_path / 'run'}", f"cache.dir={tmp_path / 'cache'}")
    with pytest.raises(DatasetError) as err:
        dopsd.train(c)
    message = str(err.value)
    for expected in (
        "corrupt.png: cannot read image",
        "truncated.png: cannot read image",
        "nocaption.png: missing caption file nocaption.txt",
        "empty.txt: caption file is empty",
        "tiny.png: 8×8 is smaller than the minimum side 12",
        "duplicate name: twin.jpg, twin.png",
    ):
        assert expected in message
    assert len(err.value.problems) == 6 and "good.png" not in message
    assert "nothing was started" in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "cache").exists()  # nothing was started
    assert cli.main(["train", "mini", f"data.path={data}", f"train.output_dir={tmp_path / 'run'}"]) == 2
    assert "6 problem(s)" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_metadata_problems_are_collected(tmp_path):
    png(tmp_path / "x.png")
    lines = [
        '{"file_name": "x.png", "text": "a red circle"}',
        "{broken json",
        '{"file_name": "gone.png", "text": "a"}',
        '{"file_name": "x.png", "text": "again"}',
        '{"text": "no file name"}',
        '{"file_name": "x.png"}',
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    c = cfg(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_dataset(c.data, c.model)
    text = str(err.value)
    assert "line 2: not valid JSON" in text and "gone.png: listed in metadata.jsonl but the file does not exist" in text
    assert "duplicate name: x.png appears on lines 1 and 4" in text and 'line 5: needs a string "file_name"' in text
    assert "x.png appears on lines 1 and 6" in text  # a second repeat is reported too
    assert len(err.value.problems) == 5


def test_empty_or_missing_folder(tmp_path):
    c = cfg(tmp_path)
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(c.data, c.model)
    c = cfg(tmp_path / "nope")
    with pytest.raises(DatasetError, match="is not a folder"):
        load_dataset(c.data, c.model)


def test_editing_sources_are_required(tmp_path):
    data, src = tmp_path / "data", tmp_path / "src"
    data.mkdir(), src.mkdir()
    for name in ("a", "b"):
        png(data / f"{name}.png")
        (data / f"{name}.txt").write_text("a red circle")  # the miniature reads only its own words
    png(src / "a_0.png")
    png(src / "a_1.png")
    c = load_config("mini", [f"data.path={data}", "model.editing=true", f"data.source_dir={src}"])
    with pytest.raises(DatasetError, match="b.png: no source image"):
        load_dataset(c.data, c.model)
    png(src / "b.png")
    examples = load_dataset(c.data, c.model)
    assert [[s.name for s in e.sources] for e in examples] == [["a_0.png", "a_1.png"], ["b.png"]]


def test_trigger_word_rules():
    c = load_config("mini", ["data.trigger_word=sks"]).data
    assert apply_trigger("photo of [V] dog", c) == "photo of sks dog"
    assert apply_trigger("a sks dog", c) == "a sks dog"
    assert apply_trigger("a dog", c) == "sks a dog"
    assert apply_trigger(" a dog ", load_config("mini").data) == "a dog"


def test_buckets_keep_the_area_and_follow_the_aspect_ratio():
    buckets = bucket_sizes(1024, 1024, 64)
    assert (1024, 1024) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and 0.5 <= w / h <= 2.0
        assert abs(h * w - 1024 * 1024) / (1024 * 1024) < 0.15
    wide = choose_bucket((1600, 900), buckets)
    tall = choose_bucket((900, 1600), buckets)
    assert wide[1] > wide[0] and tall[0] > tall[1] and choose_bucket((500, 500), buckets) == (1024, 1024)


def test_bucketed_dataset_and_batch_order(tmp_path):
    for i, size in enumerate([(64, 64), (64, 64), (64, 64), (128, 64), (128, 64)]):
        png(tmp_path / f"{i}.png", size)
        (tmp_path / f"{i}.txt").write_text("a red circle")
    c = load_config("mini", [f"data.path={tmp_path}", "data.buckets=true", "model.height=64", "model.width=64"])
    examples = load_dataset(c.data, c.model)
    assert [e.bucket for e in examples] == [(64, 64)] * 3 + [(48, 96)] * 2  # (h, w): 128×64 images go wide
    order = BatchOrder(examples, seed=3)
    seen = [order.next(step, 2) for step in range(12)]
    for batch in seen:  # a batch never mixes buckets
        assert len({examples[i].bucket for i in batch}) == 1
    counts = np.bincount([i for b in seen for i in b], minlength=5)
    assert counts.min() >= 2  # every image is visited, epoch after epoch
    state = order.state_dict()
    again = BatchOrder(examples, seed=3)
    again.load_state_dict(state)
    assert [again.next(s, 2) for s in range(12, 16)] == [order.next(s, 2) for s in range(12, 16)]


def test_one_bucket_epochs_are_permutations(tmp_path):
    for i in range(5):
        png(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text("a red circle")
    c = cfg(tmp_path)
    order = BatchOrder(load_dataset(c.data, c.model), seed=0)
    stream = [i for step in range(5) for i in order.next(step, 2)]
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))
    assert stream[:5] != stream[5:10]  # a new permutation each epoch

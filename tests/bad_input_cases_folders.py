"""Bad-input cases of the folders a command reads: the dataset, the model folder and the run folder; rows of
docs/bad-inputs.md after the config's (tests/bad_input_cases.py joins the groups in the table's order)."""

from __future__ import annotations

from bad_input_setups import SAMPLE, TRAIN, Z, both, image, metadata, raw, remove, text, truncate
from bad_inputs import Case, own

FOLDER_CASES: list[Case] = [
    # --- dataset ----------------------------------------------------------------------------------------
    Case("dataset", "data.path not set", "train mini", ("data.path",)),
    Case("dataset", "data.path missing", "train mini data.path=nowhere", ("nowhere", "not a folder"), subprocess=True),
    Case(
        "dataset",
        "data.path is a file",
        "train mini data.path=notes.txt",
        ("notes.txt", "data.path", "is a file"),
        text("notes.txt", "hello"),
    ),
    Case("dataset", "empty folder", "train mini data.path=empty", ("empty", "no images"), text("empty/.keep", "")),
    Case("dataset", "missing caption", TRAIN, ("img00.png", "img00.txt"), remove("data/img00.txt")),
    Case("dataset", "empty caption", TRAIN, ("img01.txt", "empty"), text("data/img01.txt", "\n\n")),
    Case("dataset", "caption not UTF-8", TRAIN, ("img01.txt", "UTF-8"), raw("data/img01.txt", b"\xff\xfe red")),
    Case("dataset", "corrupt image", TRAIN, ("img02.png",), raw("data/img02.png", b"not an image at all")),
    Case("dataset", "truncated image", TRAIN, ("img02.png",), truncate("data/img02.png", 0.5)),
    Case("dataset", "zero-byte image", TRAIN, ("img03.png",), raw("data/img03.png", b"")),
    Case("dataset", "image too small", TRAIN, ("small.png", "data.min_size"), image("data/small.png", (8, 8))),
    Case("dataset", "duplicate names", TRAIN, ("img00.jpg", "img00.png", "duplicate"), image("data/img00.jpg")),
    Case(
        "dataset",
        "every problem at once",
        TRAIN,
        ("img00.txt", "img02.png", "small.png"),
        both(remove("data/img00.txt"), raw("data/img02.png", b"junk"), image("data/small.png", (8, 8))),
    ),
    Case(
        "dataset",
        "metadata.jsonl: invalid JSON",
        "train mini data.path=meta",
        ("metadata.jsonl line 2", "JSON"),
        metadata(['{"file_name": "a.png", "text": "a red circle"}', '{"file_name": "b.png", "text": ']),
    ),
    Case(
        "dataset",
        "metadata.jsonl: no file_name",
        "train mini data.path=meta",
        ("metadata.jsonl line 1", "file_name"),
        metadata(['{"text": "a red circle"}']),
    ),
    Case(
        "dataset",
        "metadata.jsonl: listed file missing",
        "train mini data.path=meta",
        ("c.png", "does not exist"),
        metadata(['{"file_name": "c.png", "text": "a red circle"}']),
    ),
    Case(
        "dataset",
        "metadata.jsonl: text not a string",
        "train mini data.path=meta",
        ("a.png", '"text"'),
        metadata(['{"file_name": "a.png", "text": 5}']),
    ),
    Case(
        "dataset",
        "metadata.jsonl: duplicate file",
        "train mini data.path=meta",
        ("a.png", "duplicate"),
        metadata(['{"file_name": "a.png", "text": "a red circle"}', '{"file_name": "a.png", "text": "a red square"}']),
    ),
    Case(
        "dataset",
        "editing: source folder missing",
        "train flux2-klein-4b data.path=data model.editing=true data.source_dir=sources model.height=24 "
        "model.width=24 data.buckets=false",
        ("sources", "data.source_dir"),
    ),
    Case(
        "dataset",
        "editing: pairs of one batch with different numbers of sources",
        "train flux2-klein-4b data.path=data model.editing=true data.source_dir=sources model.height=24 "
        "model.width=24 data.buckets=false train.batch_size=2",
        ("img02.png", "2 source(s)", "train.batch_size=1"),
        both(*(image(f"sources/{n}.png", caption=None) for n in ("img00", "img01", "img02_0", "img02_1", "img03"))),
    ),
    # --- model folders ----------------------------------------------------------------------------------
    Case("model folder", "not set", "sample zimage-turbo --prompt 'a cat'", ("model.pretrained", "not set")),
    Case(
        "model folder",
        "missing",
        "sample zimage-turbo model.pretrained=nowhere --prompt 'a cat'",
        ("model.pretrained", "nowhere"),
        subprocess=True,
    ),
    Case(
        "model folder",
        "not a diffusers folder",
        "sample zimage-turbo model.pretrained=data --prompt 'a cat'",
        ("model.pretrained", "data", "model_index.json"),
    ),
    Case(
        "model folder",
        "incomplete",
        f"sample zimage-turbo {Z} --prompt 'a cat'",
        ("zimage", "vae/"),
        remove("zimage/vae", own_asset="zimage"),
    ),
    Case(
        "model folder",
        "wrong family",
        "sample flux2-klein-4b model.pretrained=zimage --prompt 'a cat'",
        ("zimage", "ZImagePipeline", "flux2"),
    ),
    Case(
        "model folder",
        "diffusers folder for the miniature",
        f"{SAMPLE} model.pretrained=zimage",
        ("model.pretrained", "zimage", "model.family"),
    ),
    Case(
        "model folder",
        "invalid model_index.json",
        f"sample zimage-turbo {Z} --prompt 'a cat'",
        ("zimage/model_index.json", "JSON"),
        both(lambda w, a: own(w, a, "zimage"), text("zimage/model_index.json", "{")),
    ),
    Case(
        "model folder",
        "truncated transformer weights",
        f"sample zimage-turbo {Z} --prompt 'a cat'",
        ("zimage/transformer/diffusion_pytorch_model.safetensors", "truncated"),
        truncate("zimage/transformer/diffusion_pytorch_model.safetensors", 0.5, own_asset="zimage"),
    ),
    Case(
        "model folder",
        "zero-byte text encoder weights",
        f"sample zimage-turbo {Z} --prompt 'a cat'",
        ("zimage/text_encoder/model.safetensors",),
        truncate("zimage/text_encoder/model.safetensors", 0.0, own_asset="zimage"),
    ),
    Case(
        "model folder",
        "Z-Image VLM teacher folder not set",
        f"train zimage-turbo {Z} data.path=data",
        ("model.teacher_encoder", "not set", "Qwen3-VL"),
    ),
    Case(
        "model folder",
        "Z-Image VLM teacher folder holds another model",
        f"train zimage-turbo {Z} data.path=data model.teacher_encoder=zimage/text_encoder",
        ("model.teacher_encoder", "zimage/text_encoder", "qwen3_vl"),
    ),
    Case(
        "model folder",
        "truncated miniature weights",
        f"{SAMPLE} model.pretrained=tiny",
        ("tiny/turbo.safetensors", "truncated"),
        truncate("tiny/turbo.safetensors", 0.3, own_asset="tiny"),
    ),
    Case(
        "model folder",
        "miniature manifest not JSON",
        f"{SAMPLE} model.pretrained=tiny",
        ("tiny/manifest.json",),
        both(lambda w, a: own(w, a, "tiny"), text("tiny/manifest.json", "{")),
    ),
    # --- run folders --------------------------------------------------------------------------------------
    Case(
        "run folder", "output folder exists", f"{TRAIN} train.output_dir=run", ("run", "--overwrite"), subprocess=True
    ),
    Case(
        "run folder",
        "--resume of a folder that is not a run",
        f"{TRAIN} train.output_dir=data --resume",
        ("data", "run folder"),
    ),
    Case(
        "run folder",
        "--resume without a checkpoint",
        "train run/config.yaml train.output_dir=run --resume",
        ("checkpoint",),
        remove("run/checkpoints"),
    ),
    Case(
        "run folder",
        "--resume with a changed setting",
        "train run/config.yaml train.output_dir=run optim.lr=1 --resume",
        ("optim.lr",),
    ),
]

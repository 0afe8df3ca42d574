"""The bad inputs of tests/test_bad_inputs.py and docs/bad-inputs.md (see tests/bad_inputs.py).

A case is a command run in a fresh folder holding data/, run/ (copies) and tiny/, zimage/, dino/ (links), plus
whatever its setup writes; `expect` lists what the message must name.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

from bad_inputs import Case, Setup, own
from PIL import Image

STEP = "run/checkpoints/step-0000002"


# --- setup helpers: each returns a Setup(case folder, assets folder) --------------------------------------
def text(rel: str, content: str) -> Setup:
    def setup(w: Path, a: Path) -> None:
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_text(content)

    return setup


def raw(rel: str, data: bytes) -> Setup:
    def setup(w: Path, a: Path) -> None:
        (w / rel).parent.mkdir(parents=True, exist_ok=True)
        (w / rel).write_bytes(data)

    return setup


def image(rel: str, size: tuple[int, int] = (24, 24), mode: str = "RGB", caption: str | None = "a red circle") -> Setup:
    def setup(w: Path, a: Path) -> None:
        path = w / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new(mode, size).save(path)
        if caption is not None:
            path.with_suffix(".txt").write_text(caption)

    return setup


def truncate(rel: str, keep: float = 0.5, own_asset: str | None = None) -> Setup:
    """Keep the first `keep` fraction of a file (an asset named by `own_asset` is copied first)."""

    def setup(w: Path, a: Path) -> None:
        if own_asset:
            own(w, a, own_asset)
        data = (w / rel).read_bytes()
        (w / rel).write_bytes(data[: int(len(data) * keep)])

    return setup


def remove(rel: str, own_asset: str | None = None) -> Setup:
    def setup(w: Path, a: Path) -> None:
        import shutil

        if own_asset:
            own(w, a, own_asset)
        target = w / rel
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return setup


def both(*setups: Setup) -> Setup:
    def setup(w: Path, a: Path) -> None:
        for s in setups:
            s(w, a)

    return setup


def metadata(lines: list[str]) -> Setup:
    """A metadata.jsonl dataset `meta/` with two good images and the given lines."""
    return both(
        image("meta/a.png", caption=None),
        image("meta/b.png", caption=None),
        text("meta/metadata.jsonl", "\n".join(lines) + "\n"),
    )


class _Planted:
    """A pickle that, when loaded, creates the file PLANTED: loading it would run someone else's code."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def planted_pickle(w: Path, a: Path) -> None:
    """Every checkpoint in the old pickle format, its optimizer state a pickle that would run code when loaded."""
    for step in (w / "run" / "checkpoints").glob("step-*"):
        (step / "optimizer.safetensors").unlink()
        (step / "optimizer.pt").write_bytes(pickle.dumps(_Planted(w / "PLANTED")))


def truncated_checkpoints(w: Path, a: Path) -> None:
    """Every checkpoint's weights cut in half (a single bad checkpoint is skipped for the one before it)."""
    for file in (w / "run" / "checkpoints").glob("step-*/trainable.safetensors"):
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


_HELD: list = []  # the lock of the case that holds one (released when the next such case starts)


def hold_run_lock(w: Path, a: Path) -> None:
    """Hold the lock of run/ as a training process would (without recording a pid: the message stays the same)."""
    from dopsd import rundir, runlock

    while _HELD:
        _HELD.pop().release()
    (w / "run" / rundir.OWNER_LOCK).write_text("")  # no holder details: the message stays the same on every run
    _HELD.append(runlock.lock_as_owner(w / "run", record=False))


def int32_image(rel: str) -> Setup:
    """A 32-bit integer image whose values exceed 16 bits: no known range to scale it from."""

    def setup(w: Path, a: Path) -> None:
        path = w / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("I", (24, 24), 1_000_000).save(path)
        path.with_suffix(".txt").write_text("a red circle")

    return setup


def lora_config(change: dict) -> Setup:
    def setup(w: Path, a: Path) -> None:
        path = w / "run" / "lora_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **change}))

    return setup


TRAIN = "train mini data.path=data"
SAMPLE = "sample mini --prompt 'a red circle'"
Z = "model.pretrained=zimage model.height=32 model.width=32 model.dtype=float32"
RUNX = "train.output_dir=run2 model.pretrained=tiny train.max_steps=1 log.progress=false"  # fast if it ever runs
PROBE = "probe mini data.path=data model.pretrained=tiny"
EVAL = "eval run --control-steps 0 --seeds 0"

CASES: list[Case] = [
    # --- config -----------------------------------------------------------------------------------------
    Case(
        "config", "unknown key", "train mini optim.lrr=1e-4", ("optim.lrr", "did you mean 'optim.lr'"), subprocess=True
    ),
    Case("config", "unknown section", "train mini optimizer.lr=1e-4", ("optimizer.lr", "optim.lr")),
    Case(
        "config",
        "unknown key in a YAML file",
        "train my.yaml",
        ("train.batch_size",),
        text("my.yaml", "preset: mini\ntrain:\n  batchsize: 4\n"),
    ),
    Case("config", "wrong type", "train mini train.max_steps=many", ("train.max_steps", "many")),
    Case("config", "not one of the choices", "train mini method.name=dops", ("method.name", "'dopsd'")),
    Case("config", "NaN", "train mini optim.lr=nan", ("optim.lr", "nan")),
    Case("config", "infinity", "train mini method.ema_decay=inf", ("method.ema_decay", "inf")),
    Case("config", "negative learning rate", "train mini optim.lr=-1e-4", ("optim.lr", "> 0", "-0.0001")),
    Case("config", "beta of 1", "train mini 'optim.betas=[0.9, 1.0]'", ("optim.betas[1]", "[0, 1)")),
    Case("config", "epsilon 0", "train mini optim.eps=0", ("optim.eps", "> 0")),
    Case("config", "zero steps", "train mini train.max_steps=0", ("train.max_steps", ">= 1")),
    Case("config", "negative seed", "train mini train.seed=-1", ("train.seed", "-1")),
    Case("config", "negative sample seed", "train mini 'sample.seeds=[0, -2]'", ("sample.seeds[1]", "-2")),
    Case("config", "caption dropout 1.5", "train mini data.caption_dropout=1.5", ("data.caption_dropout", "1.5")),
    Case("config", "LoRA dropout 1", "train mini lora.dropout=1", ("lora.dropout", "[0, 1)")),
    Case("config", "zero inference steps", "train mini model.inference_steps=0", ("model.inference_steps", ">= 1")),
    Case(
        "config",
        "roll-out coarser than the schedule",
        "train mini model.inference_steps=4 model.rollout_every=8",
        ("model.rollout_every", "model.inference_steps"),
    ),
    Case(
        "config",
        "prior weight without prompts",
        "train mini method.prior_weight=1",
        ("method.prior_weight", "method.prior_prompts"),
    ),
    Case(
        "config",
        "sample prompt the model cannot read",
        f"{TRAIN} 'sample.prompts=[a red circle, a zebra]'",
        ("sample.prompts[1]", "a zebra"),
    ),
    Case(
        "config",
        "prior prompt the model cannot read",
        f"{TRAIN} method.prior_weight=1 'method.prior_prompts=[a purple llama]'",
        ("method.prior_prompts[0]", "a purple llama"),
    ),
    Case("config", "unknown mixed precision", "train mini train.mixed_precision=fp8", ("train.mixed_precision", "fp8")),
    Case("config", "device other than cpu", "train mini train.device=cuda:0", ("train.device", "CUDA_VISIBLE_DEVICES")),
    Case(
        "config",
        "mistyped FSDP option",
        "train mini 'train.fsdp={sharding_stratgy: FULL_SHARD}'",
        ("train.fsdp.sharding_stratgy", "did you mean 'sharding_strategy'"),
    ),
    Case(
        "config",
        "quantized base with a full fine-tune",
        "train mini model.quantize=int8 lora.enabled=false",
        ("model.quantize", "lora.enabled=true", "model.quantize=none"),
    ),
    Case(
        "config",
        "float8 base on the CPU",
        f"{TRAIN} model.quantize=float8 train.device=cpu",
        ("model.quantize=float8", "CUDA", "compute capability 8.9", "model.quantize=int8"),
    ),
    Case("config", "unknown quantization", "train mini model.quantize=int4", ("model.quantize", "int4", "'nf4'")),
    Case("config", "unknown preset", "train mini-turbo", ("mini-turbo", "preset")),
    Case(
        "config",
        "unknown preset in a YAML file",
        "train my.yaml",
        ("zimage_turbo", "did you mean 'zimage-turbo'"),
        text("my.yaml", "preset: zimage_turbo\n"),
    ),
    Case(
        "config", "invalid YAML", "train my.yaml", ("my.yaml", "not valid YAML"), text("my.yaml", "optim: {lr: 1e-4\n")
    ),
    Case("config", "YAML that is a list", "train my.yaml", ("my.yaml", "mapping"), text("my.yaml", "- preset: mini\n")),
    Case(
        "config",
        "YAML section that is not a mapping",
        "train my.yaml",
        ("my.yaml", "'train'"),
        text("my.yaml", "preset: mini\ntrain: 5\n"),
    ),
    Case("config", "missing config file", "train missing.yaml", ("missing.yaml",)),
    Case("config", "override without =", "train mini optim.lr", ("optim.lr", "section.key=value")),
    Case(
        "config",
        "editing without source images",
        "train flux2-klein-4b model.editing=true",
        ("model.editing", "data.source_dir"),
    ),
    Case(
        "config", "size the miniature cannot render", f"{SAMPLE} model.height=32 model.width=32", ("model.height", "24")
    ),
    Case(
        "config",
        "size Z-Image cannot render",
        f"sample zimage-turbo {Z} model.height=30 --prompt 'a cat'",
        ("30", "model.height"),
    ),
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
    # --- sample -------------------------------------------------------------------------------------------
    Case("sample", "--steps 0", f"{SAMPLE} --steps 0", ("--steps", ">= 1"), subprocess=True),
    Case("sample", "negative --steps", f"{SAMPLE} --steps -2", ("--steps", "-2")),
    Case("sample", "negative seed", f"{SAMPLE} --seeds 0 -1", ("--seeds", "-1")),
    Case("sample", "seed not a number", f"{SAMPLE} --seeds one", ("--seeds", "one")),
    Case("sample", "--lora-scale nan", "sample run --lora-scale nan", ("--lora-scale", "nan")),
    Case("sample", "--lora-scale without a LoRA", f"{SAMPLE} --lora-scale 0.5", ("--lora-scale",)),
    Case("sample", "--out is a folder", f"{SAMPLE} --out data", ("--out", "data", "folder")),
    Case("sample", "--out without an image extension", f"{SAMPLE} --out grid", ("--out", "grid", ".png")),
    Case("sample", "--out exists", f"{SAMPLE} --out data/img00.png", ("data/img00.png", "--overwrite")),
    Case("sample", "--out under a file", f"{SAMPLE} --out data/img00.txt/grid.png", ("data/img00.txt", "not a folder")),
    Case("sample", "--lora missing", f"{SAMPLE} --lora nowhere.safetensors", ("--lora", "nowhere.safetensors")),
    Case("sample", "--lora is a folder", f"{SAMPLE} --lora run", ("--lora", "run", "folder")),
    Case(
        "sample",
        "--lora truncated",
        f"{SAMPLE} --lora run/lora.safetensors",
        ("run/lora.safetensors", "truncated"),
        truncate("run/lora.safetensors", 0.5),
    ),
    Case(
        "sample",
        "--lora not safetensors",
        f"{SAMPLE} --lora notes.safetensors",
        ("notes.safetensors",),
        text("notes.safetensors", "just text"),
    ),
    Case(
        "sample",
        "--lora of another family",
        "sample zimage-turbo model.pretrained=zimage --lora run/lora.safetensors --prompt 'a cat'",
        ("run/lora.safetensors", "'mini'", "'zimage'"),
    ),
    Case(
        "sample",
        "--lora that does not fit the model",
        f"{SAMPLE} --lora run/lora.safetensors",
        ("run/lora.safetensors", "do not fit"),
    ),
    Case(
        "sample",
        "LoRA without rank/alpha",
        "sample run",
        ("run/lora.safetensors", "lora_config.json"),
        text("run/lora_config.json", "{}"),
    ),
    Case(
        "sample",
        "lora_config.json not JSON",
        "sample run",
        ("run/lora_config.json",),
        text("run/lora_config.json", "{"),
    ),
    Case(
        "sample",
        "run folder without weights",
        "sample run",
        ("run", "lora.safetensors"),
        remove("run/lora.safetensors"),
    ),
    Case("sample", "folder that is not a run", "sample data", ("data", "config.yaml")),
    Case(
        "sample", "--lora with --no-lora", "sample run --no-lora --lora run/lora.safetensors", ("--lora", "--no-lora")
    ),
    Case("sample", "unknown --device", f"{SAMPLE} --device gpu", ("--device", "gpu")),
    Case("sample", "no prompts", "sample mini", ("--prompt",)),
    Case("sample", "negative --prompt-index", f"{SAMPLE} --prompt-index -1", ("--prompt-index", "-1")),
    Case("sample", "a repeated seed", f"{SAMPLE} --seeds 3 3", ("--seeds", "3")),
    Case(
        "sample",
        "a sample file exists",
        f"{SAMPLE} --seeds 0 --out grid.png",
        ("grid/p00-a-red-circle-s0.png", "--overwrite"),
        text("grid/p00-a-red-circle-s0.png", "mine"),
    ),
    Case(
        "sample",
        "the samples folder is a file",
        f"{SAMPLE} --out notes.png",
        ("notes", "folder"),
        text("notes", "mine"),
    ),
    # --- probe --------------------------------------------------------------------------------------------
    Case("probe", "--seeds 0", f"{PROBE} --seeds 0", ("--seeds", ">= 1")),
    Case("probe", "--steps 0", f"{PROBE} --steps 0", ("--steps", ">= 1")),
    Case("probe", "--limit 0", f"{PROBE} --limit 0", ("--limit", ">= 1")),
    Case("probe", "--max-fail above 1", f"{PROBE} --max-fail 1.5", ("--max-fail", "[0, 1]")),
    Case("probe", "--weak above --carry", f"{PROBE} --weak 0.5 --carry 0.2", ("--weak", "--carry")),
    Case("probe", "--features missing", f"{PROBE} --features nowhere", ("--features", "nowhere")),
    Case(
        "probe",
        "--features not a feature model",
        f"{PROBE} --features zimage/text_encoder",
        ("--features", "zimage/text_encoder", "qwen3"),
    ),
    Case("probe", "--out is a file", f"{PROBE} --out notes.txt", ("--out", "notes.txt"), text("notes.txt", "mine")),
    Case("probe", "--out holds other files", f"{PROBE} --out data", ("--out", "data", "img00.png")),
    Case("probe", "dataset problem", "probe mini data.path=data", ("img00.txt",), remove("data/img00.txt")),
    # --- eval ---------------------------------------------------------------------------------------------
    Case("eval", "run folder without weights", EVAL, ("run", "lora.safetensors"), remove("run/lora.safetensors")),
    Case("eval", "folder that is not a run", "eval data", ("data", "config.yaml")),
    Case("eval", "negative seed", "eval run --seeds -3", ("--seeds", "-3")),
    Case("eval", "negative --control-steps", "eval run --control-steps -1", ("--control-steps", ">= 0")),
    Case("eval", "--max-prompts 0", "eval run --max-prompts 0", ("--max-prompts", ">= 1")),
    Case("eval", "--feature-model missing", f"{EVAL} --feature-model nowhere", ("--feature-model", "nowhere")),
    Case("eval", "--clip-model without a text tower", f"{EVAL} --clip-model dino", ("--clip-model", "dino", "text")),
    Case("eval", "--out is a file", f"{EVAL} --out notes.txt", ("--out", "notes.txt"), text("notes.txt", "mine")),
    Case("eval", "--out holds other files", f"{EVAL} --out data", ("--out", "data", "img00.png")),
    Case("eval", "nothing to evaluate", "eval mini data.path=data --no-base", ("--no-base",)),
    Case(
        "eval",
        "--lora that does not fit the model",
        "eval mini data.path=data --lora run/lora.safetensors --control-steps 0 --seeds 0 --out ev",
        ("run/lora.safetensors", "do not fit"),
    ),
    Case("eval", "unknown --device", f"{EVAL} --device cuda:7", ("--device", "cuda")),
    # --- run folders (the run-folder part: --overwrite safety, locks, resume, checkpoint format) ----------------
    Case(
        "run folder",
        "output_dir is a file",
        f"{TRAIN} train.output_dir=notes.txt",
        ("notes.txt", "train.output_dir"),
        text("notes.txt", "mine"),
    ),
    Case(
        "run folder",
        "--overwrite of a folder dopsd did not write",
        f"{TRAIN} {RUNX.replace('run2', 'mine')} --overwrite",
        ("mine", "--overwrite"),
        text("mine/thesis.tex", "years of work"),
    ),
    Case("run folder", "--overwrite of the dataset", f"{TRAIN} {RUNX.replace('run2', 'data')} --overwrite", ("data",)),
    Case(
        "run folder",
        "--overwrite of the working folder",
        f"{TRAIN} {RUNX.replace('run2', '.')} --overwrite",
        ("--overwrite",),
    ),
    Case(
        "run folder",
        "locked run",
        "train run/config.yaml train.output_dir=run --resume",
        ("run", "in use"),
        hold_run_lock,
    ),
    Case(
        "run folder",
        "--resume with every checkpoint truncated",
        "train run/config.yaml train.output_dir=run --resume",
        (f"{STEP}/trainable.safetensors",),
        truncated_checkpoints,
    ),
    Case(
        "run folder",
        "--resume from old pickle checkpoints",
        "train run/config.yaml train.output_dir=run --resume",
        (STEP, "pickle"),
        planted_pickle,
    ),
    # --- continual tuning: train.init_from names the run to start from ----------------------------------------
    Case("continual", "init_from missing", f"{TRAIN} {RUNX} train.init_from=nowhere", ("train.init_from", "nowhere")),
    Case(
        "continual",
        "init_from not a dopsd run",
        f"{TRAIN} {RUNX} train.init_from=data",
        ("train.init_from", "data", "not a dopsd run folder"),
    ),
    Case(
        "continual",
        "init_from an unfinished run",
        f"{TRAIN} {RUNX} train.init_from=run",
        ("train.init_from", "run", "not a finished run", "--resume"),
        remove("run/summary.json"),
    ),
    Case(
        "continual",
        "init_from a run of another model",
        f"{TRAIN} {RUNX} model.pretrained=turbo train.init_from=run",
        ("train.init_from", "model.pretrained"),
    ),
    Case(
        "continual",
        "init_from a run of another family",
        f"{TRAIN} {RUNX} model.family=zimage {Z} train.init_from=run",
        ("train.init_from", "model.family", "mini"),
    ),
    Case(
        "continual",
        "init_mode continue with another LoRA rank",
        f"{TRAIN} {RUNX} lora.rank=3 train.init_from=run train.init_mode=continue",
        ("train.init_mode", "lora.rank", "merge"),
    ),
    Case(
        "continual",
        "init_from this run's own folder",
        f"{TRAIN} {RUNX} train.init_from=run2",
        ("train.init_from", "own folder"),
    ),
    # --- dataset (the dataset part: image modes, caption words) ---------------------------------------------
    Case(
        "dataset",
        "caption with unknown words",
        f"{TRAIN} {RUNX}",
        ("img00.txt", "elephant"),
        text("data/img00.txt", "a purple elephant"),
    ),
    Case(
        "dataset",
        "caption with too many words",
        f"{TRAIN} {RUNX}",
        ("img00.txt", "words"),
        text("data/img00.txt", "a red circle on a blue background a red circle on a"),
    ),
    Case("dataset", "32-bit image beyond 16 bits", f"{TRAIN} {RUNX}", ("deep.tif",), int32_image("data/deep.tif")),
    Case("sample", "prompt with unknown words", "sample mini --prompt 'a purple elephant'", ("elephant",)),
    Case(
        "probe",
        "caption with unknown words",
        PROBE,
        ("img00.txt", "elephant"),
        text("data/img00.txt", "a purple elephant"),
    ),
    # --- export (the interchange part) ------------------------------------------------------------------------
    Case("export", "LoRA file missing", "export nowhere.safetensors --out out.safetensors", ("nowhere.safetensors",)),
    Case(
        "export",
        "truncated LoRA",
        "export run/lora.safetensors --out out.safetensors",
        ("run/lora.safetensors",),
        truncate("run/lora.safetensors", 0.5),
    ),
    Case("export", "miniature run", "export run --out out.safetensors", ("run", "mini")),
]


assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"

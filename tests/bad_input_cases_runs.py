"""Bad-input cases of runs and their files: run-folder safety (--overwrite, locks, resume, checkpoint format),
continual tuning (train.init_from), captions and prompts the model cannot read, and export; the last rows of
docs/bad-inputs.md (tests/bad_input_cases.py joins the groups in the table's order)."""

from __future__ import annotations

from bad_input_setups import (
    PROBE,
    RUNX,
    STEP,
    TRAIN,
    Z,
    hold_run_lock,
    int32_image,
    planted_pickle,
    remove,
    text,
    truncate,
    truncated_checkpoints,
)
from bad_inputs import Case

RUN_CASES: list[Case] = [
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
        "--overwrite of a run holding the feature cache",
        f"{TRAIN} {RUNX.replace('run2', 'run')} cache.dir=run/features --overwrite",
        ("cache.dir", "run/features", "train.output_dir"),
    ),
    Case(
        "run folder",
        "feature cache inside a new run folder",
        f"{TRAIN} {RUNX} cache.dir=run2/features",
        ("cache.dir", "run2/features", "train.output_dir run2"),
    ),
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

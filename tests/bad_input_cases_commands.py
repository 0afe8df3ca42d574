"""Bad-input cases of the sample, probe and eval commands: their flags and what they read; rows of
docs/bad-inputs.md after the folders' (tests/bad_input_cases.py joins the groups in the table's order)."""

from __future__ import annotations

from bad_input_setups import EVAL, PROBE, SAMPLE, remove, text, truncate
from bad_inputs import Case

COMMAND_CASES: list[Case] = [
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
    Case(
        "sample",
        "--out beside a folder of that name dopsd did not make",
        f"{SAMPLE} --out data.png",
        ("--out data.png", "data", "did not write"),
    ),
    Case("sample", "--lora missing", f"{SAMPLE} --lora nowhere.safetensors", ("--lora", "nowhere.safetensors")),
    Case("sample", "--lora is a folder without weights", f"{SAMPLE} --lora data", ("--lora", "data", "folder")),
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
    # --- caption ------------------------------------------------------------------------------------------
    Case("caption", "folder missing", "caption nowhere --vlm dino", ("nowhere", "does not exist")),
    Case("caption", "folder without images", "caption tiny --vlm dino", ("tiny", "no images")),
    Case("caption", "--vlm not a Qwen3-VL", "caption data --vlm dino", ("--vlm", "dino", "qwen3_vl")),
    Case("caption", "--vlm missing", "caption data --vlm nowhere", ("--vlm", "nowhere", "does not exist")),
]

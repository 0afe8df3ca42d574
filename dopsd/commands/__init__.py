"""The command-line front ends: one module per `dopsd` command (`add_arguments(parser)`, `main(args) -> int`);
the library modules they call hold no argument parsing."""

# `dopsd NAME` -> (module implementing `add_arguments(parser)` and `main(args) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "dopsd.commands.demo",
        "Fine-tune the built-in miniature turbo on a concept with D-OPSD and SFT; compare.",
    ),
    "caption": ("dopsd.commands.caption", "Write captions for a folder's uncaptioned images with a local Qwen3-VL."),
    "train": ("dopsd.commands.train", "Fine-tune a step-distilled model on image-caption pairs (D-OPSD or SFT)."),
    "sample": ("dopsd.commands.sample", "Generate an image grid with a model +- LoRA at a chosen step count."),
    "export": ("dopsd.commands.export", "Convert a trained LoRA to diffusers or ComfyUI format."),
    "eval": ("dopsd.commands.evaluate", "Evaluate a trained LoRA (few-step samples, DINO/CLIP metrics, grids)."),
    "probe": ("dopsd.commands.probe", "Check before training that the teacher context carries each training pair."),
    "plan": ("dopsd.commands.plan", "Predict peak GPU memory and compute of a run before downloading anything."),
    "bench": ("dopsd.bench", "Benchmark D-OPSD against SFT baselines on the miniature world."),
    "mini": ("dopsd.mini.cli", "Miniature world: rebuild the shipped weights (recipe) or measure them (report)."),
    "ui": ("dopsd.ui", "A local web app: datasets, probe, runs with live health, compare, export, reports."),
}

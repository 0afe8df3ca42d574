"""dopsd: fine-tune step-distilled diffusion models with on-policy self-distillation (D-OPSD)."""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `dopsd.train(config)` without importing torch/accelerate on `import dopsd`.
    if name == "train":
        from dopsd.api import train

        return train
    raise AttributeError(f"module 'dopsd' has no attribute {name!r}")

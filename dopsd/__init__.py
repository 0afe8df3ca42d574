"""dopsd: fine-tune step-distilled diffusion models with on-policy self-distillation (D-OPSD)."""

import logging
from typing import Any

from dopsd.version import __version__

__all__ = ["__version__", "train"]

# torchao (model.quantize) is imported by diffusers whenever it is installed. Its import logs a warning for each
# optional compiled kernel it cannot load, for each enum it registers with torch's pytree, and diffusers one for
# torchao tensor types it looks for under old names; dopsd uses none of those, so they would only be noise.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def __getattr__(name: str) -> Any:
    # `dopsd.train(config)` without importing torch/accelerate on `import dopsd`.
    if name == "train":
        from dopsd.training.api import train

        return train
    raise AttributeError(f"module 'dopsd' has no attribute {name!r}")

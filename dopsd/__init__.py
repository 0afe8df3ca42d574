"""dopsd: fine-tune step-distilled diffusion models with on-policy self-distillation (D-OPSD)."""

__version__ = "0.1.0"

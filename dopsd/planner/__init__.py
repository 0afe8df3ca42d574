"""`dopsd plan`: peak GPU memory and compute of a training run, predicted before anything is downloaded.

The real architectures (diffusers / transformers classes, configured from the bundled public configs in
dopsd/models/fullsize or a local folder) are built on the meta device, prepared exactly as the trainer does
(LoRA, float32 LoRA weights, gradient checkpointing, EMA shadow), and run on fake tensors: every op of a step
is dispatched as on a device, while a dispatch mode follows the storages it creates and their lifetimes and
counts FLOPs with torch's own formulas. Modules: fake (building, fake tensors, live bytes), measure (a step's
phases), resident (weights, optimizer, shadows, quantization), caching (the feature-cache phase), plan (the
prediction), search (settings that would fit), report / cli (output), validate (against the real trainer).
Family facts come only through `dopsd.models.registry.plan_spec` (dopsd.models.base.PlanSpec).
"""

from dopsd.planner.plan import plan

__all__ = ["plan"]

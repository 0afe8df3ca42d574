"""The processes a run runs on and their precision: accelerate's `Accelerator`, as every run sets it up (one
process, or DDP under torchrun; FSDP is dopsd.training.sharding's)."""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import AutocastKwargs, DistributedDataParallelKwargs, broadcast_object_list


def accelerator(train: Any) -> Accelerator:
    """The Accelerator of a run with these `train` settings (dopsd.config's TrainConfig)."""
    kwargs: dict[str, Any] = {"mixed_precision": train.mixed_precision, "cpu": train.device == "cpu"}
    # Autocast's cast cache is keyed by the parameter object, not its values: it would keep serving the
    # student's bf16 cast after a ParamShadow swapped the teacher's (or the base's) values into `p.data`, and
    # the reverse. Off, every forward casts the values it finds; for a LoRA that is a few MB per forward, and a
    # full fine-tune no longer holds a second (bf16) copy of every weight for the whole step.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=False), AutocastKwargs(cache_enabled=False)]
    if AcceleratorState._shared_state.get("_mixed_precision", train.mixed_precision) != train.mixed_precision:
        # accelerate keeps one process-wide state and refuses another precision in the same process (a second
        # `dopsd.train` in one Python session, a bf16 run after a float32 one): this run's precision replaces it.
        AcceleratorState._reset_state()
    return Accelerator(**kwargs, kwargs_handlers=handlers)


def broadcast(value: Any, world: int) -> Any:
    """The main process's `value` on every one of the run's `world` processes."""
    if world == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]

"""How the trained network's weights are held: float32 masters on a low-precision model, and with train.fsdp
sharded over the processes by torch's own FSDP2 (`torch.distributed.fsdp.fully_shard`), the same code on the CPU
(gloo) and on GPUs (NCCL).

Float32 masters: bf16 weights cannot take small steps (at lr 1e-5, 10 AdamW steps of a full fine-tune changed 6% of
a tiny Z-Image's bf16 weights, the float32 masters all of them), so the trained weights are float32, autocast
computes in the model's dtype, and the final full weights go back to that dtype (`final_state`); checkpoints keep
the float32 values, so a resumed run is bit-exact.

Each transformer block is sharded on its own, then the root (the embedders and the output layer), so a process holds
1/N of every float32 weight, gradient, AdamW state and EMA value, and a block's whole weights only while it runs.
accelerate's FSDP plugin is not used: with `Accelerator(cpu=True)` it silently runs plain data parallel, and without
it each process trains alone, so the CPU tests would not test what GPUs run.

What the rest of the trainer sees: the trainable parameters are DTensors (this process's shard); the EMA shadow is a
clone of them, sharded alike (dopsd.core.weights). Whatever reads whole tensors gathers them here, every process
taking part: checkpoints and the final weights are ordinary safetensors files of whole tensors, which the main
process writes and every process reads back, each taking its own part (dopsd.core.weights.copy_full_).
"""

from __future__ import annotations

import functools
import warnings
import zlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from dopsd.config import ConfigError
from dopsd.core.weights import copy_full_
from dopsd.models import registry
from dopsd.runs import checkpoint as ckpt


# The repeated blocks of each family's denoiser: the units that are gathered, run and freed one at a time. An
# adapter may name its own (`shard_blocks`, class names).
def float32_masters(network: nn.Module, trainable: dict[str, nn.Parameter], cfg: Any, acc: Any) -> dict[str, Any]:
    """Make the low-precision trained weights float32 (LoRA or full); returns their original dtypes by name."""
    original = {n: p.dtype for n, p in trainable.items() if p.dtype in (torch.bfloat16, torch.float16)}
    for name in original:
        trainable[name].data = trainable[name].data.float()
    if not cfg.lora.enabled and cfg.train.mixed_precision != "no" and original:
        dither_masters({n: trainable[n] for n in original}, original, cfg.train.seed)
    if not cfg.lora.enabled and cfg.train.mixed_precision != "no":
        # Float32 weights take the model's low-precision inputs only under autocast (a LoRA's are cast by peft):
        # every forward runs under the run's autocast, as accelerate makes its prepared model's; the health
        # reference and DreamBooth's class images run before `prepare`, and accelerate never prepares a sharded
        # network.
        forward = network.forward

        @functools.wraps(forward)
        def autocast_forward(*args: Any, **kwargs: Any) -> Any:
            with acc.autocast():
                return forward(*args, **kwargs)

        network.forward = autocast_forward
    return original


def dither_masters(masters: dict[str, nn.Parameter], original: dict[str, torch.dtype], seed: int) -> None:
    """Place each float32 master at a random point of the cell that rounds to its low-precision value.

    Upcast from a bf16 checkpoint, every master sits exactly on a bf16 value, and autocast's forward sees it only
    through round-to-nearest: an update smaller than half a bf16 step changes nothing the forward computes, and a
    full fine-tune at the domain preset's lr then moves the computed model for about a quarter of its weights in
    10 steps. From a uniform point of the cell, an update of any size flips the rounding of a proportional share
    of the weights, so the forward follows the masters in expectation. The model as loaded is unchanged: every
    master still rounds to its original value. Seeded by name, so every process (and every rerun) agrees."""
    for name in sorted(masters):
        p, low = masters[name], original[name]
        with torch.no_grad():
            v = p.data.to(low)
            up = torch.nextafter(v, torch.full_like(v, float("inf"))).float() - v.float()
            down = v.float() - torch.nextafter(v, torch.full_like(v, float("-inf"))).float()
            half = torch.minimum(up, down).nan_to_num(0.0, posinf=0.0) * 0.4999
            g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
            u = torch.rand(v.shape, generator=g, dtype=torch.float32).to(p.device) * 2.0 - 1.0
            p.data = v.float() + u * half


def final_state(trainer: Any) -> dict[str, torch.Tensor] | None:
    """A full fine-tune's model.safetensors content on the main process (None elsewhere, and for a LoRA, which is
    saved from the network), in the model's dtype: the float32 masters cast back. Sharded: a collective."""
    if trainer.cfg.lora.enabled:
        return None
    named = trainer.network.state_dict()
    if trainer.sharded:
        named = full_tensors(named, trainer.main)
    elif not trainer.main:
        return None
    return {k: v.detach().to("cpu", trainer.master_dtypes.get(k, v.dtype)) for k, v in named.items()}


def wanted(cfg: Any, world: int) -> bool:
    """Shard this run? train.fsdp, with more than one process to shard over (one process: a warning)."""
    if not cfg.train.fsdp:
        return False
    if world < 2 or not dist.is_initialized():
        warnings.warn(
            "train.fsdp is set but this run has one process: nothing to shard over, the model trains whole. Start "
            "several (`accelerate launch --num_processes N`, or torchrun --nproc_per_node N) to shard it"
        )
        return False
    return True


def block_names(adapter: Any, family: str) -> tuple[str, ...]:
    """The class names of the blocks FSDP shards one by one: the adapter's, or (no adapter) its family's."""
    return tuple(adapter.shard_blocks if adapter is not None else registry.family_module(family).SHARD_BLOCKS)


def shard(network: nn.Module, adapter: Any, family: str, device: torch.device) -> int:
    """Shard `network` in place over all processes (blocks, then the root); returns the number of blocks."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    names = block_names(adapter, family)
    blocks = [m for m in network.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"train.fsdp: no block of {type(network).__name__} to shard (looked for {', '.join(names) or 'nothing'}: "
            f"model.family {family!r} names no block classes); set train.fsdp=false"
        )
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    # Resharded after every forward, the root too (which FSDP would keep whole until its backward): a teacher or
    # prior swap writes other values into the shards between forwards (dopsd.core.weights), and the next forward
    # must gather those, not reuse what the last one gathered.
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(network, mesh=mesh, reshard_after_forward=True)
    network.register_forward_hook(lambda module, args, output: module.reshard())  # older torch ignores it on the root
    return len(blocks)


def is_sharded(tensors: dict[str, torch.Tensor]) -> bool:
    return any(isinstance(t, DTensor) for t in tensors.values())


# --- gradients and the verdict: collectives, every process calls them --------------------------------------------
def clip_grad_norm_(params: list[torch.Tensor], limit: float) -> float:
    """torch's clip_grad_norm_ (norm then scale) on sharded gradients: the norm is over the whole gradient."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads, 2.0)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if limit != float("inf"):
        torch.nn.utils.clip_grads_with_norm_(params, limit, norm)
    return float(norm)


def weights_verdict(trainable: dict[str, torch.Tensor], start_max: float) -> dict[str, Any]:
    """runs.checkpoint.weights_verdict over all processes' shards."""
    local = ckpt.weights_verdict({k: v.to_local() if isinstance(v, DTensor) else v for k, v in trainable.items()}, 0.0)
    device = next(iter(trainable.values())).device
    worst = torch.tensor([0.0 if local["finite"] else 1.0, local["max_abs"] or 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return ckpt.verdict(not bool(worst[0]), float(worst[1]), start_max)


# --- whole tensors for the main process: collectives, every process calls them ----------------------------------
def full_tensors(tensors: dict[str, torch.Tensor], keep: bool) -> dict[str, torch.Tensor]:
    """Each tensor whole, on the CPU, where `keep` (the main process; the others get {}). One tensor is gathered at
    a time, so a process holds at most one whole tensor beyond its shards on its device."""
    out = {}
    for name, t in tensors.items():
        whole = t.full_tensor() if isinstance(t, DTensor) else t
        if keep:
            out[name] = whole.detach().to("cpu", copy=True)
        del whole
    return out


def full_optimizer_state(state: dict[str, Any], keep: bool) -> dict[str, Any]:
    """An optimizer state dict with its sharded tensors whole: the same layout as an unsharded run's."""
    per_param = {}
    for idx, values in state["state"].items():
        per_param[idx] = {k: v for k, v in values.items() if not isinstance(v, DTensor)}
        per_param[idx].update(full_tensors({k: v for k, v in values.items() if isinstance(v, DTensor)}, keep))
    return {**state, "state": per_param}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a whole-tensor optimizer state (as saved) into an optimizer over sharded parameters: each process
    keeps its part of every per-parameter tensor."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {}
    for idx, values in state["state"].items():
        p = params[int(idx)]
        per_param[idx] = dict(values)
        if isinstance(p, DTensor):
            for k, v in values.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape:
                    local = torch.zeros_like(p.detach(), dtype=v.dtype)
                    copy_full_(local, v)
                    per_param[idx][k] = local
    optimizer.load_state_dict({**state, "state": per_param})


def checkpoint_parts(trainer: Any, prior: Any) -> dict[str, Any]:
    """What a checkpoint stores (trainable weights, teacher and prior shadows, optimizer state), whole on the main
    process. Unsharded: the live objects (the writer copies them); sharded: gathered by every process."""
    teacher = None if trainer.teacher is None else trainer.teacher.state_dict()
    prior_state = None if prior is None else prior.state_dict()
    optimizer = trainer.optimizer.state_dict()
    if not trainer.sharded:
        return {"trainable": trainer.trainable, "teacher": teacher, "prior": prior_state, "optimizer": optimizer}
    keep = trainer.main
    parts: dict[str, Any] = {"trainable": full_tensors(trainer.trainable, keep)}
    for name, shadow in (("teacher", teacher), ("prior", prior_state)):
        parts[name] = None if shadow is None else {**shadow, "shadow": full_tensors(shadow["shadow"], keep)}
    parts["optimizer"] = full_optimizer_state(optimizer, keep)
    return parts

"""Counting what a step costs, shared by the planner and the benchmark: FLOPs of the ops a function runs, bytes of
the tensors it holds, and the peak of bytes it allocates (CPU, from the profiler's allocation events)."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch.utils import flop_counter as _fc

StepFn = Callable[[], Any]


def cpu_sdpa_mapping() -> dict[Any, Any]:
    """FlopCounterMode has no formula for the CPU flash-attention kernels (it counts 0); add the standard one."""
    ops = torch.ops.aten
    mapping: dict[Any, Any] = {}
    if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu"):

        def fwd(query, key, value, *args, out_shape=None, **kwargs):  # noqa: ANN001 - shapes from FlopCounterMode
            return _fc.sdpa_flop_count(query, key, value)

        def bwd(grad_out, query, key, value, *args, out_shape=None, **kwargs):  # noqa: ANN001
            return _fc.sdpa_backward_flop_count(grad_out, query, key, value)

        mapping[ops._scaled_dot_product_flash_attention_for_cpu] = fwd
        if hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu_backward"):
            mapping[ops._scaled_dot_product_flash_attention_for_cpu_backward] = bwd
    return mapping


def count_flops(fn: StepFn) -> int:
    """FLOPs of the matmul/attention/conv ops that `fn` runs (forward and any backward inside it)."""
    with _fc.FlopCounterMode(display=False, custom_mapping=cpu_sdpa_mapping()) as counter:
        fn()
    return int(counter.get_total_flops())


def resident_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the unique storages behind `tensors` (views and shared weights counted once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        storage = t.untyped_storage()
        seen[(str(t.device), storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def state_tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested dicts/lists/tuples (optimizer and teacher state dicts)."""
    out: list[torch.Tensor] = []
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, torch.Tensor):
            out.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return out


def transient_peak_bytes(fn: StepFn) -> int:
    """Peak of bytes allocated by `fn` above what was live when it started (CPU, from profiler events)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    events: list[tuple[int, int]] = []
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, int(event.extra_fields.alloc_size)))
    live = peak = 0
    for _, size in sorted(events):
        live += size  # frees are negative sizes
        peak = max(peak, live)
    return peak

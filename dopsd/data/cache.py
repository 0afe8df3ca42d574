"""Frozen features computed once: student text contexts, teacher multimodal contexts, SFT latents.

Each per-sample context (a dict of tensors) is stored as one safetensors file named by a content hash of
everything it depends on: the model identity (family, weights folder, encoders, dtype, …), the kind of
feature, the caption text, the image bytes and the training size. A second run with the same data and model
finds every file and never calls an encoder; the trainer then frees the encoders (`release_encoders`) before
the denoiser is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file

from dopsd.config import Config
from dopsd.data.dataset import Example, load_example_images
from dopsd.files import save_safetensors

Context = dict[str, torch.Tensor]
DROPPED = -1  # caption index of the empty (dropped-out) caption


def default_cache_dir() -> Path:
    if os.environ.get("DOPSD_CACHE"):
        return Path(os.environ["DOPSD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dopsd"


def model_fingerprint(config: Config, adapter: Any) -> str:
    """What the cached features depend on, besides the sample itself."""
    m = config.model
    pretrained = m.pretrained
    if pretrained and Path(pretrained).expanduser().exists():
        pretrained = str(Path(pretrained).expanduser().resolve())
    parts = {
        "adapter": adapter.name,
        "family": m.family,
        "pretrained": pretrained,
        "teacher_context": m.teacher_context,
        "teacher_encoder": m.teacher_encoder,
        "teacher_instruction": m.teacher_instruction,
        "max_caption_tokens": m.max_caption_tokens,
        "editing": m.editing,
        "dtype": m.dtype,
        "extra": str(adapter.cache_fingerprint()),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class FeatureCache:
    """Content-addressed store of per-sample contexts (on disk, or in memory when disabled)."""

    def __init__(self, root: Path | None, fingerprint: str):
        self.root = root / fingerprint[:16] if root is not None else None
        self.fingerprint = fingerprint
        self.memory: dict[str, Context] = {}
        self.hits = 0
        self.misses = 0

    def key(self, kind: str, *parts: object) -> str:
        payload = json.dumps([self.fingerprint, kind, *[str(p) for p in parts]])
        return f"{kind}-{hashlib.sha256(payload.encode()).hexdigest()[:32]}"

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:-30] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return key in self.memory or (self.root is not None and self._path(key).is_file())

    def put(self, key: str, context: Context) -> None:
        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in context.items()}
        if self.root is None:
            self.memory[key] = tensors
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        save_safetensors(tmp, tensors)
        os.replace(tmp, path)  # atomic: a reader never sees half a file

    def get(self, key: str) -> Context:
        if key in self.memory:
            return self.memory[key]
        return load_file(str(self._path(key)))

    def ensure(self, keys: list[str], compute: Callable[[list[int]], list[Context]], batch_size: int = 8) -> None:
        """Compute (in batches) and store the entries of `keys` that are missing."""
        missing = [i for i, k in enumerate(keys) if not self.has(k)]
        self.hits += len(set(keys)) - len({keys[i] for i in missing})
        done: set[str] = set()
        for start in range(0, len(missing), batch_size):
            chunk = [i for i in missing[start : start + batch_size] if keys[i] not in done]
            if not chunk:
                continue
            for i, ctx in zip(chunk, compute(chunk)):
                self.put(keys[i], ctx)
                done.add(keys[i])
        self.misses += len(done)


@dataclass
class Features:
    """Keys of every frozen feature the run needs, and a loader with a small in-memory memo."""

    cache: FeatureCache
    student: dict[tuple[int, int], str] = field(default_factory=dict)  # (example, caption index) -> key
    teacher: dict[tuple[int, int], str] = field(default_factory=dict)
    latents: dict[int, str] = field(default_factory=dict)
    prompts: dict[str, str] = field(default_factory=dict)  # caption-only contexts of sample/prior prompts
    memo: dict[str, Context] = field(default_factory=dict)
    memo_budget: int = 512 * 2**20

    def load(self, key: str) -> Context:
        if key in self.memo:
            return self.memo[key]
        ctx = self.cache.get(key)
        size = sum(t.numel() * t.element_size() for t in ctx.values())
        if size <= self.memo_budget:
            self.memo[key] = ctx
            self.memo_budget -= size
        return ctx


def _caption(example: Example, index: int) -> str:
    return "" if index == DROPPED else example.captions[index]


def build_features(
    adapter: Any,
    examples: list[Example],
    config: Config,
    cache: FeatureCache,
    prompts: list[str],
    need_latents: bool,
    need_teacher: bool,
) -> Features:
    """Make sure every feature the run needs is in the cache (computing the missing ones) and index them.

    One encoder at a time: every text-encoder feature first (training captions, then sample/prior prompts),
    then the teacher's (the VLM, or the reference path), then the VAE latents. The adapters keep only the
    running encoder on the device and load the denoiser after all of this (see dopsd.models.hooks.DiffusersHooks),
    so caching never holds the transformer and the encoders together."""
    feats = Features(cache)
    variants = lambda ex: list(range(len(ex.captions))) + ([DROPPED] if config.data.caption_dropout > 0 else [])
    pairs = [(i, c) for i, ex in enumerate(examples) for c in variants(ex)]
    size = lambda ex: f"{ex.bucket[0]}x{ex.bucket[1]}"

    def images_for(idx: list[int]) -> tuple[list[Any], list[list[Any]]]:
        loaded = [load_example_images(examples[pairs[j][0]]) for j in idx]
        return [t for t, _ in loaded], [s for _, s in loaded]

    def sources_arg(srcs: list[list[Any]]) -> list[list[Any]] | None:
        return srcs if config.model.editing else None

    def student_compute(idx: list[int]) -> list[Context]:
        caps = [_caption(examples[pairs[j][0]], pairs[j][1]) for j in idx]
        srcs = images_for(idx)[1] if config.model.editing else None
        return adapter.student_contexts(caps, srcs)

    def teacher_compute(idx: list[int]) -> list[Context]:
        caps = [_caption(examples[pairs[j][0]], pairs[j][1]) for j in idx]
        targets, srcs = images_for(idx)
        return adapter.teacher_contexts(caps, targets, sources_arg(srcs))

    # Student and teacher contexts depend on the example's sources (editing) and the caption.
    s_keys = [
        cache.key(
            "student", _caption(examples[i], c), examples[i].digest if config.model.editing else "", size(examples[i])
        )
        for i, c in pairs
    ]
    cache.ensure(s_keys, student_compute)
    feats.student = {p: k for p, k in zip(pairs, s_keys)}
    unique = list(dict.fromkeys(prompts))
    p_keys = [cache.key("student", p, "", "prompt") for p in unique]
    cache.ensure(p_keys, lambda idx: adapter.student_contexts([unique[j] for j in idx], None))
    feats.prompts = dict(zip(unique, p_keys))
    if need_teacher:
        t_keys = [
            cache.key("teacher", _caption(examples[i], c), examples[i].digest, size(examples[i])) for i, c in pairs
        ]
        cache.ensure(t_keys, teacher_compute)
        feats.teacher = {p: k for p, k in zip(pairs, t_keys)}
    if need_latents:
        l_keys = [cache.key("latents", ex.digest, size(ex)) for ex in examples]
        cache.ensure(
            l_keys,
            lambda idx: [
                {"latents": x} for x in adapter.encode_images([load_example_images(examples[j])[0] for j in idx])
            ],
        )
        feats.latents = dict(enumerate(l_keys))
    return feats

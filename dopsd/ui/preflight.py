"""The checks `dopsd train` runs before it writes anything (dopsd.training.api), run by the app before it queues a
run, so that a run that cannot start is refused at the form instead of failing seconds after "queued".

Each problem is returned under the form field it concerns ({"dataset": …, "model.pretrained": …}); messages are
the checks' own words. Only the checks that need no weights run here (the dataset, the model and teacher folders,
the prompts, the quantization mode); loading the model stays the job's work.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from dopsd.config.types import ConfigError
from dopsd.data.checks import check_prompts
from dopsd.data.dataset import DatasetError, check_dataset
from dopsd.errors import DopsdError, PromptError
from dopsd.methods.terms import terms_for
from dopsd.models.local import LAYOUTS, ModelFolderError, check_pipeline_folder
from dopsd.models.quantize import check_available
from dopsd.models.registry import check_teacher_folder
from dopsd.runs import lock as runlock

GENERAL = "_"  # a problem that belongs to no single form field (shown above the form)
_KEY = re.compile(r"config key '([a-z_]+\.[a-z_]+)")
_LEADING_KEY = re.compile(r"^(?:model\.\w+ \S+ )?([a-z_]+\.[a-z_]+)(?::| is | must )")


def field_of(message: str, default: str = GENERAL) -> str:
    """The `section.key` a check's message names first (config and model-folder messages start with it)."""
    m = _KEY.search(message) or _LEADING_KEY.match(message)
    return m.group(1) if m else default


def config_problem(err: Exception) -> dict[str, str]:
    """A ConfigError (or a type error while setting a form value) under the key it names."""
    text = str(err)
    if isinstance(err, KeyError) and len(text) > 1 and text[0] == text[-1] == "'":  # str(KeyError) quotes its text
        text = text[1:-1]
    return {"preset" if text.startswith("unknown preset") else field_of(text): text}


def check_start(cfg: Any, resume: bool = False) -> dict[str, str]:
    """Every problem `dopsd train [--resume]` would stop at before loading weights, by field; {} when the run can
    start. A resume checks its run folder and checkpoint first, then the same as a start: the dataset or the
    model folder may have moved since the run began."""

    problems: dict[str, str] = {}

    def add(key: str, message: str) -> None:
        problems.setdefault(key, message)

    try:
        runlock.plan(cfg, resume=resume, overwrite=False)  # decides only: nothing is written or claimed
    except DopsdError as err:
        add("name" if not resume else GENERAL, str(err))
    if not cfg.data.path:
        add("dataset", "choose a dataset: the run trains on its images and captions")
    else:
        try:
            check_dataset(cfg.data, cfg.model, cfg.train.batch_size)
        except DatasetError as err:
            add("dataset", _dataset_text(err))
        except DopsdError as err:  # the model folder its caption check reads (the tokenizer)
            add(field_of(str(err), "model.pretrained"), str(err))
    _model_folder(cfg, add)
    try:
        check_prompts(cfg)
    except PromptError as err:
        add("method.prior_prompts" if "method.prior_prompts[" in str(err) else "sample.prompts", str(err))
    except DopsdError as err:
        add(field_of(str(err), "model.pretrained"), str(err))
    _teacher(cfg, add)
    _quantize(cfg, add)
    return problems


def _dataset_text(err: Exception) -> str:
    problems = list(getattr(err, "problems", []) or [])
    if not problems:
        return str(err)
    shown = problems[:6] + (
        [f"… and {len(problems) - 6} more (the dataset's page lists each)"] if len(problems) > 6 else []
    )
    return f"the dataset check found {len(problems)} problem(s): " + "; ".join(shown)


def _model_folder(cfg: Any, add: Any) -> None:
    """A family that loads a local diffusers folder: the same folder check its loader starts with."""
    if cfg.model.family not in LAYOUTS:
        return  # the miniature ships its weights
    try:
        check_pipeline_folder(cfg.model.pretrained, cfg.model.family)
    except ModelFolderError as err:
        add("model.pretrained", str(err))


def _teacher(cfg: Any, add: Any) -> None:
    try:
        if any(t.teacher for t in terms_for(cfg.method)):
            check_teacher_folder(cfg.model)
    except DopsdError as err:
        add(field_of(str(err), "model.teacher_encoder"), str(err))


def _quantize(cfg: Any, add: Any) -> None:
    if cfg.model.quantize == "none":
        return  # nothing to check (and no GPU to touch from the app's process)
    device = "cpu" if cfg.train.device == "cpu" or not torch.cuda.is_available() else "cuda"
    try:
        check_available(cfg.model.quantize, device, cfg.lora.enabled)
    except (ConfigError, DopsdError) as err:
        add("model.quantize", str(err))

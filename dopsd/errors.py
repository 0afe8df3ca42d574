"""Errors a user can fix: the command line prints them as one message (no traceback) and exits non-zero.

Every module raises a subclass of `DopsdError` for bad input (config, dataset, model folder, run folder,
checkpoint): its message names the file or key and says how to fix it. Anything else that escapes a command
is a bug in dopsd and is reported as one (the traceback with `--debug` or DOPSD_DEBUG=1).
"""

from __future__ import annotations


class DopsdError(Exception):
    """Bad input or a refused action, explained in the message; `exit_code` is what the command returns."""

    exit_code = 2


class RunFolderError(DopsdError):
    """A run folder that cannot be used as asked (exists, locked, not a dopsd run, unsafe to replace)."""


class CheckpointError(DopsdError):
    """A checkpoint that cannot be read or does not fit the run."""


class WeightsFileError(DopsdError):
    """A weights file (model part, LoRA, full weights) that is truncated, not safetensors, or does not fit."""


class UsageError(DopsdError):
    """A command-line flag whose value cannot work here (the message names the flag)."""


class TrainingFailed(DopsdError):
    """Training ran but did not succeed (aborted or unhealthy); the run folder says what is kept."""

    exit_code = 3


class PromptError(DopsdError, ValueError):
    """A prompt or caption the model cannot read (the miniature's fixed vocabulary and length)."""

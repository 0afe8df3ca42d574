"""Errors a user can fix: the command line prints them as one message (no traceback) and exits non-zero.

Every module raises a subclass of `DopsdError` for bad input (config, dataset, model folder, run folder,
checkpoint): its message names the file or key and says how to fix it. Anything else that escapes a command
is a bug in dopsd and is reported as one (the traceback with `--debug` or DOPSD_DEBUG=1).

Exit codes of every command (`exit_code` of each class below; dopsd.cli returns them):
  0    done
  1    a bug in dopsd ("internal error"; the message asks for a report with --debug)
  2    bad input or a refused start: the message names the file, key or flag (`DopsdError`)
  3    training aborted: too many non-finite steps in a row (`TrainingFailed`; summary.json status "aborted")
  4    training finished but the model is broken (summary.json status "unhealthy")
  5    the machine, not the input: no space left on a device, a read-only or forbidden folder, out of memory
       (`MachineError`); what was saved before it is intact and the message says how to go on
  130  stopped by Ctrl-C (SIGINT), 143 stopped by SIGTERM (the web app's Stop, `kill`, a job scheduler): 128 + the
       signal's number, as a shell reports it. Training finishes its current optimizer step, writes a checkpoint and
       says how to resume (`Interrupted`; progress.json status "interrupted"); a second signal stops at once.
"""

from __future__ import annotations

import errno

EXIT_MACHINE = 5
EXIT_SIGNAL_BASE = 128


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


class Interrupted(TrainingFailed):
    """Stopped on request (a signal) after a checkpoint was written; `exit_code` is 128 + the signal's number."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum
        self.exit_code = EXIT_SIGNAL_BASE + signum


class MachineError(DopsdError):
    """The machine's limits (a full disk, permissions, memory), not the input: the message names the place."""

    exit_code = EXIT_MACHINE


class NoSpaceError(MachineError, OSError):
    """No space left on the device holding `path` (ENOSPC, or the user's disk quota)."""

    def __init__(self, message: str, path: str | None = None):
        super().__init__(message)
        self.path, self.errno = path, errno.ENOSPC

    def __str__(self) -> str:
        return str(self.args[0])


class PromptError(DopsdError, ValueError):
    """A prompt or caption the model cannot read (the miniature's fixed vocabulary and length)."""

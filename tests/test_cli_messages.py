"""How `dopsd` reports what went wrong: user errors as one message, the machine's limits by name, bugs as bugs."""

from __future__ import annotations

import errno
import sys

import pytest

from dopsd import cli

FAKE = """
import errno, torch
from dopsd.errors import UsageError

def add_arguments(parser):
    parser.add_argument("what")

def main(args):
    if args.what == "usage":
        raise UsageError("--flag 3 cannot work here")
    if args.what == "disk":
        raise OSError(errno.ENOSPC, "No space left on device", "/data/run/lora.safetensors")
    if args.what == "oom":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    raise KeyError("bug")
"""


@pytest.fixture
def fake_command(tmp_path, monkeypatch):
    (tmp_path / "dopsd_fake_command.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("dopsd_fake_command", "a command that fails as asked"))
    monkeypatch.delenv("DOPSD_DEBUG", raising=False)
    yield
    sys.modules.pop("dopsd_fake_command", None)


@pytest.mark.parametrize(
    "what, code, says",
    [
        ("usage", 2, "dopsd fake: --flag 3 cannot work here"),
        ("disk", 5, "dopsd fake: No space left on device (/data/run/lora.safetensors); free space"),
        (
            "oom",
            5,
            "dopsd fake: out of memory (CUDA out of memory. Tried to allocate 20.00 GiB); lower train.batch_size",
        ),
        ("bug", 1, "dopsd fake: internal error: KeyError: 'bug'\nThis is a bug in dopsd"),
    ],
)
def test_errors_are_reported_by_kind(fake_command, capsys, what, code, says):
    assert cli.main(["fake", what]) == code
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_debug_shows_the_traceback(fake_command):
    with pytest.raises(OSError) as info:
        cli.main(["fake", "disk", "--debug"])
    assert info.value.errno == errno.ENOSPC


def test_overrides_may_follow_flags(tmp_path, tiny_mini, capsys):
    out = tmp_path / "grid.png"
    sample = ["sample", "mini", "--prompt", "a red circle", "--seeds", "0", "--out", str(out)]
    model = f"model.pretrained={tiny_mini}"
    assert cli.main([*sample, model, "model.inference_steps=2"]) == 0
    assert out.is_file() and "2 steps" in capsys.readouterr().out
    assert cli.main([*sample, model]) == 2  # exists: replaced only with --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main([*sample, "--overwrite", model]) == 0


def test_report_folders_replace_only_their_own_files(tmp_path, concept_data, tiny_mini):
    """`dopsd probe` reruns into its own folder; a folder holding anything else is refused untouched."""
    common = [
        "probe",
        "mini",
        f"data.path={concept_data}",
        f"model.pretrained={tiny_mini}",
        "--seeds",
        "1",
        "--limit",
        "1",
    ]
    out = tmp_path / "probe"
    assert cli.main([*common, "--out", str(out)]) == 0
    assert cli.main([*common, "--out", str(out)]) == 0  # its own earlier report: replaced
    assert sorted(p.name for p in out.iterdir()) == ["probe.json", "probe_grid.png"]
    (out / "notes.txt").write_text("mine")
    assert cli.main([*common, "--out", str(out)]) == 2
    assert (out / "notes.txt").read_text() == "mine"

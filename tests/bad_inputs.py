"""Bad inputs through the real `dopsd` command line, and the table of what dopsd answers (docs/bad-inputs.md).

Each case (tests/bad_input_cases.py) builds its files in a fresh folder, runs `dopsd.cli.main(argv)` there
in-process with stdout/stderr captured (a few as real subprocesses, for exit codes and the absence of a
traceback in the real process) and must end with
  * a non-zero exit code that is not the "internal error" (bug) report,
  * no traceback,
  * a message that names the offending file, key or flag,
  * nothing written, changed or deleted: neither in the case's folder nor in the shared models and run.

Regenerate the table after changing a message or a case (tests/test_bad_inputs.py fails while it differs):

    .venv/bin/python tests/bad_inputs.py

Temporary paths are printed as `.` (every case runs in its own folder, where the shared assets are linked by
name), the package folder as `<dopsd>`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad-inputs.md"
REGENERATE = ".venv/bin/python tests/bad_inputs.py"
CACHE = ".cache"  # DOPSD_CACHE inside each case's folder

Setup = Callable[[Path, Path], None]  # (case folder, assets folder)


@dataclass(frozen=True)
class Case:
    group: str  # config, dataset, model folder, run folder, sample, probe, eval, export
    what: str  # the bad input, in a few words (unique within the group)
    argv: str  # the command after `dopsd`, shell-quoted; run in the case's folder
    expect: tuple[str, ...]  # what the message must name (after path normalisation)
    setup: Setup | None = None  # writes the bad files into the case folder
    subprocess: bool = False  # run as a real process (exit code, no traceback in the real stderr)

    @property
    def id(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", f"{self.group} {self.what}".lower()).strip("-")


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    message: str  # the dopsd message lines of stderr, normalised
    changed: list[str] = field(default_factory=list)  # files written/changed/deleted (should be none)

    def problems(self, case: Case) -> list[str]:
        out = []
        if self.code == 0:
            out.append("exit code 0")
        text = self.stdout + self.stderr
        if "Traceback" in text:
            out.append("a traceback was printed")
        if "internal error" in self.stderr:
            out.append("reported as an internal error (a dopsd bug)")
        if not self.message:
            out.append("no `dopsd CMD: …` message on stderr")
        out += [f"the message does not name {e!r}" for e in case.expect if e not in self.message]
        if self.changed:
            out.append(f"files written/changed/deleted: {self.changed[:5]}")
        return out


# --- the shared assets: a dataset, the tiny miniature, a finished run, tiny real-model folders ------------
def build_assets(root: Path) -> Path:
    """Built once per session; each case folder gets copies of the small ones and links to the large ones."""
    from conftest import save_tiny_mini, write_concept_folder
    from tiny_encoders import build_dinov2
    from tiny_real import build_zimage

    from dopsd import cli

    root.mkdir(parents=True, exist_ok=True)
    write_concept_folder(root / "data")
    save_tiny_mini(root / "tiny")
    old_cache = os.environ.get("DOPSD_CACHE")
    os.environ["DOPSD_CACHE"] = str(root / "cache")  # not cache.dir: the run's config.yaml keeps the default
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            build_zimage(root / "zimage")
            build_dinov2(root / "dino")
            code = cli.main(
                [
                    "train",
                    "mini",
                    f"data.path={root / 'data'}",
                    f"model.pretrained={root / 'tiny'}",
                    f"train.output_dir={root / 'run'}",
                    "train.max_steps=2",
                    "train.batch_size=2",
                    "train.checkpoint_every=1",
                    "sample.every=0",
                    "sample.seeds=[0]",
                    "sample.control_steps=0",
                    "log.progress=false",
                    "log.tensorboard=false",
                    "model.teacher_context=reference",
                    "lora.rank=4",
                ]
            )
    finally:
        os.environ.pop("DOPSD_CACHE") if old_cache is None else os.environ.update(DOPSD_CACHE=old_cache)
    assert code == 0, "building the shared run failed"
    shutil.rmtree(root / "cache")
    return root


COPIED = ("data", "run")  # small, and cases change them: each case gets its own copy
LINKED = ("tiny", "zimage", "dino")  # large and read-only: linked (a case that changes one copies it first)


def own(w: Path, a: Path, name: str) -> Path:
    """Replace the case folder's link to asset `name` by a real copy (to change it)."""
    target = w / name
    if target.is_symlink():
        target.unlink()
    if not target.exists():
        shutil.copytree(a / name, target)
    return target


def prepare(case: Case, assets: Path, w: Path) -> None:
    w.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        shutil.copytree(assets / name, w / name)
    for name in LINKED:
        (w / name).symlink_to(assets / name, target_is_directory=True)
    if case.setup is not None:
        case.setup(w, assets)


# --- running and checking ----------------------------------------------------------------------------------
def snapshot(w: Path, assets: Path) -> dict[str, tuple]:
    """Every file and folder (not following links) of the case folder and the assets: type, size, mtime."""
    state: dict[str, tuple] = {}
    for label, root in (("case", w), ("assets", assets)):
        for folder, dirs, files in os.walk(root):
            rel = Path(folder).relative_to(root)
            if label == "case" and rel.parts[:1] == (CACHE,):
                continue
            for name in dirs + files:
                if label == "case" and rel == Path(".") and name == CACHE:  # the feature cache may appear
                    continue
                p = Path(folder) / name
                st = p.lstat()
                state[f"{label}/{rel / name}"] = (p.is_symlink(), p.is_dir(), st.st_size, st.st_mtime_ns)
    return state


def _diff(before: dict[str, tuple], after: dict[str, tuple]) -> list[str]:
    return sorted(
        [f"+{k}" for k in after.keys() - before.keys()]
        + [f"-{k}" for k in before.keys() - after.keys()]
        + [f"~{k}" for k in before.keys() & after.keys() if before[k] != after[k] and not before[k][1]]
    )


def normalise(text: str, w: Path, assets: Path) -> str:
    for path, shown in sorted(
        [(w.resolve(), "."), (w, "."), (assets.resolve(), "."), (assets, "."), (ROOT / "dopsd", "<dopsd>")],
        key=lambda p: -len(str(p[0])),
    ):
        text = text.replace(str(path), shown)
    return text


def message_of(stderr: str, command: str) -> str:
    """The lines from the first `dopsd CMD:` line on (argparse's usage block and warnings before it dropped)."""
    lines = stderr.rstrip().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"dopsd {command}")), None)
    return "" if start is None else "\n".join(lines[start:])


def run_case(case: Case, assets: Path, w: Path) -> Result:
    prepare(case, assets, w)
    argv = shlex.split(case.argv)
    env = {"DOPSD_CACHE": str(w / CACHE)}
    before = snapshot(w, assets)
    if case.subprocess:
        proc = subprocess.run(
            [sys.executable, "-m", "dopsd.cli", *argv],
            cwd=w,
            capture_output=True,
            text=True,
            env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
            timeout=300,
        )
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        code, out, err = _in_process(argv, w, env)
    changed = _diff(before, snapshot(w, assets))
    err_n = normalise(err, w, assets)
    return Result(code, normalise(out, w, assets), err_n, message_of(err_n, argv[0]), changed)


def _in_process(argv: list[str], w: Path, env: dict[str, str]) -> tuple[int, str, str]:
    from dopsd import cli

    out, err = io.StringIO(), io.StringIO()
    old_cwd, old_env = os.getcwd(), {k: os.environ.get(k) for k in env}
    os.chdir(w)
    os.environ.update(env)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as stop:  # argparse: a flag value it refused (usage + message on stderr)
                code = stop.code if isinstance(stop.code, int) else 1
    finally:
        os.chdir(old_cwd)
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return code, out.getvalue(), err.getvalue()


# --- the table ---------------------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def render(cases: list[Case], results: list[Result], web_app: str = "") -> str:
    """The table; `web_app`: the web app's section (tests/bad_input_cases_ui.py), appended."""
    out = [
        "# Bad inputs and what dopsd answers",
        "",
        f"<!-- generated by `{REGENERATE}` from tests/bad_input_cases.py; do not edit by hand -->",
        "",
        "Each row is a bad input run through the real `dopsd` command line by tests/test_bad_inputs.py, which",
        "checks for every row: a non-zero exit code that is not the internal-error (bug) report, no traceback,",
        "a message naming the offending file, key or flag, and no file written, changed or deleted (the feature",
        "cache aside). Rows marked ⚙ also ran as a separate process. Each command ran in a fresh folder holding",
        "`data/` (4 miniature-world images with captions), `run/` (a finished 2-step miniature run), `tiny/`",
        "(a tiny miniature model), `zimage/` (a tiny Z-Image-Turbo folder) and `dino/` (a tiny DINOv2 folder);",
        "paths below are relative to it, `<dopsd>` is the installed package.",
        "",
        f"{len(cases)} cases.",
    ]
    groups: dict[str, list[tuple[Case, Result]]] = {}
    for case, result in zip(cases, results):
        groups.setdefault(case.group, []).append((case, result))
    for group, rows in groups.items():
        out += ["", f"## {group}", "", "| bad input | command | exit | message |", "|---|---|---|---|"]
        for case, result in rows:
            mark = " ⚙" if case.subprocess else ""
            out.append(
                f"| {_cell(case.what)}{mark} | `dopsd {_cell(case.argv)}` | {result.code} | {_cell(result.message)} |"
            )
    return "\n".join(out) + "\n" + web_app


def run_all(cases: list[Case], scratch: Path) -> list[Result]:
    assets = build_assets(scratch / "assets")
    return [run_case(c, assets, scratch / "cases" / c.id) for c in cases]


def main() -> int:
    import tempfile

    from bad_input_cases import CASES
    from bad_input_cases_ui import UI_CASES, render_ui, run_ui_case

    with tempfile.TemporaryDirectory(prefix="dopsd-bad-inputs-") as tmp:
        results = run_all(CASES, Path(tmp))
        web = [run_ui_case(c, Path(tmp) / "web-app" / c.id) for c in UI_CASES]
    failed = [(c, r.problems(c)) for c, r in zip(CASES, results) if r.problems(c)]
    failed += [(c, problems) for c, (_, problems) in zip(UI_CASES, web) if problems]
    for case, problems in failed:
        print(f"FAILED {case.id}: {'; '.join(problems)}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} case(s) failed; {DOC} not written", file=sys.stderr)
        return 1
    DOC.write_text(render(CASES, results, render_ui(UI_CASES, [shown for shown, _ in web])))
    print(f"wrote {DOC}: {len(CASES)} cases")
    return 0


if __name__ == "__main__":
    import bad_inputs  # the cases import this module by name: run its copy, not __main__'s

    sys.exit(bad_inputs.main())

"""The README's numbers are those of their sources: the demo's table and the sentences about it are the demo's
summary.json (kept as docs/demo-summary.json, beside docs/demo.png from the same run), the GPU table is the
planner's output as docs/gpus-and-planning.md keeps it (and, as a slow check, what `python -m dopsd.planner.table`
prints now), and the count of bad inputs is docs/bad-inputs.md's."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SUMMARY = REPO / "docs" / "demo-summary.json"
GPU_PAGE = REPO / "docs" / "gpus-and-planning.md"
PLANNER = "`python -m dopsd.planner.table`"
ROWS = {"before": "before", "SFT": "sft", "D-OPSD": "dopsd"}


def _section(text: str, title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def _flat(text: str) -> str:
    return " ".join(text.split())


def _summary() -> dict:
    summary = json.loads(SUMMARY.read_text())
    # the format `dopsd demo` writes (tests/test_demo.py checks the command writes exactly this)
    assert set(summary) == {"before", "sft", "dopsd", "seconds"}
    return summary


def _shown(value: float, cell: str) -> bool:
    """Whether `cell` is `value` as printed with the cell's own number of decimals."""
    decimals = len(cell.split(".")[1]) if "." in cell else 0
    return f"{value:.{decimals}f}" == cell


def test_the_demo_table_is_the_demo_summary():
    _check_demo_table(README.read_text(), _summary())
    # the docs site's copy, on the miniature's page
    _check_demo_table((REPO / "docs" / "miniature.md").read_text(), _summary(), "The demo")


def _check_demo_table(readme: str, summary: dict, title: str = "The headline result") -> None:
    section = _section(readme, title)
    header = next(line for line in section.splitlines() if line.startswith("| |"))
    columns = [c.split()[0] for c in header.strip("|").split("|")[1:]]
    assert columns == ["concept_fidelity", "fewstep_quality", "unrelated_accuracy", "drift"]
    seen = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] not in ROWS:
            continue
        row = summary[ROWS[cells[0]]]
        for column, cell in zip(columns, cells[1:], strict=True):
            assert _shown(row[column], cell), f"README {cells[0]} {column}: {cell}, the summary has {row[column]}"
        seen.add(cells[0])
    assert seen == set(ROWS), f"README's demo table lacks rows: {set(ROWS) - seen}"


def test_the_headline_sentences_are_the_demo_summary():
    _check_headline(README.read_text(), _summary())
    _check_headline((REPO / "docs" / "miniature.md").read_text(), _summary(), "The demo")


def _check_headline(readme: str, s: dict, title: str = "The headline result") -> None:
    before, sft, dopsd = s["before"], s["sft"], s["dopsd"]
    text = _flat(_section(readme, title))
    accuracy = [s[m]["unrelated_accuracy"] for m in ("before", "sft", "dopsd")]
    drift = max(sft["drift"], dopsd["drift"])
    loss = 1 - sft["fewstep_quality"] / before["fewstep_quality"]
    expected = [
        f"D-OPSD learns the concept ({dopsd['concept_fidelity']:.2f} vs SFT's {sft['concept_fidelity']:.2f})",
        f"few-step quality ({dopsd['fewstep_quality']:.3f} vs {before['fewstep_quality']:.3f} before)",
        f"SFT loses {math.floor(100 * loss)}% of it ({sft['fewstep_quality']:.3f}",
        # a bound: the largest drift rounded up
        f"(accuracy {min(accuracy):.2f}–{max(accuracy):.2f}, drift ≤ {math.ceil(drift * 1000) / 1000:.3f})",
    ]
    missing = [e for e in expected if e not in text]
    assert not missing, f"README.md's headline does not say what the summary says: {missing}"


def _gpu_table(text: str, where: str) -> list[str]:
    """The planner's output as a page keeps it: the table after its 'Predicted … with' line (the date aside)."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Predicted ") and PLANNER in line), None)
    assert start is not None, f"{where} has no line 'Predicted … with {PLANNER}'"
    table = [re.sub(r"^Predicted \S+ ", "Predicted ", lines[start])]
    for line in lines[start + 1 :]:
        if line.startswith("|") or (not line and len(table) == 1):
            table.append(line)
        elif len(table) > 2:
            break
    assert len(table) > 4, f"{where}: no table after the planner's line"
    return table


def test_the_gpu_table_is_the_planners_as_the_docs_keep_it():
    _check_gpu_table(README.read_text())


def _check_gpu_table(text: str) -> None:
    readme = _section(text, "Real GPUs")
    assert "**Predictions, not measurements**" in readme
    assert _gpu_table(readme, "README.md") == _gpu_table(GPU_PAGE.read_text(), GPU_PAGE.name)


@pytest.mark.slow
def test_the_docs_gpu_table_is_what_the_planner_prints_now():
    """The full-size planner on fake tensors, three models (about 80 s of one core)."""
    printed = subprocess.run(
        [sys.executable, "-m", "dopsd.planner.table"], cwd=REPO, capture_output=True, text=True, timeout=1200
    )
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert _gpu_table(printed.stdout, "the planner's output") == _gpu_table(GPU_PAGE.read_text(), GPU_PAGE.name), (
        f"docs/gpus-and-planning.md's table (and the README's) is stale: paste {PLANNER}'s output"
    )


def test_the_count_of_bad_inputs_is_the_generated_tables():
    _check_bad_inputs(README.read_text())


def _check_bad_inputs(readme: str) -> None:
    page = (REPO / "docs" / "bad-inputs.md").read_text()
    count = re.search(r"^(\d+) cases\.$", page, re.M)
    assert count, "docs/bad-inputs.md has no 'N cases.' line"
    said = re.findall(r"answers to (\d+) of them", _flat(readme))
    assert said == [count.group(1)], f"README.md says {said}, docs/bad-inputs.md has {count.group(1)} cases"


def test_the_checks_see_a_wrong_number():
    assert _shown(0.703125, "0.703") and _shown(0.703125, "0.70") and not _shown(0.703125, "0.71")
    assert not _shown(0.7956, "0.797") and not _shown(0.0083, "0.009")
    assert _shown(0.0, "0") and _shown(0.002320235, "0.0023")
    page = "x\nPredicted 2026-01-01 with `python -m dopsd.planner.table` (GiB).\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\ny"
    other = page.replace("2026-01-01", "2027-05-05")
    assert _gpu_table(page, "a") == _gpu_table(other, "b")
    assert _gpu_table(page, "a") != _gpu_table(page.replace("| 1 |", "| 3 |"), "c")


@pytest.mark.parametrize(
    "check, shown, wrong",
    [
        (_check_demo_table, "| SFT | 0.672 |", "| SFT | 0.673 |"),
        (_check_headline, "(0.91 vs SFT's 0.67)", "(0.92 vs SFT's 0.67)"),
        (_check_headline, "drift ≤ 0.008", "drift ≤ 0.007"),
        (_check_gpu_table, "| Z-Image-Turbo | bf16 | 16.3 |", "| Z-Image-Turbo | bf16 | 16.4 |"),
        (_check_bad_inputs, "answers to 154 of them", "answers to 129 of them"),
    ],
)
def test_each_check_fails_on_one_changed_number(check, shown, wrong):
    readme = README.read_text()
    assert shown in readme, f"the README no longer says {shown!r}: pick another number for this test"
    args = (_summary(),) if check in (_check_demo_table, _check_headline) else ()
    check(readme, *args)
    with pytest.raises(AssertionError):
        check(readme.replace(shown, wrong), *args)

"""The table of bad inputs (tests/bad_input_cases.py) through the real command line; docs/bad-inputs.md stays current.

Each case must exit non-zero without a traceback or an internal-error report, with a message naming the
offending file/key/flag, and write, change or delete nothing. Regenerate the table: `.venv/bin/python tests/bad_inputs.py`.
"""

from __future__ import annotations

import pytest
from bad_input_cases import CASES
from bad_inputs import DOC, REGENERATE, Result, build_assets, render, run_case

RESULTS: dict[str, Result] = {}  # filled by the cases, read by the table check that runs after them


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("bad-input-assets"))


def _check(case, assets, folder) -> Result:
    result = run_case(case, assets, folder)
    problems = result.problems(case)
    assert not problems, (
        f"dopsd {case.argv}: {'; '.join(problems)}\nexit {result.code}\nstderr:\n{result.stderr}"
        f"\nstdout:\n{result.stdout[-2000:]}"
    )
    return result


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_clear_message(case, assets, tmp_path):
    RESULTS[case.id] = _check(case, assets, tmp_path / "case")


def test_the_table_of_bad_inputs_is_current(assets, tmp_path):
    """docs/bad-inputs.md is what the cases print now (cases not run above in this session run here)."""
    results = [RESULTS.get(c.id) or _check(c, assets, tmp_path / c.id) for c in CASES]
    assert len(CASES) >= 60
    assert DOC.is_file() and DOC.read_text() == render(CASES, results), f"{DOC.name} is stale: run `{REGENERATE}`"

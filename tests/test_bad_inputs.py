"""The table of bad inputs (tests/bad_input_cases.py) through the real command line; docs/bad-inputs.md stays current.

Each case must exit non-zero without a traceback or an internal-error report, with a message naming the
offending file/key/flag, and write, change or delete nothing. Regenerate the table: `.venv/bin/python tests/bad_inputs.py`.
"""

from __future__ import annotations

import pytest
from bad_input_cases import CASES
from bad_input_cases_ui import UI_CASES, render_ui, run_ui_case
from bad_inputs import DOC, REGENERATE, Result, build_assets, render, run_case

RESULTS: dict[str, Result] = {}  # filled by the cases, read by the table check that runs after them
WEB_APP: dict[str, str] = {}  # the web app's answers, the same way


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


@pytest.mark.parametrize("case", UI_CASES, ids=[c.id for c in UI_CASES])
def test_the_web_app_answers_a_bad_request_clearly_and_changes_nothing(case, tmp_path):
    WEB_APP[case.id] = _check_web_app(case, tmp_path / "case")


def _check_web_app(case, folder) -> str:
    shown, problems = run_ui_case(case, folder)
    assert not problems, f"{case.shown}: {'; '.join(problems)}\nanswer: {shown}"
    return shown


def test_the_table_of_bad_inputs_is_current(assets, tmp_path):
    """docs/bad-inputs.md is what the cases print now (cases not run above in this session run here)."""
    results = [RESULTS.get(c.id) or _check(c, assets, tmp_path / c.id) for c in CASES]
    web = [WEB_APP.get(c.id) or _check_web_app(c, tmp_path / c.id) for c in UI_CASES]
    assert len(CASES) >= 60
    table = render(CASES, results, render_ui(UI_CASES, web))
    assert DOC.is_file() and DOC.read_text() == table, f"{DOC.name} is stale: run `{REGENERATE}`"

"""The bad inputs of tests/test_bad_inputs.py and docs/bad-inputs.md (see tests/bad_inputs.py), in the table's order.

A case is a command run in a fresh folder holding data/, run/ (copies) and tiny/, zimage/, dino/ (links), plus
whatever its setup writes (tests/bad_input_setups.py); `expect` lists what the message must name. The cases are
kept by group in tests/bad_input_cases_{config,folders,commands,runs,ui}.py; the web app's requests (their own
table section) in tests/bad_input_cases_ui.py.
"""

from __future__ import annotations

from bad_input_cases_commands import COMMAND_CASES
from bad_input_cases_config import CONFIG_CASES
from bad_input_cases_folders import FOLDER_CASES
from bad_input_cases_runs import RUN_CASES
from bad_input_cases_ui import UI_COMMAND_CASES
from bad_inputs import Case

CASES: list[Case] = [*CONFIG_CASES, *FOLDER_CASES, *COMMAND_CASES, *RUN_CASES, *UI_COMMAND_CASES]

assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"

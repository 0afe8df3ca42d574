"""The New-run form and a run's states in a real headless Chromium: a run that cannot start is refused at the field
its reason concerns and nothing is queued; nonsense values are refused in the browser with the config's own
rules; a queued run is cancelled after a confirmation; a refused resume says why and a stopped run lists its
checkpoints; the miniature is offered no diffusers/ComfyUI export.

Every wait is a WebDriverWait with a generous timeout (the machine may be busy); nothing sleeps.
"""

from __future__ import annotations

import sys

import pytest
import test_ui_browser
from conftest import write_concept_folder
from test_ui_browser import App, css, set_value, until

driver = test_ui_browser.driver  # the same headless Chromium fixture (one browser per module)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def error_at(d, key: str) -> str:
    """The message shown at a form field (empty when none)."""
    found = d.find_elements("id", f"error-{key}")
    return found[0].text if found and found[0].is_displayed() else ""


def nothing_queued(app: App) -> None:
    home = app.ctx.home.root
    assert not app.ctx.jobs.list(), [j.title for j in app.ctx.jobs.list()]
    assert not list((home / "runs").iterdir()) and not list((home / "configs").iterdir())


def open_form(d, app: App, dataset: str = "") -> None:
    d.get(f"{app.url}/#/new" + (f"?dataset={dataset}" if dataset else ""))
    until(
        d,
        lambda d: css(d, "#start-run") and css(d, 'input[name="train.max_steps"]')[0].get_attribute("value"),
        60,
        "the new-run form",
    )


@pytest.fixture
def app(tmp_path):
    home = tmp_path / "home"
    write_concept_folder(home / "datasets/concept", n=4)  # 32×32 renders: fine for the miniature, too small for Z-Image
    a = App(home)
    yield a
    a.close()


def test_a_run_that_cannot_start_is_refused_at_its_field(driver, app):
    d = driver
    d.get(app.login)
    until(d, lambda d: css(d, "header nav"), 60, "the app")
    open_form(d, app)
    css(d, "#start-run")[0].click()  # no dataset chosen
    until(d, lambda d: "choose a dataset" in error_at(d, "dataset"), 120, "the reason at the dataset field")
    assert d.current_url.endswith("#/new")  # the form stays
    assert css(d, 'select[name="dataset"]')[0].get_attribute("aria-invalid") == "true"
    nothing_queued(app)

    # a real model's preset, no model folder: both reasons, each at its field, before anything is queued
    css(d, 'select[name="preset"] option[value="zimage-turbo"]')[0].click()
    css(d, 'select[name="dataset"] option[value="concept"]')[0].click()
    until(d, lambda d: not error_at(d, "dataset"), 30, "the dataset message to clear on a new choice")
    set_value(d, 'input[name="model.pretrained"]', "/nonexistent/Z-Image-Turbo")
    css(d, "#start-run")[0].click()
    until(d, lambda d: "does not exist" in error_at(d, "model.pretrained"), 120, "the model folder's reason")
    shown = error_at(d, "dataset")
    assert "smaller than the minimum side 512" in shown, shown  # the dataset check `dopsd train` runs
    assert d.current_url.endswith("#/new") and css(d, 'input[name="model.pretrained"]')[0].get_attribute("value")
    nothing_queued(app)


def test_nonsense_values_are_refused_in_the_browser_and_a_queued_run_is_cancelled(driver, app):
    d = driver
    d.get(app.login)
    until(d, lambda d: css(d, "header nav"), 60, "the app")
    rules = d.execute_script("return fetch('/api/presets').then((r) => r.json()).then((p) => p.rules)")
    assert rules["train.max_steps"]["le"] == 100_000 and rules["lora.rank"] == {
        "type": "int",
        "nullable": False,
        "ge": 1,
    }
    open_form(d, app, "concept")
    for key, typed, said in (
        ("train.max_steps", "1e9", "1e9 is too many"),  # the browser's own words (the server would say 1e+09)
        ("lora.rank", "2.5", "whole number"),
        ("optim.lr", "abc", "not a number"),
        ("optim.lr", "-1", "greater than 0"),
    ):
        set_value(d, f'input[name="{key}"]', typed)
        until(d, lambda d, key=key, said=said: said in error_at(d, key), 30, f"{key}={typed} refused as typed")
    set_value(d, "input[name=name]", "-bad name")
    until(d, lambda d: "letters, digits" in error_at(d, "name"), 30, "the run name's rule")
    assert d.execute_script("return document.querySelector('input[name=name]').matches(':invalid')")  # pattern applies
    css(d, "#start-run")[0].click()
    until(d, lambda d: css(d, ".notice.error"), 30, "the refusal")
    assert d.current_url.endswith("#/new?dataset=concept")
    nothing_queued(app)

    # fixed, with the only job slot taken: the run is queued, and Cancel (after its confirmation) takes it out
    busy = app.ctx.jobs.submit("bench", [sys.executable, "-c", "import time; time.sleep(600)"], "busy")
    until(d, lambda d: app.ctx.jobs.get(busy.id).status == "running", 60, "the job that holds the slot")
    for key, value in (("train.max_steps", "4"), ("lora.rank", "4"), ("optim.lr", "5e-4"), ("name", "waits")):
        set_value(d, f'input[name="{key}"]' if "." in key else f"input[name={key}]", value)
    css(d, "#start-run")[0].click()
    until(d, lambda d: d.current_url.endswith("#/runs/waits"), 120, "the run page")
    until(d, lambda d: css(d, 'h1 .badge[data-status="queued"]') and css(d, "#cancel-run"), 60, "the queued run")
    assert css(d, "#cancel-run")[0].text == "Cancel" and not css(d, "#stop-run")
    job = next(j for j in app.ctx.jobs.list() if j.target.get("run") == "waits")
    assert job.argv[-1].endswith("runs-waits.yaml")
    css(d, "#cancel-run")[0].click()
    until(d, lambda d: d.switch_to.alert, 30, "the confirmation").dismiss()  # said no: still queued
    assert app.ctx.jobs.get(job.id).status == "queued"
    css(d, "#cancel-run")[0].click()
    until(d, lambda d: d.switch_to.alert, 30, "the confirmation").accept()
    until(d, lambda d: css(d, 'h1 .badge[data-status="cancelled"]'), 60, "the cancelled run")
    assert app.ctx.jobs.get(job.id).status == "cancelled" and not (app.ctx.home.root / "runs/waits").exists()
    assert app.ctx.jobs.get(busy.id).status == "running"  # only the queued run was touched


def test_a_refused_resume_says_why_and_checkpoints_are_listed(driver, app):
    """A stopped run whose dataset was moved away since: Resume is refused with the dataset check's reason, shown
    on the page (not a status that flips back); its checkpoints are listed with their files."""
    from dopsd.ui import adapter

    d = driver
    home = app.ctx.home.root
    run = home / "runs/halted"
    data = write_concept_folder(home / "datasets/gone", n=2)
    cfg = adapter.resolve("mini", {"data.path": str(data), "data.trigger_word": "sks"})
    adapter.set_key(cfg, "train.output_dir", str(run))
    (run / "checkpoints/step-0000002").mkdir(parents=True)
    (run / "config.yaml").write_text(adapter.to_yaml(cfg))
    (run / "checkpoints/step-0000002/state.json").write_text('{"step": 2}')
    (run / "checkpoints/step-0000002/trainable.safetensors").write_bytes(b"\0" * 64)
    for f in data.iterdir():
        f.unlink()
    data.rmdir()
    d.get(app.login)
    until(d, lambda d: css(d, "header nav"), 60, "the app")
    d.get(f"{app.url}/#/runs/halted")
    until(
        d,
        lambda d: css(d, "#resume-run") and css(d, '#checkpoints li[data-checkpoint="step-0000002"]'),
        60,
        "the stopped run with its checkpoint",
    )
    link = css(d, "#checkpoints a.checkpoint-file")[-1].get_attribute("href")
    assert link.endswith("/files/runs/halted/checkpoints/step-0000002/trainable.safetensors?download=1")
    css(d, "#resume-run")[0].click()
    until(d, lambda d: "cannot resume" in css(d, "#resume-refused")[0].text, 120, "the resume's reason")
    assert "does not exist" in css(d, "#resume-refused")[0].text
    assert not app.ctx.jobs.list() and css(d, 'h1 .badge[data-status="stopped"]')


def test_a_run_that_fails_after_it_started_shows_why_on_its_page(driver, app):
    """A failure only the job itself finds (the miniature's loader, given a weights file that does not exist): the
    run's page shows the command's own message, not only a status and a folded log."""
    d = driver
    d.get(app.login)
    until(d, lambda d: css(d, "header nav"), 60, "the app")
    open_form(d, app, "concept")
    for key, value in (("name", "broken"), ("model.pretrained", "/nonexistent/mini.safetensors")):
        set_value(d, f'input[name="{key}"]' if "." in key else f"input[name={key}]", value)
    css(d, "#start-run")[0].click()
    until(d, lambda d: d.current_url.endswith("#/runs/broken"), 120, "the run page")
    until(d, lambda d: "nonexistent" in css(d, "#run-failure .failure-reason")[0].text, 300, "the reason it failed")
    assert css(d, "#run-failure")[0].text.startswith("The run failed")
    assert css(d, "#run-failure .failure-reason")[0].text.startswith("dopsd train: ")

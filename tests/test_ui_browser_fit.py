""" "Will it fit?" and the run queue in a real headless Chromium.

The New-run form answers, for Z-Image-Turbo at 1024² (planned on fake tensors: no weights), one line per card size
for the chosen method, once, with at most one plan process at any moment while the settings change under it, and
the answer shown is the latest settings' (never a cancelled request's); the same settings again are answered from
the kept answer. A queued run is listed under Runs and cancelled there; a cancelled run is cloned with changes
(the form filled in with its config) and deleted after a confirmation that names what goes; a run copied into
the home is never offered for deletion; a failed run is retried; job titles link to their runs.

Every wait is a WebDriverWait with a generous timeout (the machine may be busy); nothing sleeps.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request

import pytest
import test_ui_browser
import yaml
from conftest import write_concept_folder
from test_ui_browser import App, css, set_value, until
from ui_support import FAST_RUN, HEADERS, write_zimage_lora_run

driver = test_ui_browser.driver  # the same headless Chromium fixture (one browser per module)


@pytest.mark.slow
def test_the_plan_process_answers_as_dopsd_plan_does():
    """The app's plan process plans one method, re-measures only the optimizer phase for 8-bit AdamW and the
    feature caching once: its answers must be `dopsd plan`'s. The miniature at a batch of 16384 does not fit a
    16 GB card (activations), so the search runs too."""
    from dataclasses import replace

    from dopsd.config import load_config
    from dopsd.models.registry import plan_spec
    from dopsd.planner.plan import Planner, choice_from_config, plan
    from dopsd.ui.fit.worker import PHASES_OF, FitPlanner, answer

    cfg = load_config("mini", ["train.batch_size=16384"])
    spec = plan_spec(cfg.model, "mini")
    c = choice_from_config(cfg)
    full = Planner(cfg, spec, "gpu", None)
    for method in ("sft", "dopsd_prior"):  # every phase between them
        fit = FitPlanner(cfg, spec, "gpu", None, only=PHASES_OF[method])
        for cand in (c, replace(c, eight_bit=True), replace(c, eight_bit=True, lora_rank=4)):
            assert fit.peaks(cand)[method]["peak"] == full.peaks(cand)[method]["peak"], (method, cand)
            assert fit.sampling(cand)[method] == full.sampling(cand)[method], (method, cand)
    expected = plan(cfg)
    events: list[tuple[str, dict]] = []
    answer(cfg, lambda event, data: events.append((event, data)))
    (kind, base), *cards = events
    want = expected["methods"]["dopsd"]
    assert kind == "base" and base["peaks_gb"]["run"] == pytest.approx(want["run_peak_gb"], rel=1e-3)
    assert {k: v["fits"] for k, v in base["cards"].items()} == want["fits"]
    assert not want["fits"]["16"] and want["fits"]["24"]  # the case this test is for
    searched = {str(d["card"]): d for kind, d in cards if kind == "card"}
    assert set(searched) == set(expected["suggestions"]["dopsd"]) == {"16"}
    assert searched["16"]["changes"] == expected["suggestions"]["dopsd"]["16"]["changes"]


def plan_processes() -> int:
    """This process's children that are plan processes (the app runs in this process, in a thread)."""
    me, found = os.getpid(), 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as fh:
                stat = fh.read().rsplit(")", 1)[-1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
        except OSError:
            continue
        if stat[0] != "Z" and int(stat[1]) == me and b"dopsd.ui.fit.worker" in cmd:
            found += 1
    return found


def api(app: App, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    headers = {**app.auth, **HEADERS, "content-type": "application/json", "origin": app.url}
    request = urllib.request.Request(f"{app.url}{path}", data=data, headers=headers)
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def click(d, selector: str, what: str) -> None:
    """Click, again while something covers it (a notice fading out) or the list is being redrawn."""
    until(d, lambda d: css(d, selector)[0].click() or True, 60, what)


def login(d, app: App) -> None:
    d.get(app.login)
    until(d, lambda d: css(d, "header nav"), 60, "the app")


@pytest.mark.browser
@pytest.mark.slow
def test_will_it_fit_names_each_card_once_with_one_plan_at_a_time(driver, tmp_path):
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select

    d = driver
    app = App(tmp_path / "home")
    seen = {"most": 0}

    def watch() -> int:
        now = max(app.ctx.fit.in_flight(), plan_processes())
        seen["most"] = max(seen["most"], now)
        return now

    try:
        login(d, app)
        d.get(f"{app.url}/#/new")
        until(d, lambda d: css(d, "#plan") and css(d, 'input[name="lora.rank"]'), 60, "the new-run form")
        Select(css(d, "select[name=preset]")[0]).select_by_value("zimage-turbo")
        until(d, lambda d: css(d, 'input[name="lora.rank"]')[0].get_attribute("value") == "64", 30, "the preset")
        # change the settings while each plan runs: every change cancels the plan in flight (its process killed)
        previous = None
        for rank in ("32", "16", "64"):

            def planning(d, before=previous):
                shown = css(d, "#fit[data-state=running]")
                return watch() == 1 and shown and shown[0].get_attribute("data-request") != before and shown[0]

            previous = until(d, planning, 300, "a new plan in flight").get_attribute("data-request")
            set_value(d, 'input[name="lora.rank"]', rank)
            css(d, 'input[name="lora.rank"]')[0].send_keys(Keys.TAB)  # a change event, as a user leaving the field

        def answered(d) -> bool:
            watch()
            return bool(css(d, "#fit[data-state=done]")) and len(css(d, "#fit-cards li")) == 4

        until(d, answered, 900, "the fit answer for Z-Image-Turbo at 1024²")
        assert seen["most"] <= 1, f"{seen['most']} plan processes at once"
        assert app.ctx.fit.processes_started >= 3  # the rank-32 and rank-16 plans were killed, not left to finish
        assert len(css(d, "#fit")) == 1 and len(css(d, "#fit-cards")) == 1
        head = css(d, "#fit .fit-head")[0].text
        assert "Z-Image" in head and "1024x1024" in head and "LoRA r64" in head, head  # the latest settings' answer
        text = css(d, "#fit-cards")[0].text
        for size in (16, 24, 48, 80):
            assert text.count(f"{size} GB:") == 1, text
        lines = {li.get_attribute("data-card"): li for li in css(d, "#fit-cards li")}
        assert lines["80"].get_attribute("data-fits") == "yes"
        # 16 GB: the planner predicts ~17.5 GB at rank 64; whatever it says, the line says fits, or what to change
        assert lines["16"].get_attribute("data-fits") in ("yes", "with-changes", "no")
        if lines["16"].get_attribute("data-fits") == "with-changes":
            assert "=" in lines["16"].find_element("css selector", "code").text
        # the breakdown, rounded, behind a disclosure
        assert not css(d, "#fit-breakdown")[0].is_displayed()
        css(d, "#fit details summary")[0].click()
        cells = [td.text for td in css(d, "#fit-breakdown td")]
        assert cells and all(len(c.split()[0]) <= 5 for c in cells), cells  # e.g. "11.5 GB", never 17 digits

        # the same settings again (another visit): the kept answer, at once
        d.get(f"{app.url}/#/datasets")
        d.get(f"{app.url}/#/new")
        until(d, lambda d: css(d, "select[name=preset]"), 60, "the new-run form again")
        Select(css(d, "select[name=preset]")[0]).select_by_value("zimage-turbo")
        until(d, lambda d: css(d, "#fit[data-state=done]") and "kept answer" in css(d, "#fit")[0].text, 60, "kept")
        assert "LoRA r64" in css(d, "#fit .fit-head")[0].text and watch() <= 1
    finally:
        app.close()
    assert plan_processes() == 0  # closing the app ends its plan process


@pytest.mark.browser
@pytest.mark.slow
def test_queue_cancel_clone_delete_retry(driver, tmp_path):
    d = driver
    home = tmp_path / "home"
    write_concept_folder(home / "datasets/concept", n=4)
    app = App(home)
    try:
        login(d, app)
        # a run whose job fails (its command exits 3), as the app records one
        (home / "configs/runs-broken.yaml").write_text(
            yaml.safe_dump({"preset": "mini", "train": {"output_dir": str(home / "runs/broken")}})
        )
        fail = [sys.executable, "-c", "raise SystemExit(3)"]
        broken = app.ctx.jobs.submit("train", fail, "train broken", {"run": "broken"})
        until(d, lambda d: app.ctx.jobs.get(broken.id).status == "failed", 120, "the failing job")
        # the only job slot taken: a run started now waits in the queue
        busy = app.ctx.jobs.submit("bench", [sys.executable, "-c", "import time; time.sleep(600)"], "busy")
        until(d, lambda d: app.ctx.jobs.get(busy.id).status == "running", 60, "the job that holds the slot")
        values = {**FAST_RUN, "method.name": "dopsd", "lora.rank": 4, "optim.lr": 5e-4}
        api(app, "/api/runs", {"preset": "mini", "dataset": "concept", "name": "waits", "values": values})
        write_zimage_lora_run(home / "runs/copied")  # trained elsewhere, copied in: never deletable here

        d.get(f"{app.url}/#/runs")
        row = 'tr[data-run="waits"]'
        until(d, lambda d: css(d, f'{row} .badge[data-status="queued"]'), 60, "the queued run in the list")
        assert css(d, 'tr[data-run="broken"] .badge[data-status="failed"]')
        assert not css(d, 'tr[data-run="copied"] [data-action=delete]')
        click(d, f"{row} [data-action=cancel]", "Cancel")
        until(d, lambda d: d.switch_to.alert, 30, "the confirmation").accept()
        until(d, lambda d: css(d, f'{row} .badge[data-status="cancelled"]'), 60, "the cancelled run")
        assert app.ctx.jobs.get(busy.id).status == "running"

        # retry the failed run: its command is queued again
        click(d, 'tr[data-run="broken"] [data-action=retry]', "Retry")
        until(d, lambda d: len([j for j in app.ctx.jobs.list() if j.target.get("run") == "broken"]) == 2, 60, "retry")
        assert app.ctx.jobs.last_for("run", "broken").argv == fail

        # clone with changes: the form filled in with the run's config; one value changed; started
        click(d, f"{row} [data-action=clone]", "Clone with changes")
        until(d, lambda d: css(d, "#clone-note") and css(d, "input[name=name]")[0].get_attribute("value"), 60, "clone")
        assert css(d, "input[name=name]")[0].get_attribute("value") == "waits-clone"
        assert css(d, "select[name=dataset]")[0].get_attribute("value") == "concept"
        assert css(d, 'input[name="lora.rank"]')[0].get_attribute("value") == "4"
        assert css(d, 'input[name="train.max_steps"]')[0].get_attribute("value") == str(FAST_RUN["train.max_steps"])
        set_value(d, 'input[name="train.max_steps"]', "20")
        click(d, "#start-run", "Start run")
        until(d, lambda d: d.current_url.endswith("#/runs/waits-clone"), 120, "the clone's run page")
        cloned = yaml.safe_load((home / "configs/runs-waits-clone.yaml").read_text())
        original = yaml.safe_load((home / "configs/runs-waits.yaml").read_text())
        assert cloned["train"]["max_steps"] == 20 and original["train"]["max_steps"] == FAST_RUN["train.max_steps"]
        for section, key in (("lora", "rank"), ("optim", "lr"), ("data", "path"), ("sample", "every")):
            assert cloned[section][key] == original[section][key], (section, key)

        # job titles link to their runs
        d.get(f"{app.url}/#/jobs")
        until(d, lambda d: css(d, 'a.job-target[href="#/runs/waits-clone"]'), 60, "the job's link to its run")

        # delete the cancelled run: the confirmation names what goes; the list and the config file lose it
        with pytest.raises(urllib.error.HTTPError) as unconfirmed:  # a request that does not name the run
            api(app, "/api/runs/waits/delete", {})
        assert unconfirmed.value.code == 400 and (home / "configs/runs-waits.yaml").is_file()
        d.get(f"{app.url}/#/runs")
        until(d, lambda d: css(d, f"{row} [data-action=delete]"), 60, "Delete on the cancelled run")
        click(d, f"{row} [data-action=delete]", "Delete")
        alert = until(d, lambda d: d.switch_to.alert, 30, "the confirmation")
        assert "configs/runs-waits.yaml" in alert.text
        alert.dismiss()  # said no: nothing goes
        assert (home / "configs/runs-waits.yaml").is_file()
        click(d, f"{row} [data-action=delete]", "Delete")
        until(d, lambda d: d.switch_to.alert, 30, "the confirmation").accept()
        until(d, lambda d: not css(d, row), 60, "the deleted run to leave the list")
        assert not (home / "configs/runs-waits.yaml").exists()
        assert (home / "runs/copied/lora.safetensors").is_file() and (home / "datasets/concept").is_dir()
        refused = api(app, "/api/runs/copied/delete")
        assert not refused["deletable"] and "not created by this app" in refused["why"]
    finally:
        app.close()

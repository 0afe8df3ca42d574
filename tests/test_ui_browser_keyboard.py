"""`dopsd ui` by keyboard alone, in a real headless Chromium: every control is reachable with Tab and works with the
browser's own keys (the method radios with the arrows, the file input with send_keys on the focused element, Enter
in a form submits it); pictures enlarge in a dialog that Esc closes; caption edits survive a preset or trigger
word change and in-app navigation; the run page shows its grids labelled with their prompts, over the steps.

The run page is read from a run folder written here as `dopsd train` leaves it (small real PNG grids, losses,
health, summary and samples/grid.json): what these tests check is the page, not training
(tests/test_ui_browser.py and tests/test_ui_screenshots.py train the miniature for real).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_ui_browser
from conftest import write_concept_folder
from PIL import Image
from test_ui_browser import App, css, until

driver = test_ui_browser.driver  # the headless Chromium fixture (one per module)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PROMPTS = ["a sks circle on a gray background", "a red square", "a blue circle"]
SEEDS = [0, 1]
STEPS = [0, 4, 8, None]  # None: the final grids


def write_run(folder: Path) -> Path:
    """A finished miniature run folder: grids at 4 and 32 steps (rows: PROMPTS, columns: SEEDS, each cell its own
    colour), losses, few-step health, summary."""
    (folder / "samples").mkdir(parents=True)
    for step in STEPS:
        tag = "final" if step is None else f"step-{step:07d}"
        for k in (4, 32):
            grid = Image.new("RGB", (len(SEEDS) * 34 + 2, len(PROMPTS) * 34 + 2), "white")
            for r in range(len(PROMPTS)):
                for c in range(len(SEEDS)):
                    shade = (40 * r + 60, 30 * c + 80, (step or 12) * 15 % 255)
                    grid.paste(Image.new("RGB", (32, 32), shade), (2 + c * 34, 2 + r * 34))
            grid.resize((grid.width * 3, grid.height * 3), Image.Resampling.NEAREST).save(
                folder / "samples" / f"{tag}_{k}steps.png"
            )
    (folder / "samples/grid.json").write_text(json.dumps({"prompts": PROMPTS, "seeds": SEEDS}))
    (folder / "config.yaml").write_text(
        "preset: mini\nmodel: {family: mini}\nmethod: {name: dopsd}\ntrain: {max_steps: 12}\n"
    )
    (folder / "losses.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 0.5 / s, "lr": 1e-4}) + "\n" for s in range(1, 13))
    )
    (folder / "health.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "health": 1 - 0.01 * s, "sharpness": 1 - 0.02 * s, "gap": 0.99, "threshold": 0.93})
            + "\n"
            for s in (0, 4, 8, 12)
        )
    )
    (folder / "progress.json").write_text(json.dumps({"step": 12, "max_steps": 12, "status": "ok"}))
    (folder / "summary.json").write_text(
        json.dumps({"status": "ok", "steps": 12, "final_loss": 0.0416666666667, "elapsed_s": 95.4, "peak_gb": 1.23456})
    )
    return folder


def keys():
    from selenium.webdriver.common.keys import Keys

    return Keys


def active(d):
    return d.switch_to.active_element


def tab_to(d, matches, limit: int = 60, what: str = "the control"):
    """Press Tab until the focused element matches (the browser's own focus order), or fail."""
    for _ in range(limit):
        el = active(d)
        if matches(el):
            return el
        el.send_keys(keys().TAB)
    raise AssertionError(f"Tab never reached {what} in {limit} presses")


UNREACHABLE = """
const out = [];
for (const el of document.querySelectorAll('main button, main input, main select, main textarea, main a[href], main summary')) {
  if (el.closest('[hidden]') || el.disabled) continue;  // not offered right now
  const style = getComputedStyle(el);
  const ok = style.display !== 'none' && style.visibility !== 'hidden' && el.tabIndex >= 0 && !el.closest('[inert]');
  const named = el.matches('input, select, textarea')
    ? el.labels.length || el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')
    : (el.textContent || '').trim() || el.getAttribute('aria-label');
  if (!named) out.push(`${el.tagName.toLowerCase()}[${el.name || el.type || ''}] has no label`);
  if (!ok) out.push(`${el.tagName.toLowerCase()}${el.id ? '#' + el.id : ''}[${el.name || el.type || ''}] "${(el.textContent || '').trim().slice(0, 30)}" display=${style.display}`);
}
return out;
"""


def unreachable(d) -> list[str]:
    """Controls on the page that Tab cannot reach (display:none, invisible or taken out of the tab order), or that
    have no name for a screen reader (no label, text or aria-label)."""
    return d.execute_script(UNREACHABLE)


def test_every_control_by_keyboard(driver, tmp_path):
    d, K = driver, keys()
    home = tmp_path / "home"
    source = write_concept_folder(tmp_path / "upload", n=3)
    write_run(home / "runs/kb-run")
    app = App(home)
    try:
        d.get(app.login)
        d.get(f"{app.url}/#/datasets")
        until(d, lambda d: css(d, "input[name=dataset-name]"), 30, "the datasets page")
        assert not unreachable(d), unreachable(d)
        # Enter in the new dataset's name submits its form
        css(d, "input[name=dataset-name]")[0].send_keys("kb", K.ENTER)
        until(d, lambda d: d.current_url.endswith("#/datasets/kb") and css(d, "input[name=trigger]"), 30, "the dataset")
        # Tab from the trigger word reaches the upload control; the focused file input takes the files
        css(d, "input[name=trigger]")[0].click()
        upload = tab_to(d, lambda el: el.get_attribute("id") == "upload-input", what="the upload control")
        assert d.execute_script("return getComputedStyle(arguments[0].closest('label')).outlineStyle", upload) != "none"
        upload.send_keys("\n".join(sorted(str(p) for p in source.iterdir())))
        until(d, lambda d: len(css(d, ".file")) == 3, 60, "three uploaded images")
        assert not unreachable(d), unreachable(d)
        # a thumbnail: Enter enlarges it in a dialog, Esc closes it and the focus comes back
        thumb = css(d, ".file a.zoom")[0]
        thumb.send_keys(K.ENTER)
        until(
            d, lambda d: d.execute_script("return document.getElementById('lightbox').open"), 10, "the enlarged image"
        )
        active(d).send_keys(K.ESCAPE)
        until(d, lambda d: not d.execute_script("return document.getElementById('lightbox').open"), 10, "Esc to close")
        assert active(d) == css(d, ".file a.zoom")[0]

        # --- new run: the method radios by Tab and the arrow keys --------------------------------------------------
        d.get(f"{app.url}/#/new?dataset=kb")
        until(d, lambda d: css(d, "input[name='model.pretrained']") and css(d, "#start-run"), 30, "the new-run form")
        assert not unreachable(d), unreachable(d)
        css(d, "input[name='model.pretrained']")[0].click()
        radio = tab_to(d, lambda el: el.get_attribute("name") == "method", 5, "a method radio")
        first = radio.get_attribute("value")
        label = radio.find_element("xpath", "..")
        assert d.execute_script("return getComputedStyle(arguments[0]).outlineStyle", label) != "none"  # focus shows
        radio.send_keys(K.ARROW_RIGHT)
        chosen = css(d, "input[name=method]:checked")[0].get_attribute("value")
        assert chosen != first and active(d).get_attribute("value") == chosen
        active(d).send_keys(K.ARROW_LEFT)
        assert css(d, "input[name=method]:checked")[0].get_attribute("value") == first
        group = css(d, "[role=radiogroup]")[0]
        assert d.execute_script(
            "return document.getElementById(arguments[0].getAttribute('aria-labelledby')).textContent", group
        )

        # --- the run page: labelled gallery, slider over the steps, lightbox, separate health charts --------------
        d.get(f"{app.url}/#/runs/kb-run")
        until(d, lambda d: len(css(d, "#over-steps tbody tr")) == len(PROMPTS), 30, "the gallery with its prompts")
        assert not unreachable(d), unreachable(d)
        assert [p.text for p in css(d, "#latest-samples figure")[0].find_elements("css selector", ".prompt")] == PROMPTS
        assert [h.text for h in css(d, "#over-steps thead th")][1:] == ["step 0", "step 4", "step 8", "final"]
        assert "final" in css(d, "#latest-samples figcaption")[0].text
        slider = css(d, "#gallery-slider")[0]
        slider.send_keys(K.ARROW_LEFT)
        until(d, lambda d: "step 8" in css(d, "#latest-samples figcaption")[0].text, 10, "the slider to step 8")
        zoom = css(d, "#over-steps tbody tr")[1].find_elements("css selector", "button.zoom")[0]
        zoom.send_keys(K.SPACE)
        until(d, lambda d: "step 0" in css(d, "#lightbox-title")[0].text, 10, "the enlarged grid at step 0")
        assert [p.text for p in css(d, "#lightbox .prompt")] == PROMPTS
        active(d).send_keys(K.ARROW_RIGHT)
        until(d, lambda d: "step 4" in css(d, "#lightbox-title")[0].text, 10, "→ to the next step")
        active(d).send_keys(K.ESCAPE)
        until(d, lambda d: not d.execute_script("return document.getElementById('lightbox').open"), 10, "Esc to close")
        measures = [c.get_attribute("data-measure") for c in css(d, "svg.chart[data-measure]")]
        assert measures[:3] == ["health", "sharpness", "gap"]  # each its own chart and axis
        summary = {r.find_element("css selector", "th").text: r.text for r in css(d, "#summary-table tr")}
        assert summary["final_loss"].endswith("0.0417") and summary["elapsed_s"].endswith("1 min 35 s")

        # --- every other page: nothing that Tab cannot reach -------------------------------------------------------
        for page, ready in (
            ("runs", "#runs-table"),
            ("probes", "h1"),
            ("compare", "#start-compare"),
            ("reports", "#start-demo"),
            ("jobs", "h1"),
        ):
            d.get(f"{app.url}/#/{page}")
            until(d, lambda d, ready=ready: css(d, ready), 30, f"the {page} page")
            assert not unreachable(d), (page, unreachable(d))
    finally:
        app.close()


def test_caption_edits_are_kept(driver, tmp_path):
    d, K = driver, keys()
    home = tmp_path / "home"
    write_concept_folder(home / "datasets/cap", n=2)
    app = App(home)
    box = 'textarea[data-file="img00.png"]'
    try:
        d.get(app.login)
        d.get(f"{app.url}/#/datasets/cap")
        until(d, lambda d: css(d, box), 120, "the dataset")
        before = (home / "datasets/cap/img00.txt").read_text()
        css(d, box)[0].send_keys(K.END, " with a draft")
        until(d, lambda d: css(d, '.file.unsaved[data-name="img00.png"]'), 120, "the edit marked unsaved")
        assert "1 caption edit" in css(d, "#drafts")[0].text
        # leaving the page with an unsaved edit asks first (the browser's beforeunload dialog)
        assert not d.execute_script("return window.dispatchEvent(new Event('beforeunload', {cancelable: true}))")

        def kept(d):
            return css(d, box)[0].get_attribute("value").endswith("with a draft") and css(d, ".file.unsaved")

        # a trigger word change saves the settings and reloads the dataset: the edit stays
        trigger = css(d, "input[name=trigger]")[0]
        trigger.send_keys(K.CONTROL, "a")
        trigger.send_keys("zzq", K.TAB)
        until(d, lambda d: "zzq" in (home / ".ui/datasets.json").read_text(), 120, "the trigger word saved")
        until(d, lambda d: "zzq" in css(d, ".trained-as")[0].text, 120, "the page reloaded with the trigger word")
        assert kept(d)
        # so does a preset change
        preset = css(d, "select[name=preset]")[0]
        other = [o for o in preset.find_elements("css selector", "option") if not o.is_selected()][0]
        wanted = other.get_attribute("value")  # read now: the saved change re-renders the page (`other` goes stale)
        other.click()
        until(d, lambda d: wanted in (home / ".ui/datasets.json").read_text(), 120, "the preset")
        until(d, kept, 120, "the edit after the preset change")
        # and navigating elsewhere in the app and back
        d.get(f"{app.url}/#/runs")
        until(d, lambda d: css(d, "h1") and "Runs" in css(d, "h1")[0].text, 120, "the runs page")
        d.get(f"{app.url}/#/datasets/cap")
        until(d, kept, 120, "the edit after navigating away and back")
        assert (home / "datasets/cap/img00.txt").read_text() == before  # nothing written without Save
        css(d, "#save-all-captions")[0].click()
        until(
            d, lambda d: (home / "datasets/cap/img00.txt").read_text().strip().endswith("with a draft"), 20, "the save"
        )
        until(d, lambda d: not css(d, ".file.unsaved") and not css(d, "#save-all-captions"), 120, "no drafts left")
        assert d.execute_script("return window.dispatchEvent(new Event('beforeunload', {cancelable: true}))")
    finally:
        app.close()

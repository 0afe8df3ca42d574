"""Screenshots of `dopsd ui` for docs/web-app.md, taken from the real app in a headless Chromium on the miniature:
the new-run form, a finished miniature run's page with its sample gallery, and the fit answer on the new-run page.

They are written to a temporary folder unless DOPSD_SCREENSHOTS names one (the docs' pictures come from
`DOPSD_SCREENSHOTS=docs/images pytest tests/test_ui_screenshots.py`), so a test run never changes the tree.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import test_ui_browser
from test_ui_browser import App, css, image_loaded, screenshot, set_value, until

driver = test_ui_browser.driver  # the headless Chromium fixture (one per module)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def out(tmp_path) -> Path:
    folder = Path(os.environ.get("DOPSD_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def card_shot(d, selector: str, path: Path, from_top: bool = False) -> None:
    """The card holding `selector` (its whole section, heading included; with `from_top`, the page from its top
    down to that card's end), cut from a picture of the whole page (an element screenshot of a card below the
    fold comes out cut off)."""
    from PIL import Image

    page = path.with_suffix(".page.png")
    screenshot(d, page)
    left, top, right, bottom, scale = d.execute_script(
        "const r = (arguments[0].closest('section.card') || arguments[0]).getBoundingClientRect();"
        "return [r.left + scrollX, r.top + scrollY, r.right + scrollX, r.bottom + scrollY, devicePixelRatio];",
        css(d, selector)[0],
    )
    box = (0, 0, d.execute_script("return innerWidth"), bottom + 16) if from_top else (left, top, right, bottom)
    with Image.open(page) as im:
        im.crop(tuple(round(v * scale) for v in box)).save(path, optimize=True)
    page.unlink()


def test_screenshots(driver, tmp_path, out):
    from selenium.webdriver.common.keys import Keys

    d = driver
    home = tmp_path / "home"
    app = App(home)
    try:
        d.get(app.login)
        d.get(f"{app.url}/#/datasets")
        until(d, lambda d: css(d, "#create-mini-dataset"), 30, "the datasets page")
        css(d, "#create-mini-dataset")[0].click()
        until(d, lambda d: css(d, ".file") and "#/datasets/" in d.current_url, 60, "the miniature's dataset")
        dataset = d.current_url.rsplit("/", 1)[-1]

        # --- the new-run form, with the fit answer (or, before it exists, the plan's estimate) ---------------------
        d.get(f"{app.url}/#/new?dataset={dataset}")
        until(d, lambda d: css(d, "#start-run") and css(d, "input[name=method]"), 30, "the new-run form")
        for key, value in (
            ("train.max_steps", "8"),
            ("sample.every", "4"),
            ("sample.control_steps", "8"),
            ("train.checkpoint_every", "4"),
        ):
            set_value(d, f'input[name="{key}"]', value)
        set_value(d, "input[name=name]", "mini-gallery")
        css(d, "input[name=name]")[0].send_keys(Keys.TAB)  # the last change asks for the fit answer
        # the fit answer for these settings (`dopsd plan` on fake tensors: seconds to a minute on a busy CPU)
        until(
            d,
            lambda d: css(d, "#fit-cards li") and css(d, "#fit")[0].get_attribute("data-state") != "running",
            240,
            "the fit answer",
        )
        screenshot(d, out / "ui-new-run.png")
        card_shot(d, "#fit", out / "ui-fit.png")
        assert (out / "ui-fit.png").stat().st_size > 5_000

        # --- the run, finished, with its gallery -------------------------------------------------------------------
        css(d, "#start-run")[0].click()
        until(d, lambda d: d.current_url.endswith("#/runs/mini-gallery"), 30, "the run page")
        until(d, lambda d: css(d, 'h1 .badge[data-status="ok"]'), 300, "the run to finish")
        until(
            d,
            lambda d: (
                "final" in css(d, "#latest-samples figcaption")[0].text
                and len(css(d, "#over-steps thead th")) >= 3
                and image_loaded(d, "#latest-samples img")
            ),
            60,
            "the final grids and the gallery over the steps",
        )
        assert css(d, "#latest-samples .prompt")  # the rows carry their prompts (samples/grid.json)
        card_shot(d, "#samples", out / "ui-live-run.png", from_top=True)  # the summary's long table left out
    finally:
        app.close()

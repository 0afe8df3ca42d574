"""`dopsd ui` end to end in a real headless Chromium (Debian's chromium + chromium-driver, driven by Selenium):
create a dataset and upload images, edit a caption, start a miniature run from the form and watch it progress,
compare it with the base model, export, and find everything again after an app restart.

Without a browser these tests skip and say why; with DOPSD_REQUIRE_BROWSER=1 (CI) a missing browser fails them.
DOPSD_UI_SCREENSHOTS=DIR keeps the screenshots (the README's docs/ui-*.png come from them).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import write_concept_folder
from ui_support import close_ctx, make_ctx, wait_for, write_zimage_lora_run

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Chromium as root in a container: no sandbox; and no background connections (refused here, many at a time).
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
]


def browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install -y {package})"
    return None


@pytest.fixture(scope="module")
def driver():
    missing = browser_missing()
    if missing:
        if os.environ.get("DOPSD_REQUIRE_BROWSER") == "1":
            pytest.fail(f"DOPSD_REQUIRE_BROWSER=1 but no browser: {missing}")
        pytest.skip(f"no headless browser: {missing}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    profile = tempfile.mkdtemp(prefix="dopsd-ui-chromium-")
    options.add_argument(f"--user-data-dir={profile}")
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    d.implicitly_wait(0)
    yield d
    d.quit()
    shutil.rmtree(profile, ignore_errors=True)


class App:
    """`dopsd ui` on a real socket in this process (uvicorn in a thread), on a given home, with a secret of its own
    as every launch has: `login` is the URL `dopsd ui` prints (?token=…), `auth` the header a script sends."""

    def __init__(self, home: Path):
        import secrets

        from dopsd.ui import listen, make_server

        self.ctx = make_ctx(home)
        self.sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        token = secrets.token_urlsafe(32)
        self.login, self.auth = f"{self.url}/?token={token}", {"Authorization": f"Bearer {token}"}
        self.server = make_server(self.ctx, self.sock, "127.0.0.1", token)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started, 20, 0.05, "the app to start")

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        close_ctx(self.ctx)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("DOPSD_UI_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(d, path: Path) -> None:
    """The whole page: the window grows to the document's height for the picture, then goes back."""
    height = d.execute_script("return document.documentElement.scrollHeight")
    d.set_window_size(1280, min(max(height, 600), 3000))
    time.sleep(0.3)
    d.save_screenshot(str(path))
    d.set_window_size(1280, 900)
    assert path.stat().st_size > 10_000


def until(d, check, timeout: float = 120, what: str = "the page"):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    def safe(drv):
        try:
            return check(drv)
        except Exception:  # noqa: BLE001 - not there yet (no element, stale element, text still changing)
            return False

    try:
        return WebDriverWait(d, timeout, poll_frequency=0.25).until(safe)
    except TimeoutException as err:
        raise AssertionError(
            f"timed out waiting for {what}; page text:\n{d.find_element('tag name', 'body').text[:3000]}"
        ) from err


def css(d, selector: str):
    return d.find_elements("css selector", selector)


def set_value(d, selector: str, value: str) -> None:
    el = css(d, selector)[0]
    el.clear()
    el.send_keys(value)


def image_loaded(d, selector: str) -> bool:
    imgs = css(d, selector)
    return bool(imgs) and all(
        d.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i) for i in imgs
    )


def test_dataset_run_compare_export_in_the_browser(driver, tmp_path, shots):
    d = driver
    home = tmp_path / "home"
    source = write_concept_folder(tmp_path / "upload", n=4)
    app = App(home)
    try:
        # --- the secret: without it the browser gets the form asking for it; the printed URL opens the app -------
        d.get(f"{app.url}/#/datasets")
        until(d, lambda d: css(d, "input[name=token]"), 30, "the page asking for the secret")
        assert not css(d, "#create-dataset")
        d.get(app.login)
        until(d, lambda d: d.current_url == f"{app.url}/" and css(d, "header nav"), 30, "the app after the secret")
        assert "token" not in d.current_url  # dropped from the address bar, kept in an HttpOnly cookie
        assert "dopsd_ui_token" not in d.execute_script("return document.cookie")
        # --- a dataset: create, upload images with their captions, edit one caption ----------------------------
        d.get(f"{app.url}/#/datasets")
        until(d, lambda d: css(d, "#create-dataset"), 30, "the datasets page")
        set_value(d, "input[name=dataset-name]", "e2e")
        css(d, "#create-dataset")[0].click()
        until(d, lambda d: css(d, "#upload-input"), 30, "the new dataset's page")
        set_value(d, "input[name=trigger]", "sks\t")
        until(d, lambda d: (home / ".ui/datasets.json").is_file(), 10, "the trigger word to be kept")
        files = sorted(str(p) for p in source.iterdir())
        css(d, "#upload-input")[0].send_keys("\n".join(files))
        until(d, lambda d: len(css(d, ".file")) == 4, 60, "four uploaded images")
        assert "passes" in css(d, "#check")[0].text
        box = css(d, 'textarea[data-file="img00.png"]')[0]
        box.clear()
        box.send_keys("a sks circle on a black background")
        css(d, '.file[data-name="img00.png"] button')[0].click()
        until(
            d,
            lambda d: (home / "datasets/e2e/img00.txt").read_text() == "a sks circle on a black background\n",
            20,
            "the caption to be saved",
        )
        until(
            d,
            lambda d: "black background" in css(d, '.file[data-name="img00.png"] .trained-as')[0].text,
            20,
            "the caption as trained",
        )
        screenshot(d, shots / "ui-dataset.png")

        # --- a run from the form; watch it progress --------------------------------------------------------------
        css(d, 'a[href="#/new?dataset=e2e"]')[0].click()
        until(
            d,
            lambda d: css(d, "#start-run") and css(d, "select[name=dataset]")[0].get_attribute("value") == "e2e",
            30,
            "the new-run form",
        )
        assert css(d, 'input[name="data.trigger_word"]')[0].get_attribute("value") == "sks"
        for key, value in (
            ("name", "e2e-run"),
            ('input[name="train.max_steps"]', "10"),
            ('input[name="sample.every"]', "5"),
            ('input[name="sample.control_steps"]', "8"),
            ('input[name="train.checkpoint_every"]', "5"),
        ):
            set_value(d, f"input[name={key}]" if key == "name" else key, value)
        css(d, "#start-run")[0].click()
        until(d, lambda d: d.current_url.endswith("#/runs/e2e-run"), 30, "the run page")

        def step(d):
            text = css(d, "#run-step")[0].text  # "step N / 10"
            return int(text.split()[1])

        until(d, lambda d: step(d) >= 1, 180, "the first training step")
        until(d, lambda d: step(d) >= 5 and image_loaded(d, "#latest-samples img"), 180, "step 5 with sample grids")
        screenshot(d, shots / "ui-run-live.png")
        until(d, lambda d: css(d, 'h1 .badge[data-status="ok"]'), 180, "the run to finish")
        until(
            d,
            lambda d: step(d) == 10 and "final" in css(d, "#latest-samples figcaption")[0].text,
            30,
            "the final grids",
        )
        paths = [p.get_attribute("d") for p in css(d, "svg.chart path.series")]
        assert len(paths) >= 2 and all(p.count("L") >= 2 for p in paths[:2])  # the loss and health curves are drawn
        # the done signal: measured at steps 0, 5 and 10, its chart and the reading of its lowest step
        reading = css(d, "#done-reading")[0].text
        assert reading.startswith("Lowest at step ") and int(reading.split()[3].rstrip(".;")) in (0, 5, 10)
        (done_curve,) = css(d, 'svg.chart[data-measure="done"] path.series')
        assert done_curve.get_attribute("d").count("L") == 2
        screenshot(d, shots / "ui-run.png")

        # --- compare with the base model on the same prompts and seeds --------------------------------------------
        d.get(f"{app.url}/#/runs")
        until(d, lambda d: css(d, 'tr[data-run="e2e-run"] input[type=checkbox]'), 30, "the runs list")
        css(d, 'tr[data-run="e2e-run"] input[type=checkbox]')[0].click()
        css(d, "#compare-selected")[0].click()
        until(d, lambda d: css(d, "#start-compare"), 30, "the compare form")
        set_value(d, "input[name=seeds]", "0 1 2")
        css(d, "#start-compare")[0].click()
        until(d, lambda d: len(css(d, "#compare-grid .compare-col")) == 2, 30, "the comparison")
        labels = [c.get_attribute("data-entry") for c in css(d, "#compare-grid .compare-col")]
        assert labels == ["before", "e2e-run"]
        until(
            d,
            lambda d: len(css(d, "#compare-grid img")) == 2 and image_loaded(d, "#compare-grid img"),
            180,
            "both sample grids",
        )
        screenshot(d, shots / "ui-compare.png")

        # --- export: the miniature's LoRA has no diffusers/ComfyUI format, so none is offered; a Z-Image run's does
        d.get(f"{app.url}/#/runs/e2e-run")
        until(d, lambda d: css(d, "#download-lora") and css(d, "#no-export"), 30, "the weights card")
        assert not css(d, "#export-comfyui") and not css(d, "#export-diffusers")
        write_zimage_lora_run(home / "runs/zi-run")  # as if trained elsewhere and copied into the home
        d.get(f"{app.url}/#/runs/zi-run")
        until(d, lambda d: css(d, "#export-comfyui"), 30, "the Z-Image run's page")
        css(d, "#export-comfyui")[0].click()
        link = until(d, lambda d: css(d, "a.export-file"), 60, "the exported file's link")[0]
        with pytest.raises(urllib.error.HTTPError) as refused:  # a download without the secret
            urllib.request.urlopen(link.get_attribute("href"))
        assert refused.value.code == 401
        with urllib.request.urlopen(urllib.request.Request(link.get_attribute("href"), headers=app.auth)) as response:
            data = response.read()
            assert "attachment" in response.headers["content-disposition"]
        header_len = struct.unpack("<Q", data[:8])[0]
        assert b"diffusion_model.layers.0" in data[8 : 8 + header_len]
        lora = css(d, "#download-lora")[0].get_attribute("href")
        with urllib.request.urlopen(urllib.request.Request(lora, headers=app.auth)) as response:
            assert response.read()[:8] == (home / "runs/zi-run/lora.safetensors").read_bytes()[:8]
    finally:
        app.close()

    # --- the app restarts on the same home: runs, jobs and comparisons are found again --------------------------
    again = App(home)
    try:
        d.get(again.login)  # a new launch, a new secret: the old cookie opens nothing
        d.get(f"{again.url}/#/runs")
        until(d, lambda d: css(d, 'tr[data-run="e2e-run"] .badge[data-status="ok"]'), 30, "the run after a restart")
        d.get(f"{again.url}/#/jobs")
        until(d, lambda d: len(css(d, "#jobs-table tr[data-job]")) >= 4, 30, "the job list after a restart")
        statuses = [b.text for b in css(d, "#jobs-table .badge")]
        assert statuses.count("succeeded") >= 4  # the run, two samples, the Z-Image export
    finally:
        again.close()


def test_a_planted_file_runs_no_script_on_the_app(driver, tmp_path):
    """SVG, XHTML and HTML files planted in a dataset, opened in the logged-in browser: each would create a dataset
    through the API if its script ran on the app's origin. The SVG and XHTML come as downloads; the HTML runs in a
    sandbox without the app's origin (its request carries neither the cookie nor the app's origin)."""
    d = driver
    home = tmp_path / "home"
    app = App(home)
    try:
        d.get(app.login)
        until(d, lambda d: css(d, "header nav"), 30, "the app")
        planted = home / "datasets/planted"
        planted.mkdir(parents=True)
        script = (
            "fetch('/api/datasets', {method: 'POST', credentials: 'include', headers: {'x-dopsd-request': '1', "
            "'content-type': 'application/json'}, body: JSON.stringify({name: 'NAME'})})"
        )
        svg = f'<svg xmlns="http://www.w3.org/2000/svg"><script>{script}</script></svg>'
        xhtml = f'<html xmlns="http://www.w3.org/1999/xhtml"><body><script>{script}</script></body></html>'
        html = f"<html><body><script>{script}</script></body></html>"
        for name, text in (("evil.svg", svg), ("evil.xhtml", xhtml), ("evil.html", html)):
            (planted / name).write_text(text.replace("NAME", f"pwned-{name.split('.')[1]}"))
            d.get(f"{app.url}/files/datasets/planted/{name}")
            time.sleep(1.5)
        # the same script from the app's own page does create one: the check above can see a script that ran
        d.get(f"{app.url}/")
        until(d, lambda d: css(d, "header nav"), 30, "the app")
        d.execute_script(script.replace("NAME", "control"))
        until(d, lambda d: (home / "datasets/control").is_dir(), 10, "the control dataset")
        assert not [p.name for p in (home / "datasets").iterdir() if p.name.startswith("pwned")]
    finally:
        app.close()

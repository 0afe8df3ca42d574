"""`dopsd ui` as a user starts it (a real process on a real socket): a new secret per launch, printed in the URL and
exchanged for a cookie; the address it prints is one it answers; a network bind warns and keeps the secret;
`--no-token` only for this machine and with a warning."""

from __future__ import annotations

import http.cookiejar
import json
import re
import select
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

HEADER = {"x-dopsd-request": "1", "content-type": "application/json"}


class Launched:
    """`python -m dopsd.cli ui …` in a fresh home, until the line with its URL."""

    def __init__(self, home: Path, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dopsd.cli", "ui", "--home", str(home), "--port", "0", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:  # on a loaded machine the app may take long to start; a failed start must not leave it running
            self.line = self._read_line(120)
            found = re.search(r"at (http://\S+)", self.line)
            assert found, self.line
        except BaseException:
            self.proc.kill()
            self.proc.wait()
            raise
        self.url = found.group(1)
        self.port = int(re.search(r":(\d+)/", self.url).group(1))

    def _read_line(self, timeout: float) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.2)
            if ready:
                return self.proc.stdout.readline()
            assert self.proc.poll() is None, f"dopsd ui ended: {self.proc.stderr.read()}"
        raise AssertionError("dopsd ui printed no URL")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err


def call(opener, url: str, method: str = "GET", body: dict | None = None, headers: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with opener.open(request, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def test_each_launch_has_a_secret_that_the_printed_url_carries(tmp_path):
    app = Launched(tmp_path / "home")
    again = Launched(tmp_path / "home2")
    try:
        secret = re.search(r"\?token=([\w-]+)", app.url).group(1)
        assert len(secret) >= 32 and secret not in again.url  # per launch
        plain = urllib.request.build_opener()
        base = f"http://127.0.0.1:{app.port}"
        # what any local program could send: the app's header, no secret
        assert call(plain, f"{base}/api/datasets", "POST", {"name": "x"}, HEADER)[0] == 401
        assert call(plain, f"{base}/api/tryit", "POST", {}, HEADER)[0] == 401
        assert call(plain, f"{base}/files/datasets/x/a.png")[0] == 401
        assert not (tmp_path / "home/datasets/x").exists() and not (tmp_path / "home/.ui/jobs.json").exists()
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        status, page = call(browser, app.url)  # the printed URL: cookie, then the app's page
        assert status == 200 and b"/static/js/app.js" in page
        assert call(browser, f"{base}/api/datasets", "POST", {"name": "x"}, HEADER)[0] == 200
        assert (tmp_path / "home/datasets/x").is_dir()
        status, _ = call(browser, f"http://127.0.0.1:{again.port}/api/info")  # the other app's cookie is not ours
        assert status == 401
    finally:
        app.stop()
        again.stop()


def test_a_local_address_other_than_127_0_0_1_is_answered_where_printed(tmp_path):
    app = Launched(tmp_path / "home", "--host", "127.0.0.2")
    try:
        assert app.url.startswith(f"http://127.0.0.2:{app.port}/?token=")
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        status, page = call(browser, app.url)
        assert status == 200 and b"/static/js/app.js" in page
    finally:
        app.stop()


def test_a_network_bind_warns_and_keeps_the_secret(tmp_path):
    app = Launched(tmp_path / "home", "--host", "0.0.0.0")
    try:
        assert "?token=" in app.url
        assert call(urllib.request.build_opener(), f"http://127.0.0.1:{app.port}/api/info")[0] == 401
    finally:
        err = app.stop()
    assert "warning: --host 0.0.0.0 serves plain, unencrypted HTTP to the network" in err


def test_no_token_only_here_and_with_a_warning(tmp_path):
    app = Launched(tmp_path / "home", "--no-token")
    try:
        assert "token" not in app.url
        plain = urllib.request.build_opener()
        assert call(plain, f"http://127.0.0.1:{app.port}/api/datasets", "POST", {"name": "x"}, HEADER)[0] == 200
    finally:
        err = app.stop()
    assert "warning: --no-token: any program or user on this machine can use the app" in err
    for args, says in (
        (["--no-token", "--host", "0.0.0.0"], "--no-token with --host 0.0.0.0"),
        (["--token", "short"], "--token (or $DOPSD_UI_TOKEN): use at least 16 characters"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "dopsd.cli", "ui", "--home", str(tmp_path / "h3"), "--port", "0", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("host", ["::1"])
def test_an_ipv6_loopback_bind_prints_a_bracketed_address(tmp_path, host):
    try:
        app = Launched(tmp_path / "home", "--host", host)
    except AssertionError as err:
        if "cannot listen" in str(err):
            pytest.skip("no IPv6 loopback here")
        raise
    try:
        assert app.url.startswith(f"http://[::1]:{app.port}/?token=")
        browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        assert call(browser, app.url)[0] == 200
    finally:
        app.stop()

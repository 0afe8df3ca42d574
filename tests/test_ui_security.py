"""What `dopsd ui` refuses: files outside its home (.., absolute, encoded, symlinks out), other Host names on a local
bind, requests without the launch's secret, cross-site and header-less state changes, oversized bodies, bad names,
user text reaching a shell; and how it serves what it does serve (inert). The secret flow of the real command and
its warnings: tests/test_ui_secret.py."""

from __future__ import annotations

import os
import socket
import threading

import pytest
from starlette.testclient import TestClient
from ui_support import HEADERS, close_ctx, make_ctx, png_bytes, wait_for

from dopsd.ui import is_local, listen, make_server
from dopsd.ui.home import Home, PathRefused, check_name
from dopsd.ui.server import LOCAL_HOSTS, create_app


@pytest.fixture
def app_ctx(tmp_path):
    ctx = make_ctx(tmp_path / "home")
    (tmp_path / "secret.txt").write_text("outside the home")
    ds = tmp_path / "home/datasets/d"
    ds.mkdir()
    (ds / "a.png").write_bytes(png_bytes())
    (ds / "a.txt").write_text("a caption")
    yield ctx, tmp_path
    close_ctx(ctx)


def test_files_are_served_only_from_the_home(app_ctx):
    ctx, tmp = app_ctx
    c = TestClient(create_app(ctx))
    assert c.get("/files/datasets/d/a.png").status_code == 200
    assert c.get("/files/datasets/d/a.txt").headers["content-type"].startswith("text/plain")
    ctx.home.state.joinpath("x.json").write_text("{}")
    (ctx.home.root / "configs/c.yaml").write_text("x")
    os.symlink(tmp / "secret.txt", ctx.home.root / "datasets/d/link.png")
    os.symlink(tmp, ctx.home.root / "datasets/out")
    refused = [
        "/files/datasets/../../secret.txt",
        "/files/datasets/%2e%2e/%2e%2e/secret.txt",
        "/files/datasets/%252e%252e/%252e%252e/secret.txt",
        "/files//etc/passwd",
        "/files/%2fetc%2fpasswd",
        "/files/datasets/d/..%2f..%2f..%2fsecret.txt",
        "/files/.ui/jobs.json",
        "/files/.ui/x.json",
        "/files/configs/c.yaml",
        "/files/datasets/d/link.png",
        "/files/datasets/out/secret.txt",
        "/files/datasets\\..\\..\\secret.txt",
        "/files/datasets/d/a.png%00.txt",
    ]
    for url in refused:
        r = c.get(url)
        assert r.status_code in (403, 404), (url, r.status_code)
        assert b"outside the home" not in r.content and b"root:" not in r.content, url


def test_resolve_served_directly(tmp_path):
    home = Home(tmp_path / "h")
    for bad in (
        "",
        "/etc/passwd",
        "../x",
        "datasets/../../x",
        "datasets//x",
        "C:/x",
        "datasets\\x",
        "datasets",
        "datasets/./x",
        "nothere/x",
    ):
        with pytest.raises(PathRefused):
            home.resolve_served(bad)
    with pytest.raises(FileNotFoundError):
        home.resolve_served("datasets/missing.png")


def test_names_are_checked(tmp_path):
    for bad in ("", ".", "..", ".hidden", "-x", "a/b", "a b", "a;rm", "x" * 65, "ü"):
        with pytest.raises(PathRefused):
            check_name(bad)
    assert check_name("my_concept-2.v1") == "my_concept-2.v1"
    ctx = make_ctx(tmp_path / "h")
    try:
        c = TestClient(create_app(ctx), headers=HEADERS)
        assert c.post("/api/datasets", json={"name": "../escape"}).status_code == 400
        assert c.get("/api/datasets/..%2f..%2fetc").status_code in (400, 404)
        assert c.post("/api/runs", json={"name": "a;b", "preset": "mini"}).status_code == 400
        assert not (tmp_path / "escape").exists()
    finally:
        close_ctx(ctx)


def test_state_changes_need_the_app_header_and_same_origin(app_ctx):
    ctx, _ = app_ctx
    c = TestClient(create_app(ctx))
    assert c.post("/api/datasets", json={"name": "x"}).status_code == 403  # no X-Dopsd-Request
    r = c.post("/api/datasets", json={"name": "x"}, headers={**HEADERS, "origin": "http://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.json()["error"]
    assert (
        c.post("/api/datasets", json={"name": "x"}, headers={**HEADERS, "origin": "http://testserver"}).status_code
        == 200
    )
    assert c.get("/api/datasets").status_code == 200  # reading needs no header


def test_local_bind_refuses_other_host_names(app_ctx):
    ctx, _ = app_ctx
    c = TestClient(create_app(ctx, hosts=set(LOCAL_HOSTS)), base_url="http://127.0.0.1:8765")
    assert c.get("/api/info").status_code == 200
    assert c.get("/api/info", headers={"host": "localhost:8765"}).status_code == 200
    assert c.get("/api/info", headers={"host": "attacker.example:8765"}).status_code == 421  # DNS rebinding
    assert is_local("127.0.0.1") and is_local("::1") and not is_local("0.0.0.0")


def test_token_required_when_set(app_ctx):
    ctx, _ = app_ctx
    c = TestClient(create_app(ctx, token="s3cret"), follow_redirects=False)
    assert c.get("/api/info").status_code == 401
    assert c.get("/").status_code == 401
    assert c.get("/files/datasets/d/a.png").status_code == 401
    assert c.get("/api/info", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert c.get("/api/info", headers={"authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/api/info?token=s3cret").status_code == 401  # the query token only opens the page
    first = c.get("/?token=s3cret")
    assert first.status_code == 303 and "dopsd_ui_token_80=s3cret" in first.headers["set-cookie"]  # per port
    assert (
        "samesite=strict" in first.headers["set-cookie"].lower() and "httponly" in first.headers["set-cookie"].lower()
    )
    assert c.get("/api/info").status_code == 200  # the cookie from now on
    assert c.get("/files/datasets/d/a.png").status_code == 200


def test_body_size_limit(app_ctx):
    ctx, _ = app_ctx
    ctx.max_body = 10_000
    c = TestClient(create_app(ctx), headers=HEADERS)
    r = c.post("/api/datasets/d/files", files=[("files", ("big.png", b"\0" * 20_000, "image/png"))])
    assert r.status_code == 413
    assert not (ctx.home.root / "datasets/d/big.png").exists()


def test_html_reports_are_sandboxed(app_ctx):
    ctx, _ = app_ctx
    report = ctx.home.root / "reports/r"
    report.mkdir()
    (report / "report.html").write_text("<script>fetch('/api/datasets', {method: 'POST'})</script>")
    r = TestClient(create_app(ctx)).get("/files/reports/r/report.html")
    assert r.headers["content-security-policy"] == "sandbox allow-scripts"
    assert r.headers["x-content-type-options"] == "nosniff"


def test_prompts_reach_the_command_as_one_argument_never_a_shell(app_ctx):
    ctx, tmp = app_ctx
    c = TestClient(create_app(ctx), headers=HEADERS)
    run = ctx.home.root / "runs/r"
    run.mkdir()
    (run / "lora.safetensors").write_bytes(b"")
    marker = tmp / "injected"
    prompt = f"a red circle $(touch {marker}); touch {marker}"
    r = c.post("/api/compare", json={"runs": ["r"], "prompts": [prompt], "seeds": [0], "base": False})
    assert r.status_code == 200, r.text
    job_id = r.json()["entries"][0]["job"]
    job = wait_for(
        lambda: (lambda j: j if j["status"] not in ("queued", "running") else None)(
            c.get(f"/api/jobs/{job_id}").json()
        ),
        120,
        0.3,
        "the sample job",
    )
    assert prompt in job["argv"] and job["status"] == "failed"  # a broken run folder: the command says so
    assert not marker.exists()
    bad = c.post("/api/compare", json={"runs": ["r"], "prompts": ["two\nlines"], "seeds": [0]})
    assert bad.status_code == 400


def test_the_real_server_binds_where_asked(tmp_path):
    """`dopsd ui` on a real socket: 127.0.0.1 by default, the page and the API answer, other names are refused."""
    ctx = make_ctx(tmp_path / "h")
    sock = listen("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = make_server(ctx, sock, "127.0.0.1", None)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 20, 0.05, "the server")
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as page:
            assert b"/static/js/app.js" in page.read()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/info", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request)
        assert err.value.code == 421
        assert sock.family == socket.AF_INET and sock.getsockname()[0] == "127.0.0.1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
        close_ctx(ctx)


def test_user_files_are_served_inert(app_ctx):
    """An SVG, XHTML or XML file in a served folder would run its script on the app's origin if rendered: each is
    only ever a download; the images the app shows come inline, and everything under a sandboxing CSP."""
    ctx, _ = app_ctx
    c = TestClient(create_app(ctx))
    script = "<script>fetch('/api/datasets', {method: 'POST', headers: {'x-dopsd-request': '1'}})</script>"
    ds = ctx.home.root / "datasets/d"
    (ds / "evil.svg").write_text(f'<svg xmlns="http://www.w3.org/2000/svg">{script}</svg>')
    (ds / "evil.xhtml").write_text(f'<html xmlns="http://www.w3.org/1999/xhtml"><body>{script}</body></html>')
    (ds / "evil.xml").write_text('<x xmlns:h="http://www.w3.org/1999/xhtml"><h:script>alert(1)</h:script></x>')
    (ds / "page.html").write_text(script)
    for name in ("evil.svg", "evil.xhtml", "evil.xml", "evil.svg?download="):
        r = c.get(f"/files/datasets/d/{name}")
        assert r.status_code == 200, name
        assert r.headers["content-type"] == "application/octet-stream", (name, r.headers["content-type"])
        assert r.headers["content-disposition"].startswith("attachment"), name
        assert "sandbox" in r.headers["content-security-policy"] and r.headers["x-content-type-options"] == "nosniff"
    image = c.get("/files/datasets/d/a.png")
    assert image.headers["content-type"] == "image/png" and "content-disposition" not in image.headers
    assert image.headers["content-security-policy"].endswith("sandbox")  # no allow-scripts: nothing runs
    html = c.get("/files/datasets/d/page.html")
    assert html.headers["content-security-policy"] == "sandbox allow-scripts"  # an opaque origin, not the app's


def test_state_changes_and_downloads_need_the_secret(app_ctx):
    """The app's request header alone (what any local program can send) no longer starts anything."""
    ctx, _ = app_ctx
    c = TestClient(create_app(ctx, token="per-launch-secret-123"), follow_redirects=False)
    for method, url in (
        ("POST", "/api/tryit"),
        ("POST", "/api/datasets"),
        ("POST", "/api/runs"),
        ("PUT", "/api/settings"),
    ):
        r = c.request(method, url, json={"name": "x"}, headers=HEADERS)
        assert r.status_code == 401 and "secret" in r.json()["error"], (url, r.status_code)
    assert not ctx.jobs.list() and not (ctx.home.root / "datasets/x").exists()
    assert c.get("/files/datasets/d/a.png").status_code == 401
    assert c.get("/files/datasets/d/a.png?token=per-launch-secret-123").status_code == 401  # only / takes it
    page = c.get("/")
    assert page.status_code == 401 and 'name="token"' in page.text and "/static/js/app.js" not in page.text
    wrong = c.get("/?token=guess")
    assert wrong.status_code == 401 and "not this app" in wrong.text and "set-cookie" not in wrong.headers
    assert c.get("/?token=per-launch-secret-123").status_code == 303
    assert c.post("/api/datasets", json={"name": "x"}, headers=HEADERS).status_code == 200  # the cookie
    assert c.post("/api/datasets", json={"name": "y"}).status_code == 403  # and still the app's header
    assert c.get("/files/datasets/d/a.png?download=1").status_code == 200
    bearer = TestClient(create_app(ctx, token="per-launch-secret-123"))
    auth = {**HEADERS, "authorization": "Bearer per-launch-secret-123"}
    assert bearer.post("/api/datasets", json={"name": "z"}, headers=auth).status_code == 200


def test_a_caption_link_out_of_the_home_is_refused(app_ctx):
    ctx, tmp = app_ctx
    ds = ctx.home.root / "datasets/d"
    (ds / "a.txt").unlink()
    os.symlink(tmp / "secret.txt", ds / "a.txt")
    r = TestClient(create_app(ctx)).get("/api/datasets/d")
    assert r.status_code == 400 and "datasets/d/a.txt is a link to a file outside" in r.json()["error"]
    assert "outside the home" not in r.text  # the linked file's content
    (ds / "a.txt").unlink()
    inside = ctx.home.root / "datasets/caption.txt"
    inside.write_text("a caption kept elsewhere in the home")
    os.symlink(inside, ds / "a.txt")  # a link within the home is fine
    r = TestClient(create_app(ctx)).get("/api/datasets/d")
    assert r.status_code == 200 and r.json()["files"][0]["caption"] == "a caption kept elsewhere in the home"

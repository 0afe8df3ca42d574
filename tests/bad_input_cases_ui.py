"""Bad requests to the web app (`dopsd ui`) and what it answers: the "web app" rows of docs/bad-inputs.md.

Each case is one HTTP request to the real app (Starlette's test client on `create_app`, as `dopsd ui` builds it for
a local bind: its secret and the local Host names) in a fresh home holding a dataset `d` (an image and its
caption), a dataset `linked` whose caption is a link to a file outside the home, and that file. A request carries
what the app's own page sends (the secret, the app's header, its Host) except the one bad part. Every row must
get an answer that is not a server error, in which `expect` appears (the status, the error, or how a file was
served), and must leave the home as it was (nothing written, moved or started).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bad_inputs import Case
from PIL import Image

SECRET = "the-launch-secret-0123456789"
BASE = "http://127.0.0.1:8765"
OUTSIDE = "outside.txt"  # beside the home: what no answer may contain


@dataclass(frozen=True)
class UiCase:
    kind: str  # path, upload, header, secret, host
    what: str  # the bad input, in a few words (unique)
    method: str
    url: str
    expect: tuple[str, ...]  # what the answer (status, error, served as) must name
    headers: dict[str, str] = field(default_factory=dict)  # replace (or with None values drop) the page's own
    body: Any = None  # JSON body; bytes are sent raw
    files: tuple[tuple[str, bytes], ...] = ()  # multipart uploads (name, content)

    @property
    def id(self) -> str:
        import re

        return re.sub(r"[^a-z0-9]+", "-", f"web app {self.kind} {self.what}".lower()).strip("-")

    @property
    def shown(self) -> str:
        bad = {k: v for k, v in self.headers.items() if k.lower() not in ("authorization", "x-dopsd-request")}
        parts = [f"{self.method} {self.url}"]
        parts += [f"{k}: {v}" for k, v in bad.items() if v is not None]
        parts += [f"without {k}" for k, v in self.headers.items() if v is None]
        parts += [f"upload {name}" for name, _ in self.files]
        return "; ".join(parts)


def _png(size: tuple[int, int] = (32, 32)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 120, 30)).save(buf, format="PNG")
    return buf.getvalue()


NO_SECRET = {"authorization": None}
UI_CASES: list[UiCase] = [
    # --- paths: only files under the home's served folders, served inert ------------------------------------------
    UiCase("path", "`..` in the path", "GET", "/files/datasets/../../outside.txt", ("404",)),
    UiCase(
        "path",
        "`..` encoded (%2e%2e)",
        "GET",
        "/files/datasets/%2e%2e/%2e%2e/outside.txt",
        ("403", "under the app's home"),
    ),
    UiCase("path", "the app's own state", "GET", "/files/.ui/jobs.json", ("403", "under the app's home")),
    UiCase("path", "an image link out of the home", "GET", "/files/datasets/d/link.png", ("403",)),
    UiCase("path", "a caption link out of the home", "GET", "/api/datasets/linked", ("400", "linked/a.txt", "outside")),
    UiCase("path", "a name with ..", "POST", "/api/datasets", ("400", "../x"), body={"name": "../x"}),
    UiCase("path", "an SVG with a script", "GET", "/files/datasets/d/evil.svg", ("200", "attachment", "sandbox")),
    UiCase("path", "an XHTML page", "GET", "/files/datasets/d/evil.xhtml", ("200", "attachment", "sandbox")),
    UiCase("path", "an HTML page", "GET", "/files/datasets/d/evil.html", ("200", "sandbox allow-scripts")),
    # --- uploads: what the dataset check refuses is not kept ----------------------------------------------------
    UiCase(
        "upload", "not an image", "POST", "/api/datasets/d/files", ("400", "not an image"), files=(("x.exe", b"MZ"),)
    ),
    UiCase(
        "upload",
        "an image that does not decode",
        "POST",
        "/api/datasets/d/files",
        ("400", "broken.png"),
        files=(("broken.png", b"\x89PNG\r\n\x1a\nnot really"),),
    ),
    UiCase(
        "upload",
        "too small for the preset",
        "POST",
        "/api/datasets/d/files",
        ("400", "tiny.png"),
        files=(("tiny.png", _png((4, 4))),),
    ),
    UiCase(
        "upload",
        "over the size limit",
        "POST",
        "/api/datasets/d/files",
        ("413", "request body over"),
        files=(("big.png", b"\0" * 300_000),),
    ),
    UiCase(
        "upload",
        "into a dataset that does not exist",
        "POST",
        "/api/datasets/nothere/files",
        ("404", "nothere"),
        files=(("a.png", _png()),),
    ),
    # --- headers: cross-site and malformed requests ---------------------------------------------------------------
    UiCase(
        "header",
        "no app header",
        "POST",
        "/api/datasets",
        ("403", "x-dopsd-request"),
        headers={"x-dopsd-request": None},
        body={"name": "x"},
    ),
    UiCase(
        "header",
        "another site's Origin",
        "POST",
        "/api/datasets",
        ("403", "cross-site", "evil.example"),
        headers={"origin": "http://evil.example"},
        body={"name": "x"},
    ),
    UiCase("header", "a body that is not JSON", "POST", "/api/datasets", ("400", "not valid JSON"), body=b"{name"),
    UiCase("header", "a JSON list", "POST", "/api/datasets", ("400", "JSON object"), body=b"[1]"),
    # --- the secret -----------------------------------------------------------------------------------------------
    UiCase("secret", "none, with the app header", "POST", "/api/tryit", ("401", "secret"), headers=NO_SECRET, body={}),
    UiCase(
        "secret",
        "a wrong one",
        "POST",
        "/api/runs",
        ("401", "secret"),
        headers={"authorization": "Bearer guess"},
        body={},
    ),
    UiCase(
        "secret",
        "in the query of an API call",
        "POST",
        f"/api/datasets?token={SECRET}",
        ("401", "secret"),
        headers=NO_SECRET,
        body={"name": "x"},
    ),
    UiCase("secret", "a download without it", "GET", "/files/datasets/d/a.png?download=1", ("401",), headers=NO_SECRET),
    UiCase("secret", "the page without it", "GET", "/", ("401", "needs the secret"), headers=NO_SECRET),
    UiCase("secret", "the page with a wrong one", "GET", "/?token=guess", ("401", "not this app's"), headers=NO_SECRET),
    # --- host -----------------------------------------------------------------------------------------------------
    UiCase(
        "host",
        "another name (DNS rebinding)",
        "GET",
        "/api/info",
        ("421", "attacker.example"),
        headers={"host": "attacker.example:8765"},
    ),
]


# `dopsd ui` refusing to start, as rows of the command table (tests/bad_inputs.py runs them like every command).
UI_COMMAND = "ui --port 0 --home uihome"
UI_COMMAND_CASES: list[Case] = [
    Case(
        "web app (dopsd ui)",
        "--no-token on a network --host",
        f"{UI_COMMAND} --no-token --host 0.0.0.0",
        ("--no-token", "0.0.0.0"),
    ),
    Case(
        "web app (dopsd ui)",
        "--no-token with --token",
        f"{UI_COMMAND} --no-token --token 0123456789abcdefgh",
        ("--no-token", "--token"),
    ),
    Case("web app (dopsd ui)", "a short --token", f"{UI_COMMAND} --token abc", ("--token", "16 characters")),
]


def setup_home(root: Path) -> Path:
    """root/home (the app's home) with the datasets the cases use, and root/outside.txt beside it."""
    (root / OUTSIDE).write_text("outside the home")
    home = root / "home"
    d = home / "datasets/d"
    d.mkdir(parents=True)
    (d / "a.png").write_bytes(_png())
    (d / "a.txt").write_text("a caption\n")
    os.symlink(root / OUTSIDE, d / "link.png")
    script = "<script>fetch('/api/datasets', {method: 'POST'})</script>"
    (d / "evil.svg").write_text(f'<svg xmlns="http://www.w3.org/2000/svg">{script}</svg>')
    (d / "evil.xhtml").write_text(f'<html xmlns="http://www.w3.org/1999/xhtml"><body>{script}</body></html>')
    (d / "evil.html").write_text(script)
    linked = home / "datasets/linked"
    linked.mkdir()
    (linked / "a.png").write_bytes(_png())
    os.symlink(root / OUTSIDE, linked / "a.txt")
    return home


def _snapshot(home: Path) -> dict[str, tuple]:
    state = {}
    for folder, dirs, files in os.walk(home):
        for name in dirs + files:
            p = Path(folder) / name
            if p.parent == home / ".ui" and name in ("jobs.json", "logs"):
                continue  # written by the job manager as it starts
            st = p.lstat()
            state[str(p.relative_to(home))] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return state


def answer(response: Any) -> str:
    """What the row shows: the status and the error, or how the file was served."""
    status = str(response.status_code)
    if response.headers.get("content-type", "").startswith("application/json"):
        data = response.json()
        text = data.get("error", "") if isinstance(data, dict) else ""
        refused = data.get("refused") if isinstance(data, dict) else None
        if refused:
            text = "; ".join(f"{r['file']}: {'; '.join(r['problems'])}" for r in refused)
        return f"{status}: {text}"
    if response.status_code >= 400 and not response.headers.get("content-type", "").startswith("text/html"):
        return f"{status}: {response.text.strip()[:200]}"
    if response.status_code == 401:
        said = "not this app's" if "not this app's" in response.text else "needs the secret"
        return f"{status}: the page asking for the secret (\u201c{said}\u201d), nothing of the app"
    served = [response.headers.get("content-type", "")]
    if "content-disposition" in response.headers:
        served.append(response.headers["content-disposition"].split(";")[0])
    served.append(f"CSP {response.headers.get('content-security-policy', 'none')}")
    return f"{status}: served as {', '.join(served)}"


def run_ui_case(case: UiCase, root: Path) -> tuple[str, list[str]]:
    """(the answer as shown, problems): problems name a server error, a missing `expect`, a changed home or the
    outside file's content in the answer."""
    from starlette.testclient import TestClient

    from dopsd.ui import allowed_hosts, build
    from dopsd.ui.server import create_app

    root.mkdir(parents=True, exist_ok=True)
    home = setup_home(root)
    ctx = build(home, threads=1, max_upload_mb=0.2)
    ctx.max_body = 200_000
    try:
        client = TestClient(create_app(ctx, token=SECRET, hosts=allowed_hosts("127.0.0.1")), base_url=BASE)
        headers: dict[str, Any] = {"authorization": f"Bearer {SECRET}", "x-dopsd-request": "1"}
        headers.update(case.headers)
        headers = {k: v for k, v in headers.items() if v is not None}
        before = _snapshot(home)
        kwargs: dict[str, Any] = {"headers": headers, "follow_redirects": False}
        if isinstance(case.body, bytes):
            kwargs["content"] = case.body
        elif case.body is not None:
            kwargs["json"] = case.body
        if case.files:
            kwargs["files"] = [("files", (name, data, "application/octet-stream")) for name, data in case.files]
        response = client.request(case.method, case.url, **kwargs)
        shown = answer(response).replace(str(home), "HOME")
        problems = []
        if response.status_code >= 500:
            problems.append(f"a server error ({response.status_code})")
        problems += [f"the answer does not name {e!r}" for e in case.expect if e not in shown]
        if "outside the home" in response.text:
            problems.append("the answer holds the outside file's content")
        changed = sorted(set(_snapshot(home).items()) ^ set(before.items()))
        if changed or ctx.jobs.list():
            problems.append(f"the home changed: {[c[0] for c in changed][:5]} {[j.id for j in ctx.jobs.list()]}")
        return shown, problems
    finally:
        ctx.jobs.shutdown()


def render_ui(cases: list[UiCase], shown: list[str]) -> str:
    """The table's web-app section (appended to docs/bad-inputs.md by tests/bad_inputs.py)."""
    out = [
        "",
        "## web app: requests",
        "",
        "Requests to `dopsd ui` (tests/bad_input_cases_ui.py): each carries what the app's own page sends (its",
        "secret, the app's request header, its Host) except the bad part, in a home holding a dataset and a file",
        "beside the home; the home must be left as it was. How `dopsd ui` itself refuses to start: the rows above.",
        "",
        "| kind | bad input | request | answer |",
        "|---|---|---|---|",
    ]
    cell = lambda t: t.replace("|", "\\|").replace("\n", "<br>")  # noqa: E731
    for case, text in zip(cases, shown):
        out.append(f"| {case.kind} | {cell(case.what)} | `{cell(case.shown)}` | {cell(text)} |")
    return "\n".join(out) + "\n"


assert len({c.id for c in UI_CASES}) == len(UI_CASES), "web-app case ids must be unique"

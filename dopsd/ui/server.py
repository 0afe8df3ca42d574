"""The app: a Starlette application around one `Context` (home, jobs, caches), the guard every request passes
(host, secret, cross-site requests, body size) and the file server that only hands out files under the home.

The secret (as Jupyter's token): `dopsd ui` makes one per launch and prints it in the app's URL; the first visit
with `?token=…` exchanges it for an HttpOnly, SameSite=Strict cookie (named per port, so two apps on one machine
keep theirs) and drops it from the address bar. From then on every request needs it — the cookie, or
`Authorization: Bearer …` for scripts — pages, API and file downloads alike; without it the page is a short form
asking for it and everything else is refused (401). State changes need, on top, the app's request header and a
same-origin Origin. Every user file is served inert: images the app shows, text as text/plain, HTML reports in
a script sandbox without the app's origin, anything else (.svg, .xhtml, .xml, …) as a download, all under a
sandboxing Content-Security-Policy, so no stored file can run script on the app's origin.
"""

from __future__ import annotations

import hmac
import mimetypes
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dopsd.ui import api_data, api_jobs, queue
from dopsd.ui.fit import api as api_fit
from dopsd.ui.home import PathRefused
from dopsd.ui.http import Context
from dopsd.ui.http import json_error as _error

STATIC = Path(__file__).parent / "static"
COOKIE = "dopsd_ui_token"  # + "_" + the port: cookies are shared by every port of a host
CSRF_HEADER = "x-dopsd-request"  # custom header: a cross-site page cannot send it without a CORS preflight
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
# Shown inline: the image types the app displays (dataset images, sample grids); SVG is not one of them.
INLINE_IMAGES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"}
INERT = "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; sandbox"
REPORT = "sandbox allow-scripts"  # benchmark reports: their scripts run, in an opaque origin (never the app's)
TEXT_TYPES = {
    ".txt": "text/plain",
    ".md": "text/plain",
    ".json": "application/json",
    ".jsonl": "text/plain",
    ".yaml": "text/plain",
    ".yml": "text/plain",
    ".log": "text/plain",
    ".csv": "text/plain",
}


class Guard:
    """ASGI middleware: every request must come for an allowed Host (a local bind refuses other names: DNS
    rebinding) and carry the secret when one is set; anything that changes state must also carry the app's
    request header and a same-origin Origin (cross-site requests), and a body within the size limit."""

    def __init__(self, app: Any, token: str | None, hosts: set[str] | None, max_body: int):
        self.app, self.token, self.hosts, self.max_body = app, token, hosts, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        refusal = self._check(request)
        if refusal is not None:
            return await refusal(scope, receive, send)
        if self.token and request.url.path == "/" and request.query_params.get("token"):
            # first visit with ?token=…: keep it in a cookie and drop it from the address bar
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(cookie_name(request), self.token, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _check(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if self.hosts is not None and name not in self.hosts:
            return _error(421, f"host {name!r} is not served here (open the app at the address it printed)")
        if self.token and not self._has_token(request):
            if request.method == "GET" and request.url.path == "/":
                return login_page(bool(request.query_params.get("token")))
            return _error(401, "this app needs its secret: open the URL with ?token=… that `dopsd ui` printed")
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            if request.headers.get(CSRF_HEADER) != "1":
                return _error(403, f"state-changing requests need the header {CSRF_HEADER}: 1 (sent by the app)")
            origin = request.headers.get("origin")
            if origin is not None and origin.split("://", 1)[-1] != host:
                return _error(403, f"cross-site request from {origin} refused")
            length = request.headers.get("content-length")
            if length is None and request.headers.get("transfer-encoding"):
                return _error(411, "send a Content-Length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                return _error(413, f"request body over {self.max_body} bytes")
        return None

    def _has_token(self, request: Request) -> bool:
        given = []
        auth = request.headers.get("authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth[7:])
        cookie = SimpleCookie()
        try:
            cookie.load(request.headers.get("cookie", ""))
        except CookieError:
            pass
        name = cookie_name(request)
        if name in cookie:
            given.append(cookie[name].value)
        if request.url.path == "/":
            given += parse_qs(request.url.query).get("token", [])
        return any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given)  # type: ignore[union-attr]


def cookie_name(request: Request) -> str:
    server = request.scope.get("server") or ("", 0)
    return f"{COOKIE}_{server[1] or 0}"


LOGIN = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>dopsd ui: secret needed</title>
<style>body{font:15px system-ui,sans-serif;max-width:40em;margin:4em auto;padding:0 1em}input{width:24em}</style>
</head><body><h1>dopsd ui</h1><p>%s</p><p>Open the address <code>dopsd ui</code> printed when it started (it ends
in <code>/?token=…</code>), or paste its secret:</p><form method="get" action="/"><input name="token"
type="password" autocomplete="off" autofocus> <button>Open</button></form></body></html>"""


def login_page(wrong: bool) -> Response:
    """The page a visit without the secret gets (401): a form that sends it as ?token=…, nothing of the app."""
    said = "That secret is not this app's." if wrong else "This app needs the secret it was started with."
    headers = {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'"}
    return Response(LOGIN % said, status_code=401, media_type="text/html", headers=headers)


def serve_file(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    try:
        path = ctx.home.resolve_served(request.path_params["path"])
    except PathRefused:
        return _error(403, "refused: only files under the app's home are served")
    except FileNotFoundError:
        return _error(404, "no such file")
    suffix = path.suffix.lower()
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache", "Content-Security-Policy": INERT}
    download = bool(request.query_params.get("download"))
    if suffix in INLINE_IMAGES:
        media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    elif suffix in TEXT_TYPES:
        media = TEXT_TYPES[suffix]
    elif suffix in (".html", ".htm"):  # reports: an opaque origin, so their scripts can never call this app's API
        media, headers["Content-Security-Policy"] = "text/html", REPORT
    else:  # anything else (.svg, .xhtml, .xml, weights, …) is only ever downloaded, never rendered here
        media, download = "application/octet-stream", True
    if download:
        return FileResponse(path, media_type=media, headers=headers, filename=path.name)
    return FileResponse(path, media_type=media, headers=headers)


async def files(request: Request) -> Response:
    return await run_in_threadpool(serve_file, request)


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def create_app(ctx: Context, token: str | None = None, hosts: set[str] | None = None) -> Any:
    """The ASGI app. `hosts`: the Host names accepted (None = any; `dopsd ui` passes the local names for a local
    bind); `token`: the secret, required on every request when set (`dopsd ui` always sets one unless --no-token)."""
    routes = [Route("/", index), Route("/files/{path:path}", files), Mount("/static", StaticFiles(directory=STATIC))]
    routes += queue.routes() + api_data.routes() + api_jobs.routes() + api_fit.routes()
    app = Starlette(routes=routes)
    app.state.ctx = ctx
    # the plan process runs with the jobs' thread limits; its own output goes to the app's logs
    ctx.fit.env, ctx.fit.log = {**ctx.jobs.env, **ctx.fit.env}, ctx.home.state / "logs" / "fit.log"
    return Guard(app, token, hosts, ctx.max_body)

"""The app: a Starlette application around one `Context` (home, jobs, caches), the guard every request passes
(host, token, cross-site requests, body size) and the file server that only hands out files under the home.
"""

from __future__ import annotations

import hmac
import json
import mimetypes
import threading
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dopsd.ui import adapter
from dopsd.ui.datasets import UploadRefused
from dopsd.ui.home import Home, PathRefused
from dopsd.ui.jobs import JobManager
from dopsd.ui.runs import HealthCache

STATIC = Path(__file__).parent / "static"
COOKIE = "dopsd_ui_token"
CSRF_HEADER = "x-dopsd-request"  # custom header: a cross-site page cannot send it without a CORS preflight
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
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


@dataclass
class Context:
    home: Home
    jobs: JobManager
    max_upload: int = 32 * 1024 * 1024  # bytes per uploaded image
    max_body: int = 256 * 1024 * 1024  # bytes per request
    health: HealthCache = field(default_factory=HealthCache)
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # per job: first progress observation (ETA)
    # held while a request picks a new name and claims it (a folder, a config file or a job's output), so two
    # requests at once never pick the same one
    names: threading.Lock = field(default_factory=threading.Lock)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


class Guard:
    """ASGI middleware: every request must come for an allowed Host (a local bind refuses other names: DNS
    rebinding), carry the token when one is set, and — for anything that changes state — carry the app's
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
            response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
            return await response(scope, receive, send)
        await self.app(scope, receive, send)

    def _check(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if self.hosts is not None and name not in self.hosts:
            return _error(421, f"host {name!r} is not served here (open the app at the address it printed)")
        if self.token and not self._has_token(request):
            return _error(401, "this app needs its access token: open the URL with ?token=… that `dopsd ui` printed")
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
        cookie = SimpleCookie(request.headers.get("cookie", ""))
        if COOKIE in cookie:
            given.append(cookie[COOKIE].value)
        if request.url.path == "/":
            given += parse_qs(request.url.query).get("token", [])
        return any(hmac.compare_digest(g.encode(), self.token.encode()) for g in given)  # type: ignore[union-attr]


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def endpoint(fn: Callable[..., Any]) -> Callable[[Request], Awaitable[Response]]:
    """An API endpoint: fn(ctx, request, body) runs in a worker thread (it may read files, run the dataset check,
    wait for a short subprocess); its dict/list result is returned as JSON and its errors as JSON errors."""

    async def handler(request: Request) -> Response:
        body: Any = {}
        if request.method in ("POST", "PUT"):
            raw = await request.body()
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    return _error(400, "the request body is not valid JSON")
                if not isinstance(body, dict):
                    return _error(400, "the request body must be a JSON object")
        try:
            result = await run_in_threadpool(fn, request.app.state.ctx, request, body)
        except Exception as err:  # noqa: BLE001 - mapped to an HTTP answer; unknown errors are reported as bugs
            return error_response(err)
        return result if isinstance(result, Response) else JSONResponse(result)

    return handler


def error_response(err: Exception) -> JSONResponse:
    if isinstance(err, HTTPError):
        return _error(err.status, err.message, **err.extra)
    if isinstance(err, UploadRefused):
        return _error(400, str(err), problems=err.problems, file=err.name)
    if isinstance(err, PathRefused):
        return _error(400, str(err))
    if isinstance(err, FileNotFoundError):
        return _error(404, str(err) if err.args else "not found")
    if isinstance(err, FileExistsError):
        return _error(409, str(err))
    if isinstance(err, (adapter.DopsdError, ValueError, KeyError, TypeError)):
        return _error(400, str(err).strip("'\""))
    return _error(500, f"internal error in dopsd ui: {type(err).__name__}: {err}")


def serve_file(request: Request) -> Response:
    ctx: Context = request.app.state.ctx
    try:
        path = ctx.home.resolve_served(request.path_params["path"])
    except PathRefused:
        return _error(403, "refused: only files under the app's home are served")
    except FileNotFoundError:
        return _error(404, "no such file")
    suffix = path.suffix.lower()
    media = TEXT_TYPES.get(suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    if media == "text/html":  # reports: an opaque origin, so their scripts can never call this app's API
        headers["Content-Security-Policy"] = "sandbox allow-scripts"
    if request.query_params.get("download"):
        return FileResponse(path, media_type=media, headers=headers, filename=path.name)
    return FileResponse(path, media_type=media, headers=headers)


async def files(request: Request) -> Response:
    return await run_in_threadpool(serve_file, request)


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


def create_app(ctx: Context, token: str | None = None, hosts: set[str] | None = None) -> Any:
    """The ASGI app. `hosts`: the Host names accepted (None = any; `dopsd ui` passes the local names for a local
    bind); `token`: required on every request when set."""
    from dopsd.ui import api_data, api_jobs

    routes = [Route("/", index), Route("/files/{path:path}", files), Mount("/static", StaticFiles(directory=STATIC))]
    routes += api_data.routes() + api_jobs.routes()
    app = Starlette(routes=routes)
    app.state.ctx = ctx
    return Guard(app, token, hosts, ctx.max_body)

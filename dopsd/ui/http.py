"""What every API endpoint of the app is built on: the app's `Context`, the errors it answers with (as JSON) and
`endpoint`, which runs an endpoint function in a worker thread. The app itself, its guard and file server:
dopsd.ui.server."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dopsd.ui import adapter
from dopsd.ui.datasets import UploadRefused
from dopsd.ui.fit.service import FitService
from dopsd.ui.home import Home, PathRefused
from dopsd.ui.jobs import Job, JobManager
from dopsd.ui.runs import HealthCache


@dataclass
class Context:
    home: Home
    jobs: JobManager
    max_upload: int = 32 * 1024 * 1024  # bytes per uploaded image
    max_body: int = 256 * 1024 * 1024  # bytes per request
    health: HealthCache = field(default_factory=HealthCache)
    fit: FitService = field(default_factory=FitService)  # "will it fit?": the one plan process (dopsd.ui.fit)
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # per job: first progress observation (ETA)
    # held while a request picks a new name and claims it (a folder, a config file or a job's output), so two
    # requests at once never pick the same one
    names: threading.Lock = field(default_factory=threading.Lock)


class HTTPError(Exception):
    def __init__(self, status: int, message: str, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.extra = status, message, extra


def json_error(status: int, message: str, **extra: Any) -> JSONResponse:
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
                    return json_error(400, "the request body is not valid JSON")
                if not isinstance(body, dict):
                    return json_error(400, "the request body must be a JSON object")
        try:
            result = await run_in_threadpool(fn, request.app.state.ctx, request, body)
        except Exception as err:  # noqa: BLE001 - mapped to an HTTP answer; unknown errors are reported as bugs
            return error_response(err)
        return result if isinstance(result, Response) else JSONResponse(result)

    return handler


def error_response(err: Exception) -> JSONResponse:
    if isinstance(err, HTTPError):
        return json_error(err.status, err.message, **err.extra)
    if isinstance(err, UploadRefused):
        return json_error(400, str(err), problems=err.problems, file=err.name)
    if isinstance(err, PathRefused):
        return json_error(400, str(err))
    if isinstance(err, FileNotFoundError):
        return json_error(404, str(err) if err.args else "not found")
    if isinstance(err, FileExistsError):
        return json_error(409, str(err))
    if isinstance(err, (adapter.DopsdError, ValueError, KeyError, TypeError)):
        return json_error(400, str(err).strip("'\""))
    # A bug: the traceback goes to the app's terminal; the page gets no exception names or server paths.
    import traceback

    traceback.print_exception(err)
    return json_error(500, "internal error in dopsd ui (a bug): the terminal running `dopsd ui` shows the details")


def job_public(ctx: Context, job: Job | None, log: bool = False) -> dict[str, Any] | None:
    """A job as the API shows it (with the tail of its log when asked)."""
    if job is None:
        return None
    out = job.public()
    if log:
        out["log"] = ctx.jobs.log_tail(job)
    return out

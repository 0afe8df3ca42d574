"""API of "will it fit?": POST /api/fit with the New-run form's request (as /api/config takes it) starts or finds
the plan of that config and answers its state; GET /api/fit/ID reads it again (the page polls while it plans);
POST /api/fit/cancel stops the one in flight (the page left)."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from dopsd.ui import adapter
from dopsd.ui.api_data import build_config
from dopsd.ui.http import Context, endpoint


def fit_ask(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    if not adapter.has_command("plan"):
        return {"available": False}
    cfg = build_config(ctx, body, ctx.home.area("runs") / "NAME")
    # Neither the run folder nor the dataset changes a plan: the same settings with another name or dataset
    # are the same request (its kept answer).
    adapter.set_key(cfg, "train.output_dir", "RUN")
    adapter.set_key(cfg, "data.path", "")
    return {"available": True, **ctx.fit.ask(adapter.to_yaml(cfg))}


def fit_view(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    state = ctx.fit.get(request.path_params["id"])
    if state is None:
        raise FileNotFoundError(f"no estimate {request.path_params['id']!r} (the app keeps the latest few)")
    return {"available": True, **state}


def fit_cancel(ctx: Context, request: Request, body: dict) -> dict[str, Any]:
    rid = body.get("id")
    ctx.fit.cancel(str(rid) if rid is not None else None)
    return {"in_flight": ctx.fit.in_flight()}


def routes() -> list[Route]:
    return [
        Route("/api/fit", endpoint(fit_ask), methods=["POST"]),
        Route("/api/fit/cancel", endpoint(fit_cancel), methods=["POST"]),
        Route("/api/fit/{id}", endpoint(fit_view)),
    ]

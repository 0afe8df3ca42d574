"""`dopsd ui`: a local web app for the whole workflow — datasets, the teacher probe, runs with live progress and
few-step health, side-by-side comparisons, exports, the benchmark report and the demo.

It runs the real commands (`python -m dopsd.cli train|probe|sample|export|plan|bench|demo`) as separate
processes and reads their results from the folders they write. In-process it only reads: dopsd/ui/adapter.py
(datasets, commands), preflight.py (the checks `dopsd train` runs before loading weights) and rules.py (the
config's ranges); it loads no model and imports no trainer (the plan runs in its own process: dopsd/ui/fit/).
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path
from typing import Any

DEFAULT_PORT = 8765


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; another address, e.g. 0.0.0.0, serves "
        "plain HTTP to the network: the app warns, and it always needs its secret then)",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)")
    parser.add_argument(
        "--home",
        type=Path,
        default=None,
        help="the app's folder: datasets, runs, probes, exports, reports (default $DOPSD_HOME or ~/dopsd-ui)",
    )
    parser.add_argument(
        "--token",
        default=None,
        help="the app's secret (default $DOPSD_UI_TOKEN, else a new one per launch, printed in the app's URL)",
    )
    parser.add_argument(
        "--no-token",
        action="store_true",
        help="no secret (this machine only): any program or user on this machine can then use the app — start "
        "jobs, read every dataset — so it warns; refused with a --host other than this machine",
    )
    parser.add_argument(
        "--max-jobs",
        type=int,
        default=None,
        help="jobs that run at the same time (default 1, or what the app's settings say)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads per job (OMP_NUM_THREADS; default: torch's choice; 1 is fastest for the "
        "miniature on a small CPU)",
    )
    parser.add_argument("--max-upload-mb", type=float, default=32.0, help="largest image upload in MB (default 32)")
    parser.add_argument(
        "--grace",
        type=float,
        default=120.0,
        help="seconds between SIGTERM and SIGKILL when a job is stopped (default 120: a stopped run finishes its "
        "step and writes a checkpoint first)",
    )


def is_local(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def build(
    home: Path,
    *,
    max_jobs: int | None = None,
    threads: int | None = None,
    max_upload_mb: float = 32.0,
    grace: float = 10.0,
) -> Any:
    """The app's Context: the home folder, the job manager (its watcher thread started), limits."""
    import json

    from dopsd.ui.home import Home
    from dopsd.ui.jobs import JobManager
    from dopsd.ui.server import Context

    h = Home(home)
    if max_jobs is None:
        try:
            max_jobs = int(json.loads((h.state / "settings.json").read_text())["max_running"])
        except (OSError, ValueError, KeyError, TypeError):
            max_jobs = 1
    env = {}
    if threads:
        env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "DOPSD_THREADS": str(threads)}
    jobs = JobManager(h, max_running=max_jobs, grace=grace, env=env)
    jobs.start()
    return Context(h, jobs, max_upload=int(max_upload_mb * 1024 * 1024))


def listen(host: str, port: int) -> socket.socket:
    from dopsd.errors import DopsdError

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise DopsdError(f"cannot listen on {host}:{port} ({err.strerror}); choose another --port or --host") from None
    sock.listen(128)
    sock.set_inheritable(False)
    return sock


def allowed_hosts(host: str) -> set[str] | None:
    """The Host names a bind on `host` answers: for a local bind the local names and the address it listens on
    (127.0.0.2 too: the address it prints), so no other name reaches it (DNS rebinding); else any."""
    from dopsd.ui.server import LOCAL_HOSTS

    if not is_local(host):
        return None
    return {*LOCAL_HOSTS, host, f"[{host}]" if ":" in host else host}


def make_server(ctx: Any, sock: socket.socket, host: str, token: str | None) -> Any:
    """A uvicorn server for the app on an already bound socket (tests run it in a thread)."""
    import uvicorn

    from dopsd.ui.server import create_app

    app = create_app(ctx, token=token, hosts=allowed_hosts(host))
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))


def secret(args: argparse.Namespace) -> str | None:
    """The launch's secret (--token, $DOPSD_UI_TOKEN, or a new one), or None with --no-token on a local bind."""
    from dopsd.errors import UsageError

    if args.no_token:
        if args.token:
            raise UsageError("--no-token and --token contradict each other; give one")
        if not is_local(args.host):
            raise UsageError(
                f"--no-token with --host {args.host}: the app would let anyone on the network start jobs and read "
                "every dataset; leave --no-token out (the app then prints its URL with the secret)"
            )
        print(
            "dopsd ui: warning: --no-token: any program or user on this machine can use the app (start and stop "
            "jobs, read and change datasets); leave it out to require the secret",
            file=sys.stderr,
            flush=True,
        )
        return None
    given = args.token or os.environ.get("DOPSD_UI_TOKEN") or None
    if given is not None and len(given) < 16:
        raise UsageError("--token (or $DOPSD_UI_TOKEN): use at least 16 characters, or leave it out for a new one")
    return given or secrets.token_urlsafe(32)


def main(args: argparse.Namespace) -> int:
    home = args.home or Path(os.environ.get("DOPSD_HOME") or Path.home() / "dopsd-ui")
    token = secret(args)
    if not is_local(args.host):
        print(
            f"dopsd ui: warning: --host {args.host} serves plain, unencrypted HTTP to the network: anyone who can "
            "reach this machine can try the app, and the secret in its URL travels in the clear. Prefer the default "
            "127.0.0.1 with an SSH tunnel (ssh -L PORT:127.0.0.1:PORT host)",
            file=sys.stderr,
            flush=True,
        )
    sock = listen(args.host, args.port)
    ctx = build(home, max_jobs=args.max_jobs, threads=args.threads, max_upload_mb=args.max_upload_mb, grace=args.grace)
    port = sock.getsockname()[1]
    shown = socket.gethostname() if args.host in ("0.0.0.0", "::", "") else args.host  # a wildcard: this machine
    url = f"http://{f'[{shown}]' if ':' in shown else shown}:{port}/" + (f"?token={token}" if token else "")
    print(
        f"dopsd ui: {ctx.home.root} at {url}  (Ctrl+C stops the app; running jobs go on and are found again)",
        flush=True,
    )
    try:
        make_server(ctx, sock, args.host, token).run(sockets=[sock])
    finally:
        ctx.fit.close()  # the plan process: its answer would be for nobody
        ctx.jobs.shutdown()
        sock.close()
    return 0


__all__ = ["add_arguments", "main", "build", "listen", "make_server", "is_local"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(argparse.ArgumentParser().parse_args()))

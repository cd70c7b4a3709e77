"""`whiskypay dashboard`: serve `whiskypay.dashboard` (the operator console and dramatiq-dashboard) with waitress."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any

from whiskypay.dashboard import DASHBOARD_VERSION, build_app, is_loopback

#: Where the dashboard listens unless --host says otherwise: loopback only.
DEFAULT_HOST = "127.0.0.1"

#: The dashboard's default TCP port.
DEFAULT_PORT = 8081

#: waitress worker threads: a handful of operators, each page a few Redis calls.
THREADS = 4

_MISSING_CREDENTIALS = (
    "whiskypay dashboard: refusing to start without credentials; the dashboard can requeue and delete messages.\n"
    "Set WHISKYPAY_DASHBOARD_USERNAME and WHISKYPAY_DASHBOARD_PASSWORD (a long random password, e.g. from\n"
    "`python -c 'import secrets; print(secrets.token_urlsafe(24))'`) in the environment or .env, then start again."
)


def serve(args: argparse.Namespace) -> int:
    """Serve the dashboard with waitress until interrupted; exit 2 if the configuration is unusable."""
    from settings import ConfigurationError, get_settings

    try:
        settings = get_settings()
    except ConfigurationError as exc:
        print(exc, file=sys.stderr)
        return 2
    password = settings.dashboard_password.get_secret_value() if settings.dashboard_password else ""
    if not settings.dashboard_username or not password:
        print(_MISSING_CREDENTIALS, file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        print(
            f"WARNING: whiskypay dashboard listens on {args.host}, reachable from other machines. Basic auth over\n"
            "WARNING: plain HTTP sends the password in clear: put a TLS proxy in front, or bind to 127.0.0.1 and\n"
            "WARNING: reach it through an SSH tunnel.",
            file=sys.stderr,
        )
    if importlib.util.find_spec("dramatiq_dashboard") is None:
        print(
            "whiskypay dashboard: dramatiq-dashboard is not installed. Install it next to the project, without its\n"
            f"stale dramatiq<2 pin (docs/dashboard.md): pip install --no-deps dramatiq-dashboard=={DASHBOARD_VERSION}",
            file=sys.stderr,
        )
        return 2

    import waitress

    import actors
    from whiskypay.broker import secrets_of

    app = build_app(actors.broker, username=settings.dashboard_username, password=password,
                    secrets=secrets_of(settings))  # fmt: skip
    queues = ", ".join(sorted(actors.broker.get_declared_queues()))
    print(f"WhiskyPay dashboard on http://{args.host}:{args.port}/ (queues: {queues}); Ctrl-C stops it.", flush=True)
    waitress.serve(app, host=args.host, port=args.port, threads=THREADS, ident="whiskypay-dashboard")
    return 0


def register(commands: Any) -> None:
    """Add `dashboard` to the `whiskypay` command."""
    p = commands.add_parser("dashboard", help="serve the operator console and /dramatiq/, behind HTTP basic auth")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.set_defaults(handler=serve)

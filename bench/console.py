"""How long the operator console's pages take with 100,000 dead letters and 100,000 ledger payments (issue 13).

`python -m bench.console [--dead-letters 100000] [--payments 100000] [--merchants 500] [--reps 7]` (about a
minute). It starts a private redis-server, fills it through our own code paths (dead letters as Dramatiq stores
them; payments through the ledger's own write, `pending_op` + `attempt_op`: one failed attempt each), builds the
dashboard's whole WSGI stack (auth, scrubbing, CSRF, console) in this process and calls each page `--reps` times,
in-process (no HTTP server: the figure is the page's own cost, Redis round trips included). Prints the median and
the slowest of each page and writes bench/results/console.json; the README quotes them.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import statistics
import sys
import time
from typing import Any

from bench.suite import RESULTS_DIR, machine

USER, PASSWORD = "bench", "bench-password-not-secret"


def fill(client: Any, namespace: str, *, dead_letters: int, payments: int, merchants: int) -> str:
    """Fill Redis; return one payment's event id (for /events/<id>)."""
    from dramatiq import Message

    from whiskypay import keys
    from whiskypay.errors import HttpStatusError
    from whiskypay.ledger import LEDGER_LUA, LedgerConfig, LedgerWriter, MessageView, attempt_op, pending_op

    now_ms = int(time.time() * 1000)
    pipe = client.pipeline(transaction=False)
    for i in range(dead_letters):
        merchant = f"m-{i % merchants}"
        message = Message(queue_name="callbackQueue", actor_name="send_callback", args=(), kwargs={
            "callback_url": f"https://{merchant}.example/hook?token=t{i}", "email": f"buyer{i}@example.com",
            "plan": "pro", "price": 19.99, "event_id": f"dl_{i}", "merchant_id": merchant,
        }, options={"retries": 4, "traceback": f"HttpStatusError: HTTP 503 from {merchant}.example"})  # fmt: skip
        redis_id = f"dead-{i}"
        message = message.copy(options={**message.options, "redis_message_id": redis_id})
        pipe.hset(keys.dead_letter_messages(namespace, "callbackQueue"), redis_id, message.encode())
        pipe.zadd(keys.dead_letters(namespace, "callbackQueue"), {redis_id: now_ms - dead_letters + i})
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    config = LedgerConfig(namespace=namespace, retention_s=7 * 24 * 3600, max_payments=payments * 2)
    writer = LedgerWriter(client)
    client.script_load(LEDGER_LUA)
    pipe = client.pipeline(transaction=False)
    error = HttpStatusError("HTTP 503 from merchant.example", http_status=503)
    for i in range(payments):
        merchant = f"m-{i % merchants}"
        message = Message(queue_name="callbackQueue", actor_name="send_callback", args=(), kwargs={
            "callback_url": f"https://{merchant}.example/hook", "email": f"buyer{i}@example.com", "plan": "pro",
            "price": 19.99, "event_id": f"evt_{i}", "merchant_id": merchant,
        }, options={"webhook_id": f"evt_{i}"})  # fmt: skip
        at = now_ms - payments + i
        op = pending_op(config, MessageView(message.asdict()), now_ms=at)
        if op is not None:
            writer.queue(pipe, op, data=message.encode())
        row = attempt_op(config, message, attempt=1, notes=[], exception=error, failed=False, now_ms=at + 1,
                         started_ms=at, duration_ms=12.0)  # fmt: skip
        if row is not None:
            writer.queue(pipe, row)
        if i % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    counters = keys.merchant_outcome_counters(namespace, "callbackQueue")
    client.hset(counters, mapping={f"{outcome}:m-{m}": 100 + m for m in range(merchants)
                                   for outcome in ("completed", "failed")})  # fmt: skip
    return f"evt_{payments // 2}"


def call(app: Any, path: str) -> tuple[int, float]:
    """GET path from the WSGI app in-process; return (status, seconds)."""
    route, _, query = path.partition("?")
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": route, "QUERY_STRING": query, "wsgi.input": io.BytesIO(),
               "HTTP_HOST": "bench", "SERVER_NAME": "bench", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
               "HTTP_AUTHORIZATION": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}
    seen: list[str] = []
    started = time.perf_counter()
    b"".join(app(environ, lambda status, headers, exc_info=None: seen.append(status)))
    return int(seen[0].split()[0]), time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    """Fill a private Redis, time every page, print and write bench/results/console.json."""
    parser = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__.split("\n", 1)[0])
    parser.add_argument("--dead-letters", type=int, default=100_000)
    parser.add_argument("--payments", type=int, default=100_000)
    parser.add_argument("--merchants", type=int, default=500)
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    from whiskypay.devstack import RedisServer

    with RedisServer() as server:
        os.environ.update({"WHISKYPAY_REDIS_URL": server.url, "WHISKYPAY_REDIS_ALLOW_VOLATILE": "true",
                           "WHISKYPAY_LEDGER_MAX_PAYMENTS": str(args.payments * 2)})  # fmt: skip
        os.environ.setdefault("WHISKYPAY_WEBHOOK_SECRET", "whsec_" + base64.b64encode(b"b" * 32).decode())
        os.environ.setdefault("WHISKYPAY_MAIL_FROM", "payments@whiskypay.test")
        import actors
        from whiskypay.dashboard import build_app

        client = actors.broker.client
        started = time.perf_counter()
        event_id = fill(client, actors.broker.namespace, dead_letters=args.dead_letters, payments=args.payments,
                        merchants=args.merchants)  # fmt: skip
        fill_s = time.perf_counter() - started
        app = build_app(actors.broker, username=USER, password=PASSWORD)
        pages = ["/", "/merchants", "/merchants/m-7", "/events", "/events?cursor=50000", "/events?merchant=m-7",
                 "/events?state=failed", f"/events/{event_id}", "/dead-letters", "/dead-letters?cursor=50000",
                 "/dead-letters?merchant=m-7", "/dead-letters?format=json", "/?format=json",
                 "/dramatiq/queues/callbackQueue/failed"]
        results = {}
        for path in pages:
            timings = []
            for _ in range(args.reps):
                status, seconds = call(app, path)
                assert status == 200, (path, status)
                timings.append(seconds * 1000)
            results[path] = {"median_ms": round(statistics.median(timings), 1), "max_ms": round(max(timings), 1)}
            print(f"{path:<40} median {results[path]['median_ms']:7.1f} ms   slowest {results[path]['max_ms']:7.1f} ms")
        info = client.info("memory")
    summary = {"machine": machine(), "dead_letters": args.dead_letters, "payments": args.payments,
               "merchants": args.merchants, "reps": args.reps, "fill_s": round(fill_s, 1),
               "used_memory_mib": round(int(info["used_memory"]) / 2**20, 1), "pages": results}  # fmt: skip
    RESULTS_DIR.mkdir(exist_ok=True)
    (RESULTS_DIR / "console.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"filled in {fill_s:.1f} s; Redis used {summary['used_memory_mib']} MiB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

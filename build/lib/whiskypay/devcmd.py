"""`whiskypay dev`, `whiskypay demo`, `whiskypay pay` and `whiskypay secret`: the service on an embedded default."""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from whiskypay.devstack import HttpReceiver, RedisServer, SmtpSink, WorkerProcess, ensure_redis

#: The project root: where `dramatiq actors` must run so it finds the actors package.
ROOT = Path(__file__).resolve().parent.parent

#: Where `whiskypay dev` keeps its state: the mail it received, its settings and worker logs.
STATE_DIR = Path(".whiskypay")


def new_secret() -> str:
    """Return a fresh Standard Webhooks secret (`whsec_` + 32 random bytes, base64)."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass
class Stack:
    """A running local stack: Redis, SMTP sink, webhook receiver and worker processes."""

    redis_url: str
    env: dict[str, str]
    sink: SmtpSink
    receiver: HttpReceiver
    workers: WorkerProcess
    redis: RedisServer | None


@contextlib.contextmanager
def local_stack(
    *, redis_url: str | None, private_redis: bool, state_dir: Path, threads: int = 4
) -> Iterator[Stack]:
    """Start Redis (reused if redis_url answers), an SMTP sink, a webhook receiver and real workers."""
    state_dir.mkdir(parents=True, exist_ok=True)
    url, server = ensure_redis(None if private_redis else redis_url)
    sink = SmtpSink(maildir=str(state_dir / "mail"))
    receiver = HttpReceiver()
    workers: WorkerProcess | None = None
    try:
        sink.start()
        receiver.start()
        env = {
            **os.environ,
            "WHISKYPAY_REDIS_URL": url,
            "WHISKYPAY_SMTP_HOST": sink.host,
            "WHISKYPAY_SMTP_PORT": str(sink.port),
            "WHISKYPAY_SMTP_TLS": "off",
            "WHISKYPAY_MAIL_FROM": os.environ.get("WHISKYPAY_MAIL_FROM", "payments@whiskypay.localhost"),
            "WHISKYPAY_WEBHOOK_SECRET": os.environ.get("WHISKYPAY_WEBHOOK_SECRET") or new_secret(),
            "WHISKYPAY_ALLOW_PRIVATE_CALLBACKS": "true",
            "WHISKYPAY_CALLBACK_HTTPS_ONLY": "false",
            "WHISKYPAY_ENVIRONMENT": os.environ.get("WHISKYPAY_ENVIRONMENT", "development"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        workers = WorkerProcess(env=env, cwd=str(ROOT), threads=threads, log_path=str(state_dir / "workers.log"))
        workers.start()
        yield Stack(redis_url=url, env=env, sink=sink, receiver=receiver, workers=workers, redis=server)
    finally:
        if workers is not None:
            workers.stop()
        receiver.stop()
        sink.stop()
        if server is not None:
            server.stop()


def _use_stack_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        if key.startswith("WHISKYPAY_"):
            os.environ[key] = value
    sys.path.insert(0, str(ROOT))


def _enqueue_payment(callback_url: str, buyer: str, merchant: str, plan: str, price: float, saas: str) -> Any:
    from actors import send_callback, send_email  # imported late: the broker reads the stack's settings

    callback = send_callback.send(callback_url=callback_url, email=buyer, plan=plan, price=price)
    send_email.send(buyer_email=buyer, merchant_email=merchant, plan=plan, saas_name=saas)
    return callback


def dev(args: argparse.Namespace) -> int:
    """Run the stack in the foreground until Ctrl-C, printing every webhook and email that arrives."""
    state = Path(args.state_dir)
    with local_stack(redis_url=os.environ.get("WHISKYPAY_REDIS_URL", "redis://127.0.0.1:6379/0"),
                     private_redis=args.private_redis, state_dir=state) as stack:
        env_file = state / "dev.env"
        env_file.write_text("".join(f"{k}={v}\n" for k, v in sorted(stack.env.items()) if k.startswith("WHISKYPAY_")))
        env_file.chmod(0o600)
        print(f"""WhiskyPay Workers dev stack is up.
  Redis:            {stack.redis_url.split('@')[-1]}{' (private, started for you)' if stack.redis else ''}
  Workers:          dramatiq actors (callbackQueue + emailQueue), log in {state / 'workers.log'}
  SMTP sink:        {stack.sink.host}:{stack.sink.port}, mail kept in {state / 'mail'}
  Webhook receiver: {stack.receiver.url('/hook')}
  Settings:         {env_file} (the webhook secret is in there)

Enqueue a payment from another terminal:
  set -a; . {env_file}; set +a
  .venv/bin/whiskypay pay --callback-url {stack.receiver.url('/hook')}

Or from Python (the gateway's way):
  from actors import send_callback, send_email
  send_callback.send(callback_url="{stack.receiver.url('/hook')}", email="buyer@example.com", plan="pro", price=19.99)

Ctrl-C stops everything.""", flush=True)
        seen_hooks = seen_mail = 0
        try:
            while True:
                time.sleep(0.5)
                hooks, mails = stack.receiver.requests(), stack.sink.mails()
                for hook in hooks[seen_hooks:]:
                    webhook_id, body = hook.headers.get("webhook-id"), hook.body.decode(errors="replace")
                    print(f"webhook  {webhook_id}  {body}", flush=True)
                for mail in mails[seen_mail:]:
                    print(f"email    to {', '.join(mail.rcpt_tos)}: {mail.message['Subject']}", flush=True)
                seen_hooks, seen_mail = len(hooks), len(mails)
                if stack.workers.returncode is not None:
                    print("The worker processes exited; see", state / "workers.log", file=sys.stderr)
                    return 1
        except KeyboardInterrupt:
            print("\nStopping...")
    return 0


def demo(args: argparse.Namespace) -> int:
    """Run one payment end to end on a private stack; exit 0 only if the webhook and both emails arrived."""
    from whiskypay.signing import WebhookVerificationError, verify

    with local_stack(redis_url=None, private_redis=True, state_dir=Path(args.state_dir)) as stack:
        _use_stack_env(stack.env)
        buyer, merchant = "buyer@example.com", "owner@merchant.example"
        started = time.monotonic()
        message = _enqueue_payment(stack.receiver.url("/hook"), buyer, merchant, "pro", 19.99, "Acme Analytics")
        print(f"Enqueued payment: send_callback {message.message_id} and send_email.")
        ok = True
        try:
            hook = stack.receiver.wait_for(1, timeout_s=args.timeout)[0]
            verify(hook.body, hook.headers, stack.env["WHISKYPAY_WEBHOOK_SECRET"], now=time.time())
            print(f"Webhook received after {time.monotonic() - started:.2f} s, signature verified:")
            print(f"  webhook-id: {hook.headers['webhook-id']}\n  body: {hook.body.decode()}")
        except (AssertionError, WebhookVerificationError) as exc:
            print(f"Webhook NOT delivered correctly: {exc}", file=sys.stderr)
            ok = False
        try:
            mails = stack.sink.wait_for(2, timeout_s=args.timeout)
            for mail in mails:
                parts = [part.get_content_type() for part in mail.message.iter_parts()]
                print(f"Email to {', '.join(mail.rcpt_tos)}: {mail.message['Subject']!r} ({' + '.join(parts)})")
        except AssertionError as exc:
            print(f"Emails NOT delivered: {exc}", file=sys.stderr)
            ok = False
        if not ok:
            print(stack.workers.log()[-3000:], file=sys.stderr)
    print("Demo passed: webhook and both emails delivered." if ok else "Demo FAILED.")
    return 0 if ok else 1


def pay(args: argparse.Namespace) -> int:
    """Enqueue one payment (callback and emails) through the configured broker, as the gateway does."""
    sys.path.insert(0, str(ROOT))
    message = _enqueue_payment(args.callback_url, args.buyer, args.merchant, args.plan, args.price, args.saas_name)
    print(f"Enqueued send_callback {message.message_id} and send_email.")
    return 0


def secret(args: argparse.Namespace) -> int:
    """Print a new webhook secret."""
    print(new_secret())
    return 0


def register(commands: Any) -> None:
    """Add dev, demo, pay and secret to the `whiskypay` command."""
    p = commands.add_parser("dev", help="run Redis, workers and an SMTP sink locally until Ctrl-C")
    p.add_argument("--state-dir", default=str(STATE_DIR))
    p.add_argument("--private-redis", action="store_true", help="always start a private Redis")
    p.set_defaults(handler=dev)
    p = commands.add_parser("demo", help="run one payment end to end on a private stack; exit 0 if delivered")
    p.add_argument("--state-dir", default=str(STATE_DIR / "demo"))
    p.add_argument("--timeout", type=float, default=30.0)
    p.set_defaults(handler=demo)
    p = commands.add_parser("pay", help="enqueue one payment (webhook + emails)")
    p.add_argument("--callback-url", required=True)
    p.add_argument("--buyer", default="buyer@example.com")
    p.add_argument("--merchant", default="owner@merchant.example")
    p.add_argument("--plan", default="pro")
    p.add_argument("--price", type=float, default=19.99)
    p.add_argument("--saas-name", default="Acme Analytics")
    p.set_defaults(handler=pay)
    p = commands.add_parser("secret", help="print a new whsec_ webhook secret")
    p.set_defaults(handler=secret)

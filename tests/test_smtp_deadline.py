"""Tier 1: every SMTP exchange ends at its deadline (WHISKYPAY_SMTP_TIMEOUT_S), however slowly the relay answers.

smtplib's timeout bounds each socket read only: a relay that answers one byte every 0.2 s never trips it. A real
SMTP-ish server on loopback (a thread per connection) answers like a relay except at one stage, where it trickles
its reply; SmtpClients (the worker's own middleware instance, without a broker) sends, and the wall time is
measured. The normal path, through the real aiosmtpd sink, is in test_middleware_smtp_client.py and
test_smtp_tls.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from email.message import EmailMessage

import pytest
import redis

from middleware.smtp_client import SmtpClients
from tests.helpers import dead_letters, wait_until
from whiskypay import keys
from whiskypay.errors import SmtpTemporaryError, SmtpTimedOut
from whiskypay.smtp import SmtpRelay, open_smtp

SENDER = "payments@whiskypay.test"
TIMEOUT_S = 1.0
#: The watchdog's tick (0.05 s) plus scheduling noise on a busy 2-core machine.
MARGIN_S = 0.5
#: The trickled reply sends one byte this often: well inside the read timeout, so no socket timeout ever fires.
TRICKLE_S = 0.2
#: A trickled reply is this long: it takes 60 x 0.2 = 12 s, which an unbounded client waits out.
PADDING = "x" * 50


class TricklingRelay:
    """A loopback SMTP-ish relay that answers at once, except the reply of stage trickle: one byte per TRICKLE_S.

    Stages: "greeting" (220), "ehlo", "mail", "rcpt", "data" (354), "data-reply" (the 250 after the data),
    "quit"; None trickles nothing. `trickle` may be changed between emails, and `trickles` is how many replies
    are trickled (None: every one). Counts connections, and records the recipients of every email whose data
    arrived (`deliveries`).
    """

    def __init__(self, trickle: str | None) -> None:
        self.trickle = trickle
        self.trickles: int | None = None
        self.deliveries: list[tuple[str, ...]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.stopped = threading.Event()
        self.connections = 0
        self.data_received = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _reply(self, conn: socket.socket, stage: str, text: str) -> None:
        data = f"{text}\r\n".encode()
        if stage != self.trickle or self.trickles == 0:
            conn.sendall(data)
            return
        if self.trickles is not None:
            self.trickles -= 1
        code, rest = text[:4], text[4:]
        for byte in f"{code}{rest} {PADDING}\r\n".encode():
            if self.stopped.is_set():
                return
            conn.sendall(bytes([byte]))
            time.sleep(TRICKLE_S)

    def _serve(self, conn: socket.socket) -> None:
        try:
            lines = conn.makefile("rb")
            self._reply(conn, "greeting", "220 trickle.test ESMTP")
            in_data = False
            rcpts: list[str] = []
            for line in lines:
                if in_data:
                    if line == b".\r\n":
                        in_data = False
                        self.data_received += 1
                        self.deliveries.append(tuple(rcpts))
                        rcpts = []
                        self._reply(conn, "data-reply", "250 2.0.0 queued")
                    continue
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    self._reply(conn, "ehlo", "250 trickle.test")
                elif verb in (b"MAIL", b"RCPT"):
                    if verb == b"RCPT":
                        rcpts.append(line.decode().split("<", 1)[1].split(">", 1)[0])
                    self._reply(conn, verb.decode().lower(), "250 2.1.0 ok")
                elif verb == b"DATA":
                    in_data = True
                    self._reply(conn, "data", "354 go ahead")
                elif verb == b"QUIT":
                    self._reply(conn, "quit", "221 bye")
                    return
                else:
                    self._reply(conn, "other", "250 ok")
        except OSError:
            pass  # the client hung up: what a bounded client does
        finally:
            conn.close()

    def close(self) -> None:
        self.stopped.set()
        self.listener.close()


@pytest.fixture
def relay_factory() -> Iterator[type[TricklingRelay]]:
    started: list[TricklingRelay] = []

    class Started(TricklingRelay):
        def __init__(self, trickle: str | None) -> None:
            super().__init__(trickle)
            started.append(self)

    yield Started
    for relay in started:
        relay.close()


def clients(relay: TricklingRelay) -> SmtpClients:
    return SmtpClients(relay=SmtpRelay(host="127.0.0.1", port=relay.port, timeout_s=TIMEOUT_S), mail_from=SENDER)


def email() -> EmailMessage:
    message = EmailMessage()
    message["To"], message["From"], message["Subject"] = "buyer@example.com", SENDER, "Your receipt"
    message.set_content("Thanks for your payment.")
    return message


@pytest.mark.parametrize("stage", ["greeting", "ehlo", "mail", "rcpt", "data", "data-reply"])
def test_a_relay_trickling_one_reply_cannot_hold_the_thread_past_the_smtp_timeout(
    relay_factory: type[TricklingRelay], stage: str
) -> None:
    # Given a relay that trickles one reply a byte every 0.2 s (12 s for the whole reply; no read ever times out)
    relay = relay_factory(stage)
    smtp = clients(relay)
    # When an email is sent on a fresh connection
    started = time.monotonic()
    with pytest.raises(SmtpTimedOut, match=r"SMTP exchange with 127\.0\.0\.1 took longer than 1 s; cut off") as raised:
        smtp.send(email())
    elapsed = time.monotonic() - started
    # Then the exchange in which it trickles is cut off at the timeout: opening the connection (greeting, EHLO)
    # or sending (MAIL, RCPT, DATA, the reply after the data), each its own exchange of at most TIMEOUT_S
    opening = stage in ("greeting", "ehlo")
    assert elapsed < (1 if opening else 2) * TIMEOUT_S + MARGIN_S, f"{stage}: {elapsed:.2f} s"
    assert elapsed >= TIMEOUT_S * 0.9
    # And it is a temporary failure (retried by the queue's policy), not tried again on a new connection
    assert isinstance(raised.value, SmtpTemporaryError) and raised.value.tags == {"host": "127.0.0.1"}
    assert relay.connections == 1
    # And the cut-off connection was dropped: the thread's next email goes over a new one
    relay.trickle = None
    smtp.send(email())
    assert relay.connections == 2


def test_a_trickled_reply_after_the_data_on_a_reused_connection_is_cut_off_and_not_sent_again(
    relay_factory: type[TricklingRelay],
) -> None:
    # Given a thread whose connection already carried one email, and a relay that now trickles the 250 after data
    relay = relay_factory(None)
    smtp = clients(relay)
    smtp.send(email())
    relay.trickle = "data-reply"
    # When the next email is sent over the same connection
    started = time.monotonic()
    with pytest.raises(SmtpTimedOut):
        smtp.send(email())
    elapsed = time.monotonic() - started
    # Then it is cut off at the timeout, and (unlike a connection the relay dropped) not sent again over a new
    # connection: the relay may have taken it, the caller decides (the actor treats it as a dropped connection)
    assert elapsed < TIMEOUT_S + MARGIN_S, f"{elapsed:.2f} s"
    assert relay.connections == 1 and relay.data_received == 2


def test_opening_a_connection_to_a_trickling_relay_is_bounded_for_whiskypay_check_too(
    relay_factory: type[TricklingRelay],
) -> None:
    relay = relay_factory("greeting")
    started = time.monotonic()
    with pytest.raises(SmtpTimedOut):
        open_smtp(SmtpRelay(host="127.0.0.1", port=relay.port, timeout_s=TIMEOUT_S))
    assert time.monotonic() - started < TIMEOUT_S + MARGIN_S


def test_a_worker_shutting_down_against_a_relay_trickling_its_quit_reply_is_not_held(
    relay_factory: type[TricklingRelay],
) -> None:
    relay = relay_factory("quit")
    smtp = clients(relay)
    smtp.send(email())
    started = time.monotonic()
    smtp.after_worker_shutdown(None, None)  # type: ignore[arg-type]
    assert time.monotonic() - started < TIMEOUT_S + MARGIN_S


@pytest.mark.e2e
def test_a_worker_whose_reply_after_the_data_is_cut_off_sends_that_email_again_as_after_a_dropped_connection(
    relay_factory: type[TricklingRelay], start_workers, env: dict[str, str], redis_client: redis.Redis
) -> None:
    # Given an email worker with a 1 s SMTP timeout and a relay that trickles its 250 after the buyer's data once
    relay = relay_factory("data-reply")
    relay.trickles = 1
    worker = start_workers("--queues", "emailQueue", threads=1, env={
        **env, "WHISKYPAY_SMTP_HOST": "127.0.0.1", "WHISKYPAY_SMTP_PORT": str(relay.port),
        "WHISKYPAY_SMTP_TIMEOUT_S": "1", "WHISKYPAY_EMAIL_SCHEDULE": "100ms",
    })
    from actors import send_email

    # When one email job runs
    started = time.monotonic()
    message = send_email.send(
        buyer_email="buyer@example.com", merchant_email="owner@merchant.example", plan="pro", saas_name="Acme"
    )
    wait_until(lambda: len(relay.deliveries) >= 3, timeout_s=20, what="three deliveries")
    elapsed = time.monotonic() - started
    # Then the cut-off exchange failed the attempt like a dropped connection (the relay may have taken the email:
    # the at-most-once marker only holds across kills and time limits), and the retry sent the buyer's email again
    assert relay.deliveries == [("buyer@example.com",), ("buyer@example.com",), ("owner@merchant.example",)]
    wait_until(lambda: "attempt 1 failed" in worker.log(), timeout_s=5, what="the first attempt's failure line")
    assert 1.0 <= elapsed < 10, f"{elapsed:.2f} s"  # cut off at the 1 s deadline, not after the 12 s trickle
    # And both markers now say sent: nothing more goes out, and nothing was dead-lettered
    for role in ("buyer", "merchant"):
        assert redis_client.get(keys.email_sent("whiskypay", message.message_id, role)) == b"sent"
    assert dead_letters(redis_client, "emailQueue") == []

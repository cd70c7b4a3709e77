"""SmtpSink: an SMTP server (aiosmtpd) on 127.0.0.1 that keeps every message and fails or drops on demand."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import os
import socket
import ssl
import threading
import time
import weakref
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Self

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass(frozen=True)
class Mail:
    """One message accepted by ``SmtpSink``."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    message: EmailMessage


@dataclass
class _FailRule:
    remaining: int
    reply: str
    stage: str
    rcpt: str | None

    def applies_to(self, rcpts: list[str]) -> bool:
        return self.rcpt is None or self.rcpt.lower() in (r.lower() for r in rcpts)


class _SinkSMTP(SMTP):
    """aiosmtpd SMTP protocol that can drop the connection at DATA."""

    sink: SmtpSink

    async def _smtp_data(self, arg: str) -> None:
        """Close the connection without a reply if the sink says so, else behave normally.

        Parameters:
            arg: DATA argument (must be empty).
        """
        if self.envelope is not None and self.envelope.rcpt_tos and self.sink._take_drop():
            if isinstance(self.transport, asyncio.Transport):
                self.transport.abort()
            return
        await super().smtp_DATA(arg)


# aiosmtpd dispatches on smtp_<VERB> (aliased so linters that enforce lowercase names stay happy).
for _verb, _impl in {"DATA": _SinkSMTP._smtp_data}.items():
    setattr(_SinkSMTP, f"smtp_{_verb}", _impl)


class _SinkController(Controller):
    sink: SmtpSink

    def factory(self) -> SMTP:
        self.sink._count_connection()
        kwargs = dict(self.SMTP_kwargs)
        # aiosmtpd warns (UserWarning + log line, on every connection) when AUTH is required without TLS. That is
        # exactly what a loopback test sink wants, so build without the requirement and switch it on afterwards.
        require_auth = bool(kwargs.pop("auth_required", False))
        server = _SinkSMTP(self.handler, **kwargs)
        server._auth_required = require_auth
        server.sink = self.sink
        return server

    def _trigger_server(self) -> None:
        # We bind port 0 to avoid races; learn the real port before aiosmtpd connects to itself.
        if self.port == 0 and isinstance(self.server, asyncio.Server) and self.server.sockets:
            self.port = int(self.server.sockets[0].getsockname()[1])
        with contextlib.ExitStack() as stack:  # what aiosmtpd does
            sock = stack.enter_context(socket.create_connection((self.hostname, self.port), 1.0))
            if self.ssl_context is not None:  # implicit TLS: the probe must handshake before the greeting
                probe = ssl.create_default_context()
                probe.check_hostname = False
                probe.verify_mode = ssl.CERT_NONE  # a loopback liveness probe of our own server, not a client
                sock = stack.enter_context(probe.wrap_socket(sock))
            sock.recv(1024)


class SmtpSink:
    """A real SMTP server (aiosmtpd) on 127.0.0.1 that keeps every message and can fail on demand.

    Parameters:
        port: port to bind; 0 (default) picks a free one.
        username: require AUTH (LOGIN/PLAIN; after STARTTLS when tls is "starttls") with this user.
        password: ... and this password.
        maildir: also write each message as a ``.eml`` file into this directory.
        tls: "off"; "starttls" (offered, and required before any mail or AUTH); or "ssl" (implicit TLS).
        cert_file: PEM certificate chain the server presents (required unless tls is "off").
        key_file: PEM private key of cert_file (None when cert_file holds it too).
    """

    def __init__(
        self,
        *,
        port: int = 0,
        username: str | None = None,
        password: str | None = None,
        maildir: str | None = None,
        tls: str = "off",
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        if tls not in ("off", "starttls", "ssl"):
            raise ValueError(f"tls must be 'off', 'starttls' or 'ssl', not {tls!r}")
        if tls != "off" and cert_file is None:
            raise ValueError(f"tls={tls!r} needs cert_file (and key_file) for the server's certificate")
        self.host = "127.0.0.1"
        self.tls = tls
        self.cert_file = cert_file
        self.key_file = key_file
        self._requested_port = port
        self.port: int = 0
        self.username = username
        self.password = password
        self.maildir = maildir
        self._lock = threading.Condition()
        self._mails: list[Mail] = []
        self._rules: list[_FailRule] = []
        self._failing: weakref.WeakKeyDictionary[Envelope, tuple[_FailRule, str]] = weakref.WeakKeyDictionary()
        self._drops = 0
        self._connections = 0
        self._seq = 0
        self._controller: _SinkController | None = None

    # -- internals --------------------------------------------------------------------------------------------------
    def _count_connection(self) -> None:
        with self._lock:
            self._connections += 1

    def _take_drop(self) -> bool:
        with self._lock:
            if self._drops > 0:
                self._drops -= 1
                return True
            return False

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode(errors="replace") == self.username
            and auth_data.password.decode(errors="replace") == self.password
        )
        return AuthResult(success=ok, handled=False)

    async def _handle_rcpt(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        """Accept the recipient unless a RCPT-stage failure is scheduled for it."""
        with self._lock:
            marked = self._failing.get(envelope)
            if marked is not None:
                rule, reply = marked
                if rule.rcpt is None or rule.rcpt.lower() == address.lower():
                    return reply
            else:
                for rule in self._rules:
                    if rule.stage == "RCPT" and rule.remaining > 0 and rule.applies_to([address]):
                        rule.remaining -= 1
                        self._failing[envelope] = (rule, rule.reply)
                        self._rules = [r for r in self._rules if r.remaining > 0]
                        return rule.reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def _handle_data(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        """Store the message unless a DATA-stage failure is scheduled."""
        with self._lock:
            for rule in self._rules:
                if rule.stage == "DATA" and rule.remaining > 0 and rule.applies_to(envelope.rcpt_tos):
                    rule.remaining -= 1
                    self._rules = [r for r in self._rules if r.remaining > 0]
                    return rule.reply
        raw = envelope.original_content or (
            envelope.content if isinstance(envelope.content, bytes) else str(envelope.content or "").encode()
        )
        message = email.message_from_bytes(raw, _class=EmailMessage, policy=email.policy.default)
        mail = Mail(
            mail_from=envelope.mail_from or "",
            rcpt_tos=tuple(envelope.rcpt_tos),
            data=raw,
            message=message,
        )
        with self._lock:
            self._seq += 1
            seq = self._seq
        if self.maildir:
            await asyncio.to_thread(self._write_eml, self.maildir, seq, raw)
        with self._lock:
            self._mails.append(mail)
            self._lock.notify_all()
        return "250 Message accepted for delivery"

    @staticmethod
    def _write_eml(maildir: str, seq: int, raw: bytes) -> None:
        os.makedirs(maildir, exist_ok=True)
        name = os.path.join(maildir, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{seq:05d}.eml")
        with open(name + ".tmp", "wb") as fh:
            fh.write(raw)
        os.replace(name + ".tmp", name)

    # -- public API -------------------------------------------------------------------------------------------------
    @property
    def connections(self) -> int:
        """Number of SMTP connections accepted since ``start()`` (or the last ``clear()``)."""
        with self._lock:
            return self._connections

    def start(self) -> Self:
        """Start the aiosmtpd controller thread."""
        if self._controller is not None:
            return self
        kwargs: dict[str, Any] = {"server_hostname": "whiskypay-smtp-sink", "decode_data": False}
        if self.tls != "off":
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)  # no client certificates asked
            context.load_cert_chain(str(self.cert_file), self.key_file)
            if self.tls == "starttls":
                kwargs.update(tls_context=context, require_starttls=True)
            else:
                kwargs.update(ssl_context=context)
        if self.username is not None:
            kwargs.update(
                authenticator=self._authenticate,
                auth_required=True,
                # aiosmtpd only knows about STARTTLS: over implicit TLS it would refuse AUTH as unencrypted.
                auth_require_tls=self.tls == "starttls",
            )
        mail_log = logging.getLogger("mail.log")
        if mail_log.level == logging.NOTSET:
            mail_log.setLevel(logging.WARNING)  # aiosmtpd logs every SMTP command at INFO
        controller = _SinkController(self, hostname=self.host, port=self._requested_port, **kwargs)
        controller.sink = self
        controller.start()
        self.port = int(controller.port)
        self._controller = controller
        with self._lock:
            self._connections = 0  # don't count aiosmtpd's own start-up probe connection
        return self

    def stop(self) -> None:
        """Stop the server thread."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def fail_next(
        self,
        n: int,
        *,
        code: int = 451,
        text: str = "4.3.0 try again later",
        stage: str = "DATA",
        rcpt: str | None = None,
    ) -> None:
        """Reject the next ``n`` transactions with ``code text`` at ``stage`` instead of accepting them.

        Parameters:
            n: number of transactions to reject.
            code: SMTP reply code.
            text: reply text.
            stage: "RCPT" or "DATA".
            rcpt: only transactions with this recipient (at RCPT: only this recipient is refused).
        """
        stage = stage.upper()
        if stage not in ("RCPT", "DATA"):
            raise ValueError(f"stage must be 'RCPT' or 'DATA', not {stage!r}")
        if n > 0:
            with self._lock:
                self._rules.append(_FailRule(remaining=n, reply=f"{code} {text}", stage=stage, rcpt=rcpt))

    def drop_connections(self, n: int) -> None:
        """Make the next ``n`` DATA commands close the connection abruptly without any reply.

        Parameters:
            n: number of DATA commands to drop.
        """
        with self._lock:
            self._drops += n

    def mails(self) -> list[Mail]:
        """Return the accepted messages, oldest first."""
        with self._lock:
            return list(self._mails)

    def wait_for(self, count: int, timeout_s: float = 10) -> list[Mail]:
        """Wait until at least ``count`` messages were accepted and return them all.

        Parameters:
            count: minimum number of messages.
            timeout_s: give up after this long with an AssertionError.
        """
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while len(self._mails) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    summary = [(m.rcpt_tos, m.message.get("Subject")) for m in self._mails]
                    raise AssertionError(
                        f"expected {count} mail(s) within {timeout_s}s, got {len(self._mails)}: {summary}"
                    )
                self._lock.wait(remaining)
            return list(self._mails)

    def clear(self) -> None:
        """Forget messages, pending failures/drops and reset the connection counter."""
        with self._lock:
            self._mails.clear()
            self._rules.clear()
            self._drops = 0
            self._connections = 0

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# aiosmtpd looks its hooks up as handle_<VERB> on the handler object.
for _verb, _hook in {"RCPT": SmtpSink._handle_rcpt, "DATA": SmtpSink._handle_data}.items():
    setattr(SmtpSink, f"handle_{_verb}", _hook)

"""One webhook attempt over a requests.Session: POST, no redirects, bounded in time and size, classified failure."""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
from urllib3.exceptions import ReadTimeoutError

from whiskypay.deadline import AttemptScope
from whiskypay.errors import DeliveryError, EndpointGone, HttpStatusError, WhiskyPayError
from whiskypay.retrying import parse_retry_after_ms


@dataclass(frozen=True)
class Attempt:
    """The outcome of one successful attempt."""

    status: int
    duration_ms: float


def post_webhook(
    session: requests.Session,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    connect_timeout_s: float,
    read_timeout_s: float,
    max_response_bytes: int,
    scope: AttemptScope | None = None,
) -> Attempt:
    """POST body to url once; return on 2xx, raise a classified `WhiskyPayError` otherwise.

    Redirects are not followed (a 3xx is a failure). At most max_response_bytes of the response are read;
    a longer body closes the connection instead of being read to the end, and so does a body still arriving
    at the deadline (connect + read timeout): its status is the answer. Error texts carry the host only.
    This is the one timer of an attempt: its duration is the Attempt's, or the raised error's `duration_ms`.

    Parameters:
      connect_timeout_s, read_timeout_s: Socket timeouts, in seconds.
      max_response_bytes: The most of the response body read, in bytes.
      scope: The running attempt (`whiskypay.deadline`), whose watchdog ends it at its deadline; its
        connection must come from a `whiskypay.netguard.GuardedAdapter`.
    """
    started = time.perf_counter()
    try:
        status = _post(
            session, url, body, headers, started=started, connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s, max_response_bytes=max_response_bytes, scope=scope,
        )
    except WhiskyPayError as exc:
        exc.duration_ms = (time.perf_counter() - started) * 1000
        raise
    return Attempt(status=status, duration_ms=(time.perf_counter() - started) * 1000)


def _post(
    session: requests.Session,
    url: str,
    body: bytes,
    headers: dict[str, str],
    *,
    started: float,
    connect_timeout_s: float,
    read_timeout_s: float,
    max_response_bytes: int,
    scope: AttemptScope | None,
) -> int:
    host = urlsplit(url).hostname or "?"
    try:
        response = session.post(
            url,
            data=body,
            headers={"Content-Type": "application/json", **headers},
            timeout=(connect_timeout_s, read_timeout_s),
            allow_redirects=False,
            stream=True,
        )
        try:
            received = 0
            deadline = started + connect_timeout_s + read_timeout_s
            for chunk in response.iter_content(8192):
                received += len(chunk)
                # Enough to know the answer: stop at the size cap, or when a trickling body passes the deadline.
                if received > max_response_bytes or time.perf_counter() > deadline:
                    break
        except (requests.RequestException, OSError):
            if scope is None or not scope.expired:
                raise  # the body stalled or broke off within the deadline: a failed attempt, as before
            # the watchdog ended a body still trickling at the deadline: the status is the answer
        finally:
            response.close()
    except WhiskyPayError:
        raise  # RefusedHost from the SSRF guard, Deferred from the slow-server cap
    except (requests.RequestException, OSError) as exc:
        if scope is not None and scope.expired:
            raise DeliveryError(
                f"timed out waiting for {host} (the attempt's {connect_timeout_s + read_timeout_s:g} s deadline)",
                host=host,
            ) from None
        if isinstance(exc, requests.Timeout):
            raise DeliveryError(f"timed out waiting for {host}", host=host) from None
        if isinstance(exc, requests.ConnectionError):
            if any(isinstance(arg, ReadTimeoutError) for arg in exc.args):
                raise DeliveryError(f"timed out waiting for {host}", host=host) from None
            reason = type(exc.__context__ or exc).__name__
            raise DeliveryError(f"could not connect to {host} ({reason})", host=host) from None
        raise DeliveryError(f"request to {host} failed ({type(exc).__name__})", host=host) from None
    status = response.status_code
    if 200 <= status < 300:
        return status
    if status == 410:
        raise EndpointGone(f"HTTP 410 Gone from {host}: the merchant removed this endpoint", host=host, http_status=410)
    retry_after = parse_retry_after_ms(response.headers.get("Retry-After"), now=time.time())
    raise HttpStatusError(f"HTTP {status} from {host}", retry_after_ms=retry_after, host=host, http_status=status)

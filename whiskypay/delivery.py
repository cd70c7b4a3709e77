"""One webhook attempt on the urllib3 pool of a requests.Session: POST, no redirects, bounded, classified failure."""

from __future__ import annotations

import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError, ReadTimeoutError
from urllib3.util import parse_url

from whiskypay.deadline import AttemptScope
from whiskypay.errors import DeliveryError, EndpointGone, HttpStatusError, WhiskyPayError
from whiskypay.retrying import parse_retry_after_ms

#: The pool key requests uses for verify=True: the same pools as a `session.post` would use.
_VERIFY_POOL_KWARGS = {"cert_reqs": "CERT_REQUIRED"}

#: How much of a response body is kept with the attempt's result or error, in bytes (for the delivery ledger).
RESPONSE_HEAD_BYTES = 1024


@dataclass(frozen=True)
class Attempt:
    """The outcome of one successful attempt."""

    status: int
    duration_ms: float
    #: The first RESPONSE_HEAD_BYTES of the response body.
    response_head: bytes = b""


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
    at the deadline (connect + read timeout), or one that stalls or breaks off: its status is the answer (a 2xx
    status line means the merchant accepted it). Error texts carry the host only.
    This is the one timer of an attempt: its duration is the Attempt's, or the raised error's `duration_ms`.

    Parameters:
      connect_timeout_s, read_timeout_s: Socket timeouts, in seconds.
      max_response_bytes: The most of the response body read, in bytes.
      scope: The running attempt (`whiskypay.deadline`), whose watchdog ends it at its deadline; its
        connection must come from a `whiskypay.netguard.GuardedAdapter`.
    """
    started = time.perf_counter()
    try:
        status, head = _post(
            session, url, body, headers, started=started, connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s, max_response_bytes=max_response_bytes, scope=scope,
        )
    except WhiskyPayError as exc:
        exc.duration_ms = (time.perf_counter() - started) * 1000
        raise
    return Attempt(status=status, duration_ms=(time.perf_counter() - started) * 1000, response_head=head)


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
) -> tuple[int, bytes]:
    # The request goes straight to the urllib3 pool of the session's adapter: the same pools and connection
    # classes (the SSRF guard on each connected peer, the attempt's deadline and peer hook), requests' own TLS
    # set-up (`cert_verify`), the session's headers, no redirects, no retries, nothing from the environment;
    # without requests' per-request layer (prepare, merge settings, hooks, cookies), which cost about 0.4 ms
    # of CPU per webhook here (BENCHMARKS.md, "Where the time and memory go").
    host = urlsplit(url).hostname or "?"
    try:
        adapter = session.get_adapter(url)
        if not isinstance(adapter, HTTPAdapter):
            raise requests.exceptions.InvalidSchema(f"no HTTP adapter for {host}")
        pool = adapter.poolmanager.connection_from_url(url, pool_kwargs=_VERIFY_POOL_KWARGS)
        if isinstance(pool, HTTPSConnectionPool):
            adapter.cert_verify(pool, url, True, None)
        response = pool.urlopen(
            "POST",
            parse_url(url).request_uri,
            body=body,
            headers={**session.headers, "Content-Type": "application/json", **headers},
            redirect=False,
            retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
            preload_content=False,
            decode_content=False,
            assert_same_host=False,
        )
        consumed = False
        head = b""
        try:
            received = 0
            deadline = started + connect_timeout_s + read_timeout_s
            for chunk in response.stream(8192, decode_content=False):
                received += len(chunk)
                if len(head) < RESPONSE_HEAD_BYTES:
                    head += chunk[: RESPONSE_HEAD_BYTES - len(head)]
                # Enough to know the answer: stop at the size cap, or when a trickling body passes the deadline.
                if received > max_response_bytes or time.perf_counter() > deadline:
                    break
            else:
                consumed = True
        except (urllib3.exceptions.HTTPError, OSError):
            # The body stalled or broke off. After a 2xx status line the merchant has accepted the webhook: its
            # status is the answer (retrying it would deliver it twice), as for a body the watchdog ends at the
            # deadline. After any other status it is a failed attempt either way.
            if not 200 <= response.status < 300 and (scope is None or not scope.expired):
                raise
        finally:
            if not consumed:
                response.close()  # bytes left unread: the connection is not reused
            response.release_conn()
    except WhiskyPayError:
        raise  # RefusedHost from the SSRF guard, Deferred from the slow-server cap
    except (urllib3.exceptions.HTTPError, requests.RequestException, OSError, ValueError) as exc:
        if scope is not None and scope.expired:
            raise DeliveryError(
                f"timed out waiting for {host} (the attempt's {connect_timeout_s + read_timeout_s:g} s deadline)",
                host=host,
            ) from None
        if isinstance(exc, NewConnectionError):  # before the timeouts: urllib3 derives it from ConnectTimeoutError
            raise DeliveryError(f"could not connect to {host} ({type(exc).__name__})", host=host) from None
        if isinstance(exc, ConnectTimeoutError | ReadTimeoutError | TimeoutError):
            raise DeliveryError(f"timed out waiting for {host}", host=host) from None
        if isinstance(exc, ProtocolError | urllib3.exceptions.SSLError | OSError):
            raise DeliveryError(f"could not connect to {host} ({type(exc).__name__})", host=host) from None
        raise DeliveryError(f"request to {host} failed ({type(exc).__name__})", host=host) from None
    status = response.status
    if 200 <= status < 300:
        return status, head
    error: WhiskyPayError
    if status == 410:
        error = EndpointGone(f"HTTP 410 Gone from {host}: the merchant removed this endpoint", host=host,
                             http_status=410)
    else:
        retry_after = parse_retry_after_ms(response.headers.get("Retry-After"), now=time.time())
        error = HttpStatusError(f"HTTP {status} from {host}", retry_after_ms=retry_after, host=host,
                                http_status=status)
    error.response_head = head
    raise error

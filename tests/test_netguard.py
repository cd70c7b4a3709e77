"""Tier 1: the SSRF guard, on addresses and on real connections to a local HTTP server."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator

import pytest
import requests

from whiskypay.errors import RefusedHost
from whiskypay.netguard import GuardedAdapter, is_public_address


@pytest.mark.parametrize(
    "address",
    [
        "8.8.8.8",
        "1.1.1.1",
        "93.184.216.34",
        "2606:4700:4700::1111",
        "2a00:1450:4001:82a::200e",
        "::ffff:8.8.8.8",
    ],
)
def test_globally_routable_unicast_addresses_are_public(address: str) -> None:
    # Given a public unicast address, when checked, then it is accepted
    assert is_public_address(address) is True


@pytest.mark.parametrize(
    "address",
    [
        pytest.param("127.0.0.1", id="ipv4-loopback"),
        pytest.param("127.8.9.10", id="ipv4-loopback-range"),
        pytest.param("10.0.0.1", id="rfc1918-10"),
        pytest.param("172.16.5.4", id="rfc1918-172"),
        pytest.param("192.168.1.1", id="rfc1918-192"),
        pytest.param("100.64.0.1", id="cgnat"),
        pytest.param("169.254.169.254", id="cloud-metadata"),
        pytest.param("169.254.1.1", id="ipv4-link-local"),
        pytest.param("0.0.0.0", id="ipv4-unspecified"),
        pytest.param("224.0.0.1", id="ipv4-multicast"),
        pytest.param("239.255.255.250", id="ipv4-multicast-ssdp"),
        pytest.param("240.0.0.1", id="ipv4-reserved"),
        pytest.param("255.255.255.255", id="ipv4-broadcast"),
        pytest.param("192.0.2.1", id="test-net-1"),
        pytest.param("198.18.0.1", id="benchmarking"),
        pytest.param("::1", id="ipv6-loopback"),
        pytest.param("::", id="ipv6-unspecified"),
        pytest.param("fe80::1", id="ipv6-link-local"),
        pytest.param("fe80::1%eth0", id="ipv6-link-local-with-zone"),
        pytest.param("fc00::1", id="ipv6-unique-local"),
        pytest.param("fd12:3456::1", id="ipv6-unique-local-fd"),
        pytest.param("fec0::1", id="ipv6-site-local"),
        pytest.param("feff:ffff::1", id="ipv6-site-local-top"),
        pytest.param("fec0::1%eth0", id="ipv6-site-local-with-zone"),
        pytest.param("ff02::1", id="ipv6-multicast"),
        pytest.param("2001:db8::1", id="ipv6-documentation"),
        pytest.param("::ffff:127.0.0.1", id="ipv4-mapped-loopback"),
        pytest.param("::ffff:169.254.169.254", id="ipv4-mapped-metadata"),
        pytest.param("::ffff:10.0.0.1", id="ipv4-mapped-private"),
        pytest.param("::127.0.0.1", id="ipv4-compatible-loopback"),
        pytest.param("2002:7f00:1::", id="6to4-of-loopback"),
        pytest.param("2002:808:808::1", id="6to4-of-public"),
        pytest.param("2001:0:4136:e378:8000:63bf:3fff:fdd2", id="teredo"),
    ],
)
def test_loopback_private_link_local_reserved_and_tunnelled_addresses_are_not_public(address: str) -> None:
    # Given a non-public (or tunnelled, hence uncheckable) address, when checked, then it is refused
    assert is_public_address(address) is False


@pytest.mark.parametrize("garbage", ["", "localhost", "999.1.1.1", "::g"])
def test_a_non_address_is_a_value_error(garbage: str) -> None:
    # Given text that is not an IP address, when checked, then ValueError (never a silent True)
    with pytest.raises(ValueError):
        is_public_address(garbage)


class _OkHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def local_port() -> Iterator[int]:
    """Port of an HTTP server on 127.0.0.1 that answers 200 to every GET."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OkHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _session(*, allow_private: bool) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # an HTTP(S)_PROXY in the test environment must not reroute 127.0.0.1
    adapter = GuardedAdapter(allow_private=allow_private, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_guarded_session_refuses_to_talk_to_a_loopback_server(local_port: int, host: str) -> None:
    # Given a guarded session and a server listening on loopback
    # When it requests the server by address or by a name that resolves to loopback
    with _session(allow_private=False) as session, pytest.raises(RefusedHost) as caught:
        session.get(f"http://{host}:{local_port}/", timeout=5)
    # Then the connection is refused, naming the host
    assert caught.value.tags["host"] == host
    assert host in str(caught.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_session_that_allows_private_addresses_reaches_the_loopback_server(local_port: int, host: str) -> None:
    # Given a session built for development, with private addresses allowed
    with _session(allow_private=True) as session:
        # When it requests the loopback server
        response = session.get(f"http://{host}:{local_port}/", timeout=5)
    # Then the server answers
    assert response.status_code == 200
    assert response.content == b"ok"

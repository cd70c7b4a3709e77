"""Refuse webhook connections to loopback, private, link-local and reserved addresses (SSRF guard).

The check runs on the socket after it connected, on the peer address the kernel reports, so a DNS answer
that changes between a check and the connect (DNS rebinding) cannot slip through: there is no earlier
check to fool. Redirects are never followed and proxies from the environment are ignored.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from whiskypay.errors import RefusedHost


def is_public_address(address: str) -> bool:
    """Return True if address is a globally routable unicast IPv4/IPv6 address (IPv4-mapped IPv6 unwrapped).

    Loopback, private, shared (CGNAT), link-local, IPv6 site-local (fec0::/10), unique-local, multicast, reserved,
    documentation and unspecified addresses are not public; neither are 6to4 and Teredo addresses.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip.sixtofour is not None or ip.teredo is not None:
            return False
        elif ip.is_site_local:  # fec0::/10: deprecated (RFC 3879), still routed inside some networks
            return False
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_unspecified
    )


def _checked(sock: socket.socket, host: str) -> socket.socket:
    peer = sock.getpeername()[0]
    if not is_public_address(peer):
        sock.close()
        raise RefusedHost(
            f"callback host {host} resolved to non-public address {peer}; refused "
            "(set WHISKYPAY_ALLOW_PRIVATE_CALLBACKS=true only for development)",
            host=host,
        )
    return sock


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _checked(super()._new_conn(), self.host)


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _checked(super()._new_conn(), self.host)


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class GuardedAdapter(HTTPAdapter):
    """A requests adapter whose connections refuse non-public peers.

    Parameters:
      allow_private(bool): Accept every address (development and tests only).
    """

    def __init__(self, *, allow_private: bool, **kwargs: Any) -> None:
        self.allow_private = allow_private
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        if not self.allow_private:
            self.poolmanager.pool_classes_by_scheme = {"http": _GuardedHTTPPool, "https": _GuardedHTTPSPool}

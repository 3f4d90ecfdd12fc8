"""Where the URL fetcher may connect: the address policy of :mod:`pipelines.ingest.fetch`.

A URL from a corpus is untrusted: it can name the metadata service (``169.254.169.254``), a
database on the ingest host (``127.0.0.1:5432``, also spelled ``2130706433``, ``0x7f.1``,
``[::ffff:127.0.0.1]``) or a redirect that leads there. The rule: every address a host name
resolves to must be public — not loopback, private, link-local, multicast, unspecified,
reserved or otherwise not globally routable (an IPv4-mapped IPv6 address is judged by its
IPv4 address) — unless ``source.fetch.allow_private`` says otherwise.

It is enforced where the socket is opened: :class:`GuardedBackend` is the network backend of
the fetcher's connection pool, so *every* connection — the first request and each redirect
hop — resolves the host once, checks every address, and connects to a checked address
itself. A host whose DNS answer changes between a check and the connect (DNS rebinding)
cannot slip through: there is no second lookup. A refusal raises :class:`BlockedAddress`
before any socket is created; it names no address, so nothing about the internal network
reaches the quarantine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The quarantine reason of a URL the policy refuses.
BLOCKED_REASON = "fetch_blocked_address"


class BlockedAddress(Exception):
    """A connection the address policy refuses; the message names no address."""

    def __init__(self) -> None:
        super().__init__("the host or a redirect leads to a loopback, private, link-local, multicast or reserved "
                         "address, which is not fetched (source.fetch.allow_private=true allows it)")


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` spells, in any form a resolver accepts, or None for a name.

    Besides the canonical forms (``127.0.0.1``, ``::1``, ``[::1]``, ``fe80::1%eth0``) this
    reads the ones ``inet_aton`` takes — decimal (``2130706433``), octal (``0177.0.0.1``),
    hex (``0x7f.0.0.1``) and short (``127.1``) — since the resolver would connect to those.
    """
    host = host.strip().rstrip(".").removeprefix("[").removesuffix("]")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if not host or any(c not in "0123456789abcdefABCDEFxX." for c in host):
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def is_blocked(ip: IPAddress) -> bool:
    """Whether the policy refuses ``ip`` (when private addresses are not allowed)."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return is_blocked(mapped)
    return (ip.is_loopback or ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_unspecified
            or ip.is_reserved or not ip.is_global)


def host_blocked(host: str, allow_private: bool) -> bool:
    """Whether ``host`` is an address literal the policy refuses (names are judged on connect)."""
    ip = ip_literal(host)
    return ip is not None and not allow_private and is_blocked(ip)


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` stands for: itself when it is a literal, else the resolver's
    answer (raises ``OSError`` when there is none)."""
    ip = ip_literal(host)
    if ip is not None:
        return [ip]
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                          proto=socket.IPPROTO_TCP)
    found: list[IPAddress] = []
    for *_, sockaddr in infos:
        ip = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
        if ip not in found:
            found.append(ip)
    if not found:
        raise OSError(f"{host} resolves to no address")
    return found


def guarded_backend(allow_private: bool):
    """A :class:`GuardedBackend` over httpcore2's default backend (imported late: the
    fetcher's HTTP stack is loaded only by the tasks that fetch)."""
    import httpcore2

    class GuardedBackend(httpcore2.AsyncNetworkBackend):
        """httpcore2's network backend with the address policy in ``connect_tcp``."""

        def __init__(self) -> None:
            self.inner = httpcore2.AnyIOBackend()

        async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                              local_address: str | None = None,
                              socket_options: Iterable | None = None):
            try:
                async with asyncio.timeout(timeout):
                    addresses = await resolve(host, port)
            except TimeoutError:
                raise httpcore2.ConnectTimeout(f"resolving {host} took over {timeout} s") from None
            except OSError as e:
                raise httpcore2.ConnectError(f"cannot resolve {host} ({e})") from None
            if not allow_private and any(is_blocked(ip) for ip in addresses):
                raise BlockedAddress()
            last: Exception | None = None
            for ip in addresses:  # connect to an address checked above, never to a new lookup
                try:
                    return await self.inner.connect_tcp(str(ip), port, timeout=timeout, local_address=local_address,
                                                        socket_options=socket_options)
                except (httpcore2.ConnectError, httpcore2.ConnectTimeout) as e:
                    last = e
            raise last if last is not None else httpcore2.ConnectError(f"{host} resolves to no address")

        async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                      socket_options: Iterable | None = None):
            raise BlockedAddress()  # the fetcher never uses one; refuse rather than reach a local socket

        async def sleep(self, seconds: float) -> None:
            await self.inner.sleep(seconds)

    return GuardedBackend()

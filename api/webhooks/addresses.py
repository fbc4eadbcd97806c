"""The SSRF guard: a webhook may only reach global addresses.

A URL is checked when it is registered and again before every try. Its host is resolved once
(``resolve``); every address it resolves to must pass (a name that answers with one public and one
private address is refused), and the try connects to the first of them, the one just checked
(``api/webhooks/sender.py``), so a second lookup cannot swap in another address.

Refused whatever the settings: link-local (169.254.0.0/16 holds cloud metadata services),
multicast, unspecified, reserved, documentation and benchmarking ranges, broadcast, and IPv6 forms
that embed an IPv4 address which is itself refused (IPv4-mapped ``::ffff:a.b.c.d``,
IPv4-compatible ``::a.b.c.d``, NAT64 ``64:ff9b::/96``, 6to4 ``2002::/16``, Teredo). Loopback and
private networks (RFC 1918, RFC 6598 shared, fc00::/7) pass only with ``allow_private``
(``AKL_WEBHOOKS_ALLOW_PRIVATE``, for tests and single-machine setups). Numeric host forms that
libc accepts (``2130706433``, ``0x7f.1``, ``017700000001``) resolve to the address they spell, and
that address is what is checked.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]

MAX_URL_CHARS = 2048
PRIVATE_NETWORKS = tuple(
    ipaddress.ip_network(n)
    for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "fc00::/7")
)
NAT64 = ipaddress.ip_network("64:ff9b::/96")


class AddressRefused(ValueError):
    """The URL, or an address its host resolves to, may not receive webhooks; the message says why."""


@dataclass(frozen=True)
class Target:
    """A checked URL: connect to ``address``; ``host`` goes in the Host header and the TLS SNI (and
    the certificate must name it)."""

    scheme: str
    host: str  # ASCII (IDNA); an IPv6 literal without brackets
    port: int
    path: str  # path and query; a fragment is never sent
    address: str


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6), in the system's order."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64 or int(address) >> 32 == 0:  # NAT64, or IPv4-compatible ::a.b.c.d
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def refusal(address: IPAddress, *, allow_private: bool = False) -> str | None:
    """Why ``address`` may not receive webhooks, or None when it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        return f"{address} has a zone (link-local)"
    if isinstance(address, ipaddress.IPv6Address) and not address.is_loopback and not address.is_unspecified:
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            why = refusal(embedded, allow_private=allow_private)
            return None if why is None else f"{address} embeds an IPv4 address: {why}"
    for flag, kind in (
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_unspecified", "unspecified"),
    ):
        if getattr(address, flag):
            if kind == "loopback" and allow_private:
                return None
            return f"{address} is {kind}"
    if any(address in network for network in PRIVATE_NETWORKS):
        return None if allow_private else f"{address} is private"
    if address.is_reserved or not address.is_global:
        return f"{address} is reserved or not globally routable"
    return None


def parse(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path with query) of an http(s) URL without credentials, the host in
    its ASCII (IDNA) form; AddressRefused saying what is wrong otherwise."""
    if len(url) > MAX_URL_CHARS:
        raise AddressRefused(f"the URL is longer than {MAX_URL_CHARS} characters")
    if any(c.isspace() or ord(c) < 0x20 or c == "\x7f" for c in url):
        raise AddressRefused("the URL may not hold spaces or control characters")
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise AddressRefused(f"not a valid URL: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        raise AddressRefused("the URL must start with https:// (or http://)")
    if not host or "%" in host:
        raise AddressRefused("the URL has no valid host")
    if parsed.userinfo:
        raise AddressRefused(
            "the URL may not carry credentials (user:password@); the signature identifies us"
        )
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise AddressRefused(f"port {port} is out of range")
    return parsed.scheme, host, port, parsed.raw_path.decode("ascii")


def check(url: str, *, allow_private: bool = False, resolver: Resolver = system_resolver) -> Target:
    """Parse and resolve ``url`` once; the Target to connect to, or AddressRefused saying why."""
    scheme, host, port, path = parse(url)
    try:
        addresses = resolver(host, port)
    except (OSError, UnicodeError) as exc:
        raise AddressRefused(f"the host {host!r} does not resolve ({exc})") from None
    if not addresses:
        raise AddressRefused(f"the host {host!r} does not resolve")
    for text in addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            raise AddressRefused(f"the host {host!r} resolved to {text!r}, not an address") from None
        why = refusal(address, allow_private=allow_private)
        if why is not None:
            raise AddressRefused(f"the host {host!r} is refused: {why} (webhooks go to public addresses)")
    return Target(scheme=scheme, host=host, port=port, path=path, address=addresses[0])

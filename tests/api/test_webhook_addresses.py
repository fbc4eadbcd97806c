"""The SSRF guard (api/webhooks/addresses.py) with AKL_WEBHOOKS_ALLOW_PRIVATE off: every class of
non-global address is refused, as a literal, in numeric IPv4 forms, in IPv6 forms that embed it,
and behind host names that resolve to it; global addresses pass; the address checked is the one
the try connects to."""

from __future__ import annotations

import ipaddress

import pytest

from api.webhooks.addresses import AddressRefused, check, parse, refusal, system_resolver

REFUSED_LITERALS = {
    "loopback": ["127.0.0.1", "127.8.9.10", "[::1]"],
    "private": ["10.0.0.1", "172.16.5.4", "172.31.255.255", "192.168.1.1", "100.64.0.1", "[fd00::1]"],
    "link-local": ["169.254.169.254", "169.254.0.1", "[fe80::1]"],
    "multicast": ["224.0.0.1", "239.255.255.250", "[ff02::1]", "[ff0e::1]"],
    "unspecified": ["0.0.0.0", "[::]"],
    "reserved": ["240.0.0.1", "255.255.255.255", "0.1.2.3", "192.0.2.1", "198.18.0.1", "[2001:db8::1]"],
    "ipv4-mapped": ["[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[::ffff:10.0.0.1]", "[::ffff:169.254.169.254]"],
    "ipv4-compatible": ["[::127.0.0.1]", "[::a00:1]"],
    "nat64": ["[64:ff9b::127.0.0.1]", "[64:ff9b::a9fe:a9fe]"],
    "6to4": ["[2002:7f00:1::]", "[2002:a00:1::1]"],
    "teredo": ["[2001:0:4136:e378:8000:63bf:80ff:fffe]"],  # client 127.0.0.1, obfuscated
}
# Numeric IPv4 spellings that libc's resolver turns into 127.0.0.1 / 10.0.0.1 / 169.254.169.254.
NUMERIC_FORMS = [
    "2130706433",  # decimal 127.0.0.1
    "0x7f000001",  # hex
    "0x7f.0.0.1",
    "0x7f.1",
    "017700000001",  # octal
    "0177.0.0.1",
    "127.1",
    "127.0.1",
    "167772161",  # 10.0.0.1
    "0xa9fea9fe",  # 169.254.169.254
]
GLOBAL = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "[2606:4700:4700::1111]", "[2a00:1450:4001::200e]"]


def _no_dns(host: str, port: int) -> list[str]:
    """Literal addresses only: no test reaches a real DNS server."""
    ipaddress.ip_address(host)
    return [host]


@pytest.mark.parametrize(
    "host", [(kind, host) for kind, hosts in REFUSED_LITERALS.items() for host in hosts], ids=str
)
def test_non_global_literals_are_refused(host: tuple[str, str]) -> None:
    _kind, literal = host
    for url in (f"http://{literal}/hook", f"https://{literal}:8443/x?y=1"):
        with pytest.raises(AddressRefused, match="is refused"):
            check(url, resolver=system_resolver)


@pytest.mark.parametrize("form", NUMERIC_FORMS)
def test_decimal_hex_and_octal_ipv4_forms_are_resolved_then_refused(form: str) -> None:
    resolved = system_resolver(form, 80)  # libc spells them out: the guard checks what it gets
    assert len(resolved) == 1 and not ipaddress.ip_address(resolved[0]).is_global
    # refused for the address it spells, or (a dotted form with a leading zero) as invalid
    with pytest.raises(AddressRefused, match="is refused|Invalid IPv4"):
        check(f"http://{form}/")


@pytest.mark.parametrize(
    "answer",
    [["127.0.0.1"], ["10.1.2.3"], ["169.254.169.254"], ["::1"], ["::ffff:192.168.0.1"], ["fe80::1%1"]],
)
def test_a_name_that_resolves_to_a_non_global_address_is_refused(answer: list[str]) -> None:
    with pytest.raises(AddressRefused, match="internal.example.com"):
        check("https://internal.example.com/hook", resolver=lambda host, port: answer)


def test_a_name_with_one_public_and_one_private_address_is_refused() -> None:
    with pytest.raises(AddressRefused, match="10.0.0.7 is private"):
        check("https://mixed.example.com/", resolver=lambda host, port: ["93.184.216.34", "10.0.0.7"])


def test_localhost_by_name_is_refused() -> None:
    with pytest.raises(AddressRefused, match="loopback"):
        check("http://localhost:8080/hook")


def test_an_unresolvable_name_is_refused() -> None:
    def fail(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(AddressRefused, match="does not resolve"):
        check("https://nowhere.invalid/", resolver=fail)


@pytest.mark.parametrize("host", GLOBAL)
def test_global_addresses_pass_and_are_the_address_connected_to(host: str) -> None:
    target = check(f"https://{host}/hook?a=1#frag", resolver=_no_dns)
    assert target.address == host.strip("[]") and target.path == "/hook?a=1" and target.port == 443


def test_the_resolved_address_is_pinned_and_the_name_kept() -> None:
    calls = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append((host, port))
        return ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"]

    target = check("https://Hooks.Example.com:8443/in", resolver=resolver)
    assert calls == [("hooks.example.com", 8443)]  # resolved once
    assert (target.host, target.address, target.port) == ("hooks.example.com", "93.184.216.34", 8443)


def test_allow_private_admits_loopback_and_private_only() -> None:
    for ok in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "[::1]", "[fd12::1]", "[::ffff:127.0.0.1]"):
        check(f"http://{ok}/", allow_private=True)
    for never in ("169.254.169.254", "[fe80::1]", "224.0.0.1", "0.0.0.0", "240.0.0.1", "[ff02::1]"):
        with pytest.raises(AddressRefused):
            check(f"http://{never}/", allow_private=True)


@pytest.mark.parametrize(
    "url, why",
    [
        ("ftp://example.com/", "https://"),
        ("file:///etc/passwd", "https://"),
        ("gopher://example.com/", "https://"),
        ("http:///path", "no valid host"),
        ("https://user:pw@example.com/", "credentials"),
        ("https://example.com:99999/", "out of range"),
        ("https://exa mple.com/", "spaces"),
        ("https://example.com/\r\nX-Injected: 1", "control"),
        ("https://a%2e%2e/", "no valid host"),
        ("https://" + "a" * 2100 + ".com/", "longer than"),
    ],
)
def test_malformed_urls_are_refused_before_any_lookup(url: str, why: str) -> None:
    def never(host: str, port: int) -> list[str]:
        raise AssertionError("resolved a URL that should have been refused first")

    with pytest.raises(AddressRefused, match=why):
        check(url, resolver=never)


def test_parse_keeps_the_idna_host_and_the_default_port() -> None:
    assert parse("https://bücher.example/p?q=1") == ("https", "xn--bcher-kva.example", 443, "/p?q=1")
    assert parse("http://[2606:4700::1]:8080/") == ("http", "2606:4700::1", 8080, "/")


def test_refusal_names_the_class() -> None:
    assert "link-local" in refusal(ipaddress.ip_address("169.254.169.254"))
    assert "embeds" in refusal(ipaddress.ip_address("::ffff:127.0.0.1"))
    assert refusal(ipaddress.ip_address("8.8.8.8")) is None

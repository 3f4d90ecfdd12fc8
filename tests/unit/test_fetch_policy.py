"""The fetcher's address policy (``pipelines.ingest.address_policy``) against real sockets on
loopback: no request reaches a refused address — the loopback server's own log says so —
in any spelling of the address, after a redirect, or through a name; private and link-local
addresses are refused before any socket connects; the connection goes to the address that
was checked (DNS rebinding); the refusal names no internal detail. No Ray."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import quote

import pytest
from http_faults import FaultServer, png_for
from hypothesis import given, settings
from hypothesis import strategies as st

from pipelines.ingest import address_policy
from pipelines.ingest.address_policy import BLOCKED_REASON, ip_literal, is_blocked
from pipelines.ingest.fetch import FetchSettings, fetch_all

STRICT = FetchSettings(retries=0, connect_timeout_s=1.0, read_timeout_s=1.0, total_timeout_s=2.0)
OPEN = FetchSettings(retries=0, connect_timeout_s=1.0, read_timeout_s=1.0, total_timeout_s=2.0, allow_private=True)


@pytest.fixture(scope="module")
def server():
    with FaultServer() as s:
        yield s


def _message(result) -> str:
    """The detail after ``GET <url>: `` — what the fetcher says about the URL."""
    return result.detail.split(": ", 1)[1]


def test_loopback_in_every_spelling_is_refused_and_the_server_sees_nothing(server):
    port = server.url.rsplit(":", 1)[1]
    hosts = ["127.0.0.1", "2130706433", "0x7f000001", "0x7f.0.0.1", "0177.0.0.1", "017700000001", "127.1",
             "127.0.0.1.", "localhost", "[::1]", "[::ffff:127.0.0.1]", "[::ffff:7f00:1]", "[0:0:0:0:0:ffff:127.0.0.1]",
             "0.0.0.0", "[::]", "0"]
    urls = [f"http://{h}:{port}/img/a.png" for h in hosts] + [f"https://{h}:{port}/img/a.png" for h in hosts[:3]]
    before = server.requests()
    results = fetch_all(urls, STRICT)
    assert server.requests() == before, server.hits  # the server's own log: not one request
    for r in results:
        assert r.reason == BLOCKED_REASON, (r.url, r.reason, r.detail)
        assert not r.ok and r.data is None and r.status is None
        assert "127.0.0.1" not in _message(r) and port not in _message(r)
        assert "source.fetch.allow_private" in _message(r)


def test_allow_private_lets_the_same_urls_through(server):
    port = server.url.rsplit(":", 1)[1]
    urls = [f"http://{h}:{port}/img/a.png" for h in ("127.0.0.1", "2130706433", "localhost", "[::ffff:127.0.0.1]")]
    results = fetch_all(urls, OPEN)
    assert all(r.ok and r.data == png_for("a.png") for r in results), [(r.url, r.detail) for r in results]


def test_a_redirect_into_a_loopback_port_is_refused(monkeypatch):
    """An allowed host (127.0.0.2, let through by a narrowed rule) redirects to another
    loopback server: the hop is refused, the second server never hears of it."""
    allowed = ipaddress.ip_address("127.0.0.2")
    monkeypatch.setattr(address_policy, "is_blocked", lambda ip: ip != allowed)
    with FaultServer(host="127.0.0.2") as front, FaultServer() as inner:
        inner_port = inner.url.rsplit(":", 1)[1]
        targets = [f"{inner.url}/img/secret.png", f"http://2130706433:{inner_port}/img/secret.png",
                   f"http://localhost:{inner_port}/img/secret.png", f"http://[::1]:{inner_port}/img/secret.png"]
        urls = [f"{front.url}/redirect-to?url={quote(t, safe='')}" for t in targets]
        results = fetch_all(urls + [f"{front.url}/img/ok.png"], STRICT)
        assert inner.requests() == 0, inner.hits
        assert front.hits["/redirect-to"] == len(targets)
    *redirected, control = results
    assert control.ok  # the front host itself is allowed: only the hop is refused
    for r in redirected:
        assert r.reason == BLOCKED_REASON, (r.url, r.reason, r.detail)
        assert inner_port not in _message(r) and "127.0.0.1" not in _message(r)


def test_a_redirect_to_another_scheme_is_refused(server):
    (r,) = fetch_all([f"{server.url}/redirect-to?url={quote('file:///etc/passwd', safe='')}"], OPEN)
    assert not r.ok and r.reason == "fetch_bad_url" and "passwd" not in _message(r)


@pytest.fixture
def no_connect(monkeypatch):
    """Fails the test if any socket tries to connect (or a resolver is asked)."""
    calls: list[object] = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"a connection was attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return calls


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/x.png", "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
    "http://192.168.1.1:8080/x.png", "http://172.16.0.1/x.png", "http://100.64.0.1/x.png", "http://224.0.0.1/x.png",
    "http://240.0.0.1/x.png", "http://255.255.255.255/x.png", "http://[fe80::1]/x.png", "http://[fe80::1%25eth0]/x",
    "http://[fc00::1]/x.png", "http://[ff02::1]/x.png", "http://[::ffff:169.254.169.254]/x", "http://[2002:a00:1::]/x",
    "http://167772161/x.png", "http://0xa.0.0.1/x.png", "http://012.0.0.1/x.png", "http://0251.0376.0251.0376/x",
    "https://169.254.169.254/x.png",
])
def test_private_and_link_local_are_refused_before_any_connect(url, no_connect):
    (r,) = fetch_all([url], STRICT)
    assert r.reason == BLOCKED_REASON and r.attempts == 0, (r.reason, r.detail)
    assert no_connect == []


def test_the_connect_hook_sees_an_allowed_fetch(server, monkeypatch):
    """The control of the test above: the same hook does see a connect when one happens."""
    seen: list[object] = []
    original = socket.socket.connect

    def record(self, address):
        seen.append(address)
        return original(self, address)

    monkeypatch.setattr(socket.socket, "connect", record)
    (r,) = fetch_all([f"{server.url}/img/hook.png"], OPEN)
    assert r.ok and seen and seen[0][0] == "127.0.0.1"


def _fake_resolver(monkeypatch, answers: dict[str, list[list[str]]]):
    """``getaddrinfo`` answering ``host`` with its next list of addresses (a rebinding DNS)."""
    asked: list[str] = []

    def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
        asked.append(host)
        ips = answers[host].pop(0) if len(answers[host]) > 1 else answers[host][0]
        return [(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "",
                 (ip, port)) for ip in ips]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return asked


def test_a_name_resolving_to_a_private_address_is_refused_before_connect(monkeypatch, no_connect):
    asked = _fake_resolver(monkeypatch, {"images.internal.example": [["93.184.216.34", "10.0.0.7"]],
                                         "metadata.example": [["169.254.169.254"]]})
    results = fetch_all(["http://images.internal.example/a.png", "http://metadata.example/latest/"], STRICT)
    assert [r.reason for r in results] == [BLOCKED_REASON, BLOCKED_REASON]
    assert sorted(asked) == ["images.internal.example", "metadata.example"] and no_connect == []
    assert all("10.0.0.7" not in r.detail and "169.254" not in r.detail for r in results)


def test_the_connection_goes_to_the_address_that_was_checked(monkeypatch):
    """DNS rebinding: the name answers a public address, then loopback. The fetcher asks
    once per connection and connects to the answer it checked — never asks again."""
    asked = _fake_resolver(monkeypatch, {"rebind.example": [["93.184.216.34"], ["127.0.0.1"]]})
    connected: list[object] = []

    def connect(self, address):
        connected.append(address)
        raise ConnectionRefusedError("no network in tests")

    monkeypatch.setattr(socket.socket, "connect", connect)
    (r,) = fetch_all(["http://rebind.example/a.png"], STRICT)
    assert r.reason == "fetch_connect_error"
    assert asked == ["rebind.example"] and [a[0] for a in connected] == ["93.184.216.34"]


# --- the rule itself, for any address ------------------------------------------------------

BLOCKED_NETS = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16", "0.0.0.0/8",
                "100.64.0.0/10", "224.0.0.0/4", "240.0.0.0/4", "198.18.0.0/15"]


def _spellings(ip: ipaddress.IPv4Address) -> list[str]:
    a, b, c, d = ip.packed
    n = int(ip)
    return [str(ip), str(n), hex(n), f"0{n:o}", f"{a:#x}.{b:#x}.{c:#x}.{d:#x}", f"0{a:o}.0{b:o}.0{c:o}.0{d:o}",
            f"{a}.{(b << 16) | (c << 8) | d}", f"[::ffff:{ip}]", f"[::ffff:{(n >> 16):x}:{(n & 0xFFFF):x}]",
            f"{ip}."]


@settings(max_examples=300, deadline=None)
@given(st.one_of(*(st.ip_addresses(network=net) for net in BLOCKED_NETS)))
def test_every_spelling_of_a_blocked_address_is_blocked(ip):
    for spelling in _spellings(ip):
        parsed = ip_literal(spelling)
        assert parsed is not None, spelling
        assert is_blocked(parsed), (spelling, parsed)
        assert address_policy.host_blocked(spelling, allow_private=False)
        assert not address_policy.host_blocked(spelling, allow_private=True)


@settings(max_examples=300, deadline=None)
@given(st.ip_addresses(v=4))
def test_every_spelling_reads_as_the_same_address_and_verdict(ip):
    for spelling in _spellings(ip):
        parsed = ip_literal(spelling)
        mapped = parsed.ipv4_mapped if isinstance(parsed, ipaddress.IPv6Address) else parsed
        assert mapped == ip, spelling
        assert is_blocked(parsed) == is_blocked(ip) == (not ip.is_global or ip.is_multicast), spelling


@settings(max_examples=200, deadline=None)
@given(st.ip_addresses(v=6))
def test_ipv6_is_judged_by_what_it_reaches(ip):
    verdict = is_blocked(ip)
    if ip.ipv4_mapped is not None:
        assert verdict == is_blocked(ip.ipv4_mapped)
    elif ip.sixtofour is not None:
        assert verdict == is_blocked(ip.sixtofour)
    elif ip.is_loopback or ip.is_link_local or ip.is_private or ip.is_multicast or ip.is_unspecified:
        assert verdict


@pytest.mark.parametrize("host", ["example.com", "cafe.be", "images.example", "a-b.c", "xn--bcher-kva.example"])
def test_names_are_not_literals(host):
    assert ip_literal(host) is None and not address_policy.host_blocked(host, allow_private=False)

"""``host:port`` as meshca writes it (listen addresses, its announcements, Envoy listener
names): IPv6 hosts in brackets, so the port stays readable and the text parses back."""

from __future__ import annotations

import pytest

from meshca.serve.config import parse_listen
from meshca.util.netaddr import AddressError, format_address, parse_server_address
from tests.serve_harness import announced_tcp_port


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [
        ("127.0.0.1", 8443, "127.0.0.1:8443"),
        ("0.0.0.0", 0, "0.0.0.0:0"),
        ("::1", 8443, "[::1]:8443"),
        ("::", 15010, "[::]:15010"),
        ("fd00::a:1", 443, "[fd00::a:1]:443"),
        ("meshca.meshca-system.svc", 15012, "meshca.meshca-system.svc:15012"),
        ("localhost", 9090, "localhost:9090"),
    ],
    ids=["ipv4", "ipv4-any", "ipv6-loopback", "ipv6-any", "ipv6", "hostname", "localhost"],
)
def test_format_address(host: str, port: int, text: str) -> None:
    assert format_address(host, port) == text


@pytest.mark.parametrize("text", ["127.0.0.1:8443", "[::1]:8443", "localhost:0"])
def test_a_listen_address_formats_back_to_its_text(text: str) -> None:
    assert format_address(*parse_listen(text)) == text


def test_the_announced_tcp_port_is_read_for_ipv4_and_ipv6() -> None:
    lines = "meshca serving trust domain cluster.local as spiffe://cluster.local/x\n"
    assert announced_tcp_port(lines + "listening on tcp 127.0.0.1:40123 (mutual TLS)\n") == 40123
    assert announced_tcp_port(lines + "listening on tcp [::1]:40124 (mutual TLS)\n") == 40124
    assert announced_tcp_port(lines + "listening on unix:///tmp/x.sock\n") is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("unix:run/meshca.sock", "needs an absolute path"),
        ("::1:15012", r"IPv6 address in brackets, like \[::1\]:15012"),
        ("localhost:99999", r"99999 is not a port number \(1-65535\)"),
        ("localhost", "is not HOST:PORT"),
        ("a b:80", "is not a host name or address"),
    ],
)
def test_an_address_that_does_not_parse_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(AddressError, match=reason):
        parse_server_address(text)

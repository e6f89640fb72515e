"""Network addresses as text: parsing ``HOST:PORT``, ``[IPv6]:PORT`` and ``unix:///path``
and formatting them back, shared by the option table, the server wiring and the Envoy
configuration."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path


class AddressError(ValueError):
    """Text that is not the address asked for; the message says which input and why."""


def format_address(host: str, port: int) -> str:
    """``host:port``, with the host in brackets when it is an IPv6 address (``[::1]:443``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class UnixServer:
    path: Path

    def __str__(self) -> str:
        return f"unix://{self.path}"


@dataclass(frozen=True)
class TcpServer:
    host: str
    port: int

    @property
    def is_ip(self) -> bool:
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True

    def __str__(self) -> str:
        return format_address(self.host, self.port)


ServerAddress = UnixServer | TcpServer


def parse_port(text: str, what: str = "") -> int:
    prefix = f"{what}: " if what else ""
    try:
        port = int(text)
    except ValueError:
        raise AddressError(f"{prefix}{text!r} is not a port number") from None
    if not 1 <= port <= 65535:
        raise AddressError(f"{prefix}{port} is not a port number (1-65535)")
    return port


def parse_host_port(text: str, what: str = "") -> TcpServer:
    """``HOST:PORT`` or ``[IPv6]:PORT``."""
    prefix = f"{what}: " if what else ""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise AddressError(f"{prefix}{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise AddressError(f"{prefix}write an IPv6 address in brackets, like [::1]:{port}")
    if not host or any(c in host for c in "/ @?#"):
        raise AddressError(f"{prefix}{host!r} is not a host name or address")
    return TcpServer(host, parse_port(port, what))


def parse_server_address(text: str) -> ServerAddress:
    """``unix:///abs/path`` (or ``unix:/abs/path``) for the Unix socket, else ``HOST:PORT``."""
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if path.startswith("//"):
            path = path[2:]
        if not path.startswith("/"):
            raise AddressError(
                f"{text!r}: a Unix socket needs an absolute path (unix:///run/meshca.sock)"
            )
        return UnixServer(Path(path))
    return parse_host_port(text)

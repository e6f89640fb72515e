"""Network addresses as text, shared by the server wiring and the Envoy configuration."""

from __future__ import annotations


def format_address(host: str, port: int) -> str:
    """``host:port``, with the host in brackets when it is an IPv6 address (``[::1]:443``)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""``meshca agent``: keys beside the workload, certified by CSR at meshca serve, served on
a Unix socket over SDS and the SPIFFE Workload API (docs/agent.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from meshca.cli.commands.common import Command, UsageError
from meshca.cli.options import ConfigError, Settings
from meshca.issuer.errors import IssuerError
from meshca.util.netaddr import TcpServer, format_address

if TYPE_CHECKING:
    from meshca.agent.runtime import AgentConfig, MeshcaAgent

NAME = "agent"


def _tcp(settings: Settings, name: str, flag: str) -> str | None:
    address = settings[name]
    if address is None:
        return None
    if not isinstance(address, TcpServer):
        raise ConfigError(
            f"{flag} {address}: the agent reaches meshca over TCP with TLS (HOST:PORT); a "
            "Unix socket carries no certificate to authenticate the agent with"
        )
    return format_address(address.host, address.port)


def _required(settings: Settings, name: str, flag: str) -> Path:
    value = settings[name]
    if value is None:
        raise UsageError(f"give {flag} (see 'meshca {NAME} --help')")
    return Path(value)


def config_from(settings: Settings) -> AgentConfig:
    from meshca.agent.runtime import AgentConfig

    server = _tcp(settings, "server", "--server")
    if server is None:
        raise UsageError(f"give --server HOST:PORT (see 'meshca {NAME} --help')")
    socket = _required(settings, "socket", "--socket")
    bundle_file = _required(settings, "trust_bundle", "--trust-bundle")
    from meshca.issuer.bundle import TrustBundle

    try:
        bundle = TrustBundle.from_pem(settings["trust_domain"], bundle_file.read_bytes())
    except OSError as exc:
        raise ConfigError(f"--trust-bundle {bundle_file}: {exc.strerror}") from None
    except IssuerError as exc:
        raise ConfigError(f"--trust-bundle {bundle_file}: {exc}") from None
    return AgentConfig(
        server=server,
        attest_server=_tcp(settings, "attest_server", "--attest-server"),
        bundle=bundle,
        data_dir=settings["data_dir"],
        socket=socket,
        token_file=settings["token_file"],
        attestor=settings["attestor"],
        socket_mode=settings["socket_mode"],
        leaf_ttl=settings["leaf_ttl"] if settings.is_explicit("leaf_ttl") else None,
        poll_interval=settings["poll_interval"].total_seconds(),
        metrics_listen=settings["metrics_listen"],
    )


def _announce(agent: MeshcaAgent) -> None:
    lines = [
        f"meshca agent {agent.credential.svid.spiffe_id if agent.credential.svid else '-'} "
        f"serving {agent.serving}"
    ]
    listen, server = agent.config.metrics_listen, agent.metrics_server
    if listen is not None and server is not None and server.port is not None:
        lines.append(f"metrics on http://{format_address(listen[0], server.port)}/metrics")
    lines.append(f"listening on unix://{agent.config.socket.absolute()}")
    print("\n".join(lines), flush=True)


def run(args: argparse.Namespace, settings: Settings) -> int:
    config = config_from(settings)
    from meshca.util.logs import configure_logging

    configure_logging(settings["log_level"], settings["log_format"])
    import asyncio

    from meshca.agent.metrics import BACKEND
    from meshca.agent.runtime import MeshcaAgent
    from meshca.serve.metrics import Metrics, MetricsServer

    metrics = Metrics(BACKEND)
    agent = MeshcaAgent(config, metrics=metrics, metrics_server=MetricsServer(metrics))
    asyncio.run(agent.run(on_ready=_announce))
    return 0


COMMAND = Command(
    NAME,
    run,
    description=(
        "Attest to 'meshca serve' with a one-time join token (--token-file), then keep "
        "an agent SVID renewed over mutual TLS. Workload keys are generated here, in "
        "memory; only CSRs go to meshca. On --socket: SDS for Envoy (SotW, Delta, "
        "Fetch; 'meshca bootstrap --agent unix:///path') and the SPIFFE Workload API "
        "(py-spiffe, go-spiffe). Cached SVIDs keep being served while meshca is down. "
        "Stops on SIGTERM or SIGINT."
    ),
)

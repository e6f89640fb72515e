"""``meshca serve``: the CA as an SDS server for Envoy (mutual TLS on TCP, a Unix socket)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from meshca.cli.commands.common import Command, UsageError
from meshca.cli.commands.vault_backend import open_backend
from meshca.cli.options import ConfigError, Settings
from meshca.util.netaddr import format_address

if TYPE_CHECKING:  # the serve runtime loads when this command runs, not with every command
    from meshca.serve.config import ServeConfig
    from meshca.serve.server import MeshcaServer

NAME = "serve"


def config_from(settings: Settings) -> ServeConfig:
    uds = settings["uds"]
    if uds is None:
        for name in ("uds_identity", "uds_mode"):
            if settings.source(name) not in ("unset", "default"):
                print(
                    f"meshca: warning: {name} ({settings.source(name)}) has no effect without "
                    "uds (--uds PATH): no Unix socket is served",
                    file=sys.stderr,
                )
    prepare, activate = settings["rotation_prepare_at"], settings["rotation_activate_at"]
    if prepare >= activate:
        raise ConfigError(
            f"the signing CA's successor must be prepared before it is activated: "
            f"rotation_prepare_at {prepare:g} ({settings.source('rotation_prepare_at')}) is "
            f"not earlier than rotation_activate_at {activate:g} "
            f"({settings.source('rotation_activate_at')})"
        )
    from meshca.serve.config import NothingToListenOn

    try:
        return _serve_config(settings)
    except NothingToListenOn as exc:
        raise UsageError(f"{exc} (see 'meshca {NAME} --help')") from None


def _serve_config(settings: Settings) -> ServeConfig:
    from meshca.serve.config import ServeConfig

    return ServeConfig(
        data_dir=settings["data_dir"],
        listen=settings["listen"],
        uds=settings["uds"],
        uds_mode=settings["uds_mode"],
        uds_identities=settings["uds_identity"] or {},
        mesh_file=settings["mesh"],
        kubernetes=settings["kubernetes"],
        kubeconfig=settings["kubeconfig"],
        leaf_ttl=settings["leaf_ttl"],
        max_leaf_ttl=settings["max_leaf_ttl"],
        server_id=settings["server_id"],
        server_namespace=settings["server_namespace"],
        server_dns=settings["server_dns"],
        metrics_listen=settings["metrics_listen"],
        health_listen=settings["health_listen"],
        rotation_prepare_at=settings["rotation_prepare_at"],
        rotation_activate_at=settings["rotation_activate_at"],
        rotation_ca_ttl=settings["rotation_ca_ttl"],
        rotation_jwt_key_ttl=settings["rotation_jwt_key_ttl"],
        rotation_ack_timeout=settings["rotation_ack_timeout"],
        rotation_resume_grace=settings["rotation_resume_grace"],
        attest_listen=settings["attest_listen"],
        agent_ttl=settings["agent_ttl"],
        agent_max_age=settings["agent_max_age"],
        kube_tokens=settings["kube_tokens"],
        kube_token_audience=settings["kube_token_audience"],
        kube_node_agents=settings["kube_node_agent"] or (),
        kube_node_proxy=settings["kube_node_proxy"],
        max_connections=settings["max_connections"],
        max_connection_age=settings["max_connection_age"],
        handshake_timeout=settings["handshake_timeout"].total_seconds(),
        uds_max_connections_per_uid=settings["uds_max_connections_per_uid"],
        max_streams_per_caller=settings["max_streams_per_caller"],
        max_names_per_caller=settings["max_names_per_caller"],
    )


def _announce(server: MeshcaServer) -> None:
    """Where meshca listens, on stdout (scripts wait for the 'listening' lines); a uid's
    identities as a few and a count, however many it holds."""
    from meshca.xds.auth import IdentitySet  # loaded by the server already

    config = server.config
    lines = [f"meshca serving trust domain {server.trust_domain} as {server.server_id}"]
    if config.listen is not None and server.tcp_port is not None:
        address = format_address(config.listen[0], server.tcp_port)
        lines.append(f"listening on tcp {address} (mutual TLS)")
    if config.uds is not None:
        lines.append(f"listening on unix://{config.uds.absolute()}")
        for uid, ids in sorted(config.uds_identities.items()):
            lines.append(f"  uid {uid} -> {IdentitySet(ids).describe()}")
    if server.attest_port is not None and config.attest_listen is not None:
        address = format_address(config.attest_listen[0], server.attest_port)
        kinds = "join tokens, Kubernetes tokens" if server.kube_tokens else "join tokens"
        lines.append(f"attestation on tcp {address} (TLS, {kinds})")
    if server.health_port is not None and config.health_listen is not None:
        address = format_address(config.health_listen[0], server.health_port)
        lines.append(f"health on {address} (gRPC health service, plaintext)")
    if server.metrics_server.port is not None and config.metrics_listen is not None:
        address = format_address(config.metrics_listen[0], server.metrics_server.port)
        lines.append(f"metrics on http://{address}/metrics")
    if server.mesh_file is not None:
        count = len(server.mesh.services)
        lines.append(f"mesh file {server.mesh_file.path}: {count} service(s), reloaded on change")
    if server.kube is not None:
        target = server.kube.target
        lines.append(f"Kubernetes API server {target.server} ({target.source})")
        lines.append(
            f"mesh from the Kubernetes API: {len(server.mesh.services)} service(s), watched"
        )
    print("\n".join(lines), flush=True)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from meshca.util.logs import configure_logging

    config = config_from(settings)
    configure_logging(settings["log_level"], settings["log_format"])
    backend = open_backend(settings, serving=True)  # the local CA, or Vault
    # gRPC and the event loop load only for the command that serves.
    import asyncio

    from meshca.serve.gc_tuning import settle_after_start_up
    from meshca.serve.server import MeshcaServer

    def ready(server: MeshcaServer) -> None:
        _announce(server)
        settle_after_start_up()

    try:
        server = MeshcaServer(config, backend=backend)
        asyncio.run(server.run(on_ready=ready))
    finally:
        backend.close()
    return 0


COMMAND = Command(
    NAME,
    run,
    description=(
        "Serve X.509-SVIDs and the trust bundle to Envoy over the Secret Discovery "
        "Service: on TCP with mutual TLS (--listen) and/or on a Unix socket (--uds) "
        "whose callers are identified by uid (--uds-identity). Certificates are issued "
        "on first request, renewed at half their lifetime and pushed at once. The same "
        "server speaks ADS: clusters, endpoints, listeners, routes and secrets generated "
        "from --mesh (or, with --kubernetes, from the Kubernetes API) for each proxy's "
        "identity ('meshca bootstrap --ads'). Stops "
        "gracefully on SIGTERM or SIGINT."
    ),
)

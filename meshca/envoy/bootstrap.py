"""Envoy bootstrap generation: a static cluster that reaches meshca's SDS, per identity.

The bootstrap holds no certificate of the workload itself; Envoy fetches it (and the
trust bundle) over SDS. Over the Unix socket meshca knows the caller by its uid; over
TCP Envoy authenticates with a bootstrap certificate from ``meshca issue`` and accepts
only meshca's own SPIFFE ID from the server. A minimal inbound/outbound listener pair
can be added for demos; real meshes get their listeners from meshca's generated
resources.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509

from meshca.issuer.errors import SvidError
from meshca.issuer.svid import spiffe_id_of
from meshca.spiffe import SpiffeId, SpiffeIdError, TrustDomain
from meshca.util.netaddr import (
    ServerAddress,
    TcpServer,
    UnixServer,
    parse_host_port,
    parse_port,
)
from meshca.xds.resources import TYPE_PREFIX

SDS_CLUSTER = "meshca_sds"
DEFAULT_ADMIN_PORT = 15000
DEFAULT_SERVER_NAMESPACE = "meshca"
SERVER_SERVICE_ACCOUNT = "meshca"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"
BUNDLE_FILE = "bundle.pem"
ISTIO_CERT_SECRET = "default"
ISTIO_BUNDLE_SECRET = "ROOTCA"

_TLS_SOCKET = "envoy.transport_sockets.tls"
_TYPE = TYPE_PREFIX + "envoy.extensions."
Json = dict[str, Any]


class BootstrapError(ValueError):
    """A bootstrap that cannot be generated as asked; the message says which input."""


def default_server_id(
    trust_domain: TrustDomain, namespace: str = DEFAULT_SERVER_NAMESPACE
) -> SpiffeId:
    """meshca's own identity: ``spiffe://<td>/ns/<namespace>/sa/meshca``."""
    return SpiffeId.from_kubernetes(namespace, SERVER_SERVICE_ACCOUNT, trust_domain)


MAX_CERT_FILE_BYTES = 1 << 20  # a certificate chain is a few KiB


@dataclass(frozen=True)
class ClientTls:
    """The bootstrap certificate Envoy presents to meshca over TCP (``meshca issue`` output)."""

    cert: Path
    key: Path
    bundle: Path

    @classmethod
    def from_dir(cls, cert_dir: Path, identity: SpiffeId | None = None) -> ClientTls:
        """The files in ``cert_dir``; with ``identity``, its certificate must be that
        identity's (meshca refuses an Envoy whose certificate names another one, which
        would otherwise show only when Envoy connects)."""
        directory = Path(cert_dir).absolute()
        files = [directory / name for name in (CERT_FILE, KEY_FILE, BUNDLE_FILE)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise BootstrapError(
                f"--cert-dir {directory}: missing {', '.join(missing)} "
                "(write them with 'meshca issue IDENTITY --out DIR')"
            )
        if identity is not None:
            found = _certified_identity(files[0])
            if found != identity:
                raise BootstrapError(
                    f"--cert-dir {directory}: {CERT_FILE} is for {found}, not {identity} "
                    f"(write one with 'meshca issue {identity} --out DIR')"
                )
        return cls(*files)


def _certified_identity(path: Path) -> SpiffeId:
    """The SPIFFE ID of the first certificate in ``path`` (a PEM file of bounded size)."""
    with path.open("rb") as file:
        data = file.read(MAX_CERT_FILE_BYTES + 1)
    try:
        if len(data) > MAX_CERT_FILE_BYTES:
            raise ValueError(f"larger than {MAX_CERT_FILE_BYTES} bytes")
        return spiffe_id_of(x509.load_pem_x509_certificate(data))
    except SvidError as exc:
        raise BootstrapError(f"{path}: {exc}") from None
    except ValueError as exc:
        raise BootstrapError(f"{path}: not a PEM certificate ({exc})") from None


@dataclass(frozen=True)
class Inbound:
    """An mTLS listener that admits the ``allowed`` IDs (any member of the trust domain
    when empty) and forwards to a local app, telling it who called (XFCC)."""

    port: int
    app_port: int
    allowed: tuple[SpiffeId, ...] = ()
    address: str = "127.0.0.1"


@dataclass(frozen=True)
class Outbound:
    """A plain HTTP listener on loopback that forwards over mTLS to ``upstream``, which
    must present ``upstream_id``."""

    port: int
    upstream: TcpServer
    upstream_id: SpiffeId
    address: str = "127.0.0.1"


@dataclass(frozen=True)
class BootstrapSpec:
    identity: SpiffeId
    server: ServerAddress
    client_tls: ClientTls | None = None
    server_id: SpiffeId | None = None
    admin_port: int = DEFAULT_ADMIN_PORT
    admin_address: str = "127.0.0.1"
    inbound: Inbound | None = None
    outbound: Outbound | None = None


# --- building blocks (also used by tests that write their own listeners) -------------


def api_config_source(*, delta: bool = False) -> Json:
    """meshca's gRPC server (one serves SDS and ADS) as an xDS source: state of the world,
    or incremental with ``delta``."""
    return {
        "api_type": "DELTA_GRPC" if delta else "GRPC",
        "transport_api_version": "V3",
        "set_node_on_first_message_only": True,
        "grpc_services": [{"envoy_grpc": {"cluster_name": SDS_CLUSTER}}],
    }


def sds_config() -> Json:
    return {"resource_api_version": "V3", "api_config_source": api_config_source()}


def sds_secret(name: str) -> Json:
    return {"name": name, "sds_config": sds_config()}


def uri_san_matchers(ids: tuple[SpiffeId, ...]) -> list[Json]:
    return [{"san_type": "URI", "matcher": {"exact": str(i)}} for i in ids]


def validation_from_sds(bundle_secret: str, allowed: tuple[SpiffeId, ...]) -> Json:
    """Roots from SDS, plus exact URI SAN matchers when ``allowed`` is not empty."""
    default: Json = {}
    if allowed:
        default["match_typed_subject_alt_names"] = uri_san_matchers(allowed)
    return {
        "combined_validation_context": {
            "default_validation_context": default,
            "validation_context_sds_secret_config": sds_secret(bundle_secret),
        }
    }


def tls_socket(kind: str, context: Json) -> Json:
    return {
        "name": _TLS_SOCKET,
        "typed_config": {"@type": f"{_TYPE}transport_sockets.tls.v3.{kind}", **context},
    }


def static_cluster(name: str, address: Json, **extra: Any) -> Json:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
        **extra,
    }


def socket_address(host: str, port: int) -> Json:
    return {"socket_address": {"address": host, "port_value": port}}


def http2_options() -> Json:
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": f"{_TYPE}upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    }


def http_connection_manager(stat_prefix: str, cluster: str, **extra: Any) -> Json:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": f"{_TYPE}filters.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat_prefix,
            "route_config": {
                "name": stat_prefix,
                "virtual_hosts": [
                    {
                        "name": stat_prefix,
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster}}],
                    }
                ],
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": f"{_TYPE}filters.http.router.v3.Router"},
                }
            ],
            **extra,
        },
    }


def inbound_resources(
    inbound: Inbound,
    *,
    cert_secret: str = ISTIO_CERT_SECRET,
    bundle_secret: str = ISTIO_BUNDLE_SECRET,
) -> tuple[Json, Json]:
    """(listener, cluster): mTLS in, client certificate required, XFCC set with the URI."""
    context: Json = {
        "require_client_certificate": True,
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [sds_secret(cert_secret)],
            **validation_from_sds(bundle_secret, inbound.allowed),
        },
    }
    listener = {
        "name": "inbound",
        "address": socket_address(inbound.address, inbound.port),
        "filter_chains": [
            {
                "transport_socket": tls_socket("DownstreamTlsContext", context),
                "filters": [
                    http_connection_manager(
                        "inbound",
                        "inbound_app",
                        forward_client_cert_details="SANITIZE_SET",
                        set_current_client_cert_details={"uri": True},
                    )
                ],
            }
        ],
    }
    cluster = static_cluster("inbound_app", socket_address("127.0.0.1", inbound.app_port))
    return listener, cluster


def outbound_resources(
    outbound: Outbound,
    *,
    cert_secret: str = ISTIO_CERT_SECRET,
    validation: Json | None = None,
) -> tuple[Json, Json]:
    """(listener, cluster): plain HTTP on loopback in, mTLS out to one pinned identity.

    ``validation`` replaces the default (bundle from ``ROOTCA`` + the upstream's ID),
    e.g. with an OSM ``root-cert-for-mtls-outbound:<ns>/<svc>`` secret.
    """
    if validation is None:
        validation = validation_from_sds(ISTIO_BUNDLE_SECRET, (outbound.upstream_id,))
    context: Json = {
        "common_tls_context": {
            "tls_certificate_sds_secret_configs": [sds_secret(cert_secret)],
            **validation,
        }
    }
    listener = {
        "name": "outbound",
        "address": socket_address(outbound.address, outbound.port),
        "filter_chains": [{"filters": [http_connection_manager("outbound", "outbound_upstream")]}],
    }
    upstream = outbound.upstream
    cluster = static_cluster(
        "outbound_upstream",
        socket_address(upstream.host, upstream.port),
        transport_socket=tls_socket("UpstreamTlsContext", context),
    )
    if not upstream.is_ip:
        cluster["type"] = "STRICT_DNS"
    return listener, cluster


# --- the bootstrap ---------------------------------------------------------------------


def _sds_cluster(spec: BootstrapSpec) -> Json:
    server = spec.server
    if isinstance(server, UnixServer):
        return static_cluster(
            SDS_CLUSTER,
            {"pipe": {"path": str(server.path)}},
            typed_extension_protocol_options=http2_options(),
        )
    if spec.client_tls is None:
        raise BootstrapError(
            f"--server {server} is TCP: meshca requires a client certificate there; "
            "pass --cert-dir with the files from 'meshca issue' (or use a unix:// address)"
        )
    server_id = spec.server_id or default_server_id(spec.identity.trust_domain)
    tls = spec.client_tls
    context: Json = {
        "common_tls_context": {
            "alpn_protocols": ["h2"],
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": str(tls.cert)},
                    "private_key": {"filename": str(tls.key)},
                }
            ],
            "validation_context": {
                "trusted_ca": {"filename": str(tls.bundle)},
                "match_typed_subject_alt_names": uri_san_matchers((server_id,)),
            },
        }
    }
    if not server.is_ip:
        context["sni"] = server.host
    cluster = static_cluster(
        SDS_CLUSTER,
        socket_address(server.host, server.port),
        typed_extension_protocol_options=http2_options(),
        transport_socket=tls_socket("UpstreamTlsContext", context),
    )
    if not server.is_ip:
        cluster["type"] = "STRICT_DNS"
    return cluster


def node_cluster(identity: SpiffeId) -> str:
    """``<sa>.<ns>`` for Kubernetes identities (the service-cluster naming Envoy logs
    show), else the ID's path."""
    kube = identity.kubernetes
    if kube is not None:
        namespace, account = kube
        return f"{account}.{namespace}"
    return identity.path.lstrip("/").replace("/", ".")


def build_bootstrap(spec: BootstrapSpec) -> Json:
    if spec.server_id is not None and spec.server_id.trust_domain != spec.identity.trust_domain:
        raise BootstrapError(
            f"meshca's ID {spec.server_id} is outside the workload's trust domain "
            f"{spec.identity.trust_domain}"
        )
    listeners: list[Json] = []
    clusters: list[Json] = [_sds_cluster(spec)]
    if spec.inbound is not None:
        listener, cluster = inbound_resources(spec.inbound)
        listeners.append(listener)
        clusters.append(cluster)
    if spec.outbound is not None:
        listener, cluster = outbound_resources(spec.outbound)
        listeners.append(listener)
        clusters.append(cluster)
    static: Json = {"clusters": clusters}
    if listeners:
        static = {"listeners": listeners, **static}
    return {
        "node": {"id": str(spec.identity), "cluster": node_cluster(spec.identity)},
        "admin": {"address": socket_address(spec.admin_address, spec.admin_port)},
        "static_resources": static,
    }


def render_bootstrap(spec: BootstrapSpec) -> str:
    header = (
        f"# Envoy bootstrap for {spec.identity}, generated by 'meshca bootstrap'.\n"
        f"# Certificates and the trust bundle come from meshca over SDS ({spec.server}).\n"
    )
    return header + yaml.safe_dump(build_bootstrap(spec), sort_keys=False)


def parse_inbound(text: str, allowed: tuple[str, ...] = ()) -> Inbound:
    """``PORT:APP_PORT`` (the ``--inbound`` flag) with the ``--allow`` IDs."""
    port, sep, app_port = text.partition(":")
    if not sep:
        raise BootstrapError(f"--inbound {text!r}: expected PORT:APP_PORT")
    ids = tuple(_parse_id(a, "--allow") for a in allowed)
    return Inbound(parse_port(port, "--inbound"), parse_port(app_port, "--inbound"), ids)


def parse_outbound(text: str, upstream_id: str | None) -> Outbound:
    """``PORT:HOST:PORT`` (the ``--outbound`` flag) with the ``--upstream-id`` ID."""
    port, sep, upstream = text.partition(":")
    if not sep:
        raise BootstrapError(f"--outbound {text!r}: expected PORT:UPSTREAM_HOST:UPSTREAM_PORT")
    if upstream_id is None:
        raise BootstrapError("--outbound needs --upstream-id: the identity the upstream must have")
    return Outbound(
        parse_port(port, "--outbound"),
        parse_host_port(upstream, "--outbound"),
        _parse_id(upstream_id, "--upstream-id"),
    )


def _parse_id(text: str, what: str) -> SpiffeId:
    try:
        return SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise BootstrapError(f"{what}: {exc}") from None

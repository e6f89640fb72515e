"""What ``meshca serve`` is configured with, and the parsers for its option values.

Kept free of gRPC and scheduler imports so every command line parses options cheaply;
:mod:`meshca.serve.server` does the serving (and the Unix-socket front door checks the mode).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from meshca.envoy.bootstrap import DEFAULT_SERVER_NAMESPACE, default_server_id
from meshca.issuer import IssuerError
from meshca.issuer.policy import DEFAULT_LEAF_TTL, DEFAULT_MAX_LEAF_TTL
from meshca.spiffe import SpiffeId, SpiffeIdError, TrustDomain
from meshca.util.durations import parse_duration
from meshca.util.netaddr import parse_host_port
from meshca.util.retry import Backoff

DEFAULT_GRACE = 5.0
DEFAULT_IDLE_TTL = timedelta(minutes=10)
DEFAULT_POLL_INTERVAL = 1.0
DEFAULT_HEALTH_INTERVAL = 5.0
DEFAULT_BACKEND_POLL_INTERVAL = 60.0
# Connections (docs/serve.md, "Limits"): a connection is re-established at least this
# often, so the certificate that opened it is checked again; open streams get the grace
# to move to the new connection.
DEFAULT_MAX_CONNECTION_AGE = timedelta(hours=1)
DEFAULT_CONNECTION_AGE_GRACE = timedelta(minutes=1)
DEFAULT_HANDSHAKE_TIMEOUT = 5.0  # seconds a TCP connection may take to complete TLS
DEFAULT_MAX_CONNECTIONS = 1024  # TCP connections at once (also bounded by the fd limit)
DEFAULT_UDS_MAX_CONNECTIONS_PER_UID = 64
DEFAULT_MAX_STREAMS_PER_CALLER = 1000
DEFAULT_MAX_NAMES_PER_CALLER = 10_000
_DNS_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([a-z0-9.-]*[a-z0-9])?$")
# The kernel reports these uids for callers it cannot map (a user namespace's overflow
# uid, 65534 by default, and the 16- and 32-bit "no uid" values): mapping one would give
# every such caller that identity.
UNMAPPABLE_UIDS = frozenset({65534, 65535, 2**32 - 1})
MAX_UID = 2**32 - 2


class ServeError(IssuerError):
    """meshca serve cannot start as configured; the message says what to change."""


class NothingToListenOn(ServeError):
    """Neither a TCP address nor a Unix socket was given."""


@dataclass(frozen=True)
class ServeConfig:
    """What ``meshca serve`` runs with. Checks itself: something to listen on at
    construction, and the identities it names against the CA's trust domain
    (:meth:`server_identity`) once the backend is known."""

    data_dir: Path
    listen: tuple[str, int] | None = None
    uds: Path | None = None
    uds_mode: int | None = None  # None: the front door's default, 0660
    uds_identities: Mapping[int, tuple[SpiffeId, ...]] = field(default_factory=dict)
    uds_private_dir: Path | None = None
    mesh_file: Path | None = None
    mesh_poll_interval: float = DEFAULT_POLL_INTERVAL
    kubernetes: bool = False  # the mesh from the Kubernetes API (meshca.kube)
    kubeconfig: Path | None = None  # None: in-cluster configuration
    kube_debounce: float = 0.1  # seconds of quiet before a rebuild from the API's events
    leaf_ttl: timedelta = DEFAULT_LEAF_TTL
    max_leaf_ttl: timedelta = DEFAULT_MAX_LEAF_TTL
    server_id: SpiffeId | None = None
    server_namespace: str = DEFAULT_SERVER_NAMESPACE
    server_dns: tuple[str, ...] | None = None
    idle_ttl: timedelta = DEFAULT_IDLE_TTL
    renew_backoff: Backoff | None = None  # failed renewals' retries (None: 1 s doubling to 60 s)
    grace: float = DEFAULT_GRACE
    metrics_listen: tuple[str, int] | None = None  # plain HTTP /metrics
    health_listen: tuple[str, int] | None = None  # plaintext gRPC health service only
    health_interval: float = DEFAULT_HEALTH_INTERVAL  # seconds between health evaluations
    # seconds between reads of a backend's roots (Vault); 5 s while it is unreachable
    backend_poll_interval: float = DEFAULT_BACKEND_POLL_INTERVAL
    # signing-CA rotation (docs/rotation.md); None: the rotation service's default
    rotation_prepare_at: float | None = None  # fraction of the signing CA's life (1/2)
    rotation_activate_at: float | None = None  # (5/6)
    rotation_ca_ttl: timedelta | None = None  # new signing CAs (as long as the one replaced)
    rotation_jwt_key_ttl: timedelta | None = None  # how long a JWT key signs (24h)
    rotation_ack_timeout: timedelta | None = None  # waits for proxies' ACKs (5 min)
    rotation_resume_grace: timedelta | None = None  # before resuming after a restart (15 s)
    # the CSR API for meshca agent (docs/agent.md)
    attest_listen: tuple[str, int] | None = None  # TLS without client certificates
    agent_ttl: timedelta = timedelta(hours=1)  # agent SVIDs' lifetime
    agent_max_age: timedelta = timedelta(days=30)  # renewals end; the agent attests again
    # Kubernetes service-account tokens (docs/agent.md): with --kubernetes, or alone
    kube_tokens: bool = False  # verify tokens with the API server, whatever the mesh source
    kube_token_audience: str = "meshca"  # tokens must be for this audience
    kube_node_agents: tuple[str, ...] = ()  # NS/SA of node agents (e.g. istio-system/ztunnel)
    kube_node_proxy: str | None = None  # NS/SA of ambient node proxies (a node agent too)
    # limits on what callers can make the server hold (docs/serve.md, "Limits")
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connection_age: timedelta = DEFAULT_MAX_CONNECTION_AGE
    connection_age_grace: timedelta = DEFAULT_CONNECTION_AGE_GRACE
    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    uds_max_connections_per_uid: int = DEFAULT_UDS_MAX_CONNECTIONS_PER_UID
    max_streams_per_caller: int = DEFAULT_MAX_STREAMS_PER_CALLER
    max_names_per_caller: int = DEFAULT_MAX_NAMES_PER_CALLER

    def __post_init__(self) -> None:
        if self.listen is None and self.uds is None:
            raise NothingToListenOn(
                "nothing to listen on: give --listen HOST:PORT and/or --uds PATH"
            )
        if self.kubernetes and self.mesh_file is not None:
            raise ServeError(
                "--mesh and --kubernetes are two sources of the mesh: give one of them"
            )
        if self.kubeconfig is not None and not self.kube_api:
            raise ServeError("--kubeconfig is read only with --kubernetes or --kube-tokens")
        if self.kube_node_proxy is not None and not self.kubernetes:
            raise ServeError("--kube-node-proxy is read only with --kubernetes")

    @property
    def kube_api(self) -> bool:
        """Whether meshca talks to the Kubernetes API server (the mesh, or tokens)."""
        return self.kubernetes or self.kube_tokens

    def server_identity(self, trust_domain: TrustDomain) -> SpiffeId:
        """meshca's own identity in ``trust_domain`` (``--server-id``, or the default for
        ``--server-namespace``), once every identity this configuration names is checked:
        all inside the trust domain, and none of the ``--uds-identity`` mappings meshca's
        own, whose key would let a workload pose as meshca (ServeError)."""
        server_id = self.server_id or default_server_id(trust_domain, self.server_namespace)
        if not server_id.is_member_of(trust_domain):
            raise ServeError(
                f"--server-id {server_id} is outside this CA's trust domain {trust_domain}"
            )
        for uid, ids in self.uds_identities.items():
            for spiffe_id in ids:
                if not spiffe_id.is_member_of(trust_domain):
                    raise ServeError(
                        f"--uds-identity {uid}={spiffe_id}: outside this CA's trust domain "
                        f"{trust_domain}"
                    )
                if spiffe_id == server_id:
                    raise ServeError(
                        f"--uds-identity {uid}={spiffe_id}: that is meshca's own identity; "
                        "no workload may hold its key"
                    )
        return server_id


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6); port 0 lets the system pick one."""
    if text.endswith(":0"):
        server = parse_host_port(text[:-1] + "1")
        return server.host, 0
    server = parse_host_port(text)
    return server.host, server.port


def parse_count(text: str) -> int:
    """A positive whole number (a limit)."""
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is not a whole number") from None
    if not 1 <= value <= 10**9:
        raise ValueError(f"{text!r} is not between 1 and 1000000000")
    return value


def parse_fraction(text: str) -> float:
    """A fraction strictly between 0 and 1: ``0.5``, ``50%`` or ``1/2``."""
    value = text.strip()
    try:
        if value.endswith("%"):
            number = float(value[:-1]) / 100
        elif "/" in value:
            numerator, _, denominator = value.partition("/")
            number = float(numerator) / float(denominator)
        else:
            number = float(value)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{text!r} is not a fraction like 0.5, 50% or 1/2") from None
    if not 0 < number < 1:
        raise ValueError(f"{text!r} is not between 0 and 1 (exclusive)")
    return number


def parse_delay(text: str) -> timedelta:
    """A duration that may be zero (``0s``): how long to wait, if at all."""
    if text.strip() in ("0", "0s", "0m", "0h", "0d"):
        return timedelta(0)
    return parse_duration(text)


def parse_socket_mode(text: str) -> int:
    """An octal mode such as ``0660`` or ``600`` (the front door refuses anything looser)."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"{text!r} is not an octal mode like 0660") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{text!r} is not a file mode (000-777)")
    return mode


def parse_uds_identities(text: str) -> dict[int, tuple[SpiffeId, ...]]:
    """``UID=SPIFFE_ID`` pairs separated by commas; a uid may appear more than once."""
    # uid -> its identities in order, without repeats (a dict: one lookup per pair, so
    # mapping thousands of identities to one uid stays linear)
    mapping: dict[int, dict[SpiffeId, None]] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        uid_text, sep, id_text = item.partition("=")
        if not sep or not uid_text.strip().isdigit():
            raise ValueError(f"{item!r} is not UID=SPIFFE_ID (e.g. 1337=spiffe://td/ns/a/sa/a)")
        try:
            spiffe_id = SpiffeId.parse(id_text.strip())
        except SpiffeIdError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
        uid = int(uid_text)
        if uid in UNMAPPABLE_UIDS:
            raise ValueError(
                f"{item!r}: uid {uid} is the overflow uid (or -1) that the kernel reports for "
                "callers it cannot map (e.g. from another user namespace); map a uid of its own"
            )
        if uid > MAX_UID:
            raise ValueError(f"{item!r}: uid {uid} is not a valid uid (at most {MAX_UID})")
        mapping.setdefault(uid, {})[spiffe_id] = None
    if not mapping:
        raise ValueError("expected at least one UID=SPIFFE_ID")
    return {uid: tuple(ids) for uid, ids in mapping.items()}


def parse_dns_names(text: str) -> tuple[str, ...]:
    """Comma-separated DNS names for meshca's serving certificate."""
    names: list[str] = []
    for name in (part.strip().lower() for part in text.split(",")):
        if not name:
            continue
        if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in name.split(".")):
            raise ValueError(f"{name!r} is not a DNS name")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("expected at least one DNS name")
    return tuple(names)


def parse_node_agents(text: str) -> tuple[str, ...]:
    """Comma-separated ``NAMESPACE/SERVICE_ACCOUNT`` of node agents."""
    agents = []
    for part in text.split(","):
        namespace, _, account = part.strip().partition("/")
        if not _DNS_LABEL.match(namespace) or not _DNS_SUBDOMAIN.match(account):
            raise ValueError(f"{part.strip()[:100]!r}: use NAMESPACE/SERVICE_ACCOUNT")
        agents.append(f"{namespace}/{account}")
    return tuple(dict.fromkeys(agents))


def parse_node_proxy(text: str) -> str:
    """One ``NAMESPACE/SERVICE_ACCOUNT``: the ambient node proxies' service account."""
    found = parse_node_agents(text)
    if len(found) != 1:
        raise ValueError(f"{text.strip()[:100]!r}: use one NAMESPACE/SERVICE_ACCOUNT")
    return found[0]


def parse_audience(text: str) -> str:
    audience = text.strip()
    if not audience or len(audience) > 253 or any(c.isspace() for c in audience):
        raise ValueError(f"{text[:100]!r} is not a token audience")
    return audience


def parse_namespace(text: str) -> str:
    if not _DNS_LABEL.match(text):
        raise ValueError(f"{text!r} is not a Kubernetes namespace name")
    return text


LOG_LEVELS = ("debug", "info", "warning", "error")


def parse_log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"{text!r} is not a log level ({', '.join(LOG_LEVELS)})")
    return level

"""Configuration: one table of options, resolved as flags > environment > config file > defaults.

Every setting a command reads is a row of :data:`OPTIONS`. The row says how the value
is spelled on the command line, in the environment and in the YAML config file, how
it is parsed and what it defaults to, so the precedence rule is implemented once
(here) and the configuration reference is generated from the same data
(:func:`reference_markdown`). A new command adds rows to the table and names them in
its ``register``; it never reads ``os.environ`` or the config file itself.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from meshca.backends.vault.path_settings import PATH_SETTINGS as VAULT_PATH_SETTINGS
from meshca.issuer.errors import IssuerError
from meshca.issuer.key_type import KeyType
from meshca.util.durations import parse_duration
from meshca.util.files import CONFIG_MAX_BYTES, YamlFileError, read_yaml

ENV_PREFIX = "MESHCA_"
EVERY_COMMAND = "*"


def _lazy(module: str, name: str) -> Callable[[str], Any]:
    """The parser ``name`` of ``module``, imported when an option first uses it: the
    table below names the parsers of every command, and each command loads only its
    own (``meshca issue`` never loads the serve runtime or the Envoy modules)."""

    def parse(text: str) -> Any:
        found: Any = importlib.import_module(module)
        for attribute in name.split("."):  # "SpiffeId.parse": a class's parser
            found = getattr(found, attribute)
        return found(text)

    parse.__name__ = name.rpartition(".")[2]
    return parse


_SERVE = "meshca.serve.config"
parse_count = _lazy(_SERVE, "parse_count")
parse_delay = _lazy(_SERVE, "parse_delay")
parse_dns_names = _lazy(_SERVE, "parse_dns_names")
parse_fraction = _lazy(_SERVE, "parse_fraction")
parse_listen = _lazy(_SERVE, "parse_listen")
parse_log_level = _lazy(_SERVE, "parse_log_level")
parse_namespace = _lazy(_SERVE, "parse_namespace")
parse_node_agents = _lazy(_SERVE, "parse_node_agents")
parse_node_proxy = _lazy(_SERVE, "parse_node_proxy")
parse_audience = _lazy(_SERVE, "parse_audience")
parse_socket_mode = _lazy(_SERVE, "parse_socket_mode")
parse_uds_identities = _lazy(_SERVE, "parse_uds_identities")
parse_log_format = _lazy("meshca.util.logs", "parse_log_format")
parse_port = _lazy("meshca.util.netaddr", "parse_port")
parse_spiffe_id = _lazy("meshca.spiffe", "SpiffeId.parse")
parse_trust_domain = _lazy("meshca.spiffe", "TrustDomain.parse")
parse_server_address = _lazy("meshca.util.netaddr", "parse_server_address")


class ConfigError(ValueError):
    """A configuration value or file meshca cannot use; the message names where it came from."""


def _path(text: str) -> Path:
    if not text:
        raise ValueError("the path is empty")
    return Path(text).expanduser()


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE + _FALSE:
        return value in _TRUE
    raise ValueError(f"{text!r} is not a boolean: use true or false")


def parse_capture(text: str) -> str:
    from meshca.envoy.generate import CAPTURE_MODES  # the Envoy API loads only when read

    capture = text.strip().lower()
    if capture not in CAPTURE_MODES:
        raise ValueError(f"{text!r} is not a capture mode: choose {' or '.join(CAPTURE_MODES)}")
    return capture


def parse_layout(text: str) -> str:
    from meshca.envoy.model import LAYOUTS

    layout = text.strip().lower()
    if layout not in LAYOUTS:
        raise ValueError(f"{text!r} is not a layout: choose {' or '.join(LAYOUTS)}")
    return layout


ATTESTORS = ("join_token", "k8s")


def parse_attestor(text: str) -> str:
    attestor = text.strip().lower()
    if attestor not in ATTESTORS:
        raise ValueError(f"{text!r} is not an attestor: choose {' or '.join(ATTESTORS)}")
    return attestor


def parse_workload(text: str) -> str:
    """NAME or NAMESPACE/NAME as in the mesh file (checked when the bootstrap is built)."""
    if not text.strip():
        raise ValueError("the workload name is empty")
    return text.strip()


class Option(NamedTuple):
    """One setting. ``default`` is text, parsed like any other source, so the reference shows
    exactly what a user would type. ``commands`` lists the commands that offer the flag
    (``EVERY_COMMAND`` for global options); the environment and config file apply to all."""

    name: str
    parse: Callable[[str], Any]
    default: str | None
    help: str
    commands: tuple[str, ...]
    flag: str = ""
    metavar: str = "VALUE"
    in_file: bool = True
    is_path: bool = False
    aliases: tuple[str, ...] = ()  # more flag spellings, e.g. --leaf-ttl for --ttl
    repeatable: bool = False  # the flag may be repeated; values join with commas
    switch: bool = False  # a flag without a value that means "true" (parse: parse_bool)

    @property
    def flag_name(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def config_key(self) -> str | None:
        return self.name if self.in_file else None

    def offered_by(self, command: str) -> bool:
        return EVERY_COMMAND in self.commands or command in self.commands


BACKENDS = ("local", "vault")
_BACKEND_COMMANDS = ("init", "issue", "serve", "ca")
# Commands that only read the trust bundle: Vault's comes from the data directory (or,
# failing that, from Vault through the standard VAULT_* variables).
_BUNDLE_READERS = ("bundle", "inspect")
# --backend vault: (VaultSettings field, metavar, help); the values are checked by
# meshca.backends.vault.settings, whose errors name these flags (docs/vault.md).
_VAULT_OPTIONS = (
    ("addr", "URL", "Vault's address (else VAULT_ADDR; default https://127.0.0.1:8200)"),
    ("mode", "MODE", "intermediate (Vault signs meshca's CA) or per-workload (every SVID)"),
    ("mount", "PATH", "the PKI secrets engine's mount (default pki)"),
    ("role", "NAME", "per-workload: the PKI role that signs SVIDs"),
    ("issuer", "REF", "intermediate: the issuer that signs meshca's CA (default: the default)"),
    ("verbatim", "BOOL", "per-workload: sign through sign-verbatim instead of sign/<role>"),
    ("auth", "METHOD", "token, approle, kubernetes or cert (default: what is configured)"),
    ("auth_mount", "PATH", "where the auth method is mounted (default: its name)"),
    ("token", "TOKEN", "a Vault token (else VAULT_TOKEN; a flag shows in ps, prefer a file)"),
    ("token_file", "FILE", "a file holding the token, re-read when Vault rejects it"),
    ("role_id", "ID", "AppRole role ID"),
    ("secret_id", "ID", "AppRole secret ID (prefer --vault-secret-id-file)"),
    ("secret_id_file", "FILE", "a file holding the AppRole secret ID, read at each login"),
    ("k8s_role", "NAME", "Kubernetes auth role"),
    ("k8s_jwt_file", "FILE", "service-account token file (default: the pod's)"),
    ("cert_role", "NAME", "cert auth: the certificate role to log in against"),
    ("client_cert", "FILE", "client certificate for cert auth (else VAULT_CLIENT_CERT)"),
    ("client_key", "FILE", "its private key (else VAULT_CLIENT_KEY)"),
    ("ca_cert", "FILE", "CA certificate that signed Vault's TLS certificate (else VAULT_CACERT)"),
    ("namespace", "NS", "Vault namespace (else VAULT_NAMESPACE)"),
    ("timeout", "D", "per-request timeout (default 5s)"),
    ("intermediate_ttl", "D", "intermediate: lifetime of meshca's CA (default 30d)"),
    ("key_type", "T", "intermediate: key type of meshca's CA (default ec-p256)"),
)


def parse_backend(text: str) -> str:
    backend = text.strip().lower()
    if backend not in BACKENDS:
        raise ValueError(f"{text!r} is not a backend: choose {' or '.join(BACKENDS)}")
    return backend


def _vault_option(field: str, metavar: str, help: str) -> Option:
    is_path = field in VAULT_PATH_SETTINGS
    return Option(
        f"vault_{field}",
        _path if is_path else str,
        None,
        help,
        _BACKEND_COMMANDS,
        flag="--vault-cacert" if field == "ca_cert" else "",
        metavar=metavar,
        is_path=is_path,
    )


# The configuration table. Add a row per setting; keep defaults as the text a user types.
OPTIONS: tuple[Option, ...] = (
    Option(
        "config",
        _path,
        None,
        "YAML config file: a mapping of config keys (shown with each option) to values",
        (EVERY_COMMAND,),
        metavar="FILE",
        in_file=False,
        is_path=True,
    ),
    Option(
        "data_dir",
        _path,
        "./.meshca",
        "state directory; the CA lives in its ca/ subdirectory",
        (EVERY_COMMAND,),
        metavar="DIR",
        is_path=True,
    ),
    Option(
        "trust_domain",
        parse_trust_domain,
        "cluster.local",
        "SPIFFE trust domain (an existing CA keeps the one it was created with)",
        (EVERY_COMMAND,),
        metavar="TD",
    ),
    Option(
        "key_type",
        KeyType.parse,
        "ec-p256",
        "key type: " + ", ".join(k.value for k in KeyType),
        ("init", "issue"),
        metavar="T",
    ),
    Option(
        "ca_ttl",
        parse_duration,
        "3650d",
        "lifetime of a new root CA; its signing CA gets 365d (or 6 leaf TTLs if longer) of it",
        ("init",),
        metavar="D",
    ),
    Option(
        "leaf_ttl",
        parse_duration,
        "24h",
        "lifetime of an issued SVID (init checks that the CA covers 6 of them; agent: "
        "default meshca's)",
        ("issue", "serve", "agent"),
        flag="--ttl",
        metavar="D",
        aliases=("--leaf-ttl",),
    ),
    Option(
        "max_leaf_ttl",
        parse_duration,
        "90d",
        "longest SVID lifetime meshca will issue; longer requests are refused",
        ("issue", "serve"),
        flag="--max-ttl",
        metavar="D",
    ),
    # meshca serve
    Option(
        "listen",
        parse_listen,
        None,
        "serve SDS and ADS over mutual TLS on HOST:PORT (port 0 picks a free port)",
        ("serve",),
        metavar="HOST:PORT",
    ),
    Option(
        "uds",
        _path,
        None,
        "serve SDS and ADS on this Unix socket; callers are known by uid (see --uds-identity)",
        ("serve",),
        metavar="PATH",
        is_path=True,
    ),
    Option(
        "uds_mode",
        parse_socket_mode,
        "0660",
        "permissions of the Unix socket: 0660 or tighter",
        ("serve",),
        metavar="MODE",
    ),
    Option(
        "uds_identity",
        parse_uds_identities,
        None,
        "UID=SPIFFE_ID: a Unix-socket caller with that uid may obtain that identity "
        "(repeat the flag or separate with commas; unmapped uids get nothing)",
        ("serve",),
        metavar="UID=ID",
        repeatable=True,
    ),
    Option(
        "mesh",
        _path,
        None,
        "mesh file (YAML: workloads, services, traffic splits, access policies; "
        "docs/mesh.md), from which each proxy's configuration is generated; reloaded on "
        "change",
        ("serve",),
        metavar="FILE",
        is_path=True,
    ),
    Option(
        "kubernetes",
        parse_bool,
        "false",
        "read the mesh from the Kubernetes API instead of a mesh file: Services, "
        "EndpointSlices and Pods of the namespaces labelled meshca.io/mesh=enabled, "
        "HTTPRoutes and AccessPolicies (in-cluster configuration inside a pod, else "
        "--kubeconfig; docs/mesh.md)",
        ("serve",),
        switch=True,
    ),
    Option(
        "kubeconfig",
        _path,
        None,
        "with --kubernetes (or --kube-tokens) outside a pod: the kubeconfig file (its "
        "current context)",
        ("serve",),
        metavar="FILE",
        is_path=True,
    ),
    Option(
        "server_id",
        parse_spiffe_id,
        None,
        "meshca's own SPIFFE ID (default spiffe://<td>/ns/<server-namespace>/sa/meshca)",
        ("serve", "bootstrap"),
        metavar="ID",
    ),
    Option(
        "server_namespace",
        parse_namespace,
        "meshca",
        "namespace of meshca's default SPIFFE ID and DNS names",
        ("serve", "bootstrap"),
        metavar="NS",
    ),
    Option(
        "server_dns",
        parse_dns_names,
        None,
        "DNS names in meshca's serving certificate, comma-separated (default localhost, "
        "meshca, meshca.<ns>, meshca.<ns>.svc, meshca.<ns>.svc.cluster.local)",
        ("serve",),
        metavar="NAMES",
    ),
    Option(
        "log_level",
        parse_log_level,
        "info",
        "log level: debug, info, warning or error",
        ("serve", "agent"),
        metavar="LEVEL",
    ),
    Option(
        "log_format",
        parse_log_format,
        "text",
        "log format on stderr, one event per line: text, or json (ts, level, logger, msg "
        "and the event's fields, such as caller, peer and request_id)",
        ("serve", "agent"),
        metavar="FORMAT",
    ),
    Option(
        "metrics_listen",
        parse_listen,
        None,
        "serve Prometheus metrics at http://HOST:PORT/metrics (plain HTTP; port 0 picks one)",
        ("serve", "agent"),
        metavar="HOST:PORT",
    ),
    Option(
        "health_listen",
        parse_listen,
        None,
        "serve the gRPC health service alone, in plaintext, on HOST:PORT (for probes that "
        "present no client certificate, such as the kubelet's; port 0 picks one)",
        ("serve",),
        metavar="HOST:PORT",
    ),
    # limits on what callers can make meshca serve hold (docs/serve.md, "Limits")
    Option(
        "max_connections",
        parse_count,
        "1024",
        "most TCP (mutual TLS) connections at once; also at most a quarter of the open-file "
        "limit. Connections beyond it are closed at once",
        ("serve",),
        metavar="N",
    ),
    Option(
        "handshake_timeout",
        parse_duration,
        "5s",
        "a TCP connection that has not completed its TLS handshake by then is closed. Each "
        "handshake costs meshca a few milliseconds of CPU, so when thousands of proxies "
        "connect at once (a restart) those queued past it are closed and retry: raise it "
        "for such fleets (docs/serve.md, Limits)",
        ("serve",),
        metavar="D",
    ),
    Option(
        "max_connection_age",
        parse_duration,
        "1h",
        "a connection is closed after this long (open streams get 1 minute to move to a "
        "new one), so the client certificate is checked again at least this often",
        ("serve",),
        metavar="D",
    ),
    Option(
        "uds_max_connections_per_uid",
        parse_count,
        "64",
        "most Unix-socket connections one uid may hold open",
        ("serve",),
        metavar="N",
    ),
    Option(
        "max_streams_per_caller",
        parse_count,
        "1000",
        "most SDS and ADS streams one caller (an mTLS identity, a Unix-socket uid) may hold "
        "open; more are refused with RESOURCE_EXHAUSTED",
        ("serve",),
        metavar="N",
    ),
    Option(
        "max_names_per_caller",
        parse_count,
        "10000",
        "most resource names one caller may watch over all its streams (and ask for in one "
        "request); more are refused with RESOURCE_EXHAUSTED",
        ("serve",),
        metavar="N",
    ),
    # signing-CA rotation (docs/rotation.md)
    Option(
        "rotation_prepare_at",
        parse_fraction,
        "1/2",
        "when the next signing CA is prepared, as a fraction of the active one's life "
        "(0.5, 1/2, or a percentage)",
        ("serve",),
        metavar="F",
    ),
    Option(
        "rotation_activate_at",
        parse_fraction,
        "5/6",
        "when the prepared signing CA starts signing, as a fraction of the active one's "
        "life (later than rotation_prepare_at)",
        ("serve",),
        metavar="F",
    ),
    Option(
        "rotation_ca_ttl",
        parse_duration,
        None,
        "lifetime of each new signing CA rotation creates, at least 6 x the leaf TTL "
        "(default: that of the CA it replaces; Vault: --vault-intermediate-ttl)",
        ("serve",),
        metavar="D",
    ),
    Option(
        "rotation_jwt_key_ttl",
        parse_duration,
        "24h",
        "how long a JWT-SVID signing key signs: its successor is prepared (published) and "
        "activated at rotation_prepare_at and rotation_activate_at of this (activation "
        "waits until every attested agent holds it)",
        ("serve",),
        metavar="D",
    ),
    Option(
        "rotation_ack_timeout",
        parse_duration,
        "5m",
        "longest wait for proxies' ACKs in a root rotation resumed after a restart "
        "('meshca ca rotate-root --timeout' sets it for one command)",
        ("serve",),
        metavar="D",
    ),
    Option(
        "rotation_resume_grace",
        parse_delay,
        "15s",
        "after a restart with no record of the connected proxies (a journal from an older "
        "version), how long proxies get to reconnect before an interrupted root rotation "
        "judges who has ACKed (0s: at once)",
        ("serve",),
        metavar="D",
    ),
    # the CSR API for meshca agent (docs/agent.md)
    Option(
        "attest_listen",
        parse_listen,
        None,
        "serve agent attestation (join tokens) over TLS without client certificates on "
        "HOST:PORT; every other CSR API call needs the agent's SVID on --listen",
        ("serve",),
        metavar="HOST:PORT",
    ),
    Option(
        "agent_ttl",
        parse_duration,
        "1h",
        "lifetime of an agent SVID (the agent renews it at half-life over mutual TLS)",
        ("serve",),
        metavar="D",
    ),
    Option(
        "agent_max_age",
        parse_duration,
        "30d",
        "how long after attesting an agent may keep renewing its own SVID before it "
        "must attest again",
        ("serve",),
        metavar="D",
    ),
    # Kubernetes service-account tokens (docs/agent.md)
    Option(
        "kube_tokens",
        parse_bool,
        "false",
        "verify agents' and Istio proxies' Kubernetes service-account tokens with the API "
        "server (in-cluster configuration, or --kubeconfig) while the mesh comes from "
        "--mesh; --kubernetes implies it",
        ("serve",),
        switch=True,
    ),
    Option(
        "kube_token_audience",
        parse_audience,
        "meshca",
        "the audience agents' and Istio proxies' projected service-account tokens must be "
        "issued for (checked by TokenReview)",
        ("serve",),
        metavar="AUD",
    ),
    Option(
        "kube_node_agent",
        parse_node_agents,
        None,
        "NAMESPACE/SERVICE_ACCOUNT whose pods are node agents: they may obtain the "
        "identities of pods on their own node only (repeat the flag)",
        ("serve",),
        metavar="NS/SA",
        repeatable=True,
    ),
    Option(
        "kube_node_proxy",
        parse_node_proxy,
        None,
        "--kubernetes: NAMESPACE/SERVICE_ACCOUNT of the ambient node proxies (e.g. "
        "istio-system/ztunnel); a pod of it may obtain its own node's proxy identity, "
        "spiffe://<td>/ns/<ns>/sa/<sa>/node/<spec.nodeName>, and so the keys of that node's "
        "ambient pods only",
        ("serve",),
        metavar="NS/SA",
    ),
    # meshca token
    Option(
        "identity",
        parse_spiffe_id,
        None,
        "token create: the workload SPIFFE ID the agent admitted by the token may obtain "
        "(sidecar mode); entry create: the identity the entry grants",
        ("token", "entry"),
        metavar="ID",
    ),
    Option(
        "token_ttl",
        parse_duration,
        "1h",
        "token create: how long the join token can be redeemed (at most 30d)",
        ("token",),
        flag="--ttl",
        metavar="D",
    ),
    Option(
        "node",
        parse_bool,
        "false",
        "token create: a node-mode token (entitlements from registration entries)",
        ("token",),
        switch=True,
    ),
    # meshca entry
    Option(
        "entry_node",
        parse_spiffe_id,
        None,
        "entry create: the agent ID (spiffe://<td>/meshca/agent/...) that may obtain the "
        "identity for its local callers",
        ("entry",),
        flag="--node",
        metavar="AGENT_ID",
    ),
    Option(
        "selector",
        str,
        None,
        "entry create: unix:uid:N, unix:gid:N or unix:path:/abs/exe; a caller must match "
        "every one (repeat the flag)",
        ("entry",),
        metavar="SELECTOR",
        repeatable=True,
    ),
    # meshca bootstrap
    Option(
        "server",
        parse_server_address,
        None,
        "bootstrap: meshca's SDS and ADS address, unix:///path/to/socket or HOST:PORT; "
        "agent: meshca serve's mutual-TLS listener (--listen), HOST:PORT",
        ("bootstrap", "agent"),
        metavar="ADDR",
    ),
    Option(
        "agent",
        parse_server_address,
        None,
        "a bootstrap for an Envoy behind 'meshca agent': its socket, unix:///path (no "
        "certificate directory needed)",
        ("bootstrap",),
        metavar="ADDR",
    ),
    # meshca agent (docs/agent.md)
    Option(
        "attest_server",
        parse_server_address,
        None,
        "meshca serve's attestation listener (--attest-listen), HOST:PORT, where the join "
        "token is exchanged (default: --server)",
        ("agent",),
        metavar="ADDR",
    ),
    Option(
        "attestor",
        parse_attestor,
        "join_token",
        "how the agent proves who it is: join_token ('meshca token create') or k8s (the "
        "pod's projected service-account token, audience meshca)",
        ("agent",),
        metavar="NAME",
    ),
    Option(
        "token_file",
        _path,
        None,
        "a file holding the join token from 'meshca token create', or for --attestor k8s "
        "the projected service-account token (read when the agent must attest: first "
        "start, or after meshca refused its SVID)",
        ("agent",),
        metavar="FILE",
        is_path=True,
    ),
    Option(
        "trust_bundle",
        _path,
        None,
        "PEM roots to trust meshca with before it sends its own ('meshca bundle')",
        ("agent",),
        metavar="FILE",
        is_path=True,
    ),
    Option(
        "socket",
        _path,
        None,
        "the agent's Unix socket: SDS for Envoy and the SPIFFE Workload API",
        ("agent",),
        metavar="PATH",
        is_path=True,
    ),
    Option(
        "socket_mode",
        parse_socket_mode,
        "0600",
        "permissions of the agent's socket: 0600, or 0660 to admit its group",
        ("agent",),
        metavar="MODE",
    ),
    Option(
        "poll_interval",
        parse_duration,
        "5s",
        "how often the agent asks meshca for the trust bundle, signing CA and JWT key set "
        "(root and CA rotations are followed within this delay; a new root or JWT key "
        "is acknowledged at the poll after it was fetched)",
        ("agent",),
        metavar="D",
    ),
    Option(
        "cert_dir",
        _path,
        None,
        "cert.pem, key.pem and bundle.pem from 'meshca issue', for TCP to meshca",
        ("bootstrap",),
        metavar="DIR",
        is_path=True,
    ),
    Option(
        "admin_port",
        parse_port,
        "15000",
        "the Envoy admin port (on 127.0.0.1)",
        ("bootstrap",),
        metavar="N",
    ),
    Option(
        "ads",
        parse_bool,
        "false",
        "a bootstrap whose only static piece is the cluster to meshca: clusters, endpoints, "
        "listeners, routes and secrets come over ADS, generated from the mesh file for "
        "the identity (docs/mesh.md)",
        ("bootstrap",),
        switch=True,
    ),
    Option(
        "capture",
        parse_capture,
        "intercept",
        "with --ads: how traffic reaches the proxy: intercept (iptables redirects to "
        "15001 and 15003) or explicit (listeners bound to the service and workload "
        "addresses; no iptables)",
        ("bootstrap",),
        metavar="MODE",
    ),
    Option(
        "layout",
        parse_layout,
        None,
        "with --ads: the Envoy layout of the generated configuration: osm (OSM's names "
        "and ports) or istio-sidecar (Istio's; intercept capture only); unset: the mesh "
        "file's workload entry says, else osm",
        ("bootstrap",),
        metavar="LAYOUT",
    ),
    Option(
        "workload",
        parse_workload,
        None,
        "with --ads: the mesh file workload (NAME or NAMESPACE/NAME) this proxy fronts, "
        "when its identity runs several",
        ("bootstrap",),
        metavar="NAME",
    ),
    Option(
        "delta",
        parse_bool,
        "false",
        "with --ads: incremental (delta) xDS instead of state of the world",
        ("bootstrap",),
        switch=True,
    ),
    Option(
        "backend",
        parse_backend,
        "local",
        "where the CA lives: local (the data directory) or vault (docs/vault.md)",
        _BACKEND_COMMANDS + _BUNDLE_READERS,
        metavar="NAME",
    ),
    *(_vault_option(*row) for row in _VAULT_OPTIONS),
)

_BY_NAME: dict[str, Option] = {option.name: option for option in OPTIONS}


def option(name: str) -> Option:
    return _BY_NAME[name]


def add_options(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the flags of every option ``command`` offers.

    Flags default to SUPPRESS so an absent flag leaves no attribute: that is how
    :class:`Settings` tells "given on the command line" from "not given".
    """
    group = parser.add_argument_group("configuration (flag > MESHCA_* environment > file)")
    for opt in OPTIONS:
        if not opt.offered_by(command):
            continue
        sources = [f"env {opt.env}"]
        if opt.default is not None:
            sources.insert(0, f"default {opt.default}")
        if opt.config_key:
            sources.append(f"config key {opt.config_key}")
        help_text = f"{opt.help} ({'; '.join(sources)})"
        if opt.switch:
            group.add_argument(
                opt.flag_name,
                *opt.aliases,
                dest=opt.name,
                action="store_const",
                const="true",
                default=argparse.SUPPRESS,
                help=help_text,
            )
            continue
        group.add_argument(
            opt.flag_name,
            *opt.aliases,
            dest=opt.name,
            metavar=opt.metavar,
            default=argparse.SUPPRESS,
            action=_JoinRepeats if opt.repeatable else "store",
            help=help_text,
        )


class _JoinRepeats(argparse.Action):
    """A repeated flag's values, joined with commas (parsed like an environment value)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        previous = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{previous},{values}" if previous else str(values))


class _Raw(NamedTuple):
    text: str
    where: str
    base: Path | None = None  # directory relative paths are resolved against


class Settings:
    """Resolved configuration for one command run. Values are parsed on first use, so a
    bad value for an option this command never reads does not stop it."""

    def __init__(
        self,
        flags: Mapping[str, str],
        environ: Mapping[str, str],
        file_values: Mapping[str, _Raw],
    ) -> None:
        self._flags = flags
        self._environ = environ
        self._file = file_values
        self._cache: dict[str, Any] = {}

    def _raw(self, opt: Option) -> _Raw | None:
        if opt.name in self._flags:
            return _Raw(self._flags[opt.name], opt.flag_name)
        env_value = self._environ.get(opt.env, "")
        if env_value:
            return _Raw(env_value, f"environment {opt.env}")
        if opt.name in self._file:
            return self._file[opt.name]
        if opt.default is not None:
            return _Raw(opt.default, "default")
        return None

    def source(self, name: str) -> str:
        """Where the value comes from: a flag, ``environment X``, ``config file F: key`` or
        ``default``."""
        raw = self._raw(option(name))
        return raw.where if raw is not None else "unset"

    def is_explicit(self, name: str) -> bool:
        """True when the user set the value (flag, environment or file), not the default."""
        return self.source(name) not in ("default", "unset")

    def __getitem__(self, name: str) -> Any:
        if name not in self._cache:
            opt = option(name)
            raw = self._raw(opt)
            self._cache[name] = None if raw is None else _parse(opt, raw)
        return self._cache[name]


def _parse(opt: Option, raw: _Raw) -> Any:
    try:
        value = opt.parse(raw.text)
    except (ValueError, IssuerError) as exc:
        raise ConfigError(f"{raw.where}: {exc}") from None
    if opt.is_path and raw.base is not None and isinstance(value, Path):
        value = raw.base / value
    return value


def _load_file(path: Path) -> dict[str, _Raw]:
    try:
        document = read_yaml(path, "config file", max_bytes=CONFIG_MAX_BYTES, numbers_as_text=True)
    except YamlFileError as exc:
        raise ConfigError(str(exc)) from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path}: the top level must be a mapping of option names")
    known = {opt.config_key: opt for opt in OPTIONS if opt.config_key}
    values: dict[str, _Raw] = {}
    for key, value in document.items():
        if key not in known:
            # A typo is worth showing; anything else may be a line of a file given by
            # mistake (--config /etc/shadow), which an error never echoes.
            shown = f" {key!r}" if isinstance(key, str) and _OPTION_LIKE.match(key) else ""
            raise ConfigError(
                f"config file {path}: unknown key{shown} (known keys: {', '.join(sorted(known))})"
            )
        opt = known[key]
        if opt.repeatable:
            value = _joined(value)
        if opt.switch and isinstance(value, bool):
            value = "true" if value else "false"
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"config file {path}: {key}: expected a single value")
        base = path.parent if opt.is_path else None
        values[opt.name] = _Raw(str(value), f"config file {path}: {key}", base)
    return values


_OPTION_LIKE = re.compile(r"^[a-z][a-z0-9_-]{0,40}$")


def _joined(value: Any) -> Any:
    """A repeatable option may be a list, or a mapping (``{1000: spiffe://...}``) in the file."""
    if isinstance(value, dict):
        value = [f"{k}={v}" for k, many in value.items() for v in _as_list(many)]
    if isinstance(value, list) and all(isinstance(v, str | int) for v in value):
        return ",".join(str(v) for v in value)
    return value


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def load_settings(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve settings for parsed ``args``: flags > ``MESHCA_*`` environment > file > defaults.

    Relative paths in a config file are taken relative to the file's directory.
    """
    environ = os.environ if environ is None else environ
    flags = {opt.name: getattr(args, opt.name) for opt in OPTIONS if hasattr(args, opt.name)}
    early = Settings(flags, environ, {})
    config_path = early["config"]
    file_values = _load_file(config_path) if config_path is not None else {}
    return Settings(flags, environ, file_values)


def reference_markdown(commands: tuple[str, ...] | None = None) -> str:
    """The configuration reference, generated from :data:`OPTIONS`: every option, or those
    whose flag one of ``commands`` offers."""
    lines = [
        "| option | flag | environment | config key | default | flag on | meaning |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for opt in OPTIONS:
        if commands is not None and not any(opt.offered_by(c) for c in commands):
            continue
        flag_on = "all" if EVERY_COMMAND in opt.commands else ", ".join(opt.commands)
        lines.append(
            f"| {opt.name} | `{opt.flag_name}` | `{opt.env}` | "
            f"{'`' + opt.config_key + '`' if opt.config_key else '-'} | "
            f"{'`' + opt.default + '`' if opt.default is not None else '-'} | "
            f"{flag_on} | {opt.help} |"
        )
    return "\n".join(lines) + "\n"

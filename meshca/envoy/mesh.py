"""The mesh file: workloads, services, traffic splits and access policies (YAML).

The format is described in ``docs/mesh.md``. Parsing checks everything a proxy's
configuration depends on, and every error names the entry it is about
(``workloads[3].ports[0].port: ...``), so a typo is one clear line, not a broken
Envoy later. The older form (``services[].service_accounts`` only) is still read.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from meshca.envoy.model import (
    AMBIENT,
    DEFAULT_CLUSTER_DOMAIN,
    EGRESS_MODES,
    LAYOUTS,
    MTLS_MODES,
    PROTOCOLS,
    RESERVED_PORTS,
    AccessPolicy,
    Labels,
    Mesh,
    MeshError,
    Node,
    Service,
    ServicePort,
    SplitBackend,
    TrafficSplit,
    Workload,
    WorkloadPort,
    labels_of,
    matches,
)
from meshca.spiffe import SpiffeId, SpiffeIdError, TrustDomain, check_segment
from meshca.util.durations import DurationError, parse_duration
from meshca.util.files import YamlFileError, read_yaml

__all__ = [
    "PROTOCOLS",
    "AccessPolicy",
    "Mesh",
    "MeshError",
    "Service",
    "ServicePort",
    "SplitBackend",
    "TrafficSplit",
    "Workload",
    "WorkloadPort",
    "load_mesh",
    "parse_mesh",
]

_TOP_LEVEL = (
    "trust_domain", "cluster_domain", "nodes", "workloads", "services", "traffic_splits",
    "access", "egress",
)  # fmt: skip
# Envoy's weighted clusters take uint32 weights, and their sum must fit in one too.
MAX_WEIGHT = 2**32 - 1
_DNS_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")
_LABEL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/")


def _mapping(value: Any, where: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise MeshError(f"{where}: expected a mapping")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise MeshError(f"{where}: unknown keys {unknown} (allowed: {', '.join(allowed)})")
    return value


def _field(
    entry: Mapping[str, Any], key: str, where: str, kind: type, required: bool = True
) -> Any:
    if key not in entry or entry[key] is None:
        if required:
            raise MeshError(f"{where}: missing required field {key!r}")
        return None
    value = entry[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MeshError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _name(value: str, where: str) -> str:
    try:
        return check_segment(value)
    except SpiffeIdError:
        raise MeshError(f"{where}: {value!r} is not a valid name (A-Z a-z 0-9 . - _)") from None


def _ref(value: Any, where: str, namespace: str | None = None) -> str:
    """``ns/name`` (or ``name`` inside ``namespace``) to the canonical ``ns/name``."""
    if not isinstance(value, str):
        raise MeshError(f"{where}: expected 'namespace/name', got {type(value).__name__}")
    parts = value.split("/")
    if len(parts) == 1 and namespace is not None:
        parts = [namespace, parts[0]]
    if len(parts) != 2:
        raise MeshError(f"{where}: {value!r} is not of the form 'namespace/name'")
    return f"{_name(parts[0], where)}/{_name(parts[1], where)}"


def _address(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise MeshError(f"{where}: expected an IP address, got {type(value).__name__}")
    try:
        parsed = ipaddress.ip_address(value)
    except ValueError:
        raise MeshError(f"{where}: {value!r} is not an IP address") from None
    if parsed.is_unspecified or parsed.is_multicast:
        raise MeshError(f"{where}: {value} cannot be a workload or service address")
    return str(parsed)


def _port_number(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise MeshError(f"{where}: expected a port number, got {type(value).__name__}")
    if not 1 <= value <= 65535:
        raise MeshError(f"{where}: {value} is not a port number (1-65535)")
    return value


def _protocol(entry: Mapping[str, Any], where: str) -> str:
    protocol = _field(entry, "protocol", where, str, required=False) or "http"
    if protocol not in PROTOCOLS:
        raise MeshError(f"{where}.protocol: {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    return str(protocol)


def _timeout(value: Any, where: str) -> int:
    """A route timeout in whole seconds (``30s``, ``2m``); ``0s`` or ``0`` is none."""
    if value in (0, "0", "0s"):
        return 0
    if not isinstance(value, str):
        raise MeshError(f"{where}: expected a duration such as 30s or 2m, or 0s for none")
    try:
        return int(parse_duration(value).total_seconds())
    except DurationError as exc:
        raise MeshError(f"{where}: {exc} (0s for none)") from None


def _labels(value: Any, where: str, *, non_empty: bool = False) -> Labels:
    if not isinstance(value, dict):
        raise MeshError(f"{where}: expected a mapping of label names to values")
    if non_empty and not value:
        raise MeshError(f"{where}: must list at least one label")
    for key, label in value.items():
        if not isinstance(key, str) or not key or set(key) - _LABEL_CHARS:
            raise MeshError(f"{where}: {key!r} is not a valid label name")
        if not isinstance(label, str) or set(label) - _LABEL_CHARS or "/" in label:
            raise MeshError(f"{where}.{key}: {label!r} is not a valid label value (quote numbers)")
    return labels_of(value)


def _list(entry: Mapping[str, Any], key: str, where: str) -> list[Any]:
    return list(_field(entry, key, where, list, required=False) or [])


def _port_list(raw_ports: list[Any], where: str) -> list[tuple[str, dict[str, Any]]]:
    """Normalise ``[14001, {port: 3306, ...}]`` to (location, mapping) pairs, unique ports."""
    seen: dict[int, str] = {}
    out: list[tuple[str, dict[str, Any]]] = []
    for j, raw in enumerate(raw_ports):
        pwhere = f"{where}.ports[{j}]"
        if isinstance(raw, int) and not isinstance(raw, bool):
            raw = {"port": raw}
        if not isinstance(raw, dict):
            raise MeshError(f"{pwhere}: expected a mapping or a port number")
        number = _port_number(_field(raw, "port", pwhere, int), f"{pwhere}.port")
        if number in seen:
            raise MeshError(f"{pwhere}.port: {number} is already listed at {seen[number]}")
        seen[number] = pwhere
        out.append((pwhere, raw))
    return out


def _check_reserved(port: int, where: str) -> None:
    """The proxy's own listeners use these in intercept mode (Istio's hand-off listeners
    would also be named after a service port there)."""
    if port in RESERVED_PORTS:
        raise MeshError(
            f"{where}: {port} is reserved for {RESERVED_PORTS[port]} "
            f"(the proxy listens on {', '.join(map(str, RESERVED_PORTS))})"
        )


def _workload(raw: Any, where: str) -> Workload:
    allowed = (
        "name", "namespace", "service_account", "address", "ports", "labels",
        "app_address", "outbound_address", "layout", "node",
    )  # fmt: skip
    entry = _mapping(raw, where, allowed)
    ports = []
    for pwhere, port in _port_list(_list(entry, "ports", where), where):
        _mapping(port, pwhere, ("port", "protocol"))
        _check_reserved(port["port"], f"{pwhere}.port")
        ports.append(WorkloadPort(port["port"], _protocol(port, pwhere)))
    layout = _field(entry, "layout", where, str, required=False)
    if layout is not None and layout not in LAYOUTS:
        raise MeshError(f"{where}.layout: {layout!r} is not one of {', '.join(LAYOUTS)}")
    node = _field(entry, "node", where, str, required=False)
    if node is not None:
        node = _name(node, f"{where}.node")
    elif layout == AMBIENT:
        raise MeshError(
            f"{where}: layout ambient needs 'node' (the host whose node proxy carries its traffic)"
        )
    address = _address(_field(entry, "address", where, str), f"{where}.address")
    app_address = "127.0.0.1"
    if entry.get("app_address") is not None:
        app_address = _address(entry["app_address"], f"{where}.app_address")
    if app_address == address:
        raise MeshError(
            f"{where}.app_address: must differ from address {address} (the proxy listens there)"
        )
    outbound = entry.get("outbound_address")
    if outbound is not None:
        outbound = _address(outbound, f"{where}.outbound_address")
        if outbound in (address, app_address):
            raise MeshError(
                f"{where}.outbound_address: must differ from address and app_address "
                "(their ports would collide)"
            )
    return Workload(
        namespace=_name(_field(entry, "namespace", where, str), f"{where}.namespace"),
        name=_name(_field(entry, "name", where, str), f"{where}.name"),
        service_account=_name(
            _field(entry, "service_account", where, str), f"{where}.service_account"
        ),
        address=address,
        ports=tuple(sorted(ports)),
        labels=_labels(entry.get("labels") or {}, f"{where}.labels"),
        app_address=app_address,
        outbound_address=outbound,
        layout=layout,
        node=node,
    )


def _cluster_domain(document: Mapping[str, Any]) -> str:
    """The DNS domain of service names (``<svc>.<ns>.svc.<domain>``), as Kubernetes' own."""
    value = document.get("cluster_domain")
    if value is None:
        return DEFAULT_CLUSTER_DOMAIN
    labels = value.split(".") if isinstance(value, str) else []
    if (
        not labels
        or len(value) > 253
        or not all(
            0 < len(label) <= 63
            and label[0] != "-"
            and label[-1] != "-"
            and set(label) <= _DNS_CHARS
            for label in labels
        )
    ):
        raise MeshError(f"cluster_domain: {value!r} is not a DNS domain such as cluster.local")
    return str(value)


def _nodes(raw_nodes: list[Any], trust_domain: TrustDomain) -> list[Node]:
    nodes: list[Node] = []
    for i, raw in enumerate(raw_nodes):
        where = f"nodes[{i}]"
        entry = _mapping(raw, where, ("name", "identity"))
        name = _name(_field(entry, "name", where, str), f"{where}.name")
        text = _field(entry, "identity", where, str)
        try:
            identity = SpiffeId.parse(text)
        except SpiffeIdError as exc:
            raise MeshError(f"{where}.identity: {exc}") from None
        if identity.trust_domain != trust_domain:
            raise MeshError(f"{where}.identity: {text} is outside the trust domain {trust_domain}")
        if identity.is_agent:
            raise MeshError(f"{where}.identity: {text} is an agent ID, reserved for meshca agents")
        for j, other in enumerate(nodes):
            if name == other.name or identity == other.identity:
                raise MeshError(f"{where}: {name} ({identity}) is already defined at nodes[{j}]")
        nodes.append(Node(name, identity))
    return nodes


def _check_nodes(mesh: Mesh, workloads: list[Workload]) -> None:
    """Each workload names a listed node; a node proxy's identity is nobody's workload
    identity (holding it gives the keys of every ambient workload on that node)."""
    for i, workload in enumerate(workloads):
        if workload.node is not None and mesh.node(workload.node) is None:
            raise MeshError(f"workloads[{i}].node: no node {workload.node} in nodes")
        proxied = mesh.node_proxied_by(mesh.identity_of(workload))
        if proxied is not None:
            raise MeshError(
                f"workloads[{i}]: runs as {mesh.identity_of(workload)}, the identity of "
                f"node {proxied.name}'s node proxy"
            )


def _service(
    raw: Any, where: str, workloads: Mapping[str, Workload], cluster_domain: str
) -> Service:
    allowed = (
        "name", "namespace", "address", "ports", "selector", "backends", "service_accounts",
        "mtls",
    )  # fmt: skip
    entry = _mapping(raw, where, allowed)
    name = _name(_field(entry, "name", where, str), f"{where}.name")
    namespace = _name(_field(entry, "namespace", where, str), f"{where}.namespace")
    forms = [k for k in ("selector", "backends", "service_accounts") if entry.get(k) is not None]
    if len(forms) != 1:
        raise MeshError(
            f"{where}: give exactly one of selector, backends or service_accounts"
            + (f" (found {', '.join(forms)})" if forms else "")
        )
    ports = []
    for pwhere, port in _port_list(_list(entry, "ports", where), where):
        _mapping(port, pwhere, ("port", "protocol", "target_port", "timeout"))
        _check_reserved(port["port"], f"{pwhere}.port")
        target = port.get("target_port")
        if target is not None:
            target = _port_number(target, f"{pwhere}.target_port")
        timeout = 0
        if port.get("timeout") is not None:
            timeout = _timeout(port["timeout"], f"{pwhere}.timeout")
        ports.append(ServicePort(port["port"], _protocol(port, pwhere), target, timeout))
    mtls = _field(entry, "mtls", where, str, required=False) or "strict"
    if mtls not in MTLS_MODES:
        raise MeshError(f"{where}.mtls: {mtls!r} is not one of {', '.join(MTLS_MODES)}")
    selector = None
    if entry.get("selector") is not None:
        selector = _labels(entry["selector"], f"{where}.selector", non_empty=True)
    backends: list[str] = []
    for k, backend in enumerate(_list(entry, "backends", where)):
        ref = _ref(backend, f"{where}.backends[{k}]", namespace)
        if ref not in workloads:
            raise MeshError(f"{where}.backends[{k}]: no workload {ref} in workloads")
        if ref in backends:
            raise MeshError(f"{where}.backends[{k}]: {ref} is listed twice")
        backends.append(ref)
    accounts = []
    for k, account in enumerate(_list(entry, "service_accounts", where)):
        if not isinstance(account, str):
            raise MeshError(f"{where}.service_accounts[{k}]: expected a string")
        accounts.append(_name(account, f"{where}.service_accounts[{k}]"))
    address = None
    if entry.get("address") is not None:
        address = _address(entry["address"], f"{where}.address")
    elif selector is not None or backends:
        raise MeshError(f"{where}: missing required field 'address' (the service's ClusterIP)")
    return Service(
        name,
        namespace,
        tuple(sorted(ports)),
        tuple(accounts),
        address=address,
        selector=selector,
        backends=tuple(sorted(backends)),
        mtls=mtls,
        cluster_domain=cluster_domain,
    )


def _check_mtls_modes(mesh: Mesh, services: list[Service]) -> None:
    """A workload port serves plaintext or not: services sharing it must agree."""
    seen: dict[tuple[str, int], tuple[int, Service]] = {}
    for i, service in enumerate(services):
        for port in service.ports:
            for workload in mesh.endpoints(service):
                first = seen.setdefault((workload.key, port.target), (i, service))
                if first[1].mtls != service.mtls:
                    raise MeshError(
                        f"services[{i}].mtls: {service.mtls} but services[{first[0]}] "
                        f"({first[1].key}, {first[1].mtls}) also targets port {port.target} "
                        f"of workload {workload.key}"
                    )


def _check_endpoint_ports(mesh: Mesh, service: Service, where: str, order: list[int]) -> None:
    """Every workload behind a service must serve each target port, with the same protocol.

    ``order`` is the file's order of the service's ports, for the error's location.
    """
    for port in service.ports:
        pwhere = f"{where}.ports[{order.index(port.port)}]"
        for workload in mesh.endpoints(service):
            served = workload.port(port.target)
            if served is None:
                raise MeshError(
                    f"{pwhere}: workload {workload.key} does not list port {port.target}"
                )
            if served.protocol != port.protocol:
                raise MeshError(
                    f"{pwhere}: protocol {port.protocol} but workload {workload.key} serves "
                    f"port {port.target} as {served.protocol}"
                )


def _split(raw: Any, where: str, mesh: Mesh) -> TrafficSplit:
    entry = _mapping(raw, where, ("service", "backends"))
    ref = _ref(_field(entry, "service", where, str), f"{where}.service")
    namespace, name = ref.split("/")
    service = mesh.service(namespace, name)
    if service is None:
        raise MeshError(f"{where}.service: no service {ref} in services")
    if not service.has_workloads:
        raise MeshError(f"{where}.service: {ref} has no selector or backends to split")
    raw_backends = _field(entry, "backends", where, list)
    if not raw_backends:
        raise MeshError(f"{where}.backends: must list at least one backend")
    backends: list[SplitBackend] = []
    for j, raw_backend in enumerate(raw_backends):
        bwhere = f"{where}.backends[{j}]"
        backend = _mapping(raw_backend, bwhere, ("name", "labels", "weight"))
        bname = _name(_field(backend, "name", bwhere, str), f"{bwhere}.name")
        if any(b.name == bname for b in backends):
            raise MeshError(f"{bwhere}.name: {bname!r} is already used in this split")
        labels = _labels(
            _field(backend, "labels", bwhere, dict), f"{bwhere}.labels", non_empty=True
        )
        weight = _field(backend, "weight", bwhere, int)
        if weight < 0:
            raise MeshError(f"{bwhere}.weight: {weight} is negative")
        if weight > MAX_WEIGHT:
            raise MeshError(f"{bwhere}.weight: {weight} is over Envoy's limit of {MAX_WEIGHT}")
        if weight and not any(matches(labels, w.labels) for w in mesh.endpoints(service)):
            raise MeshError(f"{bwhere}.labels: no workload of {ref} carries {dict(labels)}")
        backends.append(SplitBackend(bname, labels, weight))
    total = sum(b.weight for b in backends)
    if total == 0:
        raise MeshError(f"{where}.backends: the weights add up to 0")
    if total > MAX_WEIGHT:
        raise MeshError(
            f"{where}.backends: the weights add up to {total}, over Envoy's limit of {MAX_WEIGHT}"
        )
    return TrafficSplit(ref, tuple(sorted(backends)))


def _source(value: Any, where: str, trust_domain: TrustDomain) -> SpiffeId | str:
    """A SPIFFE ID, ``ns/sa``, ``ns/*`` (the namespace, returned as ``ns``) or ``*``."""
    if value == "*":
        return "*"
    if isinstance(value, str) and value.endswith("/*") and value.count("/") == 1:
        return _name(value[:-2], where)
    if isinstance(value, str) and value.startswith("spiffe://"):
        try:
            source = SpiffeId.parse(value)
        except SpiffeIdError as exc:
            raise MeshError(f"{where}: {exc}") from None
        if source.trust_domain != trust_domain:
            raise MeshError(f"{where}: {value} is outside the trust domain {trust_domain}")
        return source
    namespace, account = _ref(value, where).split("/")
    return SpiffeId.from_kubernetes(namespace, account, trust_domain)


def _policy(raw: Any, where: str, mesh: Mesh) -> AccessPolicy:
    entry = _mapping(raw, where, ("service", "ports", "from"))
    ref = _ref(_field(entry, "service", where, str), f"{where}.service")
    namespace, name = ref.split("/")
    service = mesh.service(namespace, name)
    if service is None:
        raise MeshError(f"{where}.service: no service {ref} in services")
    ports = []
    for j, port in enumerate(_list(entry, "ports", where)):
        number = _port_number(port, f"{where}.ports[{j}]")
        if service.port(number) is None:
            raise MeshError(f"{where}.ports[{j}]: {ref} has no port {number}")
        ports.append(number)
    raw_sources = _field(entry, "from", where, list)
    if not raw_sources:
        raise MeshError(f"{where}.from: must list at least one identity")
    sources = [
        _source(s, f"{where}.from[{k}]", mesh.trust_domain) for k, s in enumerate(raw_sources)
    ]
    return AccessPolicy(
        ref,
        tuple(sorted({s for s in sources if isinstance(s, SpiffeId)})),
        tuple(sorted(set(ports))),
        namespaces=tuple(sorted({s for s in sources if isinstance(s, str) and s != "*"})),
        anyone="*" in sources,
    )


def _unique_addresses(workloads: list[Workload], services: list[Service]) -> None:
    owners: dict[str, str] = {}
    claims = [(f"workloads[{i}].address", w.address) for i, w in enumerate(workloads)] + [
        (f"services[{i}].address", s.address) for i, s in enumerate(services) if s.address
    ]
    for where, address in claims:
        if address in owners:
            raise MeshError(f"{where}: {address} is already used by {owners[address]}")
        owners[address] = where


def _trust_domain(document: Mapping[str, Any], trust_domain: TrustDomain) -> None:
    if document.get("trust_domain") is None:
        return
    try:
        declared = TrustDomain.parse(str(document["trust_domain"]))
    except SpiffeIdError as exc:
        raise MeshError(f"trust_domain: {exc}") from None
    if declared != trust_domain:
        raise MeshError(
            f"trust_domain: the mesh file is for {declared}, this CA serves {trust_domain}"
        )


def _access(document: Mapping[str, Any]) -> tuple[bool, list[Any]]:
    raw = document.get("access")
    if raw is None:
        return False, []
    access = _mapping(raw, "access", ("mode", "policies"))
    mode = access.get("mode") or "strict"
    if mode not in ("strict", "permissive"):
        raise MeshError(f"access.mode: {mode!r} is not one of strict, permissive")
    return mode == "permissive", _list(access, "policies", "access")


def _unique(items: list[Any], key: str, section: str) -> None:
    seen: dict[str, int] = {}
    for i, item in enumerate(items):
        value = getattr(item, key)
        if value in seen:
            raise MeshError(
                f"{section}[{i}]: {value} is already defined at {section}[{seen[value]}]"
            )
        seen[value] = i


def parse_mesh(document: Any, trust_domain: TrustDomain) -> Mesh:
    """Validate a parsed YAML document and build the (sorted, immutable) mesh."""
    if document is None:
        return Mesh.empty(trust_domain)
    top = _mapping(document, "mesh file", _TOP_LEVEL)
    _trust_domain(top, trust_domain)
    egress = top.get("egress") or "blackhole"
    if egress not in EGRESS_MODES:
        raise MeshError(f"egress: {egress!r} is not one of {', '.join(EGRESS_MODES)}")
    cluster_domain = _cluster_domain(top)
    nodes = tuple(sorted(_nodes(_list(top, "nodes", "mesh file"), trust_domain)))
    workloads = [
        _workload(raw, f"workloads[{i}]")
        for i, raw in enumerate(_list(top, "workloads", "mesh file"))
    ]
    _unique(workloads, "key", "workloads")
    by_key = {w.key: w for w in workloads}
    raw_services = _list(top, "services", "mesh file")
    services = [
        _service(raw, f"services[{i}]", by_key, cluster_domain)
        for i, raw in enumerate(raw_services)
    ]
    _unique(services, "key", "services")
    _unique_addresses(workloads, services)
    mesh = Mesh(
        trust_domain,
        tuple(sorted(services, key=lambda s: s.key)),
        tuple(sorted(workloads)),
        nodes=nodes,
        cluster_domain=cluster_domain,
    )
    _check_nodes(mesh, workloads)
    for i, (service, raw) in enumerate(zip(services, raw_services, strict=True)):
        where = f"services[{i}]"
        order = [entry["port"] for _, entry in _port_list(_list(raw, "ports", where), where)]
        _check_endpoint_ports(mesh, service, where, order)
    _check_mtls_modes(mesh, services)
    splits = [
        _split(raw, f"traffic_splits[{i}]", mesh)
        for i, raw in enumerate(_list(top, "traffic_splits", "mesh file"))
    ]
    _unique(splits, "service", "traffic_splits")
    permissive, raw_policies = _access(top)
    policies = [_policy(raw, f"access.policies[{i}]", mesh) for i, raw in enumerate(raw_policies)]
    return Mesh(
        trust_domain,
        mesh.services,
        mesh.workloads,
        tuple(sorted(splits)),
        tuple(sorted(policies)),
        permissive=permissive,
        egress=str(egress),
        nodes=nodes,
        cluster_domain=cluster_domain,
    )


def load_mesh(path: Path, trust_domain: TrustDomain) -> Mesh:
    try:
        document = read_yaml(path, "mesh file")
    except YamlFileError as exc:
        raise MeshError(str(exc)) from None
    try:
        return parse_mesh(document, trust_domain)
    except MeshError as exc:
        raise MeshError(f"{path}: {exc}") from None

"""The mesh file: which services exist and which identities back them.

Small on purpose (YAML)::

    services:
      - name: bookstore
        namespace: bookstore
        ports: [{port: 14001, protocol: http}]
        service_accounts: [bookstore-v1, bookstore-v2]

Every error names the entry it is about (``services[1].ports[0].port: ...``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from meshca.spiffe import SpiffeId, SpiffeIdError, TrustDomain

PROTOCOLS = ("http", "tcp", "grpc")


class MeshError(ValueError):
    """A mesh file that cannot be used; the message points at the offending entry."""


@dataclass(frozen=True)
class ServicePort:
    port: int
    protocol: str = "http"


@dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    ports: tuple[ServicePort, ...]
    service_accounts: tuple[str, ...]


@dataclass(frozen=True)
class Mesh:
    trust_domain: TrustDomain
    services: tuple[Service, ...] = ()

    @classmethod
    def empty(cls, trust_domain: TrustDomain) -> Mesh:
        return cls(trust_domain)

    def service(self, namespace: str, name: str) -> Service | None:
        return next((s for s in self.services if s.namespace == namespace and s.name == name), None)

    def service_identities(self, namespace: str, name: str) -> tuple[SpiffeId, ...] | None:
        """The SPIFFE IDs backing a service (sorted), or None when the service is unknown."""
        service = self.service(namespace, name)
        if service is None:
            return None
        return tuple(
            sorted(
                SpiffeId.from_kubernetes(namespace, sa, self.trust_domain)
                for sa in service.service_accounts
            )
        )


def _field(
    entry: Mapping[str, Any], key: str, where: str, kind: type, required: bool = True
) -> Any:
    if key not in entry:
        if required:
            raise MeshError(f"{where}: missing required field {key!r}")
        return None
    value = entry[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MeshError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def _name(value: str, where: str) -> str:
    try:
        SpiffeId(TrustDomain("x"), f"/{value}")
    except SpiffeIdError:
        raise MeshError(f"{where}: {value!r} is not a valid name (A-Z a-z 0-9 . - _)") from None
    if "/" in value or not value:
        raise MeshError(f"{where}: {value!r} is not a valid name")
    return value


def parse_mesh(document: Any, trust_domain: TrustDomain) -> Mesh:
    if document is None:
        return Mesh.empty(trust_domain)
    if not isinstance(document, dict):
        raise MeshError("mesh file: the top level must be a mapping")
    unknown = set(document) - {"services", "trust_domain"}
    if unknown:
        raise MeshError(f"mesh file: unknown top-level keys {sorted(unknown)}")
    if "trust_domain" in document:
        try:
            declared = TrustDomain.parse(str(document["trust_domain"]))
        except SpiffeIdError as exc:
            raise MeshError(f"trust_domain: {exc}") from None
        if declared != trust_domain:
            raise MeshError(
                f"trust_domain: the mesh file is for {declared}, this CA serves {trust_domain}"
            )
    services: list[Service] = []
    seen: set[tuple[str, str]] = set()
    raw_services = document.get("services") or []
    if not isinstance(raw_services, list):
        raise MeshError("services: expected a list")
    for i, raw in enumerate(raw_services):
        where = f"services[{i}]"
        if not isinstance(raw, dict):
            raise MeshError(f"{where}: expected a mapping")
        name = _name(_field(raw, "name", where, str), f"{where}.name")
        namespace = _name(_field(raw, "namespace", where, str), f"{where}.namespace")
        if (namespace, name) in seen:
            raise MeshError(f"{where}: service {namespace}/{name} is listed twice")
        seen.add((namespace, name))
        ports: list[ServicePort] = []
        for j, raw_port in enumerate(_field(raw, "ports", where, list, required=False) or []):
            pwhere = f"{where}.ports[{j}]"
            if isinstance(raw_port, int) and not isinstance(raw_port, bool):
                raw_port = {"port": raw_port}
            if not isinstance(raw_port, dict):
                raise MeshError(f"{pwhere}: expected a mapping or a port number")
            port = _field(raw_port, "port", pwhere, int)
            if not 1 <= port <= 65535:
                raise MeshError(f"{pwhere}.port: {port} is not a port number (1-65535)")
            protocol = _field(raw_port, "protocol", pwhere, str, required=False) or "http"
            if protocol not in PROTOCOLS:
                raise MeshError(f"{pwhere}.protocol: {protocol!r} is not one of {PROTOCOLS}")
            ports.append(ServicePort(port, protocol))
        accounts = _field(raw, "service_accounts", where, list)
        for k, account in enumerate(accounts):
            if not isinstance(account, str):
                raise MeshError(f"{where}.service_accounts[{k}]: expected a string")
            _name(account, f"{where}.service_accounts[{k}]")
        services.append(Service(name, namespace, tuple(ports), tuple(accounts)))
    return Mesh(trust_domain, tuple(services))


def load_mesh(path: Path, trust_domain: TrustDomain) -> Mesh:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise MeshError(f"cannot read mesh file {path}: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MeshError(f"mesh file {path} is not valid YAML: {exc}") from None
    try:
        return parse_mesh(document, trust_domain)
    except MeshError as exc:
        raise MeshError(f"{path}: {exc}") from None

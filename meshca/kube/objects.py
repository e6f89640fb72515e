"""The API objects meshca watches, and what of each it keeps.

A watch cache of ten thousand pods must not hold ten thousand pod specs: each kind has
a projection to a small frozen record of the fields the mesh is made from (a pod's
service account, labels and IP; a slice's ready addresses and ports...). Projections
read defensively: an object the API server let through in an unexpected shape becomes
:class:`Unusable` (logged once by the source), never an exception in the watch.
HTTPRoutes and AccessPolicies are kept as the API returned them (without their managed
fields), for :mod:`meshca.kube.policy` and :mod:`meshca.kube.status`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from meshca.envoy.model import Labels, labels_of

MESH_LABEL = "meshca.io/mesh"
MESH_ENABLED = "enabled"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"


class Unusable(ValueError):
    """An object meshca cannot read; the message says which field."""


@dataclass(frozen=True)
class ServicePortRecord:
    name: str
    port: int
    protocol: str  # TCP, UDP, SCTP
    app_protocol: str | None
    target_port: int | str | None  # a number, a container port's name, or unset


@dataclass(frozen=True)
class ServiceRecord:
    namespace: str
    name: str
    cluster_ip: str | None  # None: headless or ExternalName
    selector: Labels | None
    ports: tuple[ServicePortRecord, ...]


@dataclass(frozen=True)
class SlicePort:
    name: str
    port: int
    protocol: str
    app_protocol: str | None


@dataclass(frozen=True)
class SliceEndpoint:
    address: str
    ready: bool
    pod: str | None  # targetRef of kind Pod


@dataclass(frozen=True)
class SliceRecord:
    namespace: str
    name: str
    service: str | None  # the kubernetes.io/service-name label
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]


@dataclass(frozen=True)
class NamespaceRecord:
    name: str
    labels: Labels  # a layout may be chosen here (meshca.kube.layouts)


@dataclass(frozen=True)
class PodRecord:
    namespace: str
    name: str
    service_account: str
    labels: Labels
    ip: str | None
    node: str | None


def _map(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise Unusable(f"{where}: not a mapping")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise Unusable(f"{where}: not a list")
    return value


def _str(value: Any, where: str, *, required: bool = True) -> str | None:
    if value is None and not required:
        return None
    if not isinstance(value, str) or (required and not value):
        raise Unusable(f"{where}: missing or not text")
    return value


def _int(value: Any, where: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Unusable(f"{where}: not a number")
    return value


def _labels(value: Any, where: str) -> Labels:
    labels = _map(value, where)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
        raise Unusable(f"{where}: not text labels")
    return labels_of(labels)


def meta(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name); namespace is "" for cluster-scoped objects."""
    metadata = _map(obj.get("metadata"), "metadata")
    name = _str(metadata.get("name"), "metadata.name")
    namespace = _str(metadata.get("namespace"), "metadata.namespace", required=False) or ""
    assert name is not None
    return namespace, name


def key_of(obj: Mapping[str, Any]) -> str:
    namespace, name = meta(obj)
    return f"{namespace}/{name}" if namespace else name


def namespace_record(obj: Mapping[str, Any]) -> NamespaceRecord:
    labels = _labels(_map(obj.get("metadata"), "metadata").get("labels"), "metadata.labels")
    return NamespaceRecord(meta(obj)[1], labels)


def service_record(obj: Mapping[str, Any]) -> ServiceRecord:
    namespace, name = meta(obj)
    spec = _map(obj.get("spec"), "spec")
    cluster_ip = spec.get("clusterIP")
    if spec.get("type") == "ExternalName" or cluster_ip in (None, "", "None"):
        cluster_ip = None
    selector = _labels(spec.get("selector"), "spec.selector") or None
    ports = []
    for i, raw in enumerate(_list(spec.get("ports"), "spec.ports")):
        entry = _map(raw, f"spec.ports[{i}]")
        target = entry.get("targetPort")
        if target is not None and not isinstance(target, int | str):
            raise Unusable(f"spec.ports[{i}].targetPort: not a number or a name")
        ports.append(
            ServicePortRecord(
                name=_str(entry.get("name"), "name", required=False) or "",
                port=_int(entry.get("port"), f"spec.ports[{i}].port"),
                protocol=_str(entry.get("protocol"), "protocol", required=False) or "TCP",
                app_protocol=_str(entry.get("appProtocol"), "appProtocol", required=False),
                target_port=target,
            )
        )
    return ServiceRecord(
        namespace, name, _str(cluster_ip, "spec.clusterIP", required=False), selector, tuple(ports)
    )


def slice_record(obj: Mapping[str, Any]) -> SliceRecord:
    namespace, name = meta(obj)
    labels = dict(_labels(_map(obj.get("metadata"), "metadata").get("labels"), "labels"))
    ports = []
    for i, raw in enumerate(_list(obj.get("ports"), "ports")):
        entry = _map(raw, f"ports[{i}]")
        if entry.get("port") is None:
            continue  # "all ports": meshca needs a number
        ports.append(
            SlicePort(
                name=_str(entry.get("name"), "name", required=False) or "",
                port=_int(entry.get("port"), f"ports[{i}].port"),
                protocol=_str(entry.get("protocol"), "protocol", required=False) or "TCP",
                app_protocol=_str(entry.get("appProtocol"), "appProtocol", required=False),
            )
        )
    endpoints = []
    for i, raw in enumerate(_list(obj.get("endpoints"), "endpoints")):
        entry = _map(raw, f"endpoints[{i}]")
        addresses = _list(entry.get("addresses"), f"endpoints[{i}].addresses")
        if not addresses:
            continue
        conditions = _map(entry.get("conditions"), f"endpoints[{i}].conditions")
        ref = _map(entry.get("targetRef"), f"endpoints[{i}].targetRef")
        pod = ref.get("name") if ref.get("kind") == "Pod" else None
        endpoints.append(
            SliceEndpoint(
                address=str(_str(addresses[0], f"endpoints[{i}].addresses[0]")),
                ready=conditions.get("ready") is not False,  # unset means ready
                pod=pod if isinstance(pod, str) and pod else None,
            )
        )
    return SliceRecord(
        namespace, name, labels.get(SERVICE_NAME_LABEL), tuple(ports), tuple(endpoints)
    )


def pod_record(obj: Mapping[str, Any]) -> PodRecord:
    namespace, name = meta(obj)
    spec = _map(obj.get("spec"), "spec")
    status = _map(obj.get("status"), "status")
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return PodRecord(
        namespace,
        name,
        str(_str(account, "spec.serviceAccountName")),
        _labels(_map(obj.get("metadata"), "metadata").get("labels"), "metadata.labels"),
        _str(status.get("podIP"), "status.podIP", required=False) or None,
        _str(spec.get("nodeName"), "spec.nodeName", required=False) or None,
    )


def policy_object(api_version: str, kind: str) -> Callable[[Mapping[str, Any]], Mapping[str, Any]]:
    """HTTPRoutes or AccessPolicies as :mod:`meshca.kube.policy` reads them and
    :mod:`meshca.kube.status` writes them: the whole object with its kind (a list's items
    may lack it) and status, less its managed fields (large, and nothing to do with it)."""

    def project(obj: Mapping[str, Any]) -> Mapping[str, Any]:
        meta(obj)
        metadata = dict(_map(obj.get("metadata"), "metadata"))
        metadata.pop("managedFields", None)
        return {**obj, "apiVersion": api_version, "kind": kind, "metadata": metadata}

    return project


@dataclass(frozen=True)
class Kind:
    """One collection meshca list-watches: its API path, an optional label selector, the
    projection of its objects, and whether it may be absent (a CRD not installed)."""

    name: str
    path: str
    project: Callable[[Mapping[str, Any]], Any]
    label_selector: str | None = None
    optional: bool = False


NAMESPACES = Kind(
    "Namespace",
    "/api/v1/namespaces",
    namespace_record,
    label_selector=f"{MESH_LABEL}={MESH_ENABLED}",
)
SERVICES = Kind("Service", "/api/v1/services", service_record)
ENDPOINT_SLICES = Kind("EndpointSlice", "/apis/discovery.k8s.io/v1/endpointslices", slice_record)
PODS = Kind("Pod", "/api/v1/pods", pod_record)
HTTP_ROUTES = Kind(
    "HTTPRoute",
    "/apis/gateway.networking.k8s.io/v1/httproutes",
    policy_object("gateway.networking.k8s.io/v1", "HTTPRoute"),
    optional=True,
)
ACCESS_POLICIES = Kind(
    "AccessPolicy",
    "/apis/meshca.io/v1alpha1/accesspolicies",
    policy_object("meshca.io/v1alpha1", "AccessPolicy"),
    optional=True,
)
MESH_KINDS = (NAMESPACES, SERVICES, ENDPOINT_SLICES, PODS)
POLICY_KINDS = (HTTP_ROUTES, ACCESS_POLICIES)

"""Traffic policy in Kubernetes terms, translated to the mesh model.

Two kinds of object, read as the API server returns them (plain mappings):

- a Gateway API ``HTTPRoute`` attached to a Service (the GAMMA mesh pattern:
  ``parentRefs`` of group ``""`` and kind ``Service``) whose one rule has weighted
  ``backendRefs`` to Services becomes a traffic split of the parent Service: each
  backend is the parent's workloads that the backend Service selects;
- meshca's ``AccessPolicy`` (``meshca.io/v1alpha1``) becomes an access policy: a target
  Service (optionally some of its ports) and who may call it (service accounts, whole
  namespaces, or the whole trust domain).

Everything here is a pure function of those objects and the mesh (its services and
workloads). Each object gets a :class:`Verdict` (``Accepted`` and, for routes,
``ResolvedRefs`` conditions) saying whether it was applied and, if not, why. A bad
object is left out and only its own verdict says so: it never changes what anyone else
gets. Messages quote what the object says only in shortened form, so what a user can
write into an object bounds what meshca writes back and logs.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from meshca.envoy.model import AccessPolicy, Mesh, Service, SplitBackend, TrafficSplit
from meshca.kube.objects import MESH_LABEL
from meshca.spiffe import SpiffeId, SpiffeIdError, check_segment
from meshca.util.logs import shorten

GATEWAY_GROUP = "gateway.networking.k8s.io"
MESHCA_GROUP = "meshca.io"
ACCESS_POLICY_VERSION = "v1alpha1"
# The controller name meshca writes in an HTTPRoute's status.parents[] entries.
CONTROLLER_NAME = "meshca.io/mesh"
# Envoy's weighted clusters take uint32 weights, and their sum must fit in one too.
MAX_WEIGHT = 2**32 - 1
MAX_MESSAGE = 1024  # characters of a condition message
_VALUE = 64  # characters of one quoted value inside a message
_CORE_GROUPS = ("", "core")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_RULE_KEYS = frozenset({"name", "matches", "backendRefs"})
_DEFAULT_MATCH = {"path": {"type": "PathPrefix", "value": "/"}}

# Condition types and reasons (Gateway API's for routes; the same words for policies).
ACCEPTED = "Accepted"
RESOLVED_REFS = "ResolvedRefs"
UNSUPPORTED_VALUE = "UnsupportedValue"
NO_MATCHING_PARENT = "NoMatchingParent"
BACKEND_NOT_FOUND = "BackendNotFound"
INVALID_KIND = "InvalidKind"
REF_NOT_PERMITTED = "RefNotPermitted"
CONFLICTED = "Conflicted"
TARGET_NOT_FOUND = "TargetNotFound"
PORT_NOT_FOUND = "PortNotFound"
INVALID_SOURCE = "InvalidSource"
NAMESPACE_NOT_IN_MESH = "NamespaceNotInMesh"


@dataclass(frozen=True)
class Condition:
    """One status condition: ``status`` True or False, a CamelCase reason, a message."""

    type: str
    status: bool
    reason: str
    message: str


@dataclass(frozen=True)
class ObjectRef:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class ParentVerdict:
    """What meshca made of one of a route's Service parents (``parent_ref`` as the route
    gives it, so status.parents[] names it the same way)."""

    parent_ref: Mapping[str, Any]
    conditions: tuple[Condition, ...]

    @property
    def accepted(self) -> bool:
        return all(c.status for c in self.conditions)


@dataclass(frozen=True)
class Verdict:
    """One object's outcome: ``conditions`` (an AccessPolicy's) or ``parents`` (an
    HTTPRoute's, one per Service parent), for the object's ``generation``."""

    ref: ObjectRef
    generation: int
    conditions: tuple[Condition, ...] = ()
    parents: tuple[ParentVerdict, ...] = ()

    @property
    def accepted(self) -> bool:
        return all(c.status for c in self.conditions) and all(p.accepted for p in self.parents)

    def problems(self) -> list[str]:
        """The messages of the conditions that are False (for the log)."""
        every = [*self.conditions, *(c for p in self.parents for c in p.conditions)]
        return list(dict.fromkeys(c.message for c in every if not c.status))


@dataclass(frozen=True)
class TrafficPolicy:
    """The splits and access policies the objects give, and a verdict per object."""

    splits: tuple[TrafficSplit, ...] = ()
    policies: tuple[AccessPolicy, ...] = ()
    verdicts: tuple[Verdict, ...] = ()

    def apply(self, mesh: Mesh) -> Mesh:
        """``mesh`` (services and workloads) with these splits and policies (reusing what
        translating them already derived from its workloads)."""
        return mesh.with_policy(self.splits, self.policies)


class _Refused(Exception):
    """Why an object (or one parent of a route) is not applied."""

    def __init__(self, reason: str, message: str, condition: str = ACCEPTED) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = _bounded(message)
        self.condition = condition


def _bounded(message: str) -> str:
    return shorten(message, MAX_MESSAGE)


def _q(value: object) -> str:
    """A value from the object, quoted and shortened for a message."""
    return repr(shorten(value, _VALUE)) if isinstance(value, str) else shorten(value, _VALUE)


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _meta(obj: Mapping[str, Any]) -> tuple[str, str, int]:
    meta = _mapping(obj.get("metadata"))
    generation = meta.get("generation")
    return (
        str(meta.get("namespace", "")),
        str(meta.get("name", "")),
        generation if isinstance(generation, int) else 0,
    )


def _age_key(obj: Mapping[str, Any]) -> tuple[str, str, str]:
    """Gateway API's precedence among conflicting routes: the oldest, then by name.
    (RFC 3339 timestamps in UTC sort as text.)"""
    meta = _mapping(obj.get("metadata"))
    namespace, name, _ = _meta(obj)
    return (str(meta.get("creationTimestamp") or "~"), namespace, name)


def _weight(value: Any, where: str) -> int:
    if value is None:
        return 1  # Gateway API's default
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Refused(UNSUPPORTED_VALUE, f"{where}.weight: {_q(value)} is not a whole number")
    if value < 0:
        raise _Refused(UNSUPPORTED_VALUE, f"{where}.weight: {value} is negative")
    if value > MAX_WEIGHT:
        raise _Refused(
            UNSUPPORTED_VALUE, f"{where}.weight: {value} is over Envoy's limit of {MAX_WEIGHT}"
        )
    return value


# --- HTTPRoute ------------------------------------------------------------------------------


def _is_service_ref(ref: Mapping[str, Any], default_group: str, default_kind: str) -> bool:
    return ref.get("group", default_group) in _CORE_GROUPS and (
        ref.get("kind", default_kind) == "Service"
    )


def _service_parents(route: Mapping[str, Any]) -> list[tuple[int, Mapping[str, Any]]]:
    """The route's parentRefs that name a Service (the mesh's); Gateways are not ours."""
    refs = _mapping(route.get("spec")).get("parentRefs")
    if not isinstance(refs, list):
        return []
    return [
        (i, ref)
        for i, ref in enumerate(refs)
        if isinstance(ref, Mapping) and _is_service_ref(ref, GATEWAY_GROUP, "Gateway")
    ]


@dataclass(frozen=True)
class _Backend:
    service: Service
    weight: int


def _rule(route: Mapping[str, Any]) -> Mapping[str, Any]:
    rules = _mapping(route.get("spec")).get("rules")
    if not isinstance(rules, list) or len(rules) != 1 or not isinstance(rules[0], Mapping):
        count = len(rules) if isinstance(rules, list) else 0
        raise _Refused(
            UNSUPPORTED_VALUE,
            f"spec.rules: meshca splits a Service's traffic as a whole: exactly one rule, "
            f"with weighted backendRefs and no matches or filters (found {count} rules)",
        )
    rule = rules[0]
    extra = sorted(str(k) for k in rule if k not in _RULE_KEYS)
    if extra:
        raise _Refused(
            UNSUPPORTED_VALUE,
            f"spec.rules[0]: meshca applies only backendRefs and their weights, "
            f"not {', '.join(_q(k) for k in extra[:4])}",
        )
    matches = rule.get("matches")
    if matches not in (None, [], [_DEFAULT_MATCH]):
        raise _Refused(
            UNSUPPORTED_VALUE,
            "spec.rules[0].matches: meshca has no per-path or header routing; "
            "only the default match (PathPrefix /) is applied",
        )
    return rule


def _backends(route: Mapping[str, Any], mesh: Mesh, namespace: str) -> list[_Backend]:
    """The route's backends, resolved to Services of the mesh; refused as a whole when one
    cannot be used, with the reason Gateway API gives for it."""
    refs = _rule(route).get("backendRefs")
    if not isinstance(refs, list) or not refs:
        raise _Refused(UNSUPPORTED_VALUE, "spec.rules[0].backendRefs: must list a backend")
    found: list[_Backend] = []
    for j, ref in enumerate(refs):
        where = f"spec.rules[0].backendRefs[{j}]"
        if not isinstance(ref, Mapping):
            raise _Refused(UNSUPPORTED_VALUE, f"{where}: expected a mapping")
        if not _is_service_ref(ref, "", "Service"):
            raise _Refused(
                INVALID_KIND,
                f"{where}: {_q(ref.get('kind'))} of group {_q(ref.get('group'))} is not a Service",
                RESOLVED_REFS,
            )
        if ref.get("namespace", namespace) != namespace:
            raise _Refused(
                REF_NOT_PERMITTED,
                f"{where}: a backend in namespace {_q(ref.get('namespace'))}: meshca splits "
                "among Services of the route's own namespace",
                RESOLVED_REFS,
            )
        if ref.get("filters"):
            raise _Refused(UNSUPPORTED_VALUE, f"{where}.filters: meshca applies no filters")
        name = ref.get("name")
        service = mesh.service(namespace, name) if isinstance(name, str) else None
        if service is None:
            raise _Refused(
                BACKEND_NOT_FOUND,
                f"{where}: no Service {_q(name)} in namespace {namespace} in the mesh",
                RESOLVED_REFS,
            )
        port = ref.get("port")
        if port is not None and service.port(port) is None:
            raise _Refused(
                BACKEND_NOT_FOUND,
                f"{where}.port: Service {service.key} has no port {_q(port)}",
                RESOLVED_REFS,
            )
        if service.selector is None:
            raise _Refused(
                UNSUPPORTED_VALUE,
                f"{where}: Service {service.key} has no selector: each backend is the "
                "workloads its Service selects",
            )
        if any(b.service.key == service.key for b in found):
            raise _Refused(UNSUPPORTED_VALUE, f"{where}: Service {service.key} is listed twice")
        found.append(_Backend(service, _weight(ref.get("weight"), where)))
    total = sum(b.weight for b in found)
    if total == 0:
        raise _Refused(UNSUPPORTED_VALUE, "spec.rules[0].backendRefs: the weights add up to 0")
    if total > MAX_WEIGHT:
        raise _Refused(
            UNSUPPORTED_VALUE,
            f"spec.rules[0].backendRefs: the weights add up to {total}, over Envoy's limit "
            f"of {MAX_WEIGHT}",
        )
    return found


def _parent(
    ref: Mapping[str, Any],
    where: str,
    mesh: Mesh,
    route: ObjectRef,
    split: Mapping[str, str],
) -> Service:
    namespace = route.namespace
    if ref.get("namespace", namespace) != namespace:
        raise _Refused(
            UNSUPPORTED_VALUE,
            f"{where}: a Service in namespace {_q(ref.get('namespace'))}: meshca applies "
            "routes in the Service's own namespace (no consumer routes)",
        )
    if ref.get("sectionName") is not None:
        raise _Refused(UNSUPPORTED_VALUE, f"{where}.sectionName: a split covers every port")
    name = ref.get("name")
    service = mesh.service(namespace, name) if isinstance(name, str) else None
    if service is None:
        raise _Refused(
            NO_MATCHING_PARENT,
            f"{where}: no Service {_q(name)} in namespace {namespace} in the mesh",
        )
    port = ref.get("port")
    if port is not None and service.port(port) is None:
        raise _Refused(
            NO_MATCHING_PARENT, f"{where}.port: Service {service.key} has no port {_q(port)}"
        )
    if port is not None and len(service.ports) > 1:
        raise _Refused(
            UNSUPPORTED_VALUE,
            f"{where}.port: a split covers every port of Service {service.key}: leave the port out",
        )
    if not service.has_workloads:
        raise _Refused(
            UNSUPPORTED_VALUE, f"{where}: Service {service.key} has no selector to split"
        )
    owner = split.get(service.key)
    if owner == route.name:
        raise _Refused(UNSUPPORTED_VALUE, f"{where}: Service {service.key} is already a parent")
    if owner is not None:
        raise _Refused(
            CONFLICTED,
            f"{where}: Service {service.key} is already split by HTTPRoute {namespace}/"
            f"{_q(owner)[1:-1]}, which is older (the oldest applies)",
        )
    return service


def _split_of(parent: Service, backends: list[_Backend], mesh: Mesh, where: str) -> TrafficSplit:
    own = {w.key for w in mesh.endpoints(parent)}
    for backend in backends:
        if not backend.weight:
            continue  # takes no traffic: where it would send it does not matter yet
        strays = sorted(w.key for w in mesh.endpoints(backend.service) if w.key not in own)
        if strays:
            raise _Refused(
                UNSUPPORTED_VALUE,
                f"{where}: backend Service {backend.service.key} selects workloads that "
                f"{parent.key} does not ({', '.join(strays[:3])}): a split shares a Service's "
                "traffic among its own workloads",
            )
    return TrafficSplit(
        parent.key,
        tuple(
            sorted(
                SplitBackend(b.service.name, b.service.selector or (), b.weight) for b in backends
            )
        ),
    )


def _route(
    route: Mapping[str, Any], mesh: Mesh, split: dict[str, str]
) -> tuple[Verdict, list[TrafficSplit]]:
    namespace, name, generation = _meta(route)
    ref_of_route = ObjectRef("HTTPRoute", namespace, name)
    try:
        backends: list[_Backend] | _Refused = _backends(route, mesh, namespace)
    except _Refused as refused:
        backends = refused
    parents: list[ParentVerdict] = []
    splits: list[TrafficSplit] = []
    for i, ref in _service_parents(route):
        where = f"spec.parentRefs[{i}]"
        resolved = Condition(RESOLVED_REFS, True, "ResolvedRefs", "every backendRef resolved")
        try:
            if isinstance(backends, _Refused):
                if backends.condition == RESOLVED_REFS:
                    resolved = Condition(RESOLVED_REFS, False, backends.reason, backends.message)
                raise backends
            parent = _parent(ref, where, mesh, ref_of_route, split)
            made = _split_of(parent, backends, mesh, where)
        except _Refused as refused:
            accepted = Condition(ACCEPTED, False, refused.reason, refused.message)
        else:
            split[parent.key] = name
            splits.append(made)
            shares = ", ".join(f"{b.name}={b.weight}" for b in made.backends)
            accepted = Condition(
                ACCEPTED, True, "Accepted", _bounded(f"splits {made.service}: {shares}")
            )
        parents.append(ParentVerdict(dict(ref), (accepted, resolved)))
    return Verdict(ref_of_route, generation, parents=tuple(parents)), splits


# --- AccessPolicy ---------------------------------------------------------------------------


def _source(entry: Any, where: str, namespace: str, mesh: Mesh) -> SpiffeId | str:
    """A ServiceAccount (its SPIFFE ID), a Namespace (its name) or the TrustDomain (``*``)."""
    if not isinstance(entry, Mapping):
        raise _Refused(INVALID_SOURCE, f"{where}: expected a mapping")
    kind = entry.get("kind")
    name = entry.get("name")
    if kind == "TrustDomain":
        if name is not None or entry.get("namespace") is not None:
            raise _Refused(INVALID_SOURCE, f"{where}: a TrustDomain source names nothing")
        return "*"
    if kind == "Namespace":
        if not isinstance(name, str) or not _DNS_LABEL.fullmatch(name):
            raise _Refused(INVALID_SOURCE, f"{where}.name: {_q(name)} is not a namespace name")
        return name
    if kind != "ServiceAccount":
        raise _Refused(
            INVALID_SOURCE,
            f"{where}.kind: {_q(kind)} is not one of ServiceAccount, Namespace, TrustDomain",
        )
    account_namespace = entry.get("namespace", namespace)
    if not isinstance(account_namespace, str) or not _DNS_LABEL.fullmatch(account_namespace):
        raise _Refused(
            INVALID_SOURCE, f"{where}.namespace: {_q(account_namespace)} is not a namespace name"
        )
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        raise _Refused(
            INVALID_SOURCE, f"{where}.name: {_q(name)} is not a valid service account name"
        )
    try:
        check_segment(name)
        return SpiffeId.from_kubernetes(account_namespace, name, mesh.trust_domain)
    except SpiffeIdError:
        raise _Refused(
            INVALID_SOURCE, f"{where}.name: {_q(name)} cannot be part of a SPIFFE ID"
        ) from None


def _access_policy(obj: Mapping[str, Any], mesh: Mesh) -> AccessPolicy:
    namespace, _, _ = _meta(obj)
    spec = _mapping(obj.get("spec"))
    target = _mapping(spec.get("targetRef"))
    if not _is_service_ref(target, "", "Service"):
        raise _Refused(INVALID_KIND, "spec.targetRef: meshca applies policies to Services")
    name = target.get("name")
    service = mesh.service(namespace, name) if isinstance(name, str) else None
    if service is None:
        raise _Refused(
            TARGET_NOT_FOUND,
            f"spec.targetRef: no Service {_q(name)} in namespace {namespace} in the mesh",
        )
    raw_ports = spec.get("ports") or []
    ports: set[int] = set()
    for j, port in enumerate(raw_ports if isinstance(raw_ports, list) else [raw_ports]):
        if not isinstance(port, int) or service.port(port) is None:
            raise _Refused(
                PORT_NOT_FOUND, f"spec.ports[{j}]: Service {service.key} has no port {_q(port)}"
            )
        ports.add(port)
    raw_sources = spec.get("from")
    if not isinstance(raw_sources, list) or not raw_sources:
        raise _Refused(INVALID_SOURCE, "spec.from: must list at least one source")
    sources = [
        _source(entry, f"spec.from[{k}]", namespace, mesh) for k, entry in enumerate(raw_sources)
    ]
    return AccessPolicy(
        service.key,
        tuple(sorted({s for s in sources if isinstance(s, SpiffeId)})),
        tuple(sorted(ports)),
        namespaces=tuple(sorted({s for s in sources if isinstance(s, str) and s != "*"})),
        anyone="*" in sources,
    )


def _access_verdict(obj: Mapping[str, Any], mesh: Mesh) -> tuple[Verdict, AccessPolicy | None]:
    namespace, name, generation = _meta(obj)
    ref = ObjectRef("AccessPolicy", namespace, name)
    try:
        policy = _access_policy(obj, mesh)
    except _Refused as refused:
        condition = Condition(ACCEPTED, False, refused.reason, refused.message)
        return Verdict(ref, generation, (condition,)), None
    who = len(policy.sources) + len(policy.namespaces) + int(policy.anyone)
    message = f"admits {who} source{'s' if who != 1 else ''} to {policy.service}"
    return Verdict(ref, generation, (Condition(ACCEPTED, True, "Accepted", message),)), policy


# --- both -----------------------------------------------------------------------------------


def _malformed(kind: str, obj: Mapping[str, Any], error: Exception) -> Verdict:
    """The last line of defence: an object the checks above did not foresee is refused on
    its own, never taking the mesh down with it."""
    namespace, name, generation = _meta(obj)
    condition = Condition(
        ACCEPTED, False, UNSUPPORTED_VALUE, _bounded(f"malformed {kind}: {type(error).__name__}")
    )
    return Verdict(ObjectRef(kind, namespace, name), generation, (condition,))


def _outside(obj: Mapping[str, Any]) -> Verdict:
    namespace, name, generation = _meta(obj)
    message = f"namespace {namespace} is not in the mesh (label it {MESH_LABEL}=enabled)"
    condition = Condition(ACCEPTED, False, NAMESPACE_NOT_IN_MESH, _bounded(message))
    return Verdict(ObjectRef("AccessPolicy", namespace, name), generation, (condition,))


def translate(
    mesh: Mesh,
    routes: Iterable[Mapping[str, Any]] = (),
    access_policies: Iterable[Mapping[str, Any]] = (),
    namespaces: Collection[str] | None = None,
) -> TrafficPolicy:
    """The splits and access policies of ``routes`` and ``access_policies`` over ``mesh``
    (its services and workloads) in ``namespaces`` (every namespace when None), with a
    verdict per object. A route with no Service parent, or outside those namespaces, is
    not meshca's: no verdict. An AccessPolicy (meshca's own kind) outside them is told
    its namespace is not in the mesh."""

    def in_mesh(obj: Mapping[str, Any]) -> bool:
        return namespaces is None or _meta(obj)[0] in namespaces

    def ours(obj: Mapping[str, Any]) -> bool:
        return isinstance(obj, Mapping) and in_mesh(obj)

    verdicts: list[Verdict] = []
    splits: list[TrafficSplit] = []
    split: dict[str, str] = {}  # Service key -> the name of the route that splits it
    for route in sorted(filter(ours, routes), key=_age_key):
        if not _service_parents(route):
            continue
        try:
            verdict, made = _route(route, mesh, split)
        except (TypeError, ValueError, AttributeError, KeyError) as error:
            verdicts.append(_malformed("HTTPRoute", route, error))
            continue
        verdicts.append(verdict)
        splits.extend(made)
    policies: list[AccessPolicy] = []
    for obj in sorted(
        (o for o in access_policies if isinstance(o, Mapping)), key=lambda o: _meta(o)[:2]
    ):
        if not in_mesh(obj):
            verdicts.append(_outside(obj))
            continue
        try:
            verdict, policy = _access_verdict(obj, mesh)
        except (TypeError, ValueError, AttributeError, KeyError) as error:
            verdicts.append(_malformed("AccessPolicy", obj, error))
            continue
        verdicts.append(verdict)
        if policy is not None:
            policies.append(policy)
    return TrafficPolicy(
        tuple(sorted(splits)),
        tuple(sorted(policies)),
        tuple(sorted(verdicts, key=lambda v: (v.ref.kind, v.ref.namespace, v.ref.name))),
    )

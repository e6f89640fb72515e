"""What changed between two meshes, as far as a proxy's configuration can tell.

A proxy's generated configuration (:func:`meshca.envoy.generate.generate`) reads the
services it may reach (their endpoints, identities and splits) and its own identity's
workloads (its listeners, inbound policy and local clusters). When only workloads and
endpoints changed (a pod came or went: the common change in Kubernetes), a proxy none
of whose inputs changed keeps its configuration as it is, instead of every connected
proxy being regenerated. Anything else (services, policies, splits, nodes, the access
or egress mode) is :data:`None` from :func:`mesh_delta`: every proxy is regenerated.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshca.envoy.model import Mesh
from meshca.spiffe import SpiffeId


@dataclass(frozen=True)
class MeshDelta:
    """``services``: keys (``ns/name``) of the services whose endpoints or identities
    changed; ``identities``: the identities one of whose workloads was added, removed or
    changed (its ports, labels or address)."""

    services: frozenset[str]
    identities: frozenset[SpiffeId]

    def affects(self, identity: SpiffeId, reaches: frozenset[str]) -> bool:
        """Whether a proxy running as ``identity`` that may reach ``reaches`` is affected."""
        return identity in self.identities or not self.services.isdisjoint(reaches)


def _same_policy(old: Mesh, new: Mesh) -> bool:
    return (
        old.trust_domain == new.trust_domain
        and old.permissive == new.permissive
        and old.egress == new.egress
        and old.cluster_domain == new.cluster_domain
        and old.nodes == new.nodes
        and old.traffic_splits == new.traffic_splits
        and old.policies == new.policies
        and old.services == new.services
    )


def mesh_delta(old: Mesh, new: Mesh) -> MeshDelta | None:
    """The services and identities whose inputs differ from ``old`` to ``new``; None
    when something else changed (every proxy may be affected)."""
    if not _same_policy(old, new):
        return None
    if any(w.node is not None for w in (*old.workloads, *new.workloads)):
        return None  # ambient node proxies serve many identities: not tracked here
    changed = set(old.workloads).symmetric_difference(new.workloads)
    identities = frozenset(new.identity_of(w) for w in changed)
    services = frozenset(
        service.key
        for service in new.services
        if old.endpoints(service) != new.endpoints(service)
        or old.service_identities(service.namespace, service.name)
        != new.service_identities(service.namespace, service.name)
    )
    return MeshDelta(services, identities)

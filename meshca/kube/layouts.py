"""Which Envoy layout a pod's proxy gets, and which node proxy carries an ambient pod.

The layout comes from a label on the Pod, else on its Namespace, else the server's
default (no layout: the proxy's bootstrap says, else ``osm``):

- ``meshca.io/layout: osm | istio-sidecar | ambient``;
- Istio's ``istio.io/dataplane-mode: ambient`` means ``ambient`` (any other value of
  Istio's label, such as ``none``, says nothing to meshca).

A label that names no layout is a problem line; that pod falls back to the next source
(the namespace's label, then the default), and nothing else is affected.

An ambient pod's node is its ``spec.nodeName`` as the API server holds it (labels play no
part). A node's proxy authenticates as :func:`node_proxy_identity`, which only a pod of
the configured node proxy service account scheduled on that node can obtain
(:meth:`meshca.attest.kube_tokens.KubeTokenVerifier.authorize`).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshca.envoy.model import AMBIENT, LAYOUTS, Labels
from meshca.spiffe import SpiffeId, TrustDomain

LAYOUT_LABEL = "meshca.io/layout"
ISTIO_DATAPLANE_MODE = "istio.io/dataplane-mode"


@dataclass(frozen=True)
class Choice:
    """A layout (None: the default) and, when a label was unusable, why."""

    layout: str | None
    problem: str | None = None


def _from_labels(labels: Labels, what: str) -> Choice | None:
    """The layout ``labels`` ask for; None when they say nothing (or nothing usable)."""
    found = dict(labels)
    value = found.get(LAYOUT_LABEL)
    if value is not None:
        if value in LAYOUTS:
            return Choice(value)
        return Choice(
            None,
            f"{what}: label {LAYOUT_LABEL}={value[:63]!r} is not one of {', '.join(LAYOUTS)}",
        )
    if found.get(ISTIO_DATAPLANE_MODE) == AMBIENT:
        return Choice(AMBIENT)
    return None


def choose_layout(pod: str, pod_labels: Labels, namespace: str, namespace_labels: Labels) -> Choice:
    """The pod's label, else its namespace's, else the default; the first problem met."""
    problem = None
    for labels, what in ((pod_labels, f"Pod {pod}"), (namespace_labels, f"Namespace {namespace}")):
        choice = _from_labels(labels, what)
        if choice is None:
            continue
        if choice.problem is None:
            return Choice(choice.layout, problem)
        problem = problem or f"{choice.problem}; ignored"
    return Choice(None, problem)


def node_proxy_identity(trust_domain: TrustDomain, node_proxy: str, node: str) -> SpiffeId:
    """The identity node ``node``'s proxy holds: ``spiffe://<td>/ns/<ns>/sa/<sa>/node/<node>``
    for the node proxy service account ``ns/sa``. It is no workload's (a workload's path has
    no ``/node/``), and it names the node, so the CA can bind it to ``spec.nodeName``."""
    namespace, account = node_proxy.split("/")
    return SpiffeId.for_node_proxy(trust_domain, namespace, account, node)

"""Listener, network and HTTP filters of the generated listeners: original destination,
HTTP connection manager, TCP proxy and RBAC (HTTP and network), packed as typed configs."""

from __future__ import annotations

from envoy.config.listener.v3 import listener_components_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as http_rbac_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2
from envoy.extensions.filters.listener.tls_inspector.v3 import tls_inspector_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.filters.network.rbac.v3 import rbac_pb2 as network_rbac_pb2
from envoy.extensions.filters.network.tcp_proxy.v3 import tcp_proxy_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import duration_pb2

from meshca.envoy.model import Callers
from meshca.envoy.xds import ads_source, pack
from meshca.spiffe import TrustDomain

ORIGINAL_DST = "envoy.filters.listener.original_dst"
TLS_INSPECTOR = "envoy.filters.listener.tls_inspector"
HCM = "envoy.filters.network.http_connection_manager"
TCP_PROXY = "envoy.filters.network.tcp_proxy"
NETWORK_RBAC = "envoy.filters.network.rbac"
HTTP_RBAC = "envoy.filters.http.rbac"
ROUTER = "envoy.filters.http.router"
ALLOWED_POLICY = "allowed-callers"


def original_dst() -> listener_components_pb2.ListenerFilter:
    """Restores the address a connection redirected by iptables was dialled to."""
    return listener_components_pb2.ListenerFilter(
        name=ORIGINAL_DST, typed_config=pack(original_dst_pb2.OriginalDst())
    )


def tls_inspector() -> listener_components_pb2.ListenerFilter:
    """Sets the transport protocol (``tls`` or ``raw_buffer``) chains can match on, and
    the SNI and ALPN a TLS client offers."""
    return listener_components_pb2.ListenerFilter(
        name=TLS_INSPECTOR, typed_config=pack(tls_inspector_pb2.TlsInspector())
    )


def _router() -> hcm_pb2.HttpFilter:
    return hcm_pb2.HttpFilter(name=ROUTER, typed_config=pack(router_pb2.Router()))


def _namespace_matcher(trust_domain: TrustDomain, namespace: str) -> string_pb2.StringMatcher:
    """Exactly the identities ``spiffe://<td>/ns/<namespace>/sa/<one segment>``: a prefix
    would also admit longer, non-Kubernetes paths under it."""
    escaped = f"{trust_domain.id}/ns/{namespace}/sa/".replace(".", r"\.")
    return string_pb2.StringMatcher(
        safe_regex=regex_pb2.RegexMatcher(
            google_re2=regex_pb2.RegexMatcher.GoogleRE2(), regex=f"{escaped}[^/]+"
        )
    )


def rbac_rules(allowed: Callers, trust_domain: TrustDomain) -> rbac_pb2.RBAC:
    """ALLOW the ``allowed`` callers, by the peer certificate's URI SAN: exact SPIFFE IDs,
    whole namespaces, or (``anyone``) any certificate of the trust domain.

    Admitting nobody is an ALLOW rule without policies, which denies everything.
    """
    if allowed.anyone:
        matchers = [string_pb2.StringMatcher(prefix=f"{trust_domain.id}/")]
    else:
        matchers = [string_pb2.StringMatcher(exact=str(i)) for i in sorted(allowed.identities)]
        matchers += [_namespace_matcher(trust_domain, ns) for ns in sorted(allowed.namespaces)]
    rules = rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW)
    if matchers:
        rules.policies[ALLOWED_POLICY].CopyFrom(
            rbac_pb2.Policy(
                permissions=[rbac_pb2.Permission(any=True)],
                principals=[
                    rbac_pb2.Principal(
                        authenticated=rbac_pb2.Principal.Authenticated(principal_name=m)
                    )
                    for m in matchers
                ],
            )
        )
    return rules


def outbound_http(stat_prefix: str, route_config_name: str) -> listener_components_pb2.Filter:
    """Routes come over ADS (RDS), so a split change is a route push, not a listener drain."""
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        rds=hcm_pb2.Rds(config_source=ads_source(), route_config_name=route_config_name),
        http_filters=[_router()],
    )
    return listener_components_pb2.Filter(name=HCM, typed_config=pack(manager))


def inbound_http(
    stat_prefix: str,
    cluster: str,
    rules: rbac_pb2.RBAC | None,
    route_name: str,
    virtual_host_name: str,
) -> listener_components_pb2.Filter:
    """RBAC on the caller's SPIFFE ID (``rules``; None for a plaintext chain, whose
    callers have none), then the local app, told who called (XFCC URI; removed from
    whatever a caller sent). No timeout: the caller's proxy applies the route's."""
    action = route_components_pb2.RouteAction(cluster=cluster, timeout=duration_pb2.Duration())
    routes = route_pb2.RouteConfiguration(
        name=route_name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name=virtual_host_name,
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix="/"), route=action
                    )
                ],
            )
        ],
    )
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        route_config=routes,
        http_filters=[
            *(
                [
                    hcm_pb2.HttpFilter(
                        name=HTTP_RBAC, typed_config=pack(http_rbac_pb2.RBAC(rules=rules))
                    )
                ]
                if rules is not None
                else []
            ),
            _router(),
        ],
        forward_client_cert_details=hcm_pb2.HttpConnectionManager.SANITIZE_SET,
        set_current_client_cert_details=hcm_pb2.HttpConnectionManager.SetCurrentClientCertDetails(
            uri=True
        ),
    )
    return listener_components_pb2.Filter(name=HCM, typed_config=pack(manager))


def network_rbac(stat_prefix: str, rules: rbac_pb2.RBAC) -> listener_components_pb2.Filter:
    config = network_rbac_pb2.RBAC(stat_prefix=stat_prefix, rules=rules)
    return listener_components_pb2.Filter(name=NETWORK_RBAC, typed_config=pack(config))


def tcp_proxy(stat_prefix: str, cluster: str) -> listener_components_pb2.Filter:
    config = tcp_proxy_pb2.TcpProxy(stat_prefix=stat_prefix, cluster=cluster)
    return listener_components_pb2.Filter(name=TCP_PROXY, typed_config=pack(config))

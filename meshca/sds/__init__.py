"""The xDS engine and the Secret Discovery Service: callers, secret names, secrets."""

from meshca.sds.ads import AggregatedDiscoveryServicer, add_ads_to_server
from meshca.sds.auth import AuthError, Caller, CallerAuthenticator, Forbidden, PeerCred
from meshca.sds.engine import Resource, ResourceError, ResourceSource, XdsEngine
from meshca.sds.secrets import SECRET_TYPE_URL, SecretSource
from meshca.sds.service import SecretDiscoveryServicer, add_sds_to_server
from meshca.sds.stats import XdsStats

__all__ = [
    "SECRET_TYPE_URL",
    "AggregatedDiscoveryServicer",
    "AuthError",
    "Caller",
    "CallerAuthenticator",
    "Forbidden",
    "PeerCred",
    "Resource",
    "ResourceError",
    "ResourceSource",
    "SecretDiscoveryServicer",
    "SecretSource",
    "XdsEngine",
    "XdsStats",
    "add_ads_to_server",
    "add_sds_to_server",
]

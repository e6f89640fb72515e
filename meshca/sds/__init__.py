"""The Secret Discovery Service: the Secret source (who may have which secret) and the
SDS servicer, both served by the xDS engine in :mod:`meshca.xds`."""

from meshca.sds.secrets import SecretSource
from meshca.sds.service import SecretDiscoveryServicer, add_sds_to_server

__all__ = [
    "SecretDiscoveryServicer",
    "SecretSource",
    "add_sds_to_server",
]

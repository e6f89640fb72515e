"""The Secret Discovery Service: the Secret source (who may have which secret) and the
SDS servicer, both served by the xDS engine in :mod:`meshca.xds`."""

from meshca.sds.secrets import SECRET_TYPE_URL, SecretSource
from meshca.sds.service import SecretDiscoveryServicer, add_sds_to_server

__all__ = [
    "SECRET_TYPE_URL",
    "SecretDiscoveryServicer",
    "SecretSource",
    "add_sds_to_server",
]

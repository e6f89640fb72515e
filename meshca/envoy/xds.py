"""Building blocks shared by the generated resources: the ADS config source, typed-config
packing and the SDS secret names a proxy's resources refer to (formatted by
:mod:`meshca.xds.resources`, where the Secret source parses them).

Everything is packed deterministically so the same mesh always serialises to the same
bytes, which is what makes content versions meaningful.
"""

from __future__ import annotations

from envoy.config.core.v3 import address_pb2, config_source_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2
from google.protobuf.message import Message

from meshca.envoy.model import MeshError
from meshca.spiffe import SpiffeId
from meshca.xds.resources import inbound_validation_name, service_cert_name

CONNECT_TIMEOUT = duration_pb2.Duration(seconds=1)


class GenerationError(MeshError):
    """A proxy whose configuration cannot be generated from this mesh (say why)."""


def pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def ads_source() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def sds_secret(name: str) -> secret_pb2.SdsSecretConfig:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads_source())


def socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def host_prefix(address: str) -> address_pb2.CidrRange:
    """``address``/32 (or /128): the mesh file's addresses are validated IPs."""
    length = 128 if ":" in address else 32
    return address_pb2.CidrRange(
        address_prefix=address, prefix_len=wrappers_pb2.UInt32Value(value=length)
    )


def kubernetes_identity(proxy: SpiffeId) -> tuple[str, str]:
    """(namespace, service account) of a proxy; the secret names need that form."""
    kube = proxy.kubernetes
    if kube is None:
        raise GenerationError(
            f"{proxy}: proxies are identified as spiffe://<td>/ns/<namespace>/sa/<account>"
        )
    return kube


def service_cert_secret(proxy: SpiffeId) -> str:
    return service_cert_name(*kubernetes_identity(proxy))


def inbound_validation_secret(proxy: SpiffeId) -> str:
    return inbound_validation_name(*kubernetes_identity(proxy))

"""``meshca serve`` speaks ADS next to SDS: the generated configuration of the mesh file
per authenticated identity, pushed again when the file changes; listed by reflection and
health, counted by the metrics, and waited for by root rotation."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshca.serve.server import ADS_SERVICE, MeshcaServer
from meshca.xds.resources import CLUSTER_TYPE, SECRET_TYPE
from tests.sds_harness import delta, open_delta, open_sotw, secrets_of, sotw, wait_until
from tests.serve_harness import (
    client_svid,
    default_config,
    kube_id,
    make_data_dir,
    mtls_channel,
    served,
    short_tempdir,
)

pytestmark = pytest.mark.timeout(60)

BUYER = kube_id("shop", "buyer")
MESH = """
access: {mode: permissive}
workloads:
  - {name: buyer, namespace: shop, service_account: buyer, address: 127.0.0.61}
  - {name: web, namespace: shop, service_account: web, address: 127.0.0.62,
     ports: [8080], labels: {app: web}}
services:
  - {name: web, namespace: shop, address: 127.0.0.161, ports: [8080], selector: {app: web}}
"""
MORE = """
  - {name: api, namespace: shop, service_account: api, address: 127.0.0.63,
     ports: [9090], labels: {app: api}}
services:
  - {name: api, namespace: shop, address: 127.0.0.162, ports: [9090], selector: {app: api}}
"""


@pytest.fixture
async def server() -> AsyncIterator[MeshcaServer]:
    with short_tempdir() as root:
        make_data_dir(root)
        (root / "mesh.yaml").write_text(MESH)
        config = default_config(
            root, mesh_file=root / "mesh.yaml", uds_identities={os.getuid(): (BUYER,)}
        )
        async with served(config) as running:
            yield running


def cluster_names(response: Any) -> set[str]:
    return {cluster_pb2.Cluster.FromString(r.value).name for r in response.resources}


async def test_ads_serves_the_mesh_and_follows_the_file(server: MeshcaServer) -> None:
    assert server.mesh_file is not None
    async with mtls_channel(server, client_svid(server, BUYER)) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        stream = await open_sotw(stub, sotw(type_url=CLUSTER_TYPE, node_id=str(BUYER)))
        first = await stream.recv()
        assert cluster_names(first) == {"shop/web|8080", "blackhole"}
        await stream.send(
            sotw(type_url=CLUSTER_TYPE, nonce=first.nonce, version=first.version_info)
        )
        # the proxy counts for metrics and for root rotation's ACK waits
        await wait_until(lambda: server.ads.engine.streams(), what="the ADS stream")
        exposition = server.metrics.exposition().decode()
        assert 'meshca_xds_streams{kind="sotw",service="ads"} 1.0' in exposition
        assert server.rotation is not None
        [waiting_for] = server.rotation.manager.acks.unacked(lambda secret: False)
        assert waiting_for.startswith(f"{BUYER} (")  # its node id, then the caller
        # a service added to the file reaches the running stream
        path = server.mesh_file.path
        staged = path.with_name("mesh.yaml.new")
        staged.write_text(MESH.replace("services:", MORE.strip("\n"), 1))
        os.replace(staged, path)
        second = await stream.recv()
        assert cluster_names(second) == {"shop/web|8080", "shop/api|9090", "blackhole"}
        stream.cancel()


async def test_ads_is_listed_by_reflection_and_health(server: MeshcaServer) -> None:
    async with mtls_channel(server, client_svid(server, BUYER)) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        response = await health.Check(health_pb2.HealthCheckRequest(service=ADS_SERVICE))
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = set()
        async for reply in replies:
            names |= {s.name for s in reply.list_services_response.service}
        assert ADS_SERVICE in names


WEB_PEERS = "root-cert-for-mtls-outbound:shop/web"


def _remove_services(server: MeshcaServer) -> None:
    assert server.mesh_file is not None
    path = server.mesh_file.path
    staged = path.with_name("mesh.yaml.new")
    staged.write_text(MESH.split("services:")[0] + "services: []\n")
    os.replace(staged, path)


@pytest.mark.parametrize("kind", ["sotw", "delta"])
async def test_a_secret_whose_service_is_removed_is_a_removal_not_an_error(
    server: MeshcaServer, kind: str
) -> None:
    """A proxy watches the peers of shop/web; web leaves the mesh file. The stream goes on
    (Delta: the name in removed_resources), and a proxy reconnecting with the name still
    in its subscription gets the rest of what it asks for: no status ends either stream."""
    async with mtls_channel(server, client_svid(server, BUYER)) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        node_id = str(BUYER)
        if kind == "sotw":
            stream = await open_sotw(stub, sotw([WEB_PEERS], type_url=SECRET_TYPE, node_id=node_id))
        else:
            stream = await open_delta(
                stub, delta([WEB_PEERS], type_url=SECRET_TYPE, node_id=node_id)
            )
        first = await stream.recv()
        assert set(secrets_of(first)) == {WEB_PEERS}
        if kind == "sotw":
            await stream.send(
                sotw(
                    [WEB_PEERS], type_url=SECRET_TYPE, nonce=first.nonce, version=first.version_info
                )
            )
        else:
            await stream.send(delta(type_url=SECRET_TYPE, nonce=first.nonce))
        _remove_services(server)
        await wait_until(lambda: not server.mesh.services, what="the reload")
        if kind == "delta":
            removal = await stream.recv()
            assert list(removal.removed_resources) == [WEB_PEERS] and not removal.resources
        # the same proxy reconnects: its first request still lists the removed name
        names = [WEB_PEERS, "default"]
        if kind == "sotw":
            again = await open_sotw(stub, sotw(names, type_url=SECRET_TYPE, node_id=node_id))
        else:
            again = await open_delta(stub, delta(names, type_url=SECRET_TYPE, node_id=node_id))
        answer = await again.recv()
        assert set(secrets_of(answer)) == {"default"}
        assert await stream.nothing_within(0.3)  # the first stream is still open, quiet
        assert await again.nothing_within(0.1)
        stream.cancel()
        again.cancel()


def _with_layout(layout: str) -> Any:
    request = sotw(type_url=CLUSTER_TYPE, node_id=str(BUYER))
    request.node.metadata.fields["meshca.layout"].string_value = layout
    return request


async def test_the_node_metadata_picks_the_layout_and_a_bad_one_is_refused(
    server: MeshcaServer,
) -> None:
    async with mtls_channel(server, client_svid(server, BUYER)) as channel:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel)
        stream = await open_sotw(stub, _with_layout("istio-sidecar"))
        assert cluster_names(await stream.recv()) == {
            "outbound|8080||web.shop.svc.cluster.local",
            "BlackHoleCluster",
            "PassthroughCluster",
        }
        stream.cancel()
        refused = await open_sotw(stub, _with_layout("ztunnel"))
        error = await refused.error()
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "layout 'ztunnel' is not one of osm, istio-sidecar, ambient" in (
            error.details() or ""
        )

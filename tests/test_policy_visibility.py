"""A workload learns who serves a service only if the mesh policy lets it call that
service (issue 11, item 14): ``root-cert-for-mtls-outbound:<ns>/<svc>`` names the
identities behind ``<svc>``, so it is refused to callers the policy denies."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from meshca.serve.server import MeshcaServer
from tests.serve_harness import (
    client_svid,
    default_config,
    fetch,
    kube_id,
    make_data_dir,
    mtls_channel,
    served,
    short_tempdir,
    uds_channel,
)

pytestmark = pytest.mark.timeout(60)

FRONT = kube_id("shop", "front")
THIEF = kube_id("shop", "thief")
MESH = """
services:
  - {name: ledger, namespace: bank, ports: [8443], service_accounts: [ledger-v1, ledger-v2]}
  - {name: front, namespace: shop, ports: [80], service_accounts: [front]}
access:
  mode: strict
  policies:
    - {service: bank/ledger, from: [shop/front]}
"""
OUTBOUND = "root-cert-for-mtls-outbound:bank/ledger"


@pytest.fixture
async def server() -> AsyncIterator[MeshcaServer]:
    with short_tempdir() as root:
        make_data_dir(root)
        (root / "mesh.yaml").write_text(MESH)
        config = default_config(
            root, mesh_file=Path(root / "mesh.yaml"), uds_identities={os.getuid(): (THIEF,)}
        )
        async with served(config) as running:
            yield running


def peers(secret: object) -> list[str]:
    context = secret.validation_context  # type: ignore[attr-defined]
    return [m.matcher.exact for m in context.match_typed_subject_alt_names]


async def test_an_allowed_caller_learns_the_identities_behind_the_service(
    server: MeshcaServer,
) -> None:
    async with mtls_channel(server, client_svid(server, FRONT)) as channel:
        [secret] = await fetch(channel, [OUTBOUND])
    assert peers(secret) == [str(kube_id("bank", "ledger-v1")), str(kube_id("bank", "ledger-v2"))]


async def test_a_denied_caller_learns_nothing_on_either_transport(server: MeshcaServer) -> None:
    async with (
        mtls_channel(server, client_svid(server, THIEF)) as tls,
        uds_channel(server) as uds,
    ):
        for channel in (tls, uds):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await fetch(channel, [OUTBOUND])
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "ledger-v" not in (refused.value.details() or "")
            assert "may not call service bank/ledger" in (refused.value.details() or "")
        assert await fetch(uds, ["ROOTCA"])  # the bundle alone stays public to callers

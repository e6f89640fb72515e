"""What a caller can put in meshca's log is bounded, and a refusal is never hidden
(issue 11, items 12 and 13). The caller is a mapped workload on the Unix socket of a
real ``meshca serve``; the log is its stderr."""

from __future__ import annotations

import os
from collections.abc import Iterator

import grpc
import pytest
from envoy.service.secret.v3 import sds_pb2_grpc

from meshca.util.logs import REDACTED
from tests.sds_harness import Stream, sotw
from tests.serve_harness import ServeProcess, kube_id, make_data_dir, serving, short_tempdir

pytestmark = pytest.mark.timeout(120)

A = kube_id("shop", "web")
B = kube_id("shop", "buyer")


@pytest.fixture
def server() -> Iterator[ServeProcess]:
    with short_tempdir() as root:
        data = make_data_dir(root)
        with serving(root, data, "--uds-identity", f"{os.getuid()}={A}") as process:
            yield process


def stub(channel: grpc.aio.Channel) -> sds_pb2_grpc.SecretDiscoveryServiceStub:
    return sds_pb2_grpc.SecretDiscoveryServiceStub(channel)


async def test_a_flood_of_huge_nacks_writes_a_few_short_lines(server: ServeProcess) -> None:
    before = server.stderr.stat().st_size
    async with grpc.aio.insecure_channel(f"unix:{server.uds}") as channel:
        stream = Stream(stub(channel).StreamSecrets())
        await stream.send(sotw(["default"]))
        first = await stream.recv()
        for _ in range(30):  # 30 NACKs of 3 MB each (90 MB of error_detail)
            await stream.send(
                sotw(
                    ["default"],
                    nonce=first.nonce,
                    version=first.version_info,
                    error="x" * 3_000_000,
                )
            )
        # a request after them all: once it is answered, every NACK has been handled
        await stream.send(
            sotw(["default", "ROOTCA"], nonce=first.nonce, version=first.version_info)
        )
        await stream.recv()
        stream.cancel()
    written = server.stderr.read_bytes()[before:].decode()
    nacks = [line for line in written.splitlines() if "rejected version" in line]
    assert len(written) < 16_384, f"{len(written)} bytes logged"
    assert 1 <= len(nacks) <= 2, nacks  # the rest are held back and counted
    assert "more characters]" in nacks[0]


async def test_a_refusal_echoes_a_bounded_part_of_the_request(server: ServeProcess) -> None:
    before = server.stderr.stat().st_size
    names = [f"service-cert:shop/{'n' * 100}{i}" for i in range(5000)]  # about 600 KB
    async with grpc.aio.insecure_channel(f"unix:{server.uds}") as channel:
        stream = Stream(stub(channel).StreamSecrets())
        await stream.send(sotw(names, node_id=str(B)))  # a node that claims B
        error = await stream.error()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert len(error.details() or "") <= 2048
    written = server.stderr.read_bytes()[before:].decode()
    [refusal] = [line for line in written.splitlines() if "refused" in line]
    assert "and 4997 more" in refusal  # a few names, then a count
    assert len(refusal) < 4096


async def test_key_material_in_a_request_is_redacted_and_the_refusal_kept(
    server: ServeProcess,
) -> None:
    planted = "-----BEGIN PRIVATE KEY-----MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEH"
    async with grpc.aio.insecure_channel(f"unix:{server.uds}") as channel:
        stream = Stream(stub(channel).StreamSecrets())
        await stream.send(sotw([str(B), planted], node_id=str(B)))  # impersonating B
        error = await stream.error()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    log = server.log()
    assert "PRIVATE KEY" not in log and "AgEAMBMGByqGSM49AgEG" not in log
    [refusal] = [line for line in log.splitlines() if "claims an identity not the caller's" in line]
    assert str(A) in refusal and "PERMISSION_DENIED" in refusal  # who tried, and what
    assert REDACTED in refusal


async def test_a_uid_holding_thousands_of_identities_gets_short_refusals_and_log_lines() -> None:
    """Every line logged for a caller names its identities (the call's context): a few
    and a count, however many it holds; so does the refusal it is sent and the start-up
    banner. Mapping thousands of identities to one uid starts as quickly as a few."""
    many = [kube_id("fleet", f"workload-{i}") for i in range(3000)]
    flags: list[str] = []
    for start in range(0, len(many), 500):  # each argument below the kernel's 128 KB
        flags += ["--uds-identity", ",".join(f"{os.getuid()}={i}" for i in many[start:][:500])]
    with short_tempdir() as root:
        data = make_data_dir(root)
        with serving(root, data, *flags) as server:
            async with grpc.aio.insecure_channel(f"unix:{server.uds}") as channel:
                refused = Stream(stub(channel).StreamSecrets())
                await refused.send(sotw([str(B)], node_id=str(many[7])))
                error = await refused.error()
                served = Stream(stub(channel).StreamSecrets())
                await served.send(sotw([str(many[1234])], node_id=str(many[1234])))
                answer = await served.recv()
                served.cancel()
            log = server.log()
            banner = server.stdout.read_text()
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "2997 more" in (error.details() or "") and len(error.details() or "") < 1024
    assert len(answer.resources) == 1  # its own certificate, issued and served
    issued = [line for line in log.splitlines() if f"issued {many[1234]}" in line]
    assert issued and "2997 more" in issued[0], log[-2000:]
    assert max(len(line) for line in log.splitlines()) < 4096
    assert "2997 more" in banner and max(len(line) for line in banner.splitlines()) < 1024

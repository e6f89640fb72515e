"""Metrics scraped over HTTP and the health service, on a real ``meshca serve`` in process.

Callers are real gRPC clients over the Unix socket (this process's uid is mapped to two
identities) and, for the main port's health, over mutual TLS; ``/metrics`` is fetched
with an HTTP client and parsed with prometheus_client's own parser. The failing backend
is real: a real OpenBao server (Vault's API) signing every SVID, stopped with SIGSTOP
and resumed; and a signing CA that expires while the server runs (nothing can be
signed), then a new signing CA under the same root, as the rotation would install it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from meshca.backends.opened import OpenedBackend
from meshca.backends.vault.backend import open_vault_authority
from meshca.backends.vault.settings import VaultSettings
from meshca.issuer import ActiveSigner, Issuer, Signer, TrustBundle, TtlError
from meshca.issuer.keys import generate_private_key
from meshca.issuer.profile import build_ca
from meshca.serve.health import evaluate, life_left
from meshca.serve.metrics import Metrics
from meshca.serve.server import SDS_SERVICE, MeshcaServer, ServeError
from meshca.util.retry import Backoff
from tests.bao_harness import (
    TRUST_DOMAIN,
    WORKLOAD_ROLE,
    BaoServer,
    prepared,
    running,
    workload_role,
)
from tests.sds_harness import wait_until
from tests.serve_harness import (
    TD,
    client_svid,
    default_config,
    fetch,
    kube_id,
    make_data_dir,
    mtls_channel,
    request,
    served,
    short_tempdir,
    uds_channel,
)

pytestmark = pytest.mark.timeout(60)

A = kube_id("a", "a")
B = kube_id("b", "b")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, str, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with _OPENER.open(req, timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read().decode()


async def scrape(server: MeshcaServer) -> Samples:
    """GET /metrics (from another thread: the endpoint runs on the server's own loop)."""
    assert server.metrics_server.port
    status, content_type, body = await asyncio.to_thread(_get, server.metrics_server.port)
    assert status == 200, body
    assert content_type.startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def health_of(channel: grpc.aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    status: int = response.status
    return status


def health_channel(server: MeshcaServer) -> grpc.aio.Channel:
    """What the kubelet's probe uses: plaintext, no client certificate."""
    return grpc.aio.insecure_channel(f"127.0.0.1:{server.health_port}")


def leaf_of(secret: Any) -> x509.Certificate:
    return x509.load_pem_x509_certificate(secret.tls_certificate.certificate_chain.inline_bytes)


def chain_of(secret: Any) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)


@pytest.fixture
def root() -> Iterator[Path]:
    with short_tempdir("mca-mh-") as path:
        yield path


@pytest.fixture
async def server(root: Path) -> AsyncIterator[MeshcaServer]:
    """Unix socket only (so the only served certificates are the callers'), with metrics
    and the plaintext health listener on free loopback ports."""
    make_data_dir(root)
    config = default_config(
        root,
        listen=None,
        uds_identities={os.getuid(): (A, B)},
        metrics_listen=("127.0.0.1", 0),
        health_listen=("127.0.0.1", 0),
        health_interval=0.1,
    )
    async with served(config) as running:
        yield running


# --- metrics ---------------------------------------------------------------------------------


async def test_an_sds_fetch_counts_an_issuance_and_sets_the_soonest_expiry(
    server: MeshcaServer,
) -> None:
    before = await scrape(server)
    assert value(before, "meshca_certificates_issued_total", backend="local", result="success") == 0
    assert ("meshca_served_certificate_soonest_expiry_timestamp_seconds", frozenset()) not in before
    async with uds_channel(server) as channel:
        (first,) = await fetch(channel, [str(A)])
        after = await scrape(server)
        assert (
            value(after, "meshca_certificates_issued_total", backend="local", result="success") == 1
        )
        assert value(after, "meshca_certificate_issue_seconds_count", backend="local") == 1
        assert value(after, "meshca_served_certificates") == 1
        soonest = "meshca_served_certificate_soonest_expiry_timestamp_seconds"
        assert value(after, soonest) == leaf_of(first).not_valid_after_utc.timestamp()

        (second,) = await fetch(channel, [str(B)])
        (again,) = await fetch(channel, [str(A)])  # served from the store: no issuance
    last = await scrape(server)
    assert value(last, "meshca_certificates_issued_total", backend="local", result="success") == 2
    assert value(last, "meshca_served_certificates") == 2
    expiries = [leaf_of(s).not_valid_after_utc.timestamp() for s in (first, second)]
    assert value(last, soonest) == min(expiries)
    assert leaf_of(again).serial_number == leaf_of(first).serial_number
    assert value(last, "meshca_xds_fetches_total") == 3
    # the signing CA and the bundle's root, as the server holds them
    signer = server.authority.signer  # type: ignore[attr-defined]
    assert value(last, "meshca_signing_ca_expiry_timestamp_seconds", backend="local") == (
        signer.not_after.timestamp()
    )
    (root_cert,) = server.store.bundle()
    bundle_expiry = "meshca_trust_bundle_soonest_expiry_timestamp_seconds"
    assert value(last, bundle_expiry) == root_cert.not_valid_after_utc.timestamp()
    assert value(last, "meshca_health_serving") == 1
    assert value(last, "meshca_build_info", version="0.1.0") == 1


async def test_streams_pushes_nacks_and_push_to_ack_latency(server: MeshcaServer) -> None:
    secret = {"type": "Secret"}
    before = await scrape(server)
    assert value(before, "meshca_xds_streams", service="sds", kind="sotw") == 0
    assert value(before, "meshca_xds_nacks_total", **secret) == 0
    async with uds_channel(server) as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        nacking = stub.StreamSecrets()
        await nacking.write(request([str(A)]))
        pushed = await nacking.read()
        acking = stub.StreamSecrets()
        await acking.write(request([str(B)]))
        acked = await acking.read()

        during = await scrape(server)
        assert value(during, "meshca_xds_streams", service="sds", kind="sotw") == 2
        assert value(during, "meshca_xds_streams", service="sds", kind="delta") == 0
        assert value(during, "meshca_xds_pushes_total", **secret) == 2

        rejection = status_pb2.Status(code=3, message="the key does not match")
        await nacking.write(
            request([str(A)], response_nonce=pushed.nonce, version_info="", error_detail=rejection)
        )
        await acking.write(
            request([str(B)], response_nonce=acked.nonce, version_info=acked.version_info)
        )

        async def answered() -> bool:
            now = await scrape(server)
            return (
                value(now, "meshca_xds_nacks_total", **secret) == 1
                and value(now, "meshca_xds_acks_total", **secret) == 1
            )

        await wait_until(answered, timeout=20, what="the NACK and the ACK to be counted")
        counted = await scrape(server)
        assert value(counted, "meshca_xds_push_to_ack_seconds_count") == 1  # ACKs only
        assert value(counted, "meshca_xds_push_to_ack_seconds_sum") > 0
        assert value(counted, "meshca_xds_push_to_ack_seconds_bucket", le="+Inf") == 1
        nacking.cancel()
        acking.cancel()

        async def closed() -> bool:
            now = await scrape(server)
            return value(now, "meshca_xds_streams", service="sds", kind="sotw") == 0

        await wait_until(closed, timeout=20, what="the streams gauge to drop to 0")
    final = await scrape(server)
    assert value(final, "meshca_xds_streams_opened_total") == 2


async def test_the_metrics_endpoint_answers_only_get_metrics(server: MeshcaServer) -> None:
    port = server.metrics_server.port
    assert port
    status, _, _ = await asyncio.to_thread(_get, port, "/metrics", "HEAD")
    assert status == 200
    status, _, body = await asyncio.to_thread(_get, port, "/", "GET")
    assert (status, body) == (404, "not found: try /metrics\n")
    status, _, _ = await asyncio.to_thread(_get, port, "/metrics", "POST")
    assert status == 405

    def garbage() -> bytes:  # not HTTP at all: answered 400, the server carries on
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"\x16\x03\x01 hello\r\n\r\n")
            return sock.recv(100)

    assert (await asyncio.to_thread(garbage)).startswith(b"HTTP/1.1 400 ")
    assert value(await scrape(server), "meshca_health_serving") == 1


def test_each_server_has_its_own_registry() -> None:
    """Two servers in one process never mix their numbers (no global registry)."""
    first, second = Metrics("local"), Metrics("local")
    first.observe_issue(0.01, None)
    assert b'meshca_certificates_issued_total{backend="local",result="success"} 1.0' in (
        first.exposition()
    )
    assert b'meshca_certificates_issued_total{backend="local",result="success"} 0.0' in (
        second.exposition()
    )


async def test_a_busy_metrics_or_health_port_is_one_clear_error(root: Path) -> None:
    make_data_dir(root)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for flag, field in (
            ("--metrics-listen", "metrics_listen"),
            ("--health-listen", "health_listen"),
        ):
            config = default_config(root, listen=None, **{field: ("127.0.0.1", port)})
            server = MeshcaServer(config)
            with pytest.raises(ServeError, match=f"^{flag}: ") as caught:
                await server.start()
            assert "\n" not in str(caught.value)
            assert not (root / "sds.sock").exists(), "the failed server cleaned up"


# --- the health policy ------------------------------------------------------------------------


def test_the_policy_keeps_serving_through_an_outage_while_certificates_are_comfortable() -> None:
    """Backend down: SERVING while every served certificate has more than 1/4 of its life
    left, NOT_SERVING once one has less; backend up: SERVING."""
    root_key = generate_private_key()
    root_cert = build_ca(TD, root_key, timedelta(days=30))
    authority = ActiveSigner(Signer(root_key, root_cert), TrustBundle.of(TD, [root_cert]))
    svid = Issuer(authority).issue(A, ttl=timedelta(hours=1))
    issued = svid.not_before + timedelta(minutes=1)  # the backdating skew
    served = [(A, svid)]
    early = issued + timedelta(minutes=40)  # a third of its life left
    late = issued + timedelta(minutes=50)  # a sixth left
    assert life_left(svid, early) == pytest.approx(1 / 3, abs=0.01)
    down = "the signing backend is unreachable (connection refused)"
    assert evaluate(ca_loaded=True, backend=down, served=served, now=early).serving
    verdict = evaluate(ca_loaded=True, backend=down, served=served, now=late)
    assert not verdict.serving
    assert str(A) in verdict.reason and "unreachable" in verdict.reason
    assert evaluate(ca_loaded=True, backend=None, served=served, now=late).serving
    assert evaluate(ca_loaded=True, backend=down, served=[], now=late).serving
    assert not evaluate(ca_loaded=False, backend=None, served=served, now=early).serving
    # meshca's own serving certificate must be valid, whatever the backend's state
    own = evaluate(ca_loaded=True, backend=None, served=served, now=late, own=(B, None))
    assert not own.serving and str(B) in own.reason
    expired = svid.not_after + timedelta(seconds=1)
    assert not evaluate(ca_loaded=True, backend=None, served=[], now=expired, own=(A, svid)).serving
    assert evaluate(ca_loaded=True, backend=None, served=[], now=late, own=(A, svid)).serving


def short_lived_authority(lifetime: timedelta) -> tuple[ActiveSigner, Signer]:
    """A root that lasts, and a signing CA under it that expires after ``lifetime``."""
    root_key = generate_private_key()
    root_cert = build_ca(TD, root_key, timedelta(days=30))
    root_signer = Signer(root_key, root_cert)
    key = generate_private_key()
    cert = build_ca(TD, key, lifetime, parent=root_signer, role="intermediate", path_length=0)
    return ActiveSigner(Signer(key, cert), TrustBundle.of(TD, [root_cert])), root_signer


async def test_health_flips_when_the_signing_ca_expires_and_recovers_with_a_new_one(
    root: Path,
) -> None:
    """Both the plaintext health port and the main server (its Unix socket and, while its
    serving certificate is valid, its mutual-TLS port) report the same status."""
    # The shortest CA serve accepts for 2 s leaves: 6 leaf lifetimes from issuance.
    authority, root_signer = short_lived_authority(timedelta(seconds=12.5))
    config = default_config(
        root,
        uds_identities={os.getuid(): (A,)},
        leaf_ttl=timedelta(seconds=2),
        metrics_listen=("127.0.0.1", 0),
        health_listen=("127.0.0.1", 0),
        health_interval=0.1,
    )
    client = client_svid_from(authority)
    async with (
        served(config, backend=OpenedBackend.in_process(authority)) as server,
        health_channel(server) as probe,
        uds_channel(server) as main,
    ):
        async with mtls_channel(server, client) as tls:
            for service in ("", SDS_SERVICE):
                assert await health_of(tls, service) == SERVING
        assert await health_of(probe) == SERVING
        assert await health_of(main) == SERVING
        (secret,) = await fetch(main, [str(A)])
        assert chain_of(secret)[1] == authority.signer.certificate

        # The signing CA expires: nothing can be signed, every served certificate ends.
        async def down() -> bool:
            return await health_of(probe) == NOT_SERVING

        await wait_until(down, timeout=30, what="the health port to report NOT_SERVING")
        for service in ("", SDS_SERVICE):
            assert await health_of(main, service) == NOT_SERVING
        assert await health_of(probe, SDS_SERVICE) == NOT_SERVING
        outage = await scrape(server)
        assert value(outage, "meshca_health_serving") == 0
        assert value(outage, "meshca_backend_errors_total", backend="local", error="signer") >= 1
        assert value(outage, "meshca_certificates_issued_total", backend="local", result="failure")

        # A new signing CA under the same root: renewals succeed again.
        key = generate_private_key()
        cert = build_ca(TD, key, timedelta(days=1), parent=root_signer, role="intermediate")
        authority.activate(Signer(key, cert))

        async def up() -> bool:
            return await health_of(probe) == SERVING

        await wait_until(up, timeout=20, what="the health port to report SERVING again")
        assert await health_of(main) == SERVING
        (renewed,) = await fetch(main, [str(A)])
        assert chain_of(renewed)[1] == cert
        async with mtls_channel(server, client_svid(server, B)) as tls:
            assert await health_of(tls) == SERVING  # a renewed serving certificate, too
        assert value(await scrape(server), "meshca_health_serving") == 1


async def test_an_issuance_failure_and_the_recovery_are_judged_at_once_and_nothing_else(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Health learns of a failed issuance, and of the next success, without waiting for
    its interval (an hour here); a success after a success changes nothing it judges, so
    it does not re-evaluate (that cost the event loop more than the issuance itself)."""
    make_data_dir(root)
    config = default_config(
        root, listen=None, uds_identities={os.getuid(): (A,)}, health_interval=3600.0
    )
    async with served(config) as server:
        monitor = server.health_monitor
        checks: list[str] = []
        check = monitor.check

        def counted() -> Any:
            verdict = check()
            checks.append(verdict.reason)
            return verdict

        monkeypatch.setattr(monitor, "check", counted)
        with pytest.raises(TtlError):
            server.issuer.issue(A, ttl=timedelta(days=1000))  # refused: over the maximum
        await wait_until(
            lambda: "the last issuance failed" in monitor.verdict.reason,
            what="health to hear of the failed issuance",
        )
        server.issuer.issue(A)
        await wait_until(
            lambda: "the last issuance failed" not in monitor.verdict.reason,
            what="health to hear of the successful issuance",
        )
        judged = len(checks)
        for _ in range(20):
            server.issuer.issue(A)
        await asyncio.sleep(0.1)  # time for any evaluation the issuances woke
        assert len(checks) == judged, checks[judged:]


def client_svid_from(authority: ActiveSigner) -> Any:
    return Issuer(authority).issue(B, ttl=timedelta(minutes=1))


def test_served_certificate_lifetimes_are_measured_from_issuance() -> None:
    """A leaf's life starts at issuance, not at its backdated NotBefore: a 1 h leaf just
    issued has all of its life left (the health policy and the renewal schedule agree)."""
    root_key = generate_private_key()
    root_cert = build_ca(TD, root_key, timedelta(days=30))
    authority = ActiveSigner(Signer(root_key, root_cert), TrustBundle.of(TD, [root_cert]))
    svid = Issuer(authority).issue(A, ttl=timedelta(hours=1))
    now = datetime.now(UTC)
    assert life_left(svid, now) > 0.99
    assert life_left(svid, svid.not_after) == 0.0
    # a recorded issuance time counts when it lies within the certificate's validity;
    # one before NotBefore (a clock step) is taken as NotBefore
    halfway = svid.not_before + (svid.not_after - svid.not_before) / 2
    assert life_left(svid, halfway, issued=svid.not_before) == pytest.approx(0.5, abs=0.01)
    before = svid.not_before - timedelta(hours=1)
    assert life_left(svid, halfway, issued=before) == pytest.approx(0.5, abs=0.01)


@pytest.mark.vault
async def test_health_and_metrics_follow_a_real_vault_outage(root: Path) -> None:
    """Per-workload Vault signs every SVID (4 s lifetimes). Vault hangs (SIGSTOP): the
    renewal times out, the backend is unreachable and the served certificate runs low:
    NOT_SERVING on both ports. Vault resumes (SIGCONT): SERVING again."""
    with running(BaoServer.dev) as bao:
        prepared(bao)
        # Vault backdates NotBefore by 30 s unless told otherwise; meshca measures a
        # certificate's life from NotBefore plus its own 60 s skew, so match it here
        # (with 4 s lifetimes the difference would be all of the certificate's life).
        role = {**workload_role(TRUST_DOMAIN), "not_before_duration": "60s"}
        bao.client().write_data(f"pki/roles/{WORKLOAD_ROLE}", data=role)
        vault = VaultSettings.from_mapping(
            {
                "addr": bao.url,
                "token": bao.token(["meshca-per-workload"]),
                "mode": "per-workload",
                "role": WORKLOAD_ROLE,
                "timeout": 1,
            }
        )
        leaf_ttl = timedelta(seconds=4)
        authority = open_vault_authority(
            vault, TD, leaf_ttl=leaf_ttl, backoff=Backoff(initial=0.1, maximum=0.5)
        )
        config = default_config(
            root,
            listen=None,
            uds_identities={os.getuid(): (A,)},
            leaf_ttl=leaf_ttl,
            metrics_listen=("127.0.0.1", 0),
            health_listen=("127.0.0.1", 0),
            health_interval=0.1,
        )
        try:
            async with (
                served(config, backend=authority.opened()) as server,
                health_channel(server) as probe,
                uds_channel(server) as main,
            ):
                assert await health_of(probe) == SERVING
                (secret,) = await fetch(main, [str(A)])
                assert leaf_of(secret).issuer != leaf_of(secret).subject
                before = await scrape(server)
                assert value(before, "meshca_backend_healthy", backend="vault") == 1
                assert (
                    value(
                        before,
                        "meshca_certificates_issued_total",
                        backend="vault",
                        result="success",
                    )
                    == 1
                )

                bao.pause()
                try:

                    async def down() -> bool:
                        return await health_of(probe) == NOT_SERVING

                    await wait_until(down, timeout=20, what="NOT_SERVING during the Vault outage")
                    assert await health_of(main) == NOT_SERVING
                    outage = await scrape(server)
                    assert value(outage, "meshca_backend_healthy", backend="vault") == 0
                    errors = "meshca_backend_errors_total"
                    assert value(outage, errors, backend="vault", error="unavailable") >= 1
                    assert value(outage, "meshca_health_serving") == 0
                finally:
                    bao.resume()

                async def up() -> bool:
                    return await health_of(probe) == SERVING

                await wait_until(up, timeout=20, what="SERVING once Vault answers again")
                assert await health_of(main) == SERVING
                (renewed,) = await fetch(main, [str(A)])
                assert leaf_of(renewed).serial_number != leaf_of(secret).serial_number
                assert value(await scrape(server), "meshca_backend_healthy", backend="vault") == 1
        finally:
            authority.close()

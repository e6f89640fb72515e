"""``meshca serve`` wiring: mTLS on TCP with a renewing serving SVID, the Unix socket with
uid mapping, health and reflection, mesh-file reload, start-up refusals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from meshca.backends.local import load_local_ca
from meshca.cli.commands.serve import config_from
from meshca.cli.main import build_parser
from meshca.cli.options import load_settings
from meshca.issuer import ActiveSigner, Issuer, IssuerError, Signer, X509Svid
from meshca.issuer.keys import generate_private_key
from meshca.issuer.profile import build_ca, build_leaf
from meshca.issuer.svid import spiffe_id_of
from meshca.serve.config import ServeConfig
from meshca.serve.mesh_reload import MeshFile
from meshca.serve.server import SDS_SERVICE, MeshcaServer, ServeError
from meshca.spiffe import SpiffeId
from meshca.xds.uds import UdsError
from tests.sds_harness import wait_until
from tests.serve_harness import (
    SECRET_TYPE,
    TD,
    client_svid,
    default_config,
    fetch,
    kube_id,
    make_data_dir,
    mtls_channel,
    request,
    secrets_of,
    served,
    serving,
    short_tempdir,
    uds_channel,
)

pytestmark = pytest.mark.timeout(60)

A = kube_id("a", "a")
B = kube_id("b", "b")
MESHCA = kube_id("meshca", "meshca")


@pytest.fixture
def root() -> AsyncIterator[Path]:
    with short_tempdir() as path:
        make_data_dir(path)
        yield path


@pytest.fixture
async def server(root: Path) -> AsyncIterator[MeshcaServer]:
    config = default_config(root, uds_identities={os.getuid(): (A,)})
    async with served(config) as running:
        yield running


def serving_certificate(port: int, client: tuple[Path, Path], bundle: Path) -> x509.Certificate:
    """The certificate meshca presents to a new TLS handshake (a plain TLS client)."""
    context = ssl.create_default_context(cafile=str(bundle))
    context.load_cert_chain(str(client[0]), str(client[1]))
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def write_client_files(
    directory: Path, server: MeshcaServer, spiffe_id: SpiffeId
) -> tuple[Path, Path, Path]:
    svid = client_svid(server, spiffe_id)
    directory.mkdir(exist_ok=True)
    cert, key, bundle = directory / "cert.pem", directory / "key.pem", directory / "bundle.pem"
    cert.write_bytes(svid.chain_pem())
    key.write_bytes(svid.private_key_pem())
    key.chmod(0o600)
    bundle.write_bytes(server.store.bundle().pem())
    return cert, key, bundle


# --- TCP with mutual TLS ---------------------------------------------------------------


async def test_a_standard_grpc_client_verifies_meshca_and_sees_health_and_reflection(
    server: MeshcaServer,
) -> None:
    async with mtls_channel(server, client_svid(server, A), host="localhost") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SDS_SERVICE):
            response = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = set()
        async for reply in replies:
            names |= {s.name for s in reply.list_services_response.service}
        assert {SDS_SERVICE, "grpc.health.v1.Health"} <= names


async def test_the_serving_certificate_is_meshcas_own_svid_with_dns_names(
    server: MeshcaServer, root: Path
) -> None:
    assert server.tcp_port
    cert, key, bundle = write_client_files(root / "client", server, A)
    served_cert = await asyncio.to_thread(serving_certificate, server.tcp_port, (cert, key), bundle)
    assert spiffe_id_of(served_cert) == MESHCA
    sans = served_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == [
        "localhost",
        "meshca",
        "meshca.meshca",
        "meshca.meshca.svc",
        "meshca.meshca.svc.cluster.local",
    ]


@pytest.mark.parametrize("case", ["no client certificate", "certificate from another CA"])
async def test_tcp_callers_without_a_trusted_client_certificate_are_refused(
    server: MeshcaServer, root: Path, case: str
) -> None:
    bundle = server.store.bundle().pem()
    if case == "no client certificate":
        credentials = grpc.ssl_channel_credentials(bundle)
    else:
        with short_tempdir() as other:
            stranger = Issuer(load_local_ca(make_data_dir(other)).authority())
            svid = stranger.issue(A)
        credentials = grpc.ssl_channel_credentials(bundle, svid.private_key_pem(), svid.chain_pem())
    async with grpc.aio.secure_channel(f"localhost:{server.tcp_port}", credentials) as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.FetchSecrets(request(["default"]), timeout=5)
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_tcp_caller_gets_its_own_certificate(server: MeshcaServer) -> None:
    async with mtls_channel(server, client_svid(server, B)) as channel:
        [secret] = await fetch(channel, ["default"])
    leaf = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)[0]
    assert spiffe_id_of(leaf) == B


async def test_new_handshakes_use_the_renewed_serving_certificate(
    server: MeshcaServer, root: Path
) -> None:
    assert server.tcp_port
    cert, key, bundle = write_client_files(root / "client", server, A)
    before = await asyncio.to_thread(serving_certificate, server.tcp_port, (cert, key), bundle)
    renewed = await server.store.renew(server.server_id)
    assert renewed.serial != before.serial_number
    after = await asyncio.to_thread(serving_certificate, server.tcp_port, (cert, key), bundle)
    assert after.serial_number == renewed.serial
    # and gRPC clients keep working across the switch
    async with mtls_channel(server, client_svid(server, A)) as channel:
        assert await fetch(channel, ["ROOTCA"])


async def test_a_bundle_change_reaches_new_handshakes(server: MeshcaServer) -> None:
    """A client whose certificate chains to a root added later is accepted once the
    bundle carries that root."""
    new_root_key = generate_private_key()
    new_root = Signer(new_root_key, build_ca(TD, new_root_key, timedelta(days=3650)))
    leaf_key = generate_private_key()
    leaf = build_leaf(new_root, leaf_key.public_key(), A, timedelta(hours=1))
    newcomer = X509Svid(A, (leaf,), leaf_key)
    roots = server.store.bundle()

    async def try_fetch() -> grpc.StatusCode:
        credentials = grpc.ssl_channel_credentials(
            server.store.bundle().pem(), newcomer.private_key_pem(), newcomer.chain_pem()
        )
        async with grpc.aio.secure_channel(f"localhost:{server.tcp_port}", credentials) as ch:
            try:
                await sds_pb2_grpc.SecretDiscoveryServiceStub(ch).FetchSecrets(
                    request(["ROOTCA"]), timeout=5
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

    assert await try_fetch() == grpc.StatusCode.UNAVAILABLE
    authority = server.authority
    assert isinstance(authority, ActiveSigner)
    authority.activate(authority.signer, roots.with_root(new_root.certificate))
    assert server.store.refresh_bundle()
    assert await try_fetch() == grpc.StatusCode.OK


# --- the Unix socket --------------------------------------------------------------------


async def test_a_mapped_uid_gets_its_identity_over_the_unix_socket(server: MeshcaServer) -> None:
    async with uds_channel(server) as channel:
        [secret] = await fetch(channel, ["default"])
    leaf = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)[0]
    assert spiffe_id_of(leaf) == A
    assert secret.tls_certificate.private_key.inline_bytes.startswith(b"-----BEGIN PRIVATE KEY")


async def test_thousands_of_streams_opened_at_once_are_all_served(server: MeshcaServer) -> None:
    """More streams than gRPC Core's default pending-call limit (3,000), all at once on
    one connection: none is refused (Core would end the surplus RESOURCE_EXHAUSTED)."""
    streams = 3500

    async def subscribe(stub: Any) -> int:
        call = stub.StreamSecrets()
        try:
            await call.write(request(["ROOTCA"]))
            response = await call.read()
            return len(response.resources)
        except grpc.aio.AioRpcError:
            return 0
        finally:
            call.cancel()

    async with uds_channel(server) as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        served_counts = await asyncio.gather(*(subscribe(stub) for _ in range(streams)))
    assert served_counts.count(1) == streams


async def test_the_unix_socket_is_0660_and_removed_on_stop(root: Path) -> None:
    server = MeshcaServer(default_config(root, listen=None))
    await server.start()
    socket_path = root / "sds.sock"
    assert oct(socket_path.stat().st_mode & 0o777) == oct(0o660)
    private = server.front_door.private_dir if server.front_door else None
    await server.stop(0)
    assert not socket_path.exists()
    assert private is not None and not private.exists()


async def test_uds_only_serving_needs_no_serving_certificate(root: Path) -> None:
    async with served(default_config(root, listen=None, uds_identities={os.getuid(): (A,)})) as s:
        assert s.tcp_port is None and s.credentials is None
        assert s.store.cached(s.server_id) is None
        async with uds_channel(s) as channel:
            assert await fetch(channel, ["ROOTCA"])


# --- mesh file ---------------------------------------------------------------------------


MESH_V1 = """
access: {mode: permissive}  # every identity may call (and so validate) every service
services:
  - name: web
    namespace: shop
    ports: [8080]
    service_accounts: [web-v1]
"""
MESH_V2 = MESH_V1 + "\n  - name: api\n    namespace: shop\n    service_accounts: [api]\n"


def outbound_peers(secret: object) -> list[str]:
    context = secret.validation_context  # type: ignore[attr-defined]
    return [m.matcher.exact for m in context.match_typed_subject_alt_names]


async def test_the_mesh_file_is_reloaded_and_a_bad_version_keeps_the_last_good_one(
    root: Path,
) -> None:
    mesh = root / "mesh.yaml"
    mesh.write_text(MESH_V1)
    config = default_config(root, mesh_file=mesh, uds_identities={os.getuid(): (A,)})
    async with served(config) as server, uds_channel(server) as channel:
        [web] = await fetch(channel, ["root-cert-for-mtls-outbound:shop/web"])
        assert outbound_peers(web) == [str(kube_id("shop", "web-v1"))]
        with pytest.raises(grpc.aio.AioRpcError):
            await fetch(channel, ["root-cert-for-mtls-outbound:shop/api"])

        # a streaming proxy watching "api" receives it once the mesh names it
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while True:
                yield await outbox.get()

        await outbox.put(request(["root-cert-for-mtls-outbound:shop/web"]))
        stream = stub.StreamSecrets(requests())
        first = await asyncio.wait_for(stream.read(), 10)
        await outbox.put(
            request(
                ["root-cert-for-mtls-outbound:shop/web"],
                version_info=first.version_info,
                response_nonce=first.nonce,
            )
        )

        mesh.write_text(MESH_V2.replace("[web-v1]", "[web-v1, web-v2]"))
        pushed = await asyncio.wait_for(stream.read(), 10)
        [web] = secrets_of(pushed.resources)
        assert sorted(outbound_peers(web)) == [
            str(kube_id("shop", "web-v1")),
            str(kube_id("shop", "web-v2")),
        ]
        stream.cancel()
        [api] = await fetch(channel, ["root-cert-for-mtls-outbound:shop/api"])
        assert outbound_peers(api) == [str(kube_id("shop", "api"))]

        assert server.mesh_file is not None
        reloads = server.mesh_file.reloads
        mesh.write_text("services: [ {name: broken")
        await wait_until(
            lambda: server.mesh_file is not None and server.mesh_file.failed_reloads,
            what="the failed reload",
        )
        assert server.mesh_file.reloads == reloads
        [api] = await fetch(channel, ["root-cert-for-mtls-outbound:shop/api"])
        assert outbound_peers(api) == [str(kube_id("shop", "api"))]


def test_a_bad_reload_is_reported_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "mesh.yaml"
    path.write_text(MESH_V1)
    changes: list[object] = []
    watcher = MeshFile(path, TD, changes.append)
    path.write_text("services: 7\n")
    assert watcher.check() is False
    assert watcher.check() is False  # unchanged since: not reported again
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1
    assert "still using the previous one" in errors[0].getMessage()
    assert "mesh.yaml" in errors[0].getMessage() and "services" in errors[0].getMessage()
    assert watcher.mesh.service("shop", "web") is not None and changes == []


# --- start-up refusals --------------------------------------------------------------------


def test_a_ca_shorter_than_six_leaf_lifetimes_is_refused(root: Path) -> None:
    # the signing CA of a fresh data directory lives 365 days
    with pytest.raises(ServeError, match="at least 6 x the leaf TTL"):
        MeshcaServer(default_config(root, leaf_ttl=timedelta(days=61)))
    MeshcaServer(default_config(root, leaf_ttl=timedelta(days=60)))


def test_nothing_to_listen_on_is_refused(root: Path) -> None:
    with pytest.raises(ServeError, match="nothing to listen on"):
        MeshcaServer(default_config(root, listen=None, uds=None))


def test_a_uid_mapped_outside_the_trust_domain_is_refused(root: Path) -> None:
    outsider = SpiffeId.parse("spiffe://other.org/ns/a/sa/a")
    with pytest.raises(ServeError, match="outside this CA's trust domain"):
        MeshcaServer(default_config(root, uds_identities={1000: (outsider,)}))


def test_no_uid_may_be_mapped_to_meshcas_own_identity(root: Path) -> None:
    with pytest.raises(ServeError, match="meshca's own identity"):
        MeshcaServer(default_config(root, uds_identities={1000: (A, MESHCA)}))


def test_a_too_open_socket_mode_is_refused(root: Path) -> None:
    with pytest.raises(UdsError, match="too open"):
        MeshcaServer(default_config(root, uds_mode=0o666))


async def test_a_busy_tcp_port_is_a_clear_error(root: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = MeshcaServer(default_config(root, listen=("127.0.0.1", port), uds=None))
        with pytest.raises(ServeError, match=f"cannot listen on 127.0.0.1:{port}"):
            await server.start()
        await server.stop(0)


def test_a_missing_ca_is_a_clear_error() -> None:
    with short_tempdir() as empty, pytest.raises(IssuerError, match="meshca init"):
        MeshcaServer(default_config(empty))


# --- authorization over the Unix socket ----------------------------------------------------

ISTIO_NODE_FOR_B = "sidecar~10.0.0.7~b-6d4f.b~b.svc.cluster.local"
# (resource name, node.id, node metadata): every way of naming B's key
ASKING_FOR_B = [
    ("service-cert:b/b", "", {}),
    (str(B), "", {}),
    ("default", str(B), {}),
    ("default", ISTIO_NODE_FOR_B, {}),
    ("default", "", {"NAMESPACE": "b", "SERVICE_ACCOUNT": "b"}),
    ("ROOTCA", str(B), {}),  # even a public secret is refused to a node claiming B
]


async def _stream_outcome(
    channel: grpc.aio.Channel, rpc: str, name: str, node_id: str, meta: dict[str, str]
) -> tuple[grpc.StatusCode, list[object]]:
    """Run one RPC for ``name``; (final status, secrets received before it ended)."""
    stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
    if rpc == "fetch":
        try:
            response = await stub.FetchSecrets(request([name], node_id, meta=meta), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), []
        return grpc.StatusCode.OK, list(secrets_of(response.resources))
    if rpc == "stream":
        first = request([name], node_id, meta=meta)
        call = stub.StreamSecrets(iter([first]), timeout=10)
    else:
        first_delta = discovery_pb2.DeltaDiscoveryRequest(
            type_url=SECRET_TYPE,
            resource_names_subscribe=[name],
            node=request([], node_id, meta=meta).node,
        )
        call = stub.DeltaSecrets(iter([first_delta]), timeout=10)
    received: list[object] = []
    try:
        async for response in call:
            received.extend(secrets_of(response.resources))
    except grpc.aio.AioRpcError as exc:
        return exc.code(), received
    return await call.code(), received


@pytest.mark.parametrize("rpc", ["fetch", "stream", "delta"])
async def test_a_unix_socket_caller_mapped_to_a_never_obtains_bs_key(root: Path, rpc: str) -> None:
    config = default_config(root, listen=None, uds_identities={os.getuid(): (A,)})
    async with served(config) as server, uds_channel(server) as channel:
        for name, node_id, meta in ASKING_FOR_B:
            code, received = await _stream_outcome(channel, rpc, name, node_id, meta)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (rpc, name, node_id, meta, code)
            assert not [s for s in received if s.tls_certificate.private_key.inline_bytes]
        assert server.store.cached(B) is None  # B's key was never even generated
        # the control: the same caller does get its own key by each scheme
        for name in ("default", str(A), "service-cert:a/a"):
            code, received = await _stream_outcome(channel, "fetch", name, "", {})
            assert code == grpc.StatusCode.OK
            [secret] = received
            chain = secret.tls_certificate.certificate_chain.inline_bytes
            assert spiffe_id_of(x509.load_pem_x509_certificates(chain)[0]) == A


@pytest.mark.parametrize("rpc", ["fetch", "stream", "delta"])
async def test_an_unmapped_uid_gets_nothing_on_any_rpc(root: Path, rpc: str) -> None:
    config = default_config(root, listen=None, uds_identities={os.getuid() + 1: (A,)})
    async with served(config) as server, uds_channel(server) as channel:
        for name in ("default", "ROOTCA", str(A), "service-cert:a/a", "spiffe://cluster.local"):
            code, received = await _stream_outcome(channel, rpc, name, "", {})
            # the front door closes an unmapped uid's connection before any call is read
            assert code == grpc.StatusCode.UNAVAILABLE, (rpc, name, code)
            assert received == []


# --- the command line ------------------------------------------------------------------


def serve_settings(argv: list[str], environ: dict[str, str] | None = None) -> ServeConfig:
    args = build_parser().parse_args(["serve", *argv])
    return config_from(load_settings(args, environ or {}))


def test_uds_identities_from_repeated_flags_environment_and_a_config_file_map(
    tmp_path: Path,
) -> None:
    c = kube_id("c", "c")
    config = serve_settings(
        ["--uds", "/run/m.sock", "--uds-identity", f"1000={A}", "--uds-identity", f"1000={B}"]
    )
    assert config.uds_identities == {1000: (A, B)}
    config = serve_settings(["--uds", "/run/m.sock"], {"MESHCA_UDS_IDENTITY": f"7={A},8={B}"})
    assert config.uds_identities == {7: (A,), 8: (B,)}
    file = tmp_path / "meshca.yaml"
    file.write_text(f"uds: m.sock\nuds_identity:\n  1000: {A}\n  1001: [{B}, {c}]\n")
    config = serve_settings(["--config", str(file)])
    assert config.uds_identities == {1000: (A,), 1001: (B, c)}
    assert config.uds == tmp_path / "m.sock"  # relative to the config file
    # the flag wins over the environment, which wins over the file
    config = serve_settings(
        ["--config", str(file), "--uds-identity", f"5={c}"], {"MESHCA_UDS_IDENTITY": f"6={c}"}
    )
    assert config.uds_identities == {5: (c,)}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "nothing to listen on"),
        (["--uds", "s.sock", "--uds-mode", "0666"], "too open"),
        (["--uds", "s.sock", "--uds-mode", "rw"], "octal mode"),
        (["--listen", "localhost"], "not HOST:PORT"),
        (["--uds", "s.sock", "--uds-identity", "alice=spiffe://cluster.local/ns/a/sa/a"], "UID="),
        (["--uds", "s.sock", "--uds-identity", "7=spiffe://other.org/x"], "trust domain"),
        (["--listen", "127.0.0.1:0", "--leaf-ttl", "61d"], "6 x the leaf TTL"),
        (["--listen", "127.0.0.1:0", "--mesh", "/nonexistent/mesh.yaml"], "mesh file"),
        (["--listen", "127.0.0.1:0", "--server-dns", "bad name"], "not a DNS name"),
    ],
)
def test_bad_serve_options_are_one_clear_line(root: Path, argv: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "meshca", "serve", "--data-dir", str(root / "data"), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=root,
        check=False,
    )
    assert result.returncode in (1, 2)
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("meshca: error:") and message in line


def test_meshca_serve_stops_cleanly_on_sigint(root: Path) -> None:
    with serving(root, root / "data", "--uds-identity", f"{os.getuid()}={A}") as process:
        with grpc.insecure_channel(f"unix:{process.uds}") as channel:
            response = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).FetchSecrets(
                request(["default"]), timeout=10
            )
        [secret] = secrets_of(response.resources)
        assert secret.tls_certificate.private_key.inline_bytes
        process.process.send_signal(signal.SIGINT)
        assert process.process.wait(timeout=30) == 0
        stderr = process.log()
    assert "Traceback" not in stderr
    assert "PRIVATE KEY" not in stderr  # keys are never logged
    assert not process.uds.exists()

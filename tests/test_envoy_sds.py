"""Real Envoys get their certificates from a real ``meshca serve`` and talk mTLS.

One ``meshca serve`` process (leaf TTL 8 s, so certificates renew every few seconds
while the tests run) serves three Envoys:

* ``web`` (server side) over the Unix socket, its bootstrap written by ``meshca
  bootstrap --inbound``: an mTLS listener that admits only ``buyer`` and tells the app
  who called (``x-forwarded-client-cert``);
* ``buyer`` (client side) over mutual TLS with a bootstrap certificate from ``meshca
  issue``; its outbound cluster validates ``web`` with OSM's
  ``root-cert-for-mtls-outbound:shop/web`` secret, whose SAN matchers come from the
  mesh file;
* ``intruder``: like ``buyer`` but an identity ``web`` does not admit.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from meshca.envoy.bootstrap import (
    BootstrapSpec,
    ClientTls,
    Outbound,
    build_bootstrap,
    outbound_resources,
    sds_secret,
    validation_from_sds,
)
from meshca.spiffe import SpiffeId
from meshca.util.netaddr import TcpServer
from tests.envoy_harness import (
    EnvoyProcess,
    RecordingApp,
    free_port,
    http_get,
    validate_config,
)
from tests.serve_harness import ServeProcess, meshca, serving, short_tempdir

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(120)]

WEB = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/web")
BUYER = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/buyer")
INTRUDER = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/intruder")
LEAF_TTL = "8s"
MESH = """
access: {mode: permissive}  # every identity may call (and so validate) every service
services:
  - name: web
    namespace: shop
    ports: [8080]
    service_accounts: [web]
"""


def client_config(
    root: Path, server: ServeProcess, identity: SpiffeId, outbound: Outbound
) -> dict[str, object]:
    """An Envoy reaching meshca over mTLS (certificate from ``meshca issue``), with an
    outbound listener whose secrets use the OSM and SPIRE names."""
    cert_dir = root / f"certs-{identity.path.rsplit('/', 1)[-1]}"
    meshca("issue", str(identity), "--data-dir", str(root / "data"), "--out", str(cert_dir))
    assert server.tcp_port is not None
    spec = BootstrapSpec(
        identity=identity,
        server=TcpServer("127.0.0.1", server.tcp_port),
        client_tls=ClientTls.from_dir(cert_dir),
    )
    config = build_bootstrap(spec)
    namespace, account = identity.kubernetes or ("", "")
    if identity == BUYER:  # OSM names; the SAN matchers come from the mesh file
        cert_secret = f"service-cert:{namespace}/{account}"
        validation = {
            "validation_context_sds_secret_config": sds_secret(
                "root-cert-for-mtls-outbound:shop/web"
            )
        }
    else:  # SPIRE names: the ID itself and the trust domain's bundle, pinned to web
        cert_secret = str(identity)
        validation = validation_from_sds("spiffe://cluster.local", (WEB,))
    listener, cluster = outbound_resources(outbound, cert_secret=cert_secret, validation=validation)
    # a fresh TLS handshake per request, so every request shows the current certificates
    cluster["typed_extension_protocol_options"] = {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "common_http_protocol_options": {"max_requests_per_connection": 1},
            "explicit_http_config": {"http_protocol_options": {}},
        }
    }
    static = config["static_resources"]
    static["listeners"] = [listener]
    static["clusters"].append(cluster)
    return config


@dataclass
class Mesh:
    root: Path
    meshca: ServeProcess
    app: RecordingApp
    web: EnvoyProcess
    buyer: EnvoyProcess
    buyer_port: int
    intruder: EnvoyProcess
    intruder_port: int


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with short_tempdir("mca-envoy-") as root, RecordingApp() as app:
        meshca("init", "--data-dir", str(root / "data"))
        (root / "mesh.yaml").write_text(MESH)
        with serving(
            root,
            root / "data",
            *("--listen", "127.0.0.1:0", "--uds-identity", f"{os.getuid()}={WEB}"),
            *("--mesh", str(root / "mesh.yaml"), "--leaf-ttl", LEAF_TTL),
        ) as server:
            assert server.tcp_port is not None, server.log()
            envoys: list[EnvoyProcess] = []
            try:
                web_port = free_port()
                bootstrap = meshca(
                    "bootstrap",
                    str(WEB),
                    "--server",
                    f"unix://{server.uds}",
                    "--inbound",
                    f"{web_port}:{app.port}",
                    "--allow",
                    str(BUYER),
                ).stdout
                web = EnvoyProcess(bootstrap, root, "web")
                envoys.append(web)
                web.start()
                upstream = TcpServer("127.0.0.1", web_port)
                ports = {}
                clients = {}
                for identity in (BUYER, INTRUDER):
                    name = identity.path.rsplit("/", 1)[-1]
                    ports[name] = free_port()
                    outbound = Outbound(ports[name], upstream, WEB)
                    clients[name] = EnvoyProcess(
                        client_config(root, server, identity, outbound), root, name
                    )
                    envoys.append(clients[name])
                    clients[name].start()
                yield Mesh(
                    root,
                    server,
                    app,
                    web,
                    clients["buyer"],
                    ports["buyer"],
                    clients["intruder"],
                    ports["intruder"],
                )
            except BaseException:
                print(server.log(), file=sys.stderr)
                raise
            finally:
                for envoy in envoys:
                    envoy.stop()
                assert server.stop() == 0, server.log()


def uris_of(envoy: EnvoyProcess) -> set[str]:
    """The SPIFFE IDs of the leaf certificates an Envoy received over SDS (admin /certs)."""
    found = set()
    for context in envoy.certs():
        for cert in context.get("cert_chain", []):
            if cert.get("path") == "<inline>":
                found |= {s["uri"] for s in cert.get("subject_alt_names", []) if "uri" in s}
    return found


def test_an_mtls_request_tells_the_app_the_callers_spiffe_id(mesh: Mesh) -> None:
    before = len(mesh.app.requests)
    status, body = http_get(mesh.buyer_port, "/hello")
    assert status == 200, body
    assert body == "hello from the app\n"
    [headers] = mesh.app.requests[before:]
    xfcc = headers["x-forwarded-client-cert"]
    assert f"URI={BUYER}" in xfcc.split(";")
    assert f"By={WEB}" in xfcc.split(";")
    # each Envoy holds its own identity, served by meshca (and nobody else's)
    assert uris_of(mesh.web) == {str(WEB)}
    assert uris_of(mesh.buyer) == {str(BUYER)}


def test_an_identity_the_server_does_not_admit_is_refused(mesh: Mesh) -> None:
    before = len(mesh.app.requests)
    status, _ = http_get(mesh.intruder_port, "/steal")
    assert status == 503  # the TLS handshake with web failed: no response from upstream
    assert len(mesh.app.requests) == before
    assert uris_of(mesh.intruder) == {str(INTRUDER)}  # it did get its own certificate
    failures = {
        name: value
        for name, value in mesh.web.stats("listener.").items()
        if name.endswith(".ssl.fail_verify_san")
    }
    assert sum(failures.values()) >= 1, failures  # web refused the intruder's certificate


def test_renewals_reach_both_envoys_without_a_failed_request(mesh: Mesh) -> None:
    """Leaves live 8 s and renew at about half of that; requests flow all along, each on
    a new mTLS connection."""
    web_before, buyer_before = mesh.web.serials(), mesh.buyer.serials()
    first_request = len(mesh.app.requests)
    assert web_before and buyer_before
    results: list[int] = []
    stop = threading.Event()

    def steady_requests() -> None:
        while not stop.is_set():
            results.append(http_get(mesh.buyer_port, "/steady")[0])
            time.sleep(0.05)

    sender = threading.Thread(target=steady_requests)
    sender.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not (mesh.web.serials() & web_before) and not (mesh.buyer.serials() & buyer_before):
                break
            time.sleep(0.1)
        renewed_at = len(results)
        time.sleep(1.0)  # and requests keep succeeding on the new certificates
    finally:
        stop.set()
        sender.join(timeout=10)
    assert not (mesh.web.serials() & web_before), "web never received a renewed certificate"
    assert not (mesh.buyer.serials() & buyer_before), "buyer never received a renewed certificate"
    assert len(results) > renewed_at > 5
    assert set(results) == {200}, f"{results.count(200)} of {len(results)} succeeded"
    # web saw buyer's old and renewed certificates (XFCC Hash is the client cert's digest)
    hashes = {
        field
        for headers in mesh.app.requests[first_request:]
        for field in headers["x-forwarded-client-cert"].split(";")
        if field.startswith("Hash=")
    }
    assert len(hashes) >= 2, hashes


def test_meshca_bootstrap_output_passes_envoy_validation(mesh: Mesh) -> None:
    cert_dir = mesh.root / "certs-buyer"
    for args in (
        ["--server", f"unix://{mesh.meshca.uds}"],
        ["--server", f"127.0.0.1:{mesh.meshca.tcp_port}", "--cert-dir", str(cert_dir)],
        ["--server", f"localhost:{mesh.meshca.tcp_port}", "--cert-dir", str(cert_dir)],
        [
            "--server",
            f"unix://{mesh.meshca.uds}",
            "--inbound",
            "15006:8080",
            "--allow",
            str(BUYER),
            "--outbound",
            "15001:127.0.0.1:15006",
            "--upstream-id",
            str(WEB),
        ],
    ):
        out = mesh.root / "validate.yaml"
        meshca("bootstrap", str(BUYER), *args, "--out", str(out))
        result = validate_config(out)
        assert result.returncode == 0, result.stdout + result.stderr
        document = yaml.safe_load(out.read_text())
        assert document["node"]["id"] == str(BUYER)
        [sds] = [c for c in document["static_resources"]["clusters"] if c["name"] == "meshca_sds"]
        if "--cert-dir" in args:
            context = sds["transport_socket"]["typed_config"]["common_tls_context"]
            pinned = context["validation_context"]["match_typed_subject_alt_names"]
            assert pinned == [
                {
                    "san_type": "URI",
                    "matcher": {"exact": "spiffe://cluster.local/ns/meshca/sa/meshca"},
                }
            ]

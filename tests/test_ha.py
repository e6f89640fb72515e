"""High availability without shared mutable state: two replicas, one root, two signing keys.

An operator makes a CA whose signing CA may sign one level of CAs (``meshca init
--path-length 1``) and hands its ``cacerts`` files to two replicas; each runs ``meshca
init --from-cacerts DIR --own-intermediate`` on its own data directory, as the init
container of the Deployment does, then ``meshca serve``. Real processes throughout:
two ``meshca serve``, real Envoys over the replicas' Unix sockets, ``openssl verify``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.service.secret.v3 import sds_pb2_grpc

from tests.envoy_harness import EnvoyProcess, RecordingApp, free_port, http_get
from tests.serve_harness import (
    MESHCA,
    clean_env,
    kube_id,
    meshca,
    request,
    secrets_of,
    serving,
    short_tempdir,
)

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(120)]

WEB = kube_id("shop", "web")
BUYER = kube_id("shop", "buyer")
CACERTS = ("ca-cert.pem", "ca-key.pem", "root-cert.pem", "cert-chain.pem")


@dataclass
class Replicas:
    root: Path
    cacerts: Path
    one: Path
    two: Path


@pytest.fixture(scope="module")
def replicas() -> Iterator[Replicas]:
    with short_tempdir("mca-ha-") as root:
        meshca("init", "--path-length", "1", "--data-dir", str(root / "operator"))
        cacerts = root / "cacerts"
        cacerts.mkdir()
        for name in CACERTS:  # what the Secret holds: never the root key
            shutil.copy(root / "operator" / "ca" / name, cacerts / name)
        for replica in ("one", "two"):
            out = meshca(
                "init",
                "--from-cacerts",
                str(cacerts),
                "--own-intermediate",
                "--data-dir",
                str(root / replica),
            )
            assert "this data directory's own" in out.stdout
        yield Replicas(root, cacerts, root / "one", root / "two")


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_replicas_share_the_bundle_and_nothing_they_sign_with(replicas: Replicas) -> None:
    one, two = replicas.one / "ca", replicas.two / "ca"
    assert (one / "root-cert.pem").read_bytes() == (two / "root-cert.pem").read_bytes()
    assert (one / "root-cert.pem").read_bytes() == (replicas.cacerts / "root-cert.pem").read_bytes()
    parent = cert(replicas.cacerts / "ca-cert.pem")
    keys = []
    for ca_dir in (one, two):
        mine = cert(ca_dir / "ca-cert.pem")
        mine.verify_directly_issued_by(parent)
        basic = mine.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert basic.ca and basic.path_length == 0
        chain = x509.load_pem_x509_certificates((ca_dir / "cert-chain.pem").read_bytes())
        assert chain == [mine, parent]
        assert not (ca_dir / "root-key.pem").exists()
        assert (ca_dir / "ca-key.pem").stat().st_mode & 0o777 == 0o600
        key = serialization.load_pem_private_key((ca_dir / "ca-key.pem").read_bytes(), None)
        assert key.public_key() == mine.public_key()
        keys.append(key.public_key())
    assert keys[0] != keys[1], "each replica has its own signing key"
    assert cert(one / "ca-cert.pem").subject != cert(two / "ca-cert.pem").subject
    # the cacerts key is in neither data directory, in any file
    shared = (replicas.cacerts / "ca-key.pem").read_bytes()
    shared_body = b"".join(shared.splitlines()[1:-1])
    for data_dir in (replicas.one, replicas.two):
        for path in data_dir.rglob("*"):
            if path.is_file():
                assert shared_body not in b"".join(path.read_bytes().splitlines()), path


def test_svids_from_either_replica_verify_against_the_shared_root(replicas: Replicas) -> None:
    """``openssl verify`` enforces path lengths: root -> cacerts CA -> replica CA -> SVID."""
    for data_dir in (replicas.one, replicas.two):
        out = data_dir.parent / f"svid-{data_dir.name}"
        meshca("issue", str(WEB), "--data-dir", str(data_dir), "--out", str(out))
        result = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(replicas.cacerts / "root-cert.pem"),
                "-untrusted",
                str(out / "cert.pem"),
                str(out / "cert.pem"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_cacerts_ca_that_may_not_sign_cas_is_refused(replicas: Replicas) -> None:
    plain = replicas.root / "plain"
    meshca("init", "--data-dir", str(plain))  # its signing CA has path length 0
    result = subprocess.run(
        [
            *MESHCA,
            *("init", "--own-intermediate", "--from-cacerts", str(plain / "ca")),
            *("--data-dir", str(replicas.root / "refused")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )
    assert result.returncode == 1
    assert result.stderr.startswith("meshca: error: the adopted CA has path length 0")
    assert result.stderr.count("\n") == 1
    assert not (replicas.root / "refused" / "ca").exists()


def fetch_own(uds: Path, identity: str) -> x509.Certificate:
    """The SVID a replica currently serves for ``identity`` (its leaf)."""
    with grpc.insecure_channel(f"unix:{uds}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        response = stub.FetchSecrets(request([identity], identity), timeout=20)
    (secret,) = secrets_of(response.resources)
    return x509.load_pem_x509_certificate(secret.tls_certificate.certificate_chain.inline_bytes)


def bootstrap(data_dir: Path, identity: str, uds: Path, *listener: str) -> str:
    return meshca(
        "bootstrap", identity, "--data-dir", str(data_dir), "--server", f"unix://{uds}", *listener
    ).stdout


def wait_ok(port: int, path: str, timeout: float = 20.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    while True:
        status, body = http_get(port, path)
        if status == 200 or time.monotonic() > deadline:
            return status, body
        time.sleep(0.1)


def test_an_envoy_moved_to_the_other_replica_keeps_talking_mtls(replicas: Replicas) -> None:
    """``web`` gets its certificate from replica two, ``buyer`` from replica one; buyer
    calls web over mTLS. Replica one goes away: buyer keeps working on what it holds, then
    is restarted against replica two and keeps working on a certificate from there."""
    root = replicas.root
    mapping = f"{os.getuid()}={WEB},{os.getuid()}={BUYER}"
    web_port, buyer_port = free_port(), free_port()
    with (
        RecordingApp() as app,
        serving(root, replicas.one, "--uds-identity", mapping, name="one") as one,
        serving(root, replicas.two, "--uds-identity", mapping, name="two") as two,
    ):
        envoys: list[EnvoyProcess] = []
        try:
            web = EnvoyProcess(
                bootstrap(
                    replicas.two,
                    str(WEB),
                    two.uds,
                    *("--inbound", f"{web_port}:{app.port}", "--allow", str(BUYER)),
                ),
                root,
                "web",
            )
            envoys.append(web)
            web.start()
            outbound = (
                "--outbound",
                f"{buyer_port}:127.0.0.1:{web_port}",
                "--upstream-id",
                str(WEB),
            )
            buyer = EnvoyProcess(
                bootstrap(replicas.one, str(BUYER), one.uds, *outbound), root, "buyer"
            )
            envoys.append(buyer)
            buyer.start()

            status, body = wait_ok(buyer_port, "/across")
            assert status == 200, f"{body}\n{buyer.log_tail()}\n{web.log_tail()}"
            assert f"URI={BUYER}" in app.requests[-1]["x-forwarded-client-cert"].split(";")
            # each Envoy holds the certificate its own replica signed
            first = fetch_own(one.uds, str(BUYER))
            assert first.issuer == cert(replicas.one / "ca" / "ca-cert.pem").subject
            assert buyer.serials() == {format(first.serial_number, "x")}
            web_cert = fetch_own(two.uds, str(WEB))
            assert web_cert.issuer == cert(replicas.two / "ca" / "ca-cert.pem").subject
            assert web.serials() == {format(web_cert.serial_number, "x")}

            # replica one goes away; buyer keeps the certificate it holds
            assert one.stop() == 0
            status, _ = http_get(buyer_port, "/replica-one-gone")
            assert status == 200

            # buyer is restarted against replica two
            buyer.stop()
            moved = EnvoyProcess(
                bootstrap(replicas.two, str(BUYER), two.uds, *outbound), root, "buyer-moved"
            )
            envoys.append(moved)
            moved.start()
            status, body = wait_ok(buyer_port, "/moved")
            assert status == 200, f"{body}\n{moved.log_tail()}"
            second = fetch_own(two.uds, str(BUYER))
            assert second.issuer == cert(replicas.two / "ca" / "ca-cert.pem").subject
            assert moved.serials() == {format(second.serial_number, "x")}
            assert second.serial_number != first.serial_number
            assert f"URI={BUYER}" in app.requests[-1]["x-forwarded-client-cert"].split(";")
        finally:
            for envoy in envoys:
                envoy.stop()
        assert two.stop() == 0, two.log()

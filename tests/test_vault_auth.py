"""Vault authentication against a real OpenBao: token (setting, VAULT_TOKEN, file),
AppRole, Kubernetes and TLS certificate login; renewal, re-login, and clear refusals.

Kubernetes: OpenBao's kubernetes auth method is real, but it verifies the JWT by
calling a Kubernetes TokenReview API; there is none here, so a stand-in TokenReview
endpoint on loopback answers for it (it accepts exactly the JWTs the test issued).
"""

from __future__ import annotations

import base64
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from meshca.backends.errors import BackendError, BackendUnavailable
from meshca.backends.vault.auth import LoginRejected, TokenKeeper
from meshca.backends.vault.backend import (
    VaultAuthority,
    VaultWorkloadAuthority,
    open_vault_authority,
)
from meshca.backends.vault.settings import VaultSettings, VaultSettingsError
from meshca.issuer import Issuer
from meshca.issuer.svid import spiffe_id_of
from meshca.spiffe import SpiffeId, TrustDomain
from tests.bao_harness import WORKLOAD_ROLE, BaoServer, bao, bao_tls

pytestmark = pytest.mark.vault

__all__ = ["bao", "bao_tls"]  # module-scoped OpenBao fixtures

TD = TrustDomain("cluster.local")
WEB = SpiffeId.from_kubernetes("default", "web", TD)
POLICY = "meshca-per-workload"


def per_workload(server: BaoServer, **values: object) -> VaultSettings:
    base: dict[str, object] = {
        "addr": server.url,
        "mode": "per-workload",
        "role": WORKLOAD_ROLE,
        "timeout": 5,
    }
    if server.ca_cert is not None:
        base["ca_cert"] = server.ca_cert
    return VaultSettings.from_mapping({**base, **values})


@contextlib.contextmanager
def opened(config: VaultSettings, *, start: bool = False) -> Iterator[VaultAuthority]:
    """The authority ``config`` opens (its background threads only when ``start``),
    closed on the way out."""
    authority = open_vault_authority(config, TD, start=start)
    try:
        yield authority
    finally:
        authority.close()


def issue_once(config: VaultSettings) -> None:
    with opened(config) as authority:
        assert spiffe_id_of(Issuer(authority).issue(WEB).leaf) == WEB


def keeper_of(authority: object) -> TokenKeeper:
    assert isinstance(authority, VaultWorkloadAuthority)
    return authority.client.keeper


def revoke(server: BaoServer, token: str) -> None:
    server.client().write_data("auth/token/revoke", data={"token": token})


# token -------------------------------------------------------------------------------
def test_token_from_vault_token_variable(bao: BaoServer) -> None:
    env = {
        "VAULT_ADDR": bao.url,
        "VAULT_TOKEN": bao.token([POLICY]),
        "MESHCA_VAULT_MODE": "per-workload",
        "MESHCA_VAULT_ROLE": WORKLOAD_ROLE,
    }
    issue_once(VaultSettings.from_env(env))


def test_token_file_is_reread_when_vault_rejects_the_token(bao: BaoServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    first = bao.token([POLICY])
    token_file.write_text(first + "\n")
    with opened(per_workload(bao, token_file=token_file)) as authority:
        issuer = Issuer(authority)
        issuer.issue(WEB)
        revoke(bao, first)
        token_file.write_text(bao.token([POLICY]))  # what Vault Agent's sink does
        issuer.issue(WEB)
        revoke(bao, token_file.read_text())
        with pytest.raises(BackendError, match=r"token was rejected.*--vault-token-file") as err:
            issuer.issue(WEB)
        assert "\n" not in str(err.value)


def test_renewable_token_is_renewed_at_two_thirds_of_its_ttl(bao: BaoServer) -> None:
    token = bao.token([POLICY], ttl="60s", explicit_max_ttl="1h")
    with opened(per_workload(bao, token=token)) as authority:
        Issuer(authority).issue(WEB)
        keeper = keeper_of(authority)
        grant = keeper.grant
        assert grant is not None and grant.renewable
        keeper.maintain(now=grant.obtained_at + 30)  # before 2/3 of 60 s: nothing to do
        assert keeper.renewals == 0
        keeper.maintain(now=grant.obtained_at + 41)
        assert keeper.renewals == 1 and keeper.logins == 1
        seen = bao.client().write_data("auth/token/lookup", data={"token": token})["data"]
        assert seen["last_renewal_time"] > 0  # Vault saw the renewal
        Issuer(authority).issue(WEB)


def test_background_renewal_keeps_a_short_token_alive(bao: BaoServer) -> None:
    token = bao.token([POLICY], ttl="3s", explicit_max_ttl="1h")
    with opened(per_workload(bao, token=token), start=True) as authority:  # threads started
        Issuer(authority).issue(WEB)
        keeper = keeper_of(authority)
        deadline = time.monotonic() + 20
        while keeper.renewals < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert keeper.renewals >= 2  # renewed twice: past the token's original 3 s
        Issuer(authority).issue(WEB)


def test_non_renewable_static_token_is_used_until_it_expires(bao: BaoServer) -> None:
    token = bao.token([POLICY], ttl="60s", renewable=False)
    with opened(per_workload(bao, token=token)) as authority:
        Issuer(authority).issue(WEB)
        keeper = keeper_of(authority)
        grant = keeper.grant
        assert grant is not None and not grant.renewable
        keeper.maintain(now=grant.obtained_at + 45)  # nothing it can do: warn, keep it
        assert keeper.grant is grant
        Issuer(authority).issue(WEB)


# AppRole ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def approle(bao: BaoServer) -> dict[str, str]:
    admin = bao.client()
    admin.sys.enable_auth_method("approle")
    ids: dict[str, str] = {}
    roles = {
        "meshca": {"token_ttl": "60s"},
        "meshca-capped": {"token_ttl": "3s", "token_max_ttl": "4s"},
        "meshca-batch": {"token_ttl": "60s", "token_type": "batch"},
    }
    for name, params in roles.items():
        admin.write_data(f"auth/approle/role/{name}", data={"token_policies": [POLICY], **params})
        role_id = admin.read(f"auth/approle/role/{name}/role-id")["data"]["role_id"]
        secret = admin.write_data(f"auth/approle/role/{name}/secret-id", data={})["data"]
        ids[f"{name}:role_id"] = role_id
        ids[f"{name}:secret_id"] = secret["secret_id"]
    return ids


def approle_settings(server: BaoServer, approle: dict[str, str], role: str) -> VaultSettings:
    return per_workload(
        server, role_id=approle[f"{role}:role_id"], secret_id=approle[f"{role}:secret_id"]
    )


def test_approle_token_is_renewed_in_place(bao: BaoServer, approle: dict[str, str]) -> None:
    with opened(approle_settings(bao, approle, "meshca")) as authority:
        Issuer(authority).issue(WEB)
        keeper = keeper_of(authority)
        first = keeper.grant
        assert first is not None and first.renewable
        keeper.maintain(now=first.obtained_at + 41)
        assert (keeper.logins, keeper.renewals) == (1, 1)
        assert keeper.grant is not None and keeper.grant.token == first.token


def test_approle_batch_token_is_replaced_by_a_new_login(
    bao: BaoServer, approle: dict[str, str]
) -> None:
    config = approle_settings(bao, approle, "meshca-batch")
    with opened(config) as authority:
        Issuer(authority).issue(WEB)
        keeper = keeper_of(authority)
        first = keeper.grant
        assert first is not None and not first.renewable
        keeper.maintain(now=first.obtained_at + 41)
        assert keeper.logins == 2
        assert keeper.grant is not None and keeper.grant.token != first.token
        Issuer(authority).issue(WEB)


def test_approle_logs_in_again_when_renewal_hits_the_max_ttl(
    bao: BaoServer, approle: dict[str, str]
) -> None:
    config = approle_settings(bao, approle, "meshca-capped")
    with opened(config) as authority:
        Issuer(authority).issue(WEB)
        keeper = keeper_of(authority)
        first = keeper.grant
        assert first is not None and first.renew_at is not None
        time.sleep(max(0.0, first.renew_at - time.time()) + 0.2)  # Vault's clock must move
        keeper.maintain()
        assert keeper.logins == 2  # renewal would have ended at max TTL: a fresh login
        assert keeper.grant is not None and keeper.grant.token != first.token
        Issuer(authority).issue(WEB)


def test_approle_logs_in_again_after_a_403(bao: BaoServer, approle: dict[str, str]) -> None:
    config = per_workload(
        bao,
        role_id=approle["meshca:role_id"],
        secret_id_file=None,
        secret_id=approle["meshca:secret_id"],
    )
    with opened(config) as authority:
        issuer = Issuer(authority)
        issuer.issue(WEB)
        keeper = keeper_of(authority)
        assert keeper.grant is not None
        revoke(bao, keeper.grant.token)
        issuer.issue(WEB)  # 403, new login, retried
        assert keeper.logins == 2


def test_approle_secret_id_file_is_reread_at_login(
    bao: BaoServer, approle: dict[str, str], tmp_path: Path
) -> None:
    admin = bao.client()
    secret_file = tmp_path / "secret-id"
    old = admin.write_data("auth/approle/role/meshca/secret-id", data={})["data"]["secret_id"]
    secret_file.write_text(old)
    config = per_workload(bao, role_id=approle["meshca:role_id"], secret_id_file=secret_file)
    with opened(config) as authority:
        issuer = Issuer(authority)
        issuer.issue(WEB)
        admin.write_data("auth/approle/role/meshca/secret-id/destroy", data={"secret_id": old})
        new = admin.write_data("auth/approle/role/meshca/secret-id", data={})["data"]["secret_id"]
        secret_file.write_text(new)
        keeper = keeper_of(authority)
        assert keeper.grant is not None
        revoke(bao, keeper.grant.token)
        issuer.issue(WEB)  # logged in with the new secret ID from the file


def test_approle_wrong_secret_id_is_one_clear_error(
    bao: BaoServer, approle: dict[str, str]
) -> None:
    config = per_workload(bao, role_id=approle["meshca:role_id"], secret_id="wrong")
    with (
        opened(config) as authority,
        pytest.raises(LoginRejected, match=r"AppRole login .* rejected.*--vault-secret-id"),
    ):
        Issuer(authority).issue(WEB)


# Kubernetes ------------------------------------------------------------------------------
class TokenReview:
    """A stand-in for the Kubernetes TokenReview API on loopback: authenticates the JWTs
    it was told about, as the service account they name; records what it reviewed."""

    def __init__(self) -> None:
        self.accepted: dict[str, tuple[str, str]] = {}
        self.reviewed: list[str] = []
        review = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                jwt = body["spec"]["token"]
                review.reviewed.append(jwt)
                who = review.accepted.get(jwt)
                status: dict[str, Any] = {"authenticated": who is not None}
                if who is not None:
                    status["user"] = {
                        "username": f"system:serviceaccount:{who[0]}:{who[1]}",
                        "uid": "uid-" + who[1],
                        "groups": ["system:serviceaccounts"],
                    }
                data = json.dumps({"kind": "TokenReview", "status": status}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def jwt(self, namespace: str, name: str) -> str:
        """A service-account token (signature irrelevant: the review decides)."""

        def part(value: dict[str, Any]) -> str:
            return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

        claims = {
            "iss": "kubernetes/serviceaccount",
            "kubernetes.io/serviceaccount/namespace": namespace,
            "kubernetes.io/serviceaccount/service-account.name": name,
            "kubernetes.io/serviceaccount/service-account.uid": "uid-" + name,
            "sub": f"system:serviceaccount:{namespace}:{name}",
            "nonce": str(len(self.accepted)),
        }
        token = f"{part({'alg': 'RS256', 'typ': 'JWT'})}.{part(claims)}.c2ln"
        self.accepted[token] = (namespace, name)
        return token

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def kubernetes(bao: BaoServer) -> Iterator[TokenReview]:
    review = TokenReview()
    admin = bao.client()
    admin.sys.enable_auth_method("kubernetes")
    any_ca = admin.read("pki/cert/ca")["data"]["certificate"]
    admin.write_data(
        "auth/kubernetes/config",
        data={
            "kubernetes_host": review.url,
            "kubernetes_ca_cert": any_ca,
            "token_reviewer_jwt": "reviewer",
            "disable_local_ca_jwt": True,
        },
    )
    admin.write_data(
        "auth/kubernetes/role/meshca",
        data={
            "bound_service_account_names": ["meshca"],
            "bound_service_account_namespaces": ["meshca-system"],
            "token_policies": [POLICY],
            "token_ttl": "60s",
        },
    )
    yield review
    review.close()


def test_kubernetes_login_with_the_service_account_jwt_file(
    bao: BaoServer, kubernetes: TokenReview, tmp_path: Path
) -> None:
    jwt_file = tmp_path / "token"
    jwt_file.write_text(kubernetes.jwt("meshca-system", "meshca"))
    config = per_workload(bao, k8s_role="meshca", k8s_jwt_file=jwt_file)
    assert config.auth_method.value == "kubernetes"
    with opened(config) as authority:
        issuer = Issuer(authority)
        issuer.issue(WEB)
        assert kubernetes.reviewed[-1] == jwt_file.read_text()
        # the kubelet rotates the projected token: the next login reads the new one
        jwt_file.write_text(kubernetes.jwt("meshca-system", "meshca"))
        keeper = keeper_of(authority)
        assert keeper.grant is not None
        revoke(bao, keeper.grant.token)
        issuer.issue(WEB)
        assert kubernetes.reviewed[-1] == jwt_file.read_text()


def test_kubernetes_login_for_an_unbound_service_account_is_refused(
    bao: BaoServer, kubernetes: TokenReview, tmp_path: Path
) -> None:
    jwt_file = tmp_path / "token"
    jwt_file.write_text(kubernetes.jwt("default", "intruder"))
    config = per_workload(bao, k8s_role="meshca", k8s_jwt_file=jwt_file)
    with (
        opened(config) as authority,
        pytest.raises(LoginRejected, match=r"Kubernetes login .*--vault-k8s-role"),
    ):
        Issuer(authority).issue(WEB)


def test_missing_jwt_file_names_the_setting(bao: BaoServer, tmp_path: Path) -> None:
    config = per_workload(bao, k8s_role="meshca", k8s_jwt_file=tmp_path / "absent")
    with (
        opened(config) as authority,
        pytest.raises(VaultSettingsError, match=r"cannot read .*--vault-k8s-jwt-file"),
    ):
        Issuer(authority).issue(WEB)


# TLS certificate ---------------------------------------------------------------------------
def client_certificate(directory: Path, name: str) -> tuple[Path, Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}-key.pem"
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_file.write_bytes(pem)
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return cert_file, key_file, pem.decode()


@pytest.fixture(scope="module")
def cert_login(bao_tls: BaoServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("client")
    cert_file, key_file, pem = client_certificate(directory, "meshca")
    admin = bao_tls.client()
    admin.sys.enable_auth_method("cert")
    admin.write_data(
        "auth/cert/certs/meshca",
        data={"certificate": pem, "token_policies": [POLICY], "token_ttl": "60s"},
    )
    return cert_file, key_file


def test_certificate_login_over_tls(bao_tls: BaoServer, cert_login: tuple[Path, Path]) -> None:
    cert_file, key_file = cert_login
    config = per_workload(bao_tls, client_cert=cert_file, client_key=key_file, cert_role="meshca")
    assert config.auth_method.value == "cert"
    issue_once(config)


def test_unknown_client_certificate_is_refused(
    bao_tls: BaoServer, cert_login: tuple[Path, Path], tmp_path: Path
) -> None:
    cert_file, key_file, _pem = client_certificate(tmp_path, "stranger")
    config = per_workload(bao_tls, client_cert=cert_file, client_key=key_file)
    with (
        opened(config) as authority,
        pytest.raises(LoginRejected, match=r"certificate login .* rejected"),
    ):
        Issuer(authority).issue(WEB)


def test_vault_ca_certificate_is_required_to_trust_its_tls(
    bao_tls: BaoServer, cert_login: tuple[Path, Path]
) -> None:
    cert_file, key_file = cert_login
    values = {"addr": bao_tls.url, "client_cert": cert_file, "client_key": key_file}
    with pytest.raises(BackendUnavailable, match=r"TLS verification failed.*--vault-cacert"):
        open_vault_authority(VaultSettings.from_mapping(values), TD, start=False)


# settings ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, "no authentication configured.*--vault-token.*--vault-role-id.*--vault-k8s-role"),
        ({"token": "t", "mode": "per-workload"}, "per-workload mode .*--vault-role"),
        ({"token": "t", "addr": "127.0.0.1:8200"}, "not an http.*--vault-addr"),
        ({"token": "t", "mode": "sideways"}, "invalid mode .*intermediate or per-workload"),
        ({"role_id": "r"}, "approle authentication needs --vault-secret-id"),
        (
            {"client_cert": "c.pem", "client_key": "k.pem", "addr": "http://127.0.0.1:1"},
            "needs an https:// address",
        ),
        ({"token": "t", "timeout": "soon"}, "invalid timeout.*--vault-timeout"),
        ({"token": "t", "colour": "blue"}, "unknown setting"),
    ],
)
def test_bad_settings_are_one_line_naming_the_setting(
    values: dict[str, object], expected: str
) -> None:
    with pytest.raises(VaultSettingsError, match=expected) as caught:
        VaultSettings.from_mapping(values)
    assert "\n" not in str(caught.value)


def test_environment_is_read_and_secrets_stay_out_of_repr() -> None:
    env = {
        "VAULT_ADDR": "https://vault.example:8200/",
        "MESHCA_VAULT_ROLE_ID": "role",
        "MESHCA_VAULT_SECRET_ID": "s3cr3t-value",
        "MESHCA_VAULT_TIMEOUT": "2s",
        "VAULT_NAMESPACE": "team-a",
    }
    config = VaultSettings.from_env(env, mount="pki-int")
    assert config.addr == "https://vault.example:8200"
    assert config.auth_method.value == "approle" and config.timeout == 2.0
    assert config.mount == "pki-int" and config.namespace == "team-a"
    assert "s3cr3t-value" not in repr(config)
    assert "s.tok3n" not in repr(VaultSettings(token="s.tok3n"))

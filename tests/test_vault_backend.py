"""The Vault backend against a real OpenBao server: both modes, the trust bundle, root
rotation inside Vault, clear errors for bad settings, refusals, and outages."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.backends.errors import BackendError, BackendUnavailable
from meshca.backends.opened import IntermediateRotation
from meshca.backends.vault.backend import (
    IntermediateState,
    VaultIntermediateAuthority,
    VaultWorkloadAuthority,
    open_vault_authority,
)
from meshca.backends.vault.check import check_vault
from meshca.backends.vault.client import VaultClient
from meshca.backends.vault.pki import VaultPki, chain_above
from meshca.backends.vault.settings import VaultSettings
from meshca.cli.main import main as cli_main
from meshca.envoy.bootstrap import BootstrapSpec, Inbound, Outbound, build_bootstrap
from meshca.issuer import (
    ActiveSigner,
    CsrError,
    Issuer,
    KeyType,
    Signer,
    TrustBundle,
    TtlPolicy,
    X509Svid,
)
from meshca.issuer.authority import workload_csr
from meshca.issuer.keys import PrivateKey, generate_private_key, load_private_key_pem
from meshca.issuer.svid import spiffe_id_of
from meshca.serve.config import ServeConfig
from meshca.serve.tls import default_dns_names
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.store import BundleChanged, SecretStore, StoreEvent
from meshca.util.netaddr import TcpServer, UnixServer
from meshca.util.retry import Backoff, Breaker
from tests.bao_harness import (
    WORKLOAD_ROLE,
    BaoServer,
    bao,
    mount,
    prepared,
    running,
    setup_pki,
    workload_role,
)
from tests.ca_factory import make_ca
from tests.envoy_harness import EnvoyProcess, RecordingApp, free_port, http_get
from tests.serve_harness import clean_env, fetch, served, serving, short_tempdir
from tests.svid_checks import assert_independently_valid

pytestmark = [pytest.mark.envoy, pytest.mark.vault]

__all__ = ["bao", "mount"]  # the OpenBao fixtures

TD = TrustDomain("cluster.local")
WEB = SpiffeId.from_kubernetes("default", "web", TD)
VICTIM = SpiffeId.from_kubernetes("kube-system", "admin", TD)
FAST = Backoff(initial=0.1, maximum=0.5)


def settings(server: BaoServer, **overrides: object) -> VaultSettings:
    values: dict[str, object] = {"addr": server.url, "token": server.root_token, "timeout": 2}
    values.update(overrides)
    return VaultSettings.from_mapping(values)


def per_workload(server: BaoServer, **overrides: object) -> VaultSettings:
    token = server.token(["meshca-per-workload"])
    base: dict[str, object] = {"mode": "per-workload", "role": WORKLOAD_ROLE, "token": token}
    return settings(server, **{**base, **overrides})


def intermediate(server: BaoServer, **overrides: object) -> VaultSettings:
    return settings(server, token=server.token(["meshca-intermediate"]), **overrides)


@pytest.fixture
def workload_authority(bao: BaoServer) -> Iterator[VaultWorkloadAuthority]:
    authority = open_vault_authority(per_workload(bao), TD, start=False)
    assert isinstance(authority, VaultWorkloadAuthority)
    yield authority
    authority.close()


@pytest.fixture
def intermediate_authority(bao: BaoServer) -> Iterator[VaultIntermediateAuthority]:
    authority = open_vault_authority(intermediate(bao), TD, start=False)
    assert isinstance(authority, VaultIntermediateAuthority)
    yield authority
    authority.close()


# per-workload mode -------------------------------------------------------------------
def caller_csr(spiffe_id: SpiffeId) -> tuple[PrivateKey, bytes]:
    """A caller's key and its PEM CSR (empty subject, one URI SAN) claiming ``spiffe_id``."""
    key = generate_private_key(KeyType.EC_P256)
    return key, workload_csr(key, spiffe_id, ()).public_bytes(serialization.Encoding.PEM)


def test_per_workload_svid_passes_py_spiffe_and_openssl(
    workload_authority: VaultWorkloadAuthority, tmp_path: Path
) -> None:
    issuer = Issuer(workload_authority)
    svid = issuer.issue(WEB)
    assert spiffe_id_of(svid.leaf) == WEB
    assert svid.leaf.subject == x509.Name([])
    assert len(svid.chain) == 1  # signed by the root directly: nothing between
    assert_independently_valid(svid, issuer.bundle(), tmp_path)


def test_per_workload_ttl_is_exact_seconds_not_hours(
    workload_authority: VaultWorkloadAuthority,
) -> None:
    issuer = Issuer(workload_authority, TtlPolicy(default=timedelta(seconds=90)))
    svid = issuer.issue(WEB)
    # the role backdates by 60 s (docs/vault.md), exactly like meshca's own leaves
    assert svid.not_after - svid.not_before == timedelta(seconds=90 + 60)


def test_per_workload_signs_a_callers_csr_for_the_entitled_id_only(
    workload_authority: VaultWorkloadAuthority, tmp_path: Path
) -> None:
    key, csr = caller_csr(VICTIM)
    svid = Issuer(workload_authority).sign_csr(WEB, csr)
    assert spiffe_id_of(svid.leaf) == WEB  # the CSR's claim of another ID was ignored
    assert_independently_valid(svid, workload_authority.bundle(), tmp_path, key)


def test_meshca_refuses_what_a_loose_role_signs_for_another_identity(bao: BaoServer) -> None:
    """A role that copies SANs from the CSR lets a caller ask for a victim's ID: Vault
    signs it, meshca must not hand it out."""
    loose = workload_role(TD.name) | {"use_csr_sans": True}
    bao.client().write_data("pki/roles/loose", data=loose)
    authority = open_vault_authority(settings(bao, mode="per-workload", role="loose"), TD)
    try:
        _, csr = caller_csr(VICTIM)
        with pytest.raises(BackendError, match=f"for {VICTIM} instead of {WEB}: refused"):
            Issuer(authority).sign_csr(WEB, csr)
    finally:
        authority.close()


def test_sign_verbatim_refuses_a_csr_naming_another_identity(bao: BaoServer) -> None:
    authority = open_vault_authority(
        settings(bao, mode="per-workload", verbatim=True, role=WORKLOAD_ROLE), TD
    )
    try:
        issuer = Issuer(authority)
        svid = issuer.issue(WEB, ttl=timedelta(seconds=120))  # meshca's own CSR is exact
        assert spiffe_id_of(svid.leaf) == WEB
        assert svid.not_after - svid.not_before == timedelta(seconds=120 + 60)
        _, csr = caller_csr(VICTIM)
        with pytest.raises(CsrError, match="sign-verbatim copies the CSR"):
            issuer.sign_csr(WEB, csr)
    finally:
        authority.close()


def test_per_workload_concurrent_issuance(workload_authority: VaultWorkloadAuthority) -> None:
    issuer = Issuer(workload_authority)
    ids = [SpiffeId.from_kubernetes("load", f"sa{i}", TD) for i in range(16)]
    with ThreadPoolExecutor(8) as pool:
        svids = list(pool.map(issuer.issue, ids))
    assert [spiffe_id_of(s.leaf) for s in svids] == ids
    assert len({s.serial for s in svids}) == len(ids)


# intermediate mode ---------------------------------------------------------------------
def test_intermediate_mode_signs_locally_under_vaults_intermediate(
    intermediate_authority: VaultIntermediateAuthority, tmp_path: Path
) -> None:
    issuer = Issuer(intermediate_authority)
    svid = issuer.issue(WEB)
    assert_independently_valid(svid, issuer.bundle(), tmp_path)
    ca = intermediate_authority.signer.certificate
    # Vault's ca_chain repeats the signed certificate and ends at the root: neither is kept
    assert svid.chain == (svid.leaf, ca)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca and basic.path_length == 0
    sans = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [TD.id]
    assert ca.subject != issuer.bundle().roots[0].subject


def test_leaves_never_outlive_the_intermediate(bao: BaoServer) -> None:
    authority = open_vault_authority(intermediate(bao, intermediate_ttl="1h"), TD, start=False)
    try:
        svid = Issuer(authority).issue(WEB, ttl=timedelta(hours=5))
        assert isinstance(authority, VaultIntermediateAuthority)
        assert svid.not_after == authority.signer.not_after
    finally:
        authority.close()


def test_each_intermediate_has_a_unique_subject_and_switching_takes_effect(
    intermediate_authority: VaultIntermediateAuthority,
) -> None:
    before = intermediate_authority.signer
    after = intermediate_authority.obtain_intermediate(timedelta(hours=2))
    assert after.certificate.subject != before.certificate.subject
    # backdated by meshca's 1-minute skew, like its own CAs (the rotation schedule relies on it)
    assert after.not_after - after.certificate.not_valid_before_utc == timedelta(hours=2, minutes=1)
    assert intermediate_authority.signer is before  # obtained, not yet in use
    intermediate_authority.active_signer.activate(after)  # what rotation does
    svid = Issuer(intermediate_authority).issue(WEB)
    assert svid.intermediates == (after.certificate,)


def test_intermediate_is_kept_across_restarts_with_a_private_key_file(
    bao: BaoServer, tmp_path: Path
) -> None:
    state = tmp_path / "vault"
    config = intermediate(bao)
    first = open_vault_authority(config, TD, state_dir=state, start=False)
    first.close()
    second = open_vault_authority(config, TD, state_dir=state, start=False)
    second.close()
    assert isinstance(first, VaultIntermediateAuthority)
    assert isinstance(second, VaultIntermediateAuthority)
    assert second.signer.certificate == first.signer.certificate
    assert (state / "ca-key.pem").stat().st_mode & 0o777 == 0o600
    other_domain = open_vault_authority(
        config, TrustDomain("other.example"), state_dir=state, start=False
    )
    other_domain.close()  # another trust domain never reuses it
    assert isinstance(other_domain, VaultIntermediateAuthority)
    assert other_domain.signer.certificate != first.signer.certificate


def test_intermediate_state_rewrites_only_what_changed(tmp_path: Path) -> None:
    origin = {"addr": "http://127.0.0.1:8200", "mount": "pki", "trust_domain": TD.name}
    ca = make_ca()
    state = IntermediateState(tmp_path, origin)
    state.save(ca.signer, ca.bundle)
    written = {path.name: path.stat().st_ino for path in tmp_path.iterdir()}
    assert set(written) == {"ca-key.pem", "cert-chain.pem", "root-cert.pem", "meta.json"}

    state.save(ca.signer, ca.bundle)  # nothing changed: nothing is written
    reloaded = IntermediateState(tmp_path, origin)
    loaded = reloaded.load(TD)
    assert loaded is not None
    reloaded.save(*loaded)  # what was just loaded is what the files hold
    assert {path.name: path.stat().st_ino for path in tmp_path.iterdir()} == written

    new_root = make_ca().root.certificate
    reloaded.save(loaded[0], loaded[1].with_root(new_root))  # the bundle changed
    assert (tmp_path / "root-cert.pem").stat().st_ino != written["root-cert.pem"]
    again = IntermediateState(tmp_path, origin).load(TD)
    assert again is not None
    assert again[0].certificate == ca.signer.certificate
    assert new_root in again[1]


class _RotatedMeanwhile(ActiveSigner):
    """Rotation switches the signer just before the next :meth:`activate` takes the lock."""

    def __init__(self, signer: Signer, bundle: TrustBundle, rotated: Signer) -> None:
        super().__init__(signer, bundle)
        self.rotated: Signer | None = rotated

    def activate(self, signer: Signer | None = None, bundle: TrustBundle | None = None) -> None:
        if self.rotated is not None:
            rotated, self.rotated = self.rotated, None
            super().activate(rotated, bundle)
        super().activate(signer, bundle)


class _Roots(VaultPki):
    """The PKI mount's roots, without a Vault."""

    def __init__(self, client: VaultClient, bundle: TrustBundle) -> None:
        super().__init__(client, TD)
        self.bundle = bundle

    def roots(self) -> TrustBundle:
        return self.bundle


def test_bundle_refresh_keeps_a_signer_rotation_switched_to_meanwhile(tmp_path: Path) -> None:
    old, new = make_ca(), make_ca()  # the rotation's new intermediate is under a new root
    both = old.bundle.with_root(new.root.certificate)
    client = VaultClient(VaultSettings.from_mapping({"addr": "http://127.0.0.1:1", "token": "t"}))
    origin = {"addr": "http://127.0.0.1:1", "mount": "pki", "trust_domain": TD.name}
    state = IntermediateState(tmp_path, origin)
    authority = _RotatedMeanwhile(old.signer, old.bundle, rotated=new.signer)
    backend = VaultIntermediateAuthority(client, _Roots(client, both), authority, state)

    assert backend.refresh_bundle() == both
    assert authority.signer is new.signer  # not put back to the one held before the refresh
    assert authority.bundle() == both
    saved = IntermediateState(tmp_path, origin).load(TD)  # what is saved is what is held
    assert saved is not None
    assert saved[0].certificate == new.signer.certificate
    assert saved[1] == both


def test_intermediate_refuses_leaf_ttls_it_cannot_cover(bao: BaoServer) -> None:
    with pytest.raises(BackendError, match="--vault-intermediate-ttl"):
        open_vault_authority(
            intermediate(bao, intermediate_ttl="1h"), TD, leaf_ttl=timedelta(hours=1)
        )


def test_chain_above_drops_the_signed_certificate_roots_and_duplicates(
    intermediate_authority: VaultIntermediateAuthority,
) -> None:
    ca = intermediate_authority.signer.certificate
    root = intermediate_authority.bundle().roots[0]
    other = Issuer(intermediate_authority).issue(WEB).leaf  # any non-root certificate
    assert chain_above(ca, [ca, other, root, other, ca]) == (other,)


# trust bundle and rotation inside Vault ------------------------------------------------
async def test_new_root_issuer_reaches_the_bundle_and_the_store(
    bao: BaoServer, mount: str, tmp_path: Path
) -> None:
    authority = open_vault_authority(settings(bao, mount=mount), TD, start=False)
    assert isinstance(authority, VaultIntermediateAuthority)
    try:
        store = SecretStore(Issuer(authority))
        events: list[StoreEvent] = []
        store.subscribe(events.append)
        old = await store.svid(WEB)
        assert len(store.bundle()) == 1
        answer = bao.client().write_data(
            f"{mount}/root/rotate/internal",
            data={"common_name": "second root", "key_type": "ec", "ttl": "87600h"},
        )
        new_root = x509.load_pem_x509_certificate(answer["data"]["certificate"].encode())
        bundle = await asyncio.to_thread(authority.refresh_bundle)
        assert new_root in bundle and len(bundle) == 2
        assert store.refresh_bundle()
        assert [e for e in events if isinstance(e, BundleChanged)][-1].bundle == bundle
        assert_independently_valid(old, bundle, tmp_path / "old")  # old root still trusted
        # an intermediate from the new root (issuer chosen by name) verifies too
        new_issuer = answer["data"]["issuer_id"]
        rotated = open_vault_authority(
            settings(bao, mount=mount, issuer=new_issuer), TD, start=False
        )
        try:
            svid = Issuer(rotated).issue(WEB)
            assert_independently_valid(svid, rotated.bundle(), tmp_path / "new")
            assert svid.intermediates[0].issuer == new_root.subject
        finally:
            rotated.close()
    finally:
        authority.close()


def test_per_workload_follows_a_new_default_issuer(
    bao: BaoServer, mount: str, tmp_path: Path
) -> None:
    authority = open_vault_authority(
        settings(bao, mount=mount, mode="per-workload", role=WORKLOAD_ROLE), TD, start=False
    )
    try:
        admin = bao.client()
        answer = admin.write_data(
            f"{mount}/root/rotate/internal",
            data={"common_name": "second root", "key_type": "ec", "ttl": "87600h"},
        )
        admin.write_data(f"{mount}/root/replace", data={"default": answer["data"]["issuer_id"]})
        svid = Issuer(authority).issue(WEB)  # signed by a root the bundle did not hold yet
        assert len(authority.bundle()) == 2
        assert_independently_valid(svid, authority.bundle(), tmp_path)
    finally:
        authority.close()


# bad settings: one clear line each --------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"mount": "pki-x"}, r"mount 'pki-x' not found at http://127\.0\.0\.1:\d+.*--vault-mount"),
        ({"role": "nope"}, r"role 'nope' not found in mount 'pki'.*--vault-role"),
        ({"token": "s.not-a-token"}, r"token was rejected.*--vault-token / VAULT_TOKEN"),
        ({"issuer": "nope", "mode": "intermediate"}, r"issuer 'nope' not found.*--vault-issuer"),
    ],
)
def test_bad_settings_give_one_clear_error(
    bao: BaoServer, overrides: dict[str, object], expected: str
) -> None:
    config = settings(bao, **{"mode": "per-workload", "role": WORKLOAD_ROLE, **overrides})
    with pytest.raises(BackendError, match=expected) as caught:
        authority = open_vault_authority(config, TD, start=False)
        try:
            Issuer(authority).issue(WEB)
        finally:
            authority.close()
    assert "\n" not in str(caught.value)


def test_documented_role_signs_meshcas_serving_certificate_and_others_get_the_right_hint(
    bao: BaoServer,
) -> None:
    """meshca's own serving certificate carries DNS names: the role of docs/vault.md
    allows exactly them; a role that allows none is refused with a hint naming
    allowed_domains and --server-dns (not allowed_uri_sans, which is not the cause)."""
    server_id = SpiffeId.from_kubernetes("meshca", "meshca", TD)
    names = default_dns_names("meshca")
    authority = open_vault_authority(per_workload(bao), TD, start=False)
    try:
        svid = Issuer(authority).issue(server_id, dns_names=names)
    finally:
        authority.close()
    sans = svid.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == list(names)
    uri_only = workload_role(TD.name) | {"allowed_domains": [], "allow_bare_domains": False}
    bao.client().write_data("pki/roles/uri-only", data=uri_only)
    uri_only_settings = settings(bao, mode="per-workload", role="uri-only")
    authority = open_vault_authority(uri_only_settings, TD, start=False)
    try:
        with pytest.raises(BackendError) as caught:
            Issuer(authority).issue(server_id, dns_names=names)
        Issuer(authority).issue(WEB)  # workloads' SVIDs need no DNS name
    finally:
        authority.close()
    assert "allowed_domains" in str(caught.value) and "--server-dns" in str(caught.value)
    assert "allowed_uri_sans" not in str(caught.value)


def test_least_privilege_token_with_wrong_role_names_the_settings(bao: BaoServer) -> None:
    authority = open_vault_authority(per_workload(bao, role="nope"), TD, start=False)
    try:
        with pytest.raises(BackendError, match=r"pki/sign/nope.*--vault-role") as caught:
            Issuer(authority).issue(WEB)
        assert "\n" not in str(caught.value)
    finally:
        authority.close()


def test_unreachable_address_is_unavailable_and_names_the_setting() -> None:
    port = free_port()  # nothing listens there
    config = VaultSettings(addr=f"http://127.0.0.1:{port}", token="t", timeout=2)
    with pytest.raises(
        BackendUnavailable, match=r"cannot reach .*connection refused.*--vault-addr"
    ):
        open_vault_authority(config, TD)


def test_check_reports_everything_that_is_missing(bao: BaoServer) -> None:
    good = check_vault(per_workload(bao), TD)
    assert good.ok, good.lines()
    assert [item.name for item in good.items] == ["address", "auth", "mount", "permissions", "role"]
    bad = check_vault(settings(bao, token="s.bad", mode="per-workload", role="x", mount="nope"), TD)
    failed = {item.name: item.detail for item in bad.failures}
    assert set(failed) == {"auth", "mount", "permissions"}
    assert "--vault-token" in failed["auth"] and "--vault-mount" in failed["mount"]
    wrong_role = check_vault(per_workload(bao, role="nope"), TD)
    assert {item.name for item in wrong_role.failures} == {"permissions", "role"}
    assert check_vault(intermediate(bao), TD).ok


def test_namespace_is_sent(bao: BaoServer) -> None:
    bao.client().write_data("sys/namespaces/team-a", data={})
    setup_pki(bao, "pki-ns", namespace="team-a")
    config = settings(bao, mount="pki-ns", namespace="team-a")
    authority = open_vault_authority(config, TD, start=False)
    authority.close()
    with pytest.raises(BackendError, match="mount 'pki-ns' not found"):
        open_vault_authority(settings(bao, mount="pki-ns"), TD, start=False)


# backoff helper ---------------------------------------------------------------------------
def test_backoff_grows_exponentially_with_bounded_jitter() -> None:
    backoff = Backoff(initial=1.0, maximum=8.0, multiplier=2.0, jitter=0.5)
    for attempt, base in enumerate([1.0, 2.0, 4.0, 8.0, 8.0, 8.0]):
        delays = {backoff.delay(attempt) for _ in range(50)}
        assert all(base / 2 <= d <= base for d in delays)
        assert len(delays) > 1  # jittered


def test_breaker_fails_fast_until_the_delay_passes() -> None:
    now = [100.0]
    breaker = Breaker(Backoff(initial=1.0, maximum=1.0, jitter=0.0), clock=lambda: now[0])
    assert breaker.allows() and breaker.healthy
    breaker.record_failure("down")
    assert not breaker.allows() and breaker.last_error == "down"
    now[0] += 1.0
    assert breaker.allows() and not breaker.healthy
    assert breaker.record_success()
    assert breaker.healthy and breaker.last_error is None


# outage ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def persistent_bao() -> Iterator[BaoServer]:
    with running(BaoServer.persistent) as server:
        yield prepared(server)


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``condition`` in a thread (it may block on HTTP) while the loop keeps serving."""
    async with asyncio.timeout(timeout):
        while not await asyncio.to_thread(condition):
            await asyncio.sleep(0.05)


async def test_outage_fails_fast_store_keeps_serving_then_recovers(
    persistent_bao: BaoServer,
) -> None:
    server = persistent_bao
    config = settings(server, mode="per-workload", role=WORKLOAD_ROLE, timeout=1)
    authority = open_vault_authority(config, TD, backoff=FAST)
    assert isinstance(authority, VaultWorkloadAuthority)
    store = SecretStore(Issuer(authority), renew_fraction=0.0, renew_jitter=0.0)
    try:
        cached = await store.svid(WEB)
        for outage in (server.pause, server.stop):  # a hung Vault, then a dead one
            outage()
            started = time.monotonic()
            with pytest.raises(BackendUnavailable, match="cannot reach"):
                await store.renew(WEB)
            assert time.monotonic() - started < 10  # bounded by the timeout, not hung
            assert not authority.healthy and "cannot reach" in (authority.last_error or "")
            # due for renewal, Vault down: the store keeps serving what it has
            assert await store.svid(WEB) is cached
            with pytest.raises(BackendUnavailable):
                await asyncio.to_thread(authority.refresh_bundle)
            if outage == server.pause:
                server.resume()
            else:
                server.start()
                server.wait_status({503})  # restarted sealed: still unavailable
                await until(lambda: "sealed" in (authority.last_error or ""))
                server.unseal()
            await until(lambda: authority.healthy)  # the monitor found it back by itself
            renewed = await store.renew(WEB)
            assert renewed.serial != cached.serial
            cached = renewed
    finally:
        server.resume()
        if server.process is None or server.process.poll() is not None:
            server.start()
            server.wait_status({503})
            server.unseal()
        store.stop()
        authority.close()


def test_intermediate_mode_restarts_during_an_outage_from_its_state(
    persistent_bao: BaoServer, tmp_path: Path
) -> None:
    server = persistent_bao
    config = settings(server, timeout=1)
    first = open_vault_authority(config, TD, state_dir=tmp_path, start=False)
    first.close()
    server.pause()
    try:
        second = open_vault_authority(config, TD, state_dir=tmp_path, backoff=FAST, start=False)
        try:
            svid = Issuer(second).issue(WEB)  # signed locally: Vault is not needed
            assert isinstance(second, VaultIntermediateAuthority)
            assert isinstance(first, VaultIntermediateAuthority)
            assert svid.intermediates == (first.signer.certificate,)
            assert not second.healthy
        finally:
            second.close()
    finally:
        server.resume()


# a real Envoy pair through an outage and a root rotation ----------------------------------
BUYER = SpiffeId.from_kubernetes("shop", "buyer", TD)
SHOP = SpiffeId.from_kubernetes("shop", "web", TD)
ENVOY_LEAF_TTL = timedelta(seconds=16)  # renewals fall due within the test's outage


def _envoy_pair(root: Path, sds: Path, app_port: int) -> tuple[EnvoyProcess, EnvoyProcess, int]:
    web_port, buyer_port = free_port(), free_port()
    server = UnixServer(sds)
    web = build_bootstrap(
        BootstrapSpec(SHOP, server, inbound=Inbound(web_port, app_port, (BUYER,)))
    )
    outbound = Outbound(buyer_port, TcpServer("127.0.0.1", web_port), SHOP)
    buyer = build_bootstrap(BootstrapSpec(BUYER, server, outbound=outbound))
    for cluster in buyer["static_resources"]["clusters"]:
        if cluster["name"] == "outbound_upstream":  # a new mTLS handshake per request
            cluster["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "common_http_protocol_options": {"max_requests_per_connection": 1},
                    "explicit_http_config": {"http_protocol_options": {}},
                }
            }
    return EnvoyProcess(web, root, "web"), EnvoyProcess(buyer, root, "buyer"), buyer_port


def _root_serials(envoy: EnvoyProcess) -> set[str]:
    return {
        ca["serial_number"].lower().lstrip("0")
        for context in envoy.certs()
        for ca in context.get("ca_cert", [])
    }


@pytest.mark.timeout(120)
async def test_envoy_pair_loses_no_request_through_a_vault_outage_and_a_root_rotation(
    persistent_bao: BaoServer,
) -> None:
    server = persistent_bao
    mount = "pki-envoy"
    setup_pki(server, mount)
    config = settings(server, mode="per-workload", role=WORKLOAD_ROLE, mount=mount, timeout=1)
    authority = open_vault_authority(config, TD, backoff=FAST)
    results: list[int] = []
    stop = threading.Event()

    def steady_requests(port: int) -> None:
        while not stop.is_set():
            results.append(http_get(port, "/through-the-outage")[0])
            time.sleep(0.05)

    with short_tempdir("mca-vault-") as root, RecordingApp() as app:
        serve = ServeConfig(
            data_dir=root / "data",
            uds=root / "sds.sock",
            uds_identities={os.getuid(): (SHOP, BUYER)},
            leaf_ttl=ENVOY_LEAF_TTL,
            grace=0.0,
            backend_poll_interval=0.5,  # the server's poll of Vault's roots
        )
        async with served(serve, backend=authority.opened()) as meshca:
            web, buyer, buyer_port = _envoy_pair(root, serve.uds, app.port)  # type: ignore[arg-type]
            sender = threading.Thread(target=steady_requests, args=(buyer_port,))
            try:
                # started from a thread: Envoy waits for its SDS secrets, served by this loop
                await asyncio.gather(asyncio.to_thread(web.start), asyncio.to_thread(buyer.start))
                await until(lambda: http_get(buyer_port, "/ready")[0] == 200)
                sender.start()
                try:
                    before = web.serials() | buyer.serials()
                    server.pause()  # Vault hangs across the renewal point
                    try:
                        await until(lambda: meshca.store.issue_failures > 0, timeout=30)
                        assert not authority.healthy
                        await asyncio.sleep(1.0)  # requests keep flowing on current certs
                    finally:
                        server.resume()
                    await until(
                        lambda: not (web.serials() & before) and not (buyer.serials() & before),
                        timeout=30,
                    )  # renewed and pushed once Vault is back
                    roots_before = _root_serials(buyer)
                    rotated = server.client().write_data(
                        f"{mount}/root/rotate/internal",
                        data={"common_name": "second root", "key_type": "ec", "ttl": "87600h"},
                    )
                    new_root = x509.load_pem_x509_certificate(
                        rotated["data"]["certificate"].encode()
                    )
                    # the server's own poll brings the new root to the bundle and the proxies
                    new_serial = f"{new_root.serial_number:x}"
                    await until(
                        lambda: (
                            new_serial in _root_serials(buyer) and new_serial in _root_serials(web)
                        )
                    )
                    assert roots_before < _root_serials(buyer)  # old root kept alongside
                    await asyncio.sleep(0.5)
                finally:
                    stop.set()
                    if sender.is_alive():
                        await asyncio.to_thread(sender.join, 10)
            finally:
                await asyncio.gather(asyncio.to_thread(web.stop), asyncio.to_thread(buyer.stop))
    authority.close()
    assert len(results) > 20
    assert set(results) == {200}, f"{results.count(200)} of {len(results)} requests succeeded"


# the commands: --backend vault ---------------------------------------------------------------
@pytest.fixture
def cli(
    bao: BaoServer,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Callable[..., tuple[int, str, str]]:
    """``meshca ...`` in process, with Vault's standard variables pointing at the server."""
    for name in list(os.environ):
        if name.startswith(("MESHCA_", "VAULT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VAULT_ADDR", bao.url)
    monkeypatch.setenv("VAULT_TOKEN", bao.token(["meshca-per-workload", "meshca-intermediate"]))
    monkeypatch.chdir(tmp_path)

    def run(*argv: str | Path) -> tuple[int, str, str]:
        code = cli_main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


PER_WORKLOAD_FLAGS = ("--backend", "vault", "--vault-mode", "per-workload", "--vault-role")


def test_init_checks_vault_and_lists_everything_missing(cli: Callable[..., Any]) -> None:
    code, out, err = cli("init", *PER_WORKLOAD_FLAGS, WORKLOAD_ROLE)
    assert code == 0, err
    assert "ok    role" in out and "FAIL" not in out
    assert not Path(".meshca/ca").exists()  # the CA is Vault's: nothing created locally
    code, out, err = cli(
        "init", *PER_WORKLOAD_FLAGS, "nope", "--vault-mount", "pki-x", "--vault-token", "s.bad"
    )
    assert code == 1
    assert {line.split()[1] for line in out.splitlines() if "FAIL" in line} == {
        "auth",
        "mount",
        "permissions",
    }
    assert err.count("\n") == 1 and "fix auth, mount, permissions" in err


@pytest.mark.parametrize("mode", ["per-workload", "intermediate"])
def test_issue_writes_an_svid_signed_under_vaults_root(
    cli: Callable[..., Any], tmp_path: Path, mode: str
) -> None:
    code, _out, err = cli(
        "issue",
        str(WEB),
        "--out",
        "out",
        "--backend",
        "vault",
        "--vault-mode",
        mode,
        "--vault-role",
        WORKLOAD_ROLE,
        "--ttl",
        "90s",
    )
    assert code == 0, err
    out = tmp_path / "out"
    assert (out / "key.pem").stat().st_mode & 0o777 == 0o600
    chain = x509.load_pem_x509_certificates((out / "cert.pem").read_bytes())
    bundle = TrustBundle.from_pem(TD, (out / "bundle.pem").read_bytes())
    key = load_private_key_pem((out / "key.pem").read_bytes())
    svid = X509Svid(WEB, tuple(chain), key)
    assert_independently_valid(svid, bundle, tmp_path / "check")
    assert len(chain) == (1 if mode == "per-workload" else 2)
    if mode == "per-workload":
        assert svid.not_after - svid.not_before == timedelta(seconds=90 + 60)


def test_vault_settings_come_from_the_config_file(
    cli: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = os.environ["VAULT_TOKEN"]
    monkeypatch.delenv("VAULT_TOKEN")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token").write_text(token)
    (tmp_path / "meshca.yaml").write_text(
        "backend: vault\nvault_mode: per-workload\nvault_role: meshca-workload\n"
        "vault_token_file: secrets/token\nvault_mount: pki-from-file\n"
    )
    code, _out, err = cli("--config", "meshca.yaml", "issue", str(WEB), "--out", "out")
    assert code == 1 and "mount 'pki-from-file' not found" in err  # the file was read
    code, _out, err = cli(
        "--config", "meshca.yaml", "issue", str(WEB), "--out", "out", "--vault-mount", "pki"
    )
    assert code == 0, err  # a flag beats the file; the token came from the file's path


def test_bad_vault_flag_is_one_line_naming_it(cli: Callable[..., Any]) -> None:
    code, _out, err = cli(
        "issue", str(WEB), "--out", "o", "--backend", "vault", "--vault-mode", "sideways"
    )
    assert code == 1
    assert err.count("\n") == 1 and "--vault-mode" in err and "Traceback" not in err


def test_serve_with_vault_serves_vault_signed_svids_and_reports_health(
    bao: BaoServer, tmp_path: Path
) -> None:
    env = clean_env() | {"VAULT_ADDR": bao.url, "VAULT_TOKEN": bao.token(["meshca-per-workload"])}
    with (
        short_tempdir("mca-vserve-") as root,
        serving(
            root,
            root / "data",
            "--uds-identity",
            f"{os.getuid()}={WEB}",
            *PER_WORKLOAD_FLAGS,
            WORKLOAD_ROLE,
            "--ttl",
            "1h",
            env=env,
        ) as server,
    ):
        secrets, health = asyncio.run(_fetch_over_uds(server.uds))
        assert server.stop() == 0, server.log()
    [secret] = secrets
    chain = x509.load_pem_x509_certificates(secret.tls_certificate.certificate_chain.inline_bytes)
    assert spiffe_id_of(chain[0]) == WEB
    vault_root = bao.client().read("pki/cert/ca")["data"]["certificate"]
    assert chain[0].issuer == x509.load_pem_x509_certificate(vault_root.encode()).subject
    assert health == "SERVING"  # Vault reachable: the backend reports itself healthy


async def _fetch_over_uds(socket_path: Path) -> tuple[list[Any], str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        secrets = await fetch(channel, ["default"], str(WEB))
        answer = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="meshca.backend"), timeout=10
        )
        return secrets, health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)


def test_each_vault_mode_is_opened_with_what_it_can_do(
    workload_authority: VaultWorkloadAuthority, intermediate_authority: VaultIntermediateAuthority
) -> None:
    """Both modes can be unreachable and follow roots added in Vault; only the
    intermediate holds a key here, and only it is rotated by meshca."""
    workload = workload_authority.opened()
    assert (workload.name, workload.signer, workload.rotation) == ("vault", None, None)
    assert workload.health is workload_authority and workload.roots is workload_authority
    opened = intermediate_authority.opened()
    assert opened.signer is intermediate_authority.active_signer
    assert opened.health is intermediate_authority and opened.roots is intermediate_authority
    assert isinstance(opened.rotation, IntermediateRotation)
    assert opened.rotation.backend is intermediate_authority

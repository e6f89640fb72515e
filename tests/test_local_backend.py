"""The local backend: `meshca init`'s CA on disk, plugged-in CAs, and loading it back."""

from __future__ import annotations

import json
import os
import re
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from meshca.backends import local
from meshca.backends.local import (
    CaError,
    CaExistsError,
    CaMissingError,
    import_cacerts,
    init_local_ca,
    load_local_ca,
)
from meshca.backends.opened import LocalCaRotation, OpenedBackend
from meshca.issuer import Issuer, KeyType, SignerError
from meshca.issuer.keys import generate_private_key, private_key_pem
from meshca.issuer.profile import build_ca, build_leaf, utcnow
from meshca.issuer.svid import certificates_pem
from meshca.issuer.verify import verify_chain
from meshca.spiffe import SpiffeId
from tests.ca_factory import TRUST_DOMAIN, InMemoryCa, make_ca
from tests.svid_checks import assert_independently_valid

WORKLOAD = SpiffeId.from_kubernetes("default", "web", TRUST_DOMAIN)
CA_FILES = {
    "root-cert.pem",
    "root-key.pem",
    "ca-cert.pem",
    "ca-key.pem",
    "cert-chain.pem",
    "meta.json",
}
PRIVATE_FILES = {"root-key.pem", "ca-key.pem"}


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory``: its bytes and mode."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), mode(p))
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def staging_dirs(data_dir: Path) -> list[Path]:
    return [p for p in data_dir.iterdir() if p.name.startswith(".")]


@pytest.fixture(scope="module")
def source_ca() -> InMemoryCa:
    """A CA made elsewhere (as an operator's PKI would), to plug in."""
    return make_ca(levels=2)


# init ------------------------------------------------------------------------------


def test_init_layout_and_file_modes(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    ca = init_local_ca(data_dir, TRUST_DOMAIN)
    ca_dir = data_dir / "ca"
    assert {p.name for p in ca_dir.iterdir()} == CA_FILES
    assert mode(data_dir) == 0o700
    assert mode(ca_dir) == 0o700
    for name in CA_FILES:
        expected = 0o600 if name in PRIVATE_FILES else 0o644
        assert mode(ca_dir / name) == expected, name
    assert staging_dirs(data_dir) == []
    meta = json.loads((ca_dir / "meta.json").read_text())
    assert meta["trust_domain"] == "cluster.local"
    assert meta["origin"] == "generated"
    assert meta["key_type"] == "ec-p256"
    assert b"BEGIN PRIVATE KEY" in (ca_dir / "ca-key.pem").read_bytes()  # PKCS#8
    # the root: self-signed, 10 years, URI SAN spiffe://<td>
    root = x509.load_pem_x509_certificate((ca_dir / "root-cert.pem").read_bytes())
    assert root.issuer == root.subject
    assert root.not_valid_after_utc - root.not_valid_before_utc >= timedelta(days=3650)
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier("spiffe://cluster.local")]
    assert ca.bundle.roots == (root,)
    chain = x509.load_pem_x509_certificates((ca_dir / "cert-chain.pem").read_bytes())
    assert chain == [ca.signer.certificate]
    assert ca.signer.certificate.issuer == root.subject


def test_leaves_chain_leaf_intermediate_root(tmp_path: Path) -> None:
    ca = init_local_ca(tmp_path / "data", TRUST_DOMAIN)
    svid = Issuer(ca.authority()).issue(WORKLOAD)
    path = verify_chain(svid.leaf, svid.intermediates, ca.bundle)
    assert path == [svid.leaf, ca.signer.certificate, ca.bundle.roots[0]]
    assert svid.chain == (svid.leaf, ca.signer.certificate)
    assert_independently_valid(svid, ca.bundle, tmp_path / "check")


@pytest.mark.parametrize("key_type", [KeyType.EC_P384, KeyType.RSA_2048])
def test_init_with_other_key_types(tmp_path: Path, key_type: KeyType) -> None:
    ca = init_local_ca(tmp_path / "data", TRUST_DOMAIN, key_type=key_type)
    assert json.loads((tmp_path / "data" / "ca" / "meta.json").read_text())["key_type"] == (
        key_type.value
    )
    svid = Issuer(ca.authority()).issue(WORKLOAD)
    assert_independently_valid(svid, ca.bundle, tmp_path / "check")


def test_a_second_init_never_replaces_the_ca(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    init_local_ca(data_dir, TRUST_DOMAIN)
    before = snapshot(data_dir)
    with pytest.raises(CaExistsError, match="already exists") as refused:
        init_local_ca(data_dir, TRUST_DOMAIN)
    assert "--force" in str(refused.value)
    with pytest.raises(CaExistsError):
        import_cacerts(data_dir, tmp_path, TRUST_DOMAIN)
    assert snapshot(data_dir) == before
    assert staging_dirs(data_dir) == []


def test_force_keeps_the_old_ca_in_a_timestamped_backup(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    old = init_local_ca(data_dir, TRUST_DOMAIN)
    old_files = snapshot(data_dir / "ca")
    new = init_local_ca(data_dir, TRUST_DOMAIN, force=True)
    assert new.bundle != old.bundle
    backups = list((data_dir / "backup").iterdir())
    assert len(backups) == 1
    assert re.fullmatch(r"ca-\d{8}T\d{6}\.\d{6}Z", backups[0].name)
    assert snapshot(backups[0]) == old_files
    assert mode(data_dir / "backup") == 0o700
    assert load_local_ca(data_dir).bundle == new.bundle
    init_local_ca(data_dir, TRUST_DOMAIN, force=True)
    assert len(list((data_dir / "backup").iterdir())) == 2
    assert staging_dirs(data_dir) == []


class _FailingWrite:
    """atomic_write that fails on its n-th call, as a full disk would."""

    def __init__(self, fail_on: int) -> None:
        self.calls = 0
        self.fail_on = fail_on
        self.real = local.atomic_write

    def __call__(self, path: Path, data: bytes, mode: int = 0o644) -> None:
        self.calls += 1
        if self.calls == self.fail_on:
            raise OSError(28, "No space left on device")
        self.real(path, data, mode)


@pytest.mark.parametrize("fail_on", [1, 3, 6])
def test_a_failed_init_leaves_no_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_on: int
) -> None:
    data_dir = tmp_path / "data"
    monkeypatch.setattr(local, "atomic_write", _FailingWrite(fail_on))
    with pytest.raises(OSError, match="No space left"):
        init_local_ca(data_dir, TRUST_DOMAIN)
    assert list(data_dir.iterdir()) == []
    monkeypatch.undo()
    init_local_ca(data_dir, TRUST_DOMAIN)  # and a retry works


def test_a_failed_forced_init_keeps_the_old_ca(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    init_local_ca(data_dir, TRUST_DOMAIN)
    before = snapshot(data_dir)
    monkeypatch.setattr(local, "atomic_write", _FailingWrite(4))
    with pytest.raises(OSError):
        init_local_ca(data_dir, TRUST_DOMAIN, force=True)
    assert snapshot(data_dir) == before
    assert staging_dirs(data_dir) == []
    assert not (data_dir / "backup").exists()


# import_cacerts --------------------------------------------------------------------------


def test_import_istio_layout(tmp_path: Path, source_ca: InMemoryCa) -> None:
    source = source_ca.write_istio_layout(tmp_path / "cacerts")
    data_dir = tmp_path / "data"
    ca = import_cacerts(data_dir, source, TRUST_DOMAIN)
    assert ca.origin == "imported (istio)"
    assert ca.bundle.roots == source_ca.bundle.roots
    assert ca.signer.certificate == source_ca.signer.certificate
    assert ca.signer.intermediates == source_ca.signer.intermediates
    ca_dir = data_dir / "ca"
    assert not (ca_dir / "root-key.pem").exists()  # the root key stays with its owner
    assert mode(ca_dir / "ca-key.pem") == 0o600
    assert mode(ca_dir) == 0o700
    svid = Issuer(load_local_ca(data_dir).authority()).issue(WORKLOAD)
    assert len(svid.chain) == 3  # leaf, signing CA, the intermediate above it
    assert_independently_valid(svid, ca.bundle, tmp_path / "check")
    assert staging_dirs(data_dir) == []


def test_import_kubernetes_tls_layout(tmp_path: Path, source_ca: InMemoryCa) -> None:
    source = source_ca.write_kubernetes_tls_layout(tmp_path / "secret")
    data_dir = tmp_path / "data"
    ca = import_cacerts(data_dir, source, TRUST_DOMAIN)
    assert ca.origin == "imported (kubernetes.io/tls)"
    assert ca.signer.intermediates == source_ca.signer.intermediates
    svid = Issuer(ca.authority()).issue(WORKLOAD)
    assert_independently_valid(svid, ca.bundle, tmp_path / "check")


def test_import_keeps_every_root_beside_the_ca(tmp_path: Path, source_ca: InMemoryCa) -> None:
    """A cacerts root file that holds the next root too (a root rotation under way)."""
    source = source_ca.write_istio_layout(tmp_path / "cacerts")
    roots = source_ca.bundle.with_root(make_ca().root.certificate)
    _replace(source, "root-cert.pem", roots.pem())
    data_dir = tmp_path / "data"
    ca = import_cacerts(data_dir, source, TRUST_DOMAIN)
    assert ca.bundle == roots
    assert (data_dir / "ca" / "root-cert.pem").read_bytes() == roots.pem()


def test_import_a_root_directly(tmp_path: Path) -> None:
    """A self-signed CA plugged in as both signing CA and root."""
    ca = make_ca()
    source = tmp_path / "cacerts"
    source.mkdir()
    (source / "ca-cert.pem").write_bytes(certificates_pem([ca.root.certificate]))
    (source / "ca-key.pem").write_bytes(private_key_pem(ca.root.key))
    (source / "root-cert.pem").write_bytes(certificates_pem([ca.root.certificate]))
    imported = import_cacerts(tmp_path / "data", source, TRUST_DOMAIN)
    svid = Issuer(imported.authority()).issue(WORKLOAD)
    assert svid.chain == (svid.leaf,)
    assert_independently_valid(svid, imported.bundle, tmp_path / "check")


def _replace(directory: Path, name: str, data: bytes) -> Path:
    (directory / name).write_bytes(data)
    return directory


def _expired_ca() -> InMemoryCa:
    return make_ca(now=utcnow() - timedelta(days=30), signer_ttl=timedelta(days=1))


def _leaf_pem(ca: InMemoryCa) -> bytes:
    key = generate_private_key()
    leaf = build_leaf(ca.signer, key.public_key(), WORKLOAD, timedelta(hours=1))
    return certificates_pem([leaf])


def _istio(tmp_path: Path, ca: InMemoryCa) -> Path:
    return ca.write_istio_layout(tmp_path / "cacerts")


REFUSALS = {
    "key-mismatch": (
        lambda tmp, ca: _replace(
            _istio(tmp, ca), "ca-key.pem", private_key_pem(generate_private_key())
        ),
        "does not match",
    ),
    "does-not-chain": (
        lambda tmp, ca: _replace(_istio(tmp, ca), "root-cert.pem", make_ca().bundle.pem()),
        "does not chain to root-cert.pem",
    ),
    "expired": (lambda tmp, ca: _expired_ca().write_istio_layout(tmp / "cacerts"), "expired"),
    "missing-key": (
        lambda tmp, ca: (_istio(tmp, ca) / "ca-key.pem").unlink() or tmp / "cacerts",
        "cannot read .*ca-key.pem",
    ),
    "missing-root": (
        lambda tmp, ca: (_istio(tmp, ca) / "root-cert.pem").unlink() or tmp / "cacerts",
        "cannot read .*root-cert.pem",
    ),
    "missing-tls-ca": (
        lambda tmp, ca: (
            (ca.write_kubernetes_tls_layout(tmp / "tls") / "ca.crt").unlink() or tmp / "tls"
        ),
        "cannot read .*ca.crt",
    ),
    "empty-dir": (lambda tmp, ca: (tmp / "empty").mkdir() or tmp / "empty", "holds neither"),
    "not-a-dir": (lambda tmp, ca: tmp / "nowhere", "is not a directory"),
    "garbage-cert": (
        lambda tmp, ca: _replace(_istio(tmp, ca), "ca-cert.pem", b"garbage\n"),
        "cannot read ca-cert.pem",
    ),
    "garbage-key": (
        lambda tmp, ca: _replace(
            _istio(tmp, ca),
            "ca-key.pem",
            b"-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n",
        ),
        "cannot read private key",
    ),
    "garbage-root": (
        lambda tmp, ca: _replace(_istio(tmp, ca), "root-cert.pem", b"\x00\x01binary"),
        "cannot read root-cert.pem",
    ),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_import_refusals(tmp_path: Path, source_ca: InMemoryCa, case: str) -> None:
    make_source, message = REFUSALS[case]
    source = make_source(tmp_path, source_ca)
    data_dir = tmp_path / "data"
    with pytest.raises(CaError, match=message) as refused:
        import_cacerts(data_dir, source, TRUST_DOMAIN)
    assert "\n" not in str(refused.value)
    assert not (data_dir / "ca").exists()
    assert not data_dir.exists() or staging_dirs(data_dir) == []


def test_import_refuses_a_leaf_with_its_own_key(tmp_path: Path, source_ca: InMemoryCa) -> None:
    """A certificate with a matching key that is not a CA (CA=false) is no signing CA."""
    key = generate_private_key()
    leaf = build_leaf(source_ca.signer, key.public_key(), WORKLOAD, timedelta(hours=1))
    source = _istio(tmp_path, source_ca)
    _replace(source, "ca-cert.pem", certificates_pem([leaf]))
    _replace(source, "ca-key.pem", private_key_pem(key))
    with pytest.raises(CaError, match="is not a CA certificate"):
        import_cacerts(tmp_path / "data", source, TRUST_DOMAIN)


def test_import_refuses_a_ca_not_yet_valid(tmp_path: Path) -> None:
    future = make_ca(now=utcnow() + timedelta(days=2))
    source = future.write_istio_layout(tmp_path / "cacerts")
    with pytest.raises(CaError, match="not valid before"):
        import_cacerts(tmp_path / "data", source, TRUST_DOMAIN)


def test_import_refuses_a_root_that_is_not_a_ca_for_its_intermediate(tmp_path: Path) -> None:
    """A signing CA whose issuer (in cert-chain.pem) is missing cannot chain."""
    ca = make_ca(levels=2)
    source = ca.write_kubernetes_tls_layout(tmp_path / "tls")
    _replace(source, "tls.crt", certificates_pem([ca.signer.certificate]))  # drop the middle
    with pytest.raises(CaError, match="does not chain"):
        import_cacerts(tmp_path / "data", source, TRUST_DOMAIN)


# load_local_ca ---------------------------------------------------------------------------


def test_load_round_trips_init(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    made = init_local_ca(data_dir, TRUST_DOMAIN)
    loaded = load_local_ca(data_dir)
    assert loaded.signer.certificate == made.signer.certificate
    assert loaded.bundle == made.bundle
    assert loaded.trust_domain == TRUST_DOMAIN
    assert loaded.origin == "generated"


def test_load_refuses_a_private_key_readable_by_others(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    init_local_ca(data_dir, TRUST_DOMAIN)
    os.chmod(data_dir / "ca" / "ca-key.pem", 0o644)
    with pytest.raises(CaError, match="must be 0600"):
        load_local_ca(data_dir)


def test_load_refuses_a_key_that_does_not_match(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    init_local_ca(data_dir, TRUST_DOMAIN)
    key_file = data_dir / "ca" / "ca-key.pem"
    key_file.write_bytes(private_key_pem(generate_private_key()))
    with pytest.raises(CaError, match="does not match"):
        load_local_ca(data_dir)


def test_load_without_a_ca_says_to_run_init(tmp_path: Path) -> None:
    with pytest.raises(CaMissingError, match="meshca init"):
        load_local_ca(tmp_path / "data")


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("meta.json", b"{not json", "meta.json is unreadable"),
        ("meta.json", b'{"trust_domain": "Bad Domain"}', "meta.json is unreadable"),
        ("meta.json", b"[]", "meta.json is unreadable"),
        ("cert-chain.pem", b"garbage", "cannot read cert-chain.pem"),
        ("root-cert.pem", b"", "cannot read root-cert.pem"),
        ("ca-key.pem", b"garbage", "cannot read private key"),
    ],
)
def test_load_refuses_damaged_files(tmp_path: Path, name: str, data: bytes, message: str) -> None:
    data_dir = tmp_path / "data"
    init_local_ca(data_dir, TRUST_DOMAIN)
    (data_dir / "ca" / name).write_bytes(data)
    with pytest.raises(CaError, match=message) as refused:
        load_local_ca(data_dir)
    assert "\n" not in str(refused.value)
    assert "X.509-SVID" not in str(refused.value)


def test_an_expired_local_ca_cannot_issue(tmp_path: Path) -> None:
    """Loading an expired CA works (so it can be inspected); signing with it does not."""
    data_dir = tmp_path / "data"
    init_local_ca(data_dir, TRUST_DOMAIN)
    expired = _expired_ca()
    ca_dir = data_dir / "ca"
    (ca_dir / "cert-chain.pem").write_bytes(certificates_pem([expired.signer.certificate]))
    (ca_dir / "ca-key.pem").write_bytes(private_key_pem(expired.signer.key))
    (ca_dir / "root-cert.pem").write_bytes(expired.bundle.pem())
    loaded = load_local_ca(data_dir)
    with pytest.raises(SignerError, match="expired"):
        Issuer(loaded.authority()).issue(WORKLOAD)


def test_build_ca_root_is_self_signed_and_unique() -> None:
    key = generate_private_key()
    first = build_ca(TRUST_DOMAIN, key, timedelta(days=1))
    second = build_ca(TRUST_DOMAIN, key, timedelta(days=1))
    assert first.subject != second.subject
    first.verify_directly_issued_by(first)


def test_the_local_backend_is_opened_with_what_it_can_do(tmp_path: Path) -> None:
    """What serve relies on instead of probing: the data directory's CA signs here and is
    rotated from the data directory's keys; it has no outage to report and no roots
    that change outside meshca."""
    data_dir = tmp_path / "data"
    init_local_ca(data_dir, TRUST_DOMAIN)
    backend = load_local_ca(data_dir).opened()
    assert backend.name == "local"
    assert backend.signer is backend.authority
    assert backend.health is None and backend.roots is None
    assert isinstance(backend.rotation, LocalCaRotation)
    assert backend.rotation.data_dir == data_dir and backend.rotation.authority is backend.signer
    assert OpenedBackend.in_process(backend.signer).rotation is None  # a key not kept on disk

"""Independent checks of an issued X.509-SVID: py-spiffe and ``openssl verify``.

meshca's own verifier is not trusted to judge meshca's certificates; these two are
written by others and are what a workload's libraries and proxies actually run.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import spiffe
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.issuer import TrustBundle, X509Svid
from meshca.issuer.keys import PrivateKey, private_key_pem
from meshca.issuer.svid import certificates_pem

OPENSSL = shutil.which("openssl") or "openssl"


def openssl_verify(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    directory: Path,
    *,
    purpose: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``openssl verify -x509_strict -CAfile bundle.pem -untrusted ... cert.pem``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cert.pem").write_bytes(certificates_pem([leaf]))
    (directory / "bundle.pem").write_bytes(certificates_pem(list(roots)))
    command = [OPENSSL, "verify", "-x509_strict", "-CAfile", str(directory / "bundle.pem")]
    if intermediates:
        (directory / "intermediates.pem").write_bytes(certificates_pem(list(intermediates)))
        command += ["-untrusted", str(directory / "intermediates.pem")]
    if purpose:
        command += ["-purpose", purpose]
    command.append(str(directory / "cert.pem"))
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=30)


def assert_openssl_accepts(
    svid: X509Svid, bundle: TrustBundle, directory: Path, *, purposes: bool = True
) -> None:
    """openssl verifies the chain, and (by default) for both TLS client and server use."""
    for purpose in ("sslclient", "sslserver") if purposes else (None,):
        result = openssl_verify(
            svid.leaf, svid.intermediates, bundle.roots, directory, purpose=purpose
        )
        assert result.returncode == 0, f"openssl verify ({purpose}): {result.stdout}{result.stderr}"
        assert result.stdout.strip().endswith(": OK"), result.stdout


def assert_py_spiffe_accepts(svid: X509Svid, private_key: PrivateKey | None = None) -> None:
    """py-spiffe parses the chain and key as an X.509-SVID with the same SPIFFE ID."""
    key = private_key if private_key is not None else svid.private_key
    assert key is not None, "py-spiffe needs the SVID's private key"
    parsed = spiffe.X509Svid.parse(svid.chain_pem(), private_key_pem(key))
    assert str(parsed.spiffe_id) == str(svid.spiffe_id)
    assert [c.public_bytes(serialization.Encoding.DER) for c in parsed.cert_chain] == [
        c.public_bytes(serialization.Encoding.DER) for c in svid.chain
    ]


def assert_independently_valid(
    svid: X509Svid,
    bundle: TrustBundle,
    directory: Path,
    private_key: PrivateKey | None = None,
) -> None:
    assert_py_spiffe_accepts(svid, private_key)
    assert_openssl_accepts(svid, bundle, directory)

"""SVIDs per second on one core, as ratios of OpenSSL's raw ECDSA P-256 signature rate.

Run: ``.venv/bin/python bench/issue_throughput.py [--seconds N]``

Figures (one thread pinned to one core, ec-p256 signing CA, ec-p256 leaves):
  issue        key generation + signing (``Issuer.issue``)
  sign         signing a CSR's public key alone (``build_leaf``), the target figure
  sign_csr     parsing and verifying a CSR, then signing (``Issuer.sign_csr``)
  builder      the same leaf made with a plain ``CertificateBuilder`` (the reference)
OpenSSL's rate (``openssl speed ecdsap256``) is measured before and after the Python
figures in the same run and averaged: these machines are noisy, so only ratios mean
anything. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from meshca.backends.local import init_local_ca
from meshca.issuer import Issuer
from meshca.issuer.keys import PublicKey
from meshca.issuer.profile import Signer, build_leaf, random_serial, utcnow
from meshca.spiffe import SpiffeId, TrustDomain

TARGET_SIGN_RATIO = 0.25
_OPENSSL_LINE = re.compile(r"^\s*256 bits ecdsa \(nistp256\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)")


def openssl_sign_rate(seconds: int) -> float:
    """Signatures per second from ``openssl speed -seconds N ecdsap256``."""
    openssl = shutil.which("openssl")
    if openssl is None:
        sys.exit("openssl not found on PATH: it is the baseline of this benchmark")
    out = subprocess.run(
        [openssl, "speed", "-seconds", str(seconds), "ecdsap256"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for line in out.splitlines():
        match = _OPENSSL_LINE.match(line)
        if match:
            return float(match.group(1))
    sys.exit(f"cannot find the ecdsa (nistp256) line in openssl's output:\n{out}")


def rate(action: Callable[[], object], seconds: float) -> float:
    """Calls per second of ``action`` over about ``seconds`` (after a short warm-up)."""
    for _ in range(50):
        action()
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(100):
            action()
        count += 100
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def builder_leaf(signer: Signer, public_key: PublicKey, spiffe_id: SpiffeId) -> x509.Certificate:
    """The same leaf through CertificateBuilder: what build_leaf cost before its template."""
    now = utcnow()
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(signer.certificate.subject)
        .public_key(public_key)
        .serial_number(random_serial())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=24))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(signer.authority_key_identifier, critical=False)
        .sign(signer.key, hashes.SHA256())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=2, help="duration of each measurement")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny counts: checks that it runs (make test does)"
    )
    args = parser.parse_args()
    seconds = 1 if args.smoke else args.seconds
    measured = 0.05 if args.smoke else float(seconds)
    # One core: this process and the openssl it runs share the same one.
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

    trust_domain = TrustDomain("cluster.local")
    spiffe_id = SpiffeId.from_kubernetes("bench", "client", trust_domain)
    ttl = timedelta(hours=24)
    with tempfile.TemporaryDirectory() as data_dir:
        ca = init_local_ca(Path(data_dir), trust_domain)
    issuer = Issuer(ca.authority())
    csr_key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(csr_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    public_key = csr_key.public_key()

    openssl_before = openssl_sign_rate(seconds)
    figures = {
        "issue_per_s": rate(lambda: issuer.issue(spiffe_id), measured),
        "sign_per_s": rate(lambda: build_leaf(ca.signer, public_key, spiffe_id, ttl), measured),
        "sign_csr_per_s": rate(lambda: issuer.sign_csr(spiffe_id, csr), measured),
        "builder_per_s": rate(lambda: builder_leaf(ca.signer, public_key, spiffe_id), measured),
    }
    openssl_after = openssl_sign_rate(seconds)
    openssl = (openssl_before + openssl_after) / 2

    ratios = {name.replace("_per_s", "_ratio"): value / openssl for name, value in figures.items()}
    print(
        f"openssl speed ecdsap256: {openssl:10.0f} sign/s "
        f"(before {openssl_before:.0f}, after {openssl_after:.0f})"
    )
    labels = {
        "issue_per_s": "key generation + signing",
        "sign_per_s": "signing a CSR's key alone",
        "sign_csr_per_s": "CSR parse + verify + sign",
        "builder_per_s": "CertificateBuilder reference",
    }
    for name, value in figures.items():
        ratio = ratios[name.replace("_per_s", "_ratio")]
        print(f"{labels[name]:<30} {value:10.0f} SVIDs/s   {ratio:5.3f} x openssl")
    met = ratios["sign_ratio"] >= TARGET_SIGN_RATIO
    print(f"target: signing alone >= {TARGET_SIGN_RATIO} x openssl: {'met' if met else 'NOT met'}")
    result: dict[str, float | bool] = {
        "openssl_ecdsap256_sign_per_s": round(openssl, 1),
        "openssl_before_per_s": round(openssl_before, 1),
        "openssl_after_per_s": round(openssl_after, 1),
        **{name: round(value, 1) for name, value in figures.items()},
        **{name: round(value, 4) for name, value in ratios.items()},
        "target_sign_ratio": TARGET_SIGN_RATIO,
        "target_met": met,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

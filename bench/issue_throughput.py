"""SVIDs per second on one core, as ratios of OpenSSL's raw ECDSA P-256 signature rate.

Run: ``.venv/bin/python bench/issue_throughput.py [--seconds N] [--served N]``

Every path of an issuance (one thread pinned to one core, ec-p256 CA and leaves):
  sign         signing a public key alone (``build_leaf``)           goal >= 0.25
  issue        key generation + signing (``Issuer.issue``)           goal >= 0.35
  sign_csr     parsing and verifying a CSR, then signing (``Issuer.sign_csr``): the
               CSR API's path                                         goal >= 0.25
               Its floor in C is one verify and one sign at OpenSSL's own rates,
               1 / (1/sign + 1/verify) (``openssl speed`` verifies at about a third
               of its signing rate): printed beside it as ``csr_floor``, a reference
               for how close the Python path is to what OpenSSL alone would do.
  builder      the same leaf made with a plain ``CertificateBuilder`` (a reference)
  served       new identities over SDS, one per stream (``bench/sds_fanout.py --cases
               issuance``, ``--served`` identities), per server CPU-second  goal >= 0.10
               Beside it, the same streams already held (serving without issuance) and
               a plain grpc.aio servicer answering the same shape of streams with a
               fixed message: the ceiling of a Python gRPC server on this machine.
Rates are per CPU-second of the measuring thread, as ``openssl speed`` reports its own
(it divides by user CPU time): on a machine shared with other work, wall-clock rates
would mostly measure the others. OpenSSL's rates (``openssl speed ecdsap256``, sign and
verify) are measured before and after the Python figures in the same run and averaged. The last
line is one JSON object with every figure.
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

TARGETS = {"sign_ratio": 0.25, "issue_ratio": 0.35, "sign_csr_ratio": 0.25, "served_ratio": 0.10}
_OPENSSL_LINE = re.compile(r"^\s*256 bits ecdsa \(nistp256\)\s+\S+s\s+\S+s\s+([\d.]+)\s+([\d.]+)")


def openssl_rates(seconds: int) -> tuple[float, float]:
    """(signatures, verifications) per second from ``openssl speed -seconds N ecdsap256``."""
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
            return float(match.group(1)), float(match.group(2))
    sys.exit(f"cannot find the ecdsa (nistp256) line in openssl's output:\n{out}")


def rate(action: Callable[[], object], seconds: float) -> float:
    """Calls per CPU-second of this thread, over about ``seconds`` of its CPU time (after
    a short warm-up)."""
    for _ in range(50):
        action()
    count = 0
    start = time.thread_time()
    deadline = start + seconds
    while True:
        for _ in range(100):
            action()
        count += 100
        now = time.thread_time()
        if now >= deadline:
            return count / (now - start)


def served_rate(identities: int) -> dict[str, float]:
    """New identities over SDS per server CPU-second, from bench/sds_fanout.py's issuance
    case (a server process of its own; this one's core is left to openssl and Python)."""
    fanout = Path(__file__).with_name("sds_fanout.py")
    command = [sys.executable, str(fanout), "--cases", "issuance", "--streams", str(identities)]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    figures = json.loads(out.strip().splitlines()[-1])
    return {
        "served_per_s": figures["issuance_per_server_cpu_s"],
        "served_wall_per_s": figures["issuance_per_s"],
        "served_held_per_s": figures["held_per_server_cpu_s"],
        "plain_grpc_per_s": figures["plain_grpc_per_server_cpu_s"],
    }


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
        "--served", type=int, default=1000, help="identities of the served case (0: skip it)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny counts: checks that it runs (make test does)"
    )
    args = parser.parse_args()
    served = served_rate(4 if args.smoke else args.served) if args.served else {}
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

    openssl_before, verify_before = openssl_rates(seconds)
    figures = {
        "issue_per_s": rate(lambda: issuer.issue(spiffe_id), measured),
        "sign_per_s": rate(lambda: build_leaf(ca.signer, public_key, spiffe_id, ttl), measured),
        "sign_csr_per_s": rate(lambda: issuer.sign_csr(spiffe_id, csr), measured),
        "builder_per_s": rate(lambda: builder_leaf(ca.signer, public_key, spiffe_id), measured),
    }
    openssl_after, verify_after = openssl_rates(seconds)
    openssl = (openssl_before + openssl_after) / 2
    verify = (verify_before + verify_after) / 2
    # What OpenSSL alone would do for a CSR: one verification and one signature.
    figures["csr_floor_per_s"] = 1 / (1 / openssl + 1 / verify)
    figures.update(served)

    ratios = {name.replace("_per_s", "_ratio"): value / openssl for name, value in figures.items()}
    print(
        f"openssl speed ecdsap256: {openssl:10.0f} sign/s "
        f"(before {openssl_before:.0f}, after {openssl_after:.0f}); "
        f"{verify:.0f} verify/s (before {verify_before:.0f}, after {verify_after:.0f})"
    )
    labels = {
        "sign_per_s": "signing a key alone (build_leaf)",
        "issue_per_s": "key generation + signing",
        "sign_csr_per_s": "CSR parse + verify + sign",
        "csr_floor_per_s": "  floor in C: 1/(1/sign + 1/verify)",
        "builder_per_s": "CertificateBuilder reference",
        "served_per_s": "new identities over SDS",
        "served_wall_per_s": "  the same, in wall time",
        "served_held_per_s": "  the same streams, already held",
        "plain_grpc_per_s": "  a plain grpc.aio servicer",
    }
    for name in (name for name in labels if name in figures):
        value = figures[name]
        ratio_name = name.replace("_per_s", "_ratio")
        goal = f"  (goal >= {TARGETS[ratio_name]})" if ratio_name in TARGETS else ""
        print(
            f"{labels[name]:<34} {value:10.0f} /CPU-s   {ratios[ratio_name]:5.3f} x openssl{goal}"
        )
    # How close each path is to the ceiling it cannot pass: the CSR path to OpenSSL's
    # verify-and-sign, served issuance to a plain grpc.aio servicer.
    of_ceiling = {
        "sign_csr_of_floor": ("sign_csr_per_s", "csr_floor_per_s", "CSR path / its floor in C")
    }
    if served:
        of_ceiling["served_of_plain_grpc"] = (
            "served_per_s",
            "plain_grpc_per_s",
            "new identities over SDS / plain grpc.aio",
        )
        of_ceiling["held_of_plain_grpc"] = (
            "served_held_per_s",
            "plain_grpc_per_s",
            "streams already held / plain grpc.aio",
        )
    fractions = {name: figures[a] / figures[b] for name, (a, b, _) in of_ceiling.items()}
    for name, value in fractions.items():
        print(f"{of_ceiling[name][2]:<42} {value:5.3f}")
    verdicts = {name: ratios[name] >= goal for name, goal in TARGETS.items() if name in ratios}
    for name, ok in verdicts.items():
        print(f"target: {name} >= {TARGETS[name]}: {'met' if ok else 'NOT met'}")
    met = all(verdicts.values())
    result: dict[str, float | bool] = {
        "openssl_ecdsap256_sign_per_s": round(openssl, 1),
        "openssl_before_per_s": round(openssl_before, 1),
        "openssl_after_per_s": round(openssl_after, 1),
        "openssl_ecdsap256_verify_per_s": round(verify, 1),
        **{name: round(value, 1) for name, value in figures.items()},
        **{name: round(value, 4) for name, value in ratios.items()},
        **{name: round(value, 4) for name, value in fractions.items()},
        **{f"target_{name}": goal for name, goal in TARGETS.items()},
        "targets_met": met,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

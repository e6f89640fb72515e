"""In-memory CAs for tests: a root and a signing intermediate, made with meshca's profile."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from meshca.issuer import KeyType, Signer, TrustBundle
from meshca.issuer.keys import generate_private_key, private_key_pem
from meshca.issuer.profile import build_ca
from meshca.issuer.svid import certificates_pem
from meshca.spiffe import TrustDomain

TRUST_DOMAIN = TrustDomain("cluster.local")


@dataclass(frozen=True)
class InMemoryCa:
    root: Signer
    signer: Signer  # the intermediate that signs leaves
    bundle: TrustBundle

    def write_istio_layout(self, directory: Path) -> Path:
        """Istio's plugged-in CA layout: ca-cert, ca-key, root-cert, cert-chain."""
        directory.mkdir(parents=True, exist_ok=True)
        signer = self.signer
        (directory / "ca-cert.pem").write_bytes(certificates_pem([signer.certificate]))
        (directory / "ca-key.pem").write_bytes(private_key_pem(signer.key))
        (directory / "root-cert.pem").write_bytes(self.bundle.pem())
        chain = [signer.certificate, *signer.intermediates, self.root.certificate]
        (directory / "cert-chain.pem").write_bytes(certificates_pem(chain))
        return directory

    def write_kubernetes_tls_layout(self, directory: Path) -> Path:
        """A kubernetes.io/tls secret: tls.crt (CA cert then intermediates), tls.key, ca.crt."""
        directory.mkdir(parents=True, exist_ok=True)
        signer = self.signer
        tls_crt = certificates_pem([signer.certificate, *signer.intermediates])
        (directory / "tls.crt").write_bytes(tls_crt)
        (directory / "tls.key").write_bytes(private_key_pem(signer.key))
        (directory / "ca.crt").write_bytes(self.bundle.pem())
        return directory


def make_ca(
    key_type: KeyType = KeyType.EC_P256,
    *,
    trust_domain: TrustDomain = TRUST_DOMAIN,
    root_ttl: timedelta = timedelta(days=3650),
    signer_ttl: timedelta = timedelta(days=365),
    now: datetime | None = None,
    levels: int = 1,
) -> InMemoryCa:
    """A root and ``levels`` intermediates below it; the last one signs leaves."""
    root_key = generate_private_key(key_type)
    root = Signer(root_key, build_ca(trust_domain, root_key, root_ttl, now=now))
    parent = root
    above: tuple[Signer, ...] = ()
    for level in range(levels):
        key = generate_private_key(key_type)
        last = level == levels - 1
        cert = build_ca(
            trust_domain,
            key,
            signer_ttl,
            parent=parent,
            role="intermediate",
            path_length=0 if last else None,
            now=now,
        )
        intermediates = tuple(s.certificate for s in above)
        parent = Signer(key, cert, tuple(reversed(intermediates)))
        above = (*above, parent)
    return InMemoryCa(root, parent, TrustBundle.of(trust_domain, [root.certificate]))

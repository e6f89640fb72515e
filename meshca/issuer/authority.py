"""The signing-authority interface backends implement, and the Issuer that uses it.

The issuer owns policy (TTLs, key types, which trust domain); an authority owns a
root of trust and the act of signing. ``backends`` implement :class:`SigningAuthority`
(and may use :class:`SignerAuthority` when they hold a signing key themselves).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from cryptography import x509

from meshca.issuer.bundle import TrustBundle
from meshca.issuer.csr import csr_public_key, load_csr
from meshca.issuer.errors import IssuerError
from meshca.issuer.keys import (
    DEFAULT_KEY_TYPE,
    KeyType,
    PrivateKey,
    PublicKey,
    generate_private_key,
)
from meshca.issuer.policy import TtlPolicy
from meshca.issuer.profile import DEFAULT_SKEW, Signer, build_leaf, check_dns_names, hash_for
from meshca.issuer.svid import X509Svid
from meshca.issuer.verify import self_check
from meshca.spiffe import SpiffeId, TrustDomain


@dataclass(frozen=True)
class LeafRequest:
    """What to certify; built by the Issuer after policy checks, never from a CSR's contents."""

    spiffe_id: SpiffeId
    public_key: PublicKey
    ttl: timedelta
    dns_names: tuple[str, ...] = ()
    skew: timedelta = DEFAULT_SKEW
    # Proof of possession for authorities that sign elsewhere (Vault): never trusted for
    # content, the authority still certifies only ``spiffe_id`` and ``dns_names``.
    csr: x509.CertificateSigningRequest | None = None


class SigningAuthority(Protocol):
    """A root of trust that signs leaves. Implementations must be thread-safe.

    An authority that needs a CSR signed by the leaf key (it signs remotely) sets a
    ``requires_csr = True`` attribute; the Issuer then puts one in every request.
    """

    @property
    def trust_domain(self) -> TrustDomain: ...

    def sign(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        """The signed leaf followed by the intermediates up to (not including) the root."""
        ...

    def bundle(self) -> TrustBundle: ...


@dataclass
class SignerAuthority:
    """An authority whose signing key is held in this process (local CA, Vault intermediate)."""

    signer: Signer
    trust_bundle: TrustBundle
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self_check(self.signer, self.trust_bundle)

    @property
    def trust_domain(self) -> TrustDomain:
        return self.trust_bundle.trust_domain

    def sign(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        signer = self.signer
        leaf = build_leaf(
            signer,
            request.public_key,
            request.spiffe_id,
            request.ttl,
            dns_names=request.dns_names,
            skew=request.skew,
        )
        return (leaf, *signer.chain)

    def bundle(self) -> TrustBundle:
        return self.trust_bundle

    def activate(self, signer: Signer, bundle: TrustBundle | None = None) -> None:
        """Switch to a new signer (after its self-check against the bundle it will use)."""
        bundle = bundle or self.trust_bundle
        self_check(signer, bundle)
        with self._lock:
            self.signer = signer
            self.trust_bundle = bundle


class Issuer:
    """Issues X.509-SVIDs for one trust domain under a TTL policy."""

    def __init__(
        self,
        authority: SigningAuthority,
        policy: TtlPolicy | None = None,
        default_key_type: KeyType = DEFAULT_KEY_TYPE,
    ) -> None:
        self.authority = authority
        self.policy = policy or TtlPolicy()
        self.default_key_type = default_key_type

    @property
    def trust_domain(self) -> TrustDomain:
        return self.authority.trust_domain

    def bundle(self) -> TrustBundle:
        return self.authority.bundle()

    def _request(
        self,
        spiffe_id: SpiffeId,
        public_key: PublicKey,
        ttl: timedelta | None,
        dns_names: Sequence[str],
        csr: x509.CertificateSigningRequest | None = None,
    ) -> LeafRequest:
        if spiffe_id.trust_domain != self.trust_domain:
            raise IssuerError(f"{spiffe_id} is outside this CA's trust domain {self.trust_domain}")
        return LeafRequest(
            spiffe_id,
            public_key,
            self.policy.resolve(ttl),
            check_dns_names(dns_names),
            self.policy.skew,
            csr,
        )

    def issue(
        self,
        spiffe_id: SpiffeId,
        *,
        ttl: timedelta | None = None,
        key_type: KeyType | None = None,
        dns_names: Sequence[str] = (),
    ) -> X509Svid:
        """Generate a key and sign an SVID for it."""
        key = generate_private_key(key_type or self.default_key_type)
        csr = None
        if getattr(self.authority, "requires_csr", False):
            csr = workload_csr(key, spiffe_id, dns_names)
        request = self._request(spiffe_id, key.public_key(), ttl, dns_names, csr)
        return X509Svid(spiffe_id, self.authority.sign(request), key)

    def sign_csr(
        self, spiffe_id: SpiffeId, csr: bytes, *, ttl: timedelta | None = None
    ) -> X509Svid:
        """Sign the public key of ``csr`` for ``spiffe_id`` (the CSR's own claims are ignored)."""
        loaded = load_csr(csr)
        public_key = csr_public_key(loaded)
        request = self._request(spiffe_id, public_key, ttl, (), loaded)
        return X509Svid(spiffe_id, self.authority.sign(request), None)


def workload_csr(
    key: PrivateKey, spiffe_id: SpiffeId, dns_names: Sequence[str]
) -> x509.CertificateSigningRequest:
    """A CSR with an empty subject and only the requested names, for remote authorities."""
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    names.extend(x509.DNSName(name) for name in dns_names)
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .sign(key, hash_for(key))
    )

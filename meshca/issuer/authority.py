"""The signing-authority interface backends implement, and the Issuer that uses it.

The issuer owns policy (TTLs, key types, which trust domain); an authority owns a
root of trust and the act of signing. ``backends`` implement :class:`SigningAuthority`
(and may use :class:`ActiveSigner` when they hold a signing key themselves).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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

IssueObserver = Callable[[float, BaseException | None], None]
"""Told, in the issuing thread, how long one issuance took (seconds) and how it ended
(None when an SVID was issued). Must be thread-safe and quick."""


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
    """A root of trust that signs leaves. Implementations must be thread-safe."""

    @property
    def trust_domain(self) -> TrustDomain: ...

    @property
    def requires_csr(self) -> bool:
        """True for an authority that signs remotely (Vault per-workload) and wants proof
        of possession: the Issuer then puts a CSR signed by the leaf key in every request."""
        ...

    def sign(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        """The signed leaf followed by the intermediates up to (not including) the root."""
        ...

    def bundle(self) -> TrustBundle: ...


class ActiveSigner:
    """An authority whose signing key is held in this process (local CA, Vault intermediate).

    The signer and the bundle are held as one pair, replaced at once, so a leaf is never
    signed by a CA whose root is missing from the bundle served beside it. Readers take
    no lock; :meth:`activate` serialises switches.
    """

    requires_csr = False  # the key is here: a public key is all it needs

    def __init__(self, signer: Signer, trust_bundle: TrustBundle) -> None:
        self_check(signer, trust_bundle)
        self._current = (signer, trust_bundle)
        self._lock = threading.Lock()

    @property
    def signer(self) -> Signer:
        return self._current[0]

    @property
    def trust_domain(self) -> TrustDomain:
        return self._current[1].trust_domain

    def sign(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        signer = self._current[0]
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
        return self._current[1]

    def current(self) -> tuple[Signer, TrustBundle]:
        """The signer and the bundle it is served with, read together."""
        return self._current

    def activate(self, signer: Signer | None = None, bundle: TrustBundle | None = None) -> None:
        """Switch to a new signer and/or bundle (None keeps the current one), after the
        self-check of the pair; a failed check changes nothing."""
        with self._lock:
            current_signer, current_bundle = self._current
            pair = (
                current_signer if signer is None else signer,
                current_bundle if bundle is None else bundle,  # an empty bundle is falsy
            )
            self_check(*pair)
            self._current = pair


class Issuer:
    """Issues X.509-SVIDs for one trust domain under a TTL policy; every issuance and CSR
    signing, successful or not, is reported to ``issue_observers``."""

    def __init__(
        self,
        authority: SigningAuthority,
        policy: TtlPolicy | None = None,
        default_key_type: KeyType = DEFAULT_KEY_TYPE,
        *,
        issue_observers: Sequence[IssueObserver] = (),
    ) -> None:
        self.authority = authority
        self.policy = policy or TtlPolicy()
        self.default_key_type = default_key_type
        self.issue_observers: list[IssueObserver] = list(issue_observers)

    def _report(self, started: float, error: BaseException | None) -> None:
        elapsed = time.perf_counter() - started
        for observe in list(self.issue_observers):
            try:
                observe(elapsed, error)
            except Exception:
                # only here: `meshca issue` does not load logging
                from meshca.util.logger import get_logger

                get_logger("meshca.issuer").exception("an issuance observer failed")

    @property
    def trust_domain(self) -> TrustDomain:
        return self.authority.trust_domain

    def bundle(self) -> TrustBundle:
        return self.authority.bundle()

    def issues_quickly(self, key_type: KeyType | None = None) -> bool:
        """Whether :meth:`issue` is a fraction of a millisecond of work in this process:
        an EC key, signed by a key held here. Callers on an event loop run such an
        issuance inline (a thread hand-off costs more than the work); RSA key generation
        (up to seconds) and remote signing belong in a thread."""
        return (
            isinstance(self.authority, ActiveSigner)
            and not (key_type or self.default_key_type).is_rsa
        )

    def _checked(
        self, spiffe_id: SpiffeId, ttl: timedelta | None, dns_names: Sequence[str]
    ) -> tuple[timedelta, tuple[str, ...]]:
        """The policy's verdict on a request, before any key is made or CSR parsed:
        the TTL to sign with and the DNS names."""
        if spiffe_id.trust_domain != self.trust_domain:
            raise IssuerError(f"{spiffe_id} is outside this CA's trust domain {self.trust_domain}")
        return self.policy.resolve(ttl), check_dns_names(dns_names)

    def issue(
        self,
        spiffe_id: SpiffeId,
        *,
        ttl: timedelta | None = None,
        key_type: KeyType | None = None,
        dns_names: Sequence[str] = (),
    ) -> X509Svid:
        """Generate a key and sign an SVID for it."""
        started = time.perf_counter()
        try:
            resolved, names = self._checked(spiffe_id, ttl, dns_names)
            key = generate_private_key(key_type or self.default_key_type)
            csr = None
            if self.authority.requires_csr:
                csr = workload_csr(key, spiffe_id, names)
            request = LeafRequest(
                spiffe_id, key.public_key(), resolved, names, self.policy.skew, csr
            )
            svid = X509Svid(spiffe_id, self.authority.sign(request), key)
        except BaseException as exc:
            self._report(started, exc)
            raise
        self._report(started, None)
        return svid

    def sign_csr(
        self,
        spiffe_id: SpiffeId,
        csr: bytes | x509.CertificateSigningRequest,
        *,
        ttl: timedelta | None = None,
    ) -> X509Svid:
        """Sign the public key of ``csr`` (DER or PEM, or already read) for ``spiffe_id``
        (the CSR's own claims are ignored; its signature is verified here)."""
        started = time.perf_counter()
        try:
            resolved, _ = self._checked(spiffe_id, ttl, ())
            loaded = csr if isinstance(csr, x509.CertificateSigningRequest) else load_csr(csr)
            request = LeafRequest(
                spiffe_id, csr_public_key(loaded), resolved, (), self.policy.skew, loaded
            )
            svid = X509Svid(spiffe_id, self.authority.sign(request), None)
        except BaseException as exc:
            self._report(started, exc)
            raise
        self._report(started, None)
        return svid


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

"""The Vault backend: a root of trust kept in Vault's (or OpenBao's) PKI engine.

Two modes (``VaultSettings.mode``):

``intermediate`` (default)
    meshca generates a signing key, Vault signs it as an intermediate CA (path length
    0, URI SAN ``spiffe://<td>``), and leaves are signed here at local speed. Vault is
    needed only to obtain the intermediate and to read the roots, so an outage costs
    nothing until the intermediate itself is due. When the next intermediate is
    obtained and when it starts signing is the signing-CA rotation machinery's
    business (``meshca.rotation.vault_ca``); this module only obtains, keeps and
    reloads intermediates.
``per-workload``
    Vault signs every SVID (``sign/<role>`` or ``sign-verbatim``); meshca never holds
    a signing key. TTLs are sent in seconds, exactly as the policy resolves them.

The trust bundle is every root of the mount's issuers, so a root rotated in inside
Vault (a new issuer) reaches the bundle when the server polls the roots. Errors are
:class:`BackendUnavailable` when Vault cannot be reached (transient: keep serving, it
recovers by itself) or :class:`BackendError` naming the setting to fix.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from cryptography import x509

from meshca.backends.errors import BackendError, BackendUnavailable
from meshca.backends.opened import IntermediateRotation, OpenedBackend
from meshca.backends.vault.client import VaultClient
from meshca.backends.vault.pki import VaultPki
from meshca.backends.vault.settings import VaultMode, VaultSettings
from meshca.issuer import (
    ActiveSigner,
    ChainError,
    KeyTypeError,
    LeafRequest,
    Signer,
    SignerError,
    SvidError,
    TrustBundle,
    TtlError,
)
from meshca.issuer.keys import (
    generate_private_key,
    key_matches,
    load_private_key_pem,
    private_key_pem,
)
from meshca.issuer.policy import check_ca_covers_leaves
from meshca.issuer.profile import ca_subject, hash_for, utcnow
from meshca.issuer.svid import certificates_pem, load_certificates_pem
from meshca.issuer.verify import verify_chain
from meshca.spiffe import TrustDomain
from meshca.util.files import PRIVATE, PUBLIC, atomic_write, ensure_private_dir, loose_key_mode
from meshca.util.formats import rfc3339, serial_hex
from meshca.util.logger import get_logger
from meshca.util.retry import Backoff

log = get_logger("meshca.backends.vault")

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "VaultIntermediateAuthority",
    "VaultWorkloadAuthority",
    "open_vault_authority",
]


VAULT = "vault"  # the backend's name (a metrics label)


class _VaultAuthority:
    """What both modes share: the client, the PKI mount, the bundle, health."""

    def __init__(self, client: VaultClient, pki: VaultPki) -> None:
        self.client = client
        self.pki = pki
        self.settings = client.settings
        self._refresh_lock = threading.Lock()

    @property
    def trust_domain(self) -> TrustDomain:
        return self.pki.trust_domain

    @property
    def healthy(self) -> bool:
        """False while Vault is unreachable (requests fail fast, probes back off)."""
        return self.client.healthy

    @property
    def last_error(self) -> str | None:
        return self.client.last_error

    def on_recovery(self, callback: Callable[[], None]) -> Callable[[], None]:
        """See :meth:`meshca.backends.vault.client.VaultClient.on_recovery`."""
        return self.client.on_recovery(callback)

    def describe(self) -> str:
        """Which Vault and mount, for messages."""
        s = self.settings
        where = f"mount '{s.mount}' at {s.addr}"
        where += f" (namespace {s.namespace})" if s.namespace else ""
        return where + (f", issuer '{s.issuer}'" if s.issuer else "")

    def start(self) -> None:
        """Token renewal and outage recovery in background threads."""
        self.client.start()

    def close(self) -> None:
        self.client.close()


class VaultWorkloadAuthority(_VaultAuthority):
    """``per-workload`` mode: Vault signs each SVID; meshca holds no signing key."""

    requires_csr = True

    def __init__(self, client: VaultClient, pki: VaultPki, bundle: TrustBundle) -> None:
        super().__init__(client, pki)
        self._bundle = bundle
        self._chain_check = VaultChainVerifier()

    def bundle(self) -> TrustBundle:
        return self._bundle

    def opened(self) -> OpenedBackend:
        """This authority with what it can do: it can be unreachable, its roots change
        inside Vault, and it is closed after use. It holds no key: nothing to rotate."""
        return OpenedBackend(VAULT, self, health=self, roots=self, close=self.close)

    def refresh_bundle(self) -> TrustBundle:
        """Re-read the mount's roots (raises BackendUnavailable during an outage)."""
        with self._refresh_lock:
            bundle = self.pki.roots()
            if bundle != self._bundle:
                log.info("vault: trust bundle now holds %d root(s)", len(bundle))
                self._bundle = bundle
            return bundle

    def sign(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        chain = self.pki.sign_leaf(request)
        try:
            self._chain_check.check(chain, self._bundle)
        except ChainError:
            # signed under a root this process has not seen yet: a rotation inside Vault
            bundle = self.refresh_bundle()
            try:
                self._chain_check.check(chain, bundle)
            except ChainError as exc:
                raise BackendError(
                    f"vault: the certificate for {request.spiffe_id} does not chain to any "
                    f"root of mount '{self.settings.mount}': {exc}"
                ) from None
            log.warning(
                "vault: %s was signed under a root new to the bundle; the bundle was refreshed "
                "(add new roots as issuers before making them the default)",
                request.spiffe_id,
            )
        return chain


class VaultChainVerifier:
    """Checks that Vault's leaves chain to the bundle, at the cost of a signature check
    per CA chain rather than per leaf.

    The first leaf under a given CA chain and bundle is verified in full (signatures,
    validity, up to a root). Later leaves under the same verified chain are checked for
    their link to it (issuer name and key identifier) and their validity: they arrive
    from Vault over the authenticated connection in answer to this request, and their
    content was checked already, so a second ECDSA verification per SVID (the largest
    cost in per-workload mode after Vault itself) would buy nothing a proxy's own
    verification does not.
    """

    def __init__(self) -> None:
        self._verified: set[tuple[TrustBundle, tuple[x509.Certificate, ...]]] = set()

    def check(self, chain: tuple[x509.Certificate, ...], bundle: TrustBundle) -> None:
        leaf, cas = chain[0], chain[1:]
        if (bundle, cas) in self._verified and self._linked(leaf, cas, bundle):
            return
        verify_chain(leaf, cas, bundle)
        if len(self._verified) > 64:  # bounded: a long-running server sees few CA chains
            self._verified.clear()
        self._verified.add((bundle, cas))

    @staticmethod
    def _linked(
        leaf: x509.Certificate, cas: tuple[x509.Certificate, ...], bundle: TrustBundle
    ) -> bool:
        now = utcnow()
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            return False
        candidates = cas[:1] if cas else bundle.roots
        issuer = next((c for c in candidates if c.subject == leaf.issuer), None)
        if issuer is None:
            return False
        try:
            ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
            aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        except x509.ExtensionNotFound:
            return False
        return aki.key_identifier == ski.digest


class VaultIntermediateAuthority(_VaultAuthority):
    """``intermediate`` mode: Vault signs meshca's CA; leaves are signed in process."""

    requires_csr = False

    def __init__(
        self,
        client: VaultClient,
        pki: VaultPki,
        authority: ActiveSigner,
        state: IntermediateState | None = None,
    ) -> None:
        super().__init__(client, pki)
        self._authority = authority
        self._state = state

    @property
    def signer(self) -> Signer:
        return self._authority.signer

    def opened(self) -> OpenedBackend:
        """This authority with what it can do: it can be unreachable, its roots change
        inside Vault, leaves are signed in process (by :attr:`active_signer`),
        rotation obtains the next intermediate here, and it is closed after use."""
        return OpenedBackend(
            VAULT,
            self,
            signer=self._authority,
            health=self,
            roots=self,
            rotation=IntermediateRotation(self),
            close=self.close,
        )

    def bundle(self) -> TrustBundle:
        return self._authority.bundle()

    def sign(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        return self._authority.sign(request)

    def refresh_bundle(self) -> TrustBundle:
        """Re-read the roots; a bundle that no longer holds this intermediate's root is
        refused (the current one stays) until the intermediate is rotated."""
        with self._refresh_lock:
            bundle = self.pki.roots()
            if bundle == self._authority.bundle():
                return bundle
            try:
                # only the bundle: the signer is whatever rotation has switched to meanwhile
                self._authority.activate(bundle=bundle)
            except SignerError:
                raise BackendError(
                    f"vault: the roots of mount '{self.settings.mount}' no longer include the "
                    "root of meshca's intermediate: rotate the intermediate first"
                ) from None
            log.info("vault: trust bundle now holds %d root(s)", len(bundle))
            # what the authority holds now, which a concurrent rotation may have changed
            self.save_state(*self._authority.current())
            return bundle

    # what the signing-CA rotation machinery uses (meshca.rotation.vault_ca) ------------
    @property
    def active_signer(self) -> ActiveSigner:
        """The in-process authority that signs leaves: rotation switches its signer."""
        return self._authority

    def roots(self) -> TrustBundle:
        """Vault's roots now (BackendUnavailable during an outage)."""
        return self.pki.roots()

    def obtain_intermediate(self, ttl: timedelta | None = None) -> Signer:
        """A new intermediate signed by Vault (not yet in use)."""
        signer = obtain_intermediate(self.pki, ttl)
        log.info(
            "vault: obtained intermediate serial=%s not_after=%s",
            serial_hex(signer.certificate.serial_number),
            rfc3339(signer.not_after),
        )
        return signer

    def save_state(self, signer: Signer, bundle: TrustBundle) -> None:
        """Keep ``signer`` and ``bundle`` for the next start (no-op without a state dir)."""
        if self._state is not None:
            self._state.save(signer, bundle)


def obtain_intermediate(pki: VaultPki, ttl: timedelta | None = None) -> Signer:
    """A fresh key, a CSR for ``spiffe://<td>``, Vault's signature: a Signer that lives
    ``ttl`` (default: the settings' intermediate TTL)."""
    settings = pki.settings
    key = generate_private_key(settings.key_type)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(ca_subject(pki.trust_domain, "vault intermediate"))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(pki.trust_domain.id)]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hash_for(key))
    )
    cert, chain = pki.sign_intermediate(csr, ttl or settings.intermediate_ttl)
    return Signer(key, cert, chain)


# persistence: restart during a Vault outage with the intermediate already held -------
KEY_FILE = "ca-key.pem"
CHAIN_FILE = "cert-chain.pem"
ROOTS_FILE = "root-cert.pem"
META_FILE = "meta.json"


class IntermediateState:
    """The intermediate's key (0600), chain and roots in a private directory, tagged
    with where they came from so another Vault or trust domain never reuses them.

    What was last loaded or saved is remembered: saving it again writes nothing (the
    rotation machinery publishes after every change it applies, most of which leave
    the intermediate and the roots as they were)."""

    def __init__(self, directory: Path, origin: dict[str, str]) -> None:
        self.directory = directory
        self.origin = origin
        self._held: tuple[tuple[x509.Certificate, ...], TrustBundle] | None = None

    def save(self, signer: Signer, bundle: TrustBundle) -> None:
        chain = (signer.certificate, *signer.intermediates)
        if (chain, bundle) == self._held:
            return
        ensure_private_dir(self.directory)
        atomic_write(self.directory / KEY_FILE, private_key_pem(signer.key), PRIVATE)
        atomic_write(self.directory / CHAIN_FILE, certificates_pem(chain), PUBLIC)
        atomic_write(self.directory / ROOTS_FILE, bundle.pem(), PUBLIC)
        meta = json.dumps(self.origin, indent=2, sort_keys=True) + "\n"
        atomic_write(self.directory / META_FILE, meta.encode(), PUBLIC)
        self._held = (chain, bundle)

    def load(self, trust_domain: TrustDomain) -> tuple[Signer, TrustBundle] | None:
        """The stored intermediate if it is whole, ours, and still valid; else None. A key
        file others may read is refused (BackendError): that key must be replaced."""
        problem = loose_key_mode(self.directory / KEY_FILE)
        if problem:
            raise BackendError(f"vault: {problem}")
        try:
            meta = json.loads((self.directory / META_FILE).read_text())
            if meta != self.origin:
                log.info("vault: stored intermediate is for another Vault/mount: not reused")
                return None
            key = load_private_key_pem((self.directory / KEY_FILE).read_bytes())
            chain = load_certificates_pem((self.directory / CHAIN_FILE).read_bytes())
            roots = load_certificates_pem((self.directory / ROOTS_FILE).read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyTypeError, SvidError) as exc:
            log.warning("vault: stored intermediate in %s unusable (%s)", self.directory, exc)
            return None
        if not key_matches(key, chain[0]):
            log.warning("vault: stored intermediate key does not match its certificate")
            return None
        if utcnow() >= chain[0].not_valid_after_utc:
            return None
        bundle = TrustBundle.of(trust_domain, roots)
        self._held = (tuple(chain), bundle)
        return Signer(key, chain[0], tuple(chain[1:])), bundle


def _origin(settings: VaultSettings, trust_domain: TrustDomain) -> dict[str, str]:
    return {
        "addr": settings.addr,
        "namespace": settings.namespace or "",
        "mount": settings.mount,
        "issuer": settings.issuer or "",
        "trust_domain": trust_domain.name,
    }


# construction --------------------------------------------------------------------
VaultAuthority = VaultIntermediateAuthority | VaultWorkloadAuthority


def open_vault_authority(
    settings: VaultSettings,
    trust_domain: TrustDomain,
    *,
    state_dir: Path | None = None,
    leaf_ttl: timedelta | None = None,
    backoff: Backoff | None = None,
    start: bool = True,
) -> VaultAuthority:
    """Connect, authenticate, read the roots and (intermediate mode) reload or obtain the
    intermediate. ``state_dir`` keeps the intermediate across restarts (so meshca starts
    during a Vault outage): a stored one is used while it is valid and chains to Vault's
    roots; replacing it on schedule is the rotation machinery's job. ``leaf_ttl`` is
    checked against a newly obtained one's lifetime (CA >= 6 x leaf). ``start`` runs
    token renewal and outage recovery in the background (a server wants it; a one-shot
    command does not)."""
    client = VaultClient(settings, backoff=backoff)
    try:
        pki = VaultPki(client, trust_domain)
        authority: VaultAuthority
        if settings.mode is VaultMode.PER_WORKLOAD:
            authority = VaultWorkloadAuthority(client, pki, pki.roots())
        else:
            authority = _open_intermediate(client, pki, state_dir, leaf_ttl)
    except BaseException:
        client.close()
        raise
    if start:
        authority.start()
    return authority


def _open_intermediate(
    client: VaultClient, pki: VaultPki, state_dir: Path | None, leaf_ttl: timedelta | None
) -> VaultIntermediateAuthority:
    state = (
        IntermediateState(Path(state_dir), _origin(client.settings, pki.trust_domain))
        if state_dir is not None
        else None
    )
    stored = state.load(pki.trust_domain) if state is not None else None
    authority = _reuse(pki, *stored) if stored is not None else None
    if authority is None:
        authority = _obtain(pki, stored, leaf_ttl)
    if state is not None:
        state.save(authority.signer, authority.bundle())  # writes only what changed
    return VaultIntermediateAuthority(client, pki, authority, state)


def _reuse(pki: VaultPki, signer: Signer, stored_roots: TrustBundle) -> ActiveSigner | None:
    """The stored intermediate under Vault's current roots (the stored ones while Vault
    is unreachable); None when it no longer chains to them."""
    try:
        bundle = pki.roots()
    except BackendUnavailable as exc:
        log.warning("%s; starting with the stored roots", exc)
        bundle = stored_roots
    try:
        return ActiveSigner(signer, bundle)  # self-check before any use
    except SignerError:
        log.warning("vault: the stored intermediate no longer chains to the mount's roots")
        return None


def _obtain(
    pki: VaultPki, stored: tuple[Signer, TrustBundle] | None, leaf_ttl: timedelta | None
) -> ActiveSigner:
    """A new intermediate; during an outage the stored one, however old, if there is one."""
    try:
        bundle = pki.roots()
        signer = obtain_intermediate(pki)
    except BackendUnavailable as exc:
        if stored is None:
            raise
        log.warning("%s; starting with the stored intermediate until it can be replaced", exc)
        return ActiveSigner(*stored)
    _check_fresh_intermediate(signer, leaf_ttl)
    return ActiveSigner(signer, bundle)  # self-check before any use


def _remaining(signer: Signer) -> timedelta:
    return signer.not_after - utcnow()


def _check_fresh_intermediate(signer: Signer, leaf_ttl: timedelta | None) -> None:
    """A freshly minted intermediate's *remaining* life must cover 6 leaves: a question
    of its own (Vault may cap it at the root's expiry, so it can be born short), asked
    before it is adopted; the start-up rule is ``meshca serve``'s, on whatever signs."""
    if leaf_ttl is not None:
        try:
            check_ca_covers_leaves(_remaining(signer), leaf_ttl)
        except TtlError as exc:
            raise BackendError(
                f"vault: the intermediate Vault signed ends {rfc3339(signer.not_after)}: {exc} "
                "(raise --vault-intermediate-ttl, or check the root's expiry in Vault)"
            ) from None

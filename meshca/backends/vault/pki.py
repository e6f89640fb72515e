"""Calls to Vault's PKI engine, and the checks meshca applies to what comes back.

Vault is trusted to sign, not to decide what a certificate says: every leaf it returns
is checked to carry exactly the requested identity over the requested key, and to
chain to the trust bundle, before anyone sees it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from meshca.backends.errors import BackendError
from meshca.backends.vault.client import PermissionDenied, VaultClient, VaultRequestError
from meshca.backends.vault.settings import hint
from meshca.issuer import LeafRequest, TrustBundle
from meshca.issuer.errors import CsrError, SvidError
from meshca.issuer.keys import public_keys_equal
from meshca.issuer.profile import DEFAULT_SKEW
from meshca.issuer.svid import spiffe_id_of
from meshca.spiffe import TrustDomain

LEAF_EXT_KEY_USAGE = ["ServerAuth", "ClientAuth"]


def _seconds(ttl: timedelta) -> str:
    """Vault's duration syntax, in whole seconds (never rounded to hours)."""
    return f"{max(1, int(ttl.total_seconds()))}s"


def _pem(cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> str:
    return cert_or_csr.public_bytes(serialization.Encoding.PEM).decode()


def _load(values: Iterable[Any], what: str) -> list[x509.Certificate]:
    certs: list[x509.Certificate] = []
    for value in values:
        if not value:
            continue
        try:
            certs.extend(x509.load_pem_x509_certificates(str(value).encode()))
        except ValueError as exc:
            raise BackendError(f"vault: unreadable {what} in Vault's answer: {exc}") from None
    return certs


@functools.lru_cache(maxsize=256)
def is_self_signed(cert: x509.Certificate) -> bool:
    """Cached: Vault sends the same few CA certificates with every leaf."""
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def chain_above(
    cert: x509.Certificate, ca_chain: Iterable[x509.Certificate]
) -> tuple[x509.Certificate, ...]:
    """Vault's ``ca_chain`` without ``cert`` itself (newer Vault includes it), without
    roots (the bundle carries those) and without duplicates, in Vault's order."""
    above: list[x509.Certificate] = []
    for candidate in ca_chain:  # certificates compare by their DER encoding
        if candidate != cert and candidate not in above and not is_self_signed(candidate):
            above.append(candidate)
    return tuple(above)


class VaultPki:
    """One PKI mount, seen through one authenticated client."""

    def __init__(self, client: VaultClient, trust_domain: TrustDomain) -> None:
        self.client = client
        self.settings = client.settings
        self.trust_domain = trust_domain

    # errors -----------------------------------------------------------------------
    def explain(self, exc: VaultRequestError, action: str) -> BackendError:
        """One line naming the setting to fix, for a refusal of the PKI engine."""
        s = self.settings
        text = "; ".join(e.strip().replace("\n", " ") for e in exc.errors)
        where = f"at {s.addr}" + (f" (namespace {s.namespace})" if s.namespace else "")
        if "no handler for route" in text or (exc.status == 404 and not exc.errors):
            return BackendError(
                f"vault: mount '{s.mount}' not found {where}, or it is not a PKI mount "
                f"(check {hint('mount')})"
            )
        if "unknown role" in text:
            return BackendError(
                f"vault: role '{s.role}' not found in mount '{s.mount}' {where} "
                f"(check {hint('role')})"
            )
        if "unable to find PKI issuer" in text:
            return BackendError(
                f"vault: issuer '{s.issuer}' not found in mount '{s.mount}' {where} "
                f"(check {hint('issuer')})"
            )
        if "no default issuer" in text:
            return BackendError(
                f"vault: mount '{s.mount}' {where} has no CA yet: generate or import a root "
                "(see docs/vault.md)"
            )
        refused_name = re.search(r"alternate name (\S+) not allowed", text)
        if refused_name and not refused_name.group(1).startswith("spiffe://"):
            # only meshca's own serving certificate asks for DNS names
            return BackendError(
                f"vault: role '{s.role}' refuses {action}: {text} (meshca's serving "
                "certificate carries DNS names: list them in the role's allowed_domains "
                "with allow_bare_domains=true, or choose them with --server-dns; "
                "see docs/vault.md)"
            )
        if "not valid for this role" in text or "not allowed by this role" in text:
            return BackendError(
                f"vault: role '{s.role}' refuses {action}: {text} (let its allowed_uri_sans "
                f"cover {self.trust_domain.id}/*, see docs/vault.md)"
            )
        if "common_name field is required" in text:
            return BackendError(
                f"vault: role '{s.role}' requires a common name: set require_cn=false on it "
                "(see docs/vault.md)"
            )
        return BackendError(f"vault: {action} refused {where}: {text or exc.status}")

    def _call(
        self,
        action: str,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        auth: bool = True,
    ) -> dict[str, Any]:
        try:
            return self.client.request(method, path, body, auth=auth)
        except VaultRequestError as exc:
            raise self.explain(exc, action) from None
        except PermissionDenied as exc:
            # a least-privilege token sees a wrong mount or role as a path it may not use
            settings = [hint("mount")] + ([hint("role")] if self.settings.role else [])
            raise BackendError(
                f"{exc} (check {' and '.join(settings)}, or grant it: see docs/vault.md)"
            ) from None

    # trust bundle -----------------------------------------------------------------
    def roots(self) -> TrustBundle:
        """Every root of the mount's issuers (so a new root issuer joins the bundle)."""
        mount = self.settings.mount
        try:
            listing = self.client.request("list", f"{mount}/issuers", auth=False)
        except VaultRequestError as exc:
            if exc.status == 403:  # listing issuers needs no token: there is no such mount
                raise self.explain(VaultRequestError(404, exc.path, []), "listing") from None
            if exc.status != 404:
                raise self.explain(exc, "listing issuers") from None
            if exc.errors:  # no issuers API (Vault before 1.11), or no such mount
                return self._bundle(self._legacy_ca())
            listing = {}  # an empty list is a 404 without errors
        certs: list[x509.Certificate] = []
        for issuer_id in (listing.get("data") or {}).get("keys") or []:
            path = f"{mount}/issuer/{issuer_id}/json"
            data = self._call("reading an issuer", "get", path, auth=False).get("data") or {}
            pems = [data.get("certificate"), *(data.get("ca_chain") or [])]
            certs.extend(_load(pems, "issuer certificate"))
        return self._bundle(certs)

    def _legacy_ca(self) -> list[x509.Certificate]:
        path = f"{self.settings.mount}/cert/ca"
        data = self._call("reading the CA", "get", path, auth=False).get("data") or {}
        return _load([data.get("certificate")], "CA certificate")

    def _bundle(self, certs: list[x509.Certificate]) -> TrustBundle:
        roots = [c for c in certs if is_self_signed(c)]
        if not roots:
            raise BackendError(
                f"vault: mount '{self.settings.mount}' at {self.settings.addr} holds no root "
                "certificate: generate a root, or import the root above its CA "
                "(see docs/vault.md)"
            )
        roots.sort(key=lambda c: (c.not_valid_before_utc, c.fingerprint(hashes.SHA256())))
        return TrustBundle.of(self.trust_domain, roots)

    # signing ----------------------------------------------------------------------
    def sign_intermediate(
        self, csr: x509.CertificateSigningRequest, ttl: timedelta
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        """Vault signs meshca's CA (path length 0: it can sign leaves only)."""
        s = self.settings
        path = (
            f"{s.mount}/issuer/{s.issuer}/sign-intermediate"
            if s.issuer
            else f"{s.mount}/root/sign-intermediate"
        )
        body = {
            "csr": _pem(csr),
            "ttl": _seconds(ttl),
            "use_csr_values": True,
            "uri_sans": self.trust_domain.id,
            "exclude_cn_from_sans": True,
            "max_path_length": 0,
            # backdated like meshca's own CAs, so the rotation schedule (life from
            # NotBefore + skew) is exact (Vault's default is 30 s)
            "not_before_duration": _seconds(DEFAULT_SKEW),
            "format": "pem",
        }
        data = self._call("signing the intermediate", "post", path, body).get("data") or {}
        cert, chain = self._certificate_and_chain(data)
        self._check_intermediate(cert, csr)
        return cert, chain

    def _check_intermediate(
        self, cert: x509.Certificate, csr: x509.CertificateSigningRequest
    ) -> None:
        if not public_keys_equal(cert.public_key(), csr.public_key()):
            raise BackendError("vault: the signed intermediate is not for meshca's key: refused")
        try:
            basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
            uris = cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound as exc:
            raise BackendError(f"vault: the signed intermediate lacks {exc.oid._name}") from None
        if not basic.ca:
            raise BackendError("vault: the signed intermediate is not a CA (CA=false): refused")
        if uris != [self.trust_domain.id]:
            raise BackendError(
                f"vault: the signed intermediate names {uris} instead of "
                f"{self.trust_domain.id}: refused"
            )

    def sign_leaf(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        """Vault signs one SVID (``sign/<role>`` or ``sign-verbatim``); the leaf is checked
        here, its chain to the bundle by the caller."""
        csr = request.csr
        if csr is None:
            raise BackendError("vault: per-workload signing needs a CSR signed by the leaf key")
        s = self.settings
        if s.verbatim:
            _check_verbatim_csr(request, csr)
            path = f"{s.mount}/sign-verbatim" + (f"/{s.role}" if s.role else "")
            usage = ["DigitalSignature"]
            if isinstance(request.public_key, rsa.RSAPublicKey):
                usage.append("KeyEncipherment")
            body: dict[str, Any] = {
                "csr": _pem(csr),
                "ttl": _seconds(request.ttl),
                "key_usage": usage,
                "ext_key_usage": LEAF_EXT_KEY_USAGE,
                "format": "pem",
            }
        else:
            path = f"{s.mount}/sign/{s.role}"
            body = {
                "csr": _pem(csr),
                "uri_sans": str(request.spiffe_id),
                "ttl": _seconds(request.ttl),
                "exclude_cn_from_sans": True,
                "format": "pem",
            }
            if request.dns_names:
                body["alt_names"] = ",".join(request.dns_names)
        data = self._call(f"signing {request.spiffe_id}", "post", path, body).get("data") or {}
        cert, chain = self._certificate_and_chain(data)
        check_leaf(cert, request)
        return (cert, *chain)

    def _certificate_and_chain(
        self, data: dict[str, Any]
    ) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]]:
        certs = _load([data.get("certificate")], "certificate")
        if not certs:
            raise BackendError("vault: the answer carried no certificate")
        cert = certs[0]
        raw_chain = data.get("ca_chain") or [data.get("issuing_ca")]
        cas = [ca for pem in raw_chain if pem for ca in _load_ca(str(pem))]
        return cert, chain_above(cert, cas)


@functools.lru_cache(maxsize=256)
def _load_ca(pem: str) -> tuple[x509.Certificate, ...]:
    """Cached: the same CA certificates come back with every leaf."""
    return tuple(_load([pem], "CA chain"))


def check_leaf(cert: x509.Certificate, request: LeafRequest) -> None:
    """Refuse anything but exactly the requested identity over the requested key."""
    try:
        found = spiffe_id_of(cert)
    except SvidError as exc:
        raise BackendError(
            f"vault returned a certificate for {request.spiffe_id} that is not a valid "
            f"X.509-SVID: {exc} (check the role: docs/vault.md)"
        ) from None
    if found != request.spiffe_id:
        raise BackendError(
            f"vault returned a certificate for {found} instead of {request.spiffe_id}: refused"
        )
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    extra = [
        n
        for n in names
        if not isinstance(n, x509.UniformResourceIdentifier)
        and not (isinstance(n, x509.DNSName) and n.value in request.dns_names)
    ]
    if extra:
        raise BackendError(
            f"vault returned a certificate for {request.spiffe_id} with names meshca did not "
            f"ask for ({', '.join(str(n.value) for n in extra)}): refused (check the role)"
        )
    if cert.public_key() != request.public_key:
        raise BackendError(
            f"vault returned a certificate for {request.spiffe_id} over another key: refused"
        )


def _check_verbatim_csr(request: LeafRequest, csr: x509.CertificateSigningRequest) -> None:
    """sign-verbatim copies the CSR's subject and names: they must be exactly the request's."""
    try:
        sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        sans = x509.SubjectAlternativeName([])
    uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    dns = sans.get_values_for_type(x509.DNSName)
    others = [n for n in sans if not isinstance(n, x509.UniformResourceIdentifier | x509.DNSName)]
    if (
        len(csr.subject) != 0
        or uris != [str(request.spiffe_id)]
        or not set(dns) <= set(request.dns_names)
        or others
    ):
        raise CsrError(
            "CSR refused: sign-verbatim copies the CSR as is, so its subject must be empty and "
            f"its only URI SAN must be {request.spiffe_id}"
        )

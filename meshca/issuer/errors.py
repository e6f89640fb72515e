"""The issuer's exceptions: each is a refusal with a message fit to show a user as is."""

from __future__ import annotations

# What a remote caller (SDS, ADS, the CA API) is told when signing fails: the detail (a
# Vault address, a backend's own wording) goes to the server log only.
BACKEND_UNAVAILABLE = "the CA's backend is unavailable"


class IssuerError(Exception):
    """Base class: a request the issuer refuses (bad input or a state that forbids signing)."""


class KeyTypeError(IssuerError):
    """An unsupported key type or a key too weak to certify."""


class CsrError(IssuerError):
    """A CSR that cannot be parsed, whose signature is wrong, or whose key is refused."""


class TtlError(IssuerError):
    """A requested lifetime outside the policy."""


class SignerError(IssuerError):
    """The signing CA cannot sign (expired, not yet valid, or failed its self-check)."""


class SvidError(IssuerError):
    """A certificate that is not a valid X.509-SVID; ``rule`` names the broken rule."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"not a valid X.509-SVID: {detail} (rule: {rule})")
        self.rule = rule
        self.detail = detail


class PemError(SvidError):
    """A file meant to hold PEM certificates (a chain, a bundle, a CA) that holds none.

    A SvidError with rule ``pem``, worded for whatever the file was meant to be.
    """

    def __init__(self, detail: str) -> None:
        IssuerError.__init__(self, detail)
        self.rule = "pem"
        self.detail = detail


class ChainError(IssuerError):
    """A certificate chain that does not verify up to a root of the trust bundle."""

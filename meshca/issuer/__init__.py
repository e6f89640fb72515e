"""The X.509-SVID profile, keys, CSR checks, TTL policy, signing and rotation timing."""

from meshca.issuer.authority import Issuer, LeafRequest, SignerAuthority, SigningAuthority
from meshca.issuer.bundle import TrustBundle
from meshca.issuer.errors import (
    ChainError,
    CsrError,
    IssuerError,
    KeyTypeError,
    SignerError,
    SvidError,
    TtlError,
)
from meshca.issuer.keys import KeyType
from meshca.issuer.policy import TtlPolicy
from meshca.issuer.profile import Signer
from meshca.issuer.svid import X509Svid

__all__ = [
    "ChainError",
    "CsrError",
    "Issuer",
    "IssuerError",
    "KeyType",
    "KeyTypeError",
    "LeafRequest",
    "Signer",
    "SignerAuthority",
    "SignerError",
    "SigningAuthority",
    "SvidError",
    "TrustBundle",
    "TtlError",
    "TtlPolicy",
    "X509Svid",
]

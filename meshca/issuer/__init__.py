"""The X.509-SVID profile, keys, CSR checks, TTL policy (leaf renewal timing and the
CA-lifetime rule) and signing: the :class:`SigningAuthority` protocol backends implement,
:class:`ActiveSigner` for a key held in this process, and the :class:`Issuer`. When a
signing CA is replaced is rotation's business (``meshca.rotation.rotator``)."""

from meshca.issuer.authority import ActiveSigner, Issuer, LeafRequest, SigningAuthority
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
    "ActiveSigner",
    "ChainError",
    "CsrError",
    "Issuer",
    "IssuerError",
    "KeyType",
    "KeyTypeError",
    "LeafRequest",
    "Signer",
    "SignerError",
    "SigningAuthority",
    "SvidError",
    "TrustBundle",
    "TtlError",
    "TtlPolicy",
    "X509Svid",
]

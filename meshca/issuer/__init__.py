"""The X.509-SVID profile, keys, CSR checks, TTL policy (leaf renewal timing and the
CA-lifetime rule) and signing: the :class:`SigningAuthority` protocol backends implement,
:class:`ActiveSigner` for a key held in this process, and the :class:`Issuer`. When a
signing CA is replaced is rotation's business (``meshca.rotation.rotator``).

The names below load their module on first use: ``meshca.issuer.errors`` (what every
command line refusal checks) must not pull in the cryptography library, which costs a
command that never signs more than the rest of its start-up."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from meshca.issuer.key_type import KeyType
    from meshca.issuer.policy import TtlPolicy
    from meshca.issuer.profile import Signer
    from meshca.issuer.svid import X509Svid

_MODULES = {
    "ActiveSigner": "authority",
    "Issuer": "authority",
    "LeafRequest": "authority",
    "SigningAuthority": "authority",
    "TrustBundle": "bundle",
    "ChainError": "errors",
    "CsrError": "errors",
    "IssuerError": "errors",
    "KeyTypeError": "errors",
    "SignerError": "errors",
    "SvidError": "errors",
    "TtlError": "errors",
    "KeyType": "key_type",
    "TtlPolicy": "policy",
    "Signer": "profile",
    "X509Svid": "svid",
}

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


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"meshca.issuer.{module}"), name)
    globals()[name] = value  # looked up once
    return value

"""The key types meshca issues, apart from the key code: the command line's options and the
Vault settings name them without loading the cryptography library."""

from __future__ import annotations

import enum

from meshca.issuer.errors import KeyTypeError


class KeyType(enum.StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"

    @classmethod
    def parse(cls, value: str) -> KeyType:
        try:
            return cls(value.strip().lower())
        except ValueError:
            choices = ", ".join(k.value for k in cls)
            raise KeyTypeError(f"unsupported key type {value!r}: choose one of {choices}") from None

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("rsa-")

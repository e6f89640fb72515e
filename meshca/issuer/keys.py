"""Key generation and the key types meshca certifies."""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from meshca.issuer.errors import KeyTypeError
from meshca.issuer.key_type import KeyType as KeyType  # re-exported: where the key code is

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

MIN_RSA_BITS = 2048


DEFAULT_KEY_TYPE = KeyType.EC_P256

_CURVES: dict[str, KeyType] = {"secp256r1": KeyType.EC_P256, "secp384r1": KeyType.EC_P384}
_P256, _P384 = ec.SECP256R1(), ec.SECP384R1()  # made once: every issuance asks for one


def generate_private_key(key_type: KeyType = DEFAULT_KEY_TYPE) -> PrivateKey:
    if key_type is KeyType.EC_P256:
        return ec.generate_private_key(_P256)
    if key_type is KeyType.EC_P384:
        return ec.generate_private_key(_P384)
    return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type.value[4:]))


def key_type_of(key: object) -> KeyType:
    """The KeyType of a public or private key, refusing weak RSA and unsupported curves."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        found = _CURVES.get(key.curve.name)
        if found is None:
            raise KeyTypeError(f"unsupported elliptic curve {key.curve.name}: use P-256 or P-384")
        return found
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyTypeError(
                f"RSA key of {key.key_size} bits refused: at least {MIN_RSA_BITS} bits required"
            )
        if key.key_size not in (2048, 3072, 4096):
            raise KeyTypeError(
                f"RSA key of {key.key_size} bits unsupported: use 2048, 3072 or 4096 bits"
            )
        return KeyType(f"rsa-{key.key_size}")
    raise KeyTypeError(f"unsupported key algorithm {type(key).__name__}: use EC or RSA")


def private_key_pem(key: PrivateKey) -> bytes:
    """PKCS#8 PEM, unencrypted: the file mode (0600) is what protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_private_key_pem(data: bytes) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyTypeError(f"cannot read private key: {exc}") from None
    key_type_of(key)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    return key


def public_keys_equal(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    """Same key, whatever holds it (certificate, CSR, private key's public half)."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return a.public_bytes(der, fmt) == b.public_bytes(der, fmt)


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Whether ``key`` is the private key of ``cert``."""
    return public_keys_equal(key.public_key(), cert.public_key())

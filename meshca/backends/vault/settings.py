"""Settings of the Vault backend: one frozen value, read from flags, config or environment.

Every field has one flag and one environment variable (:data:`SETTING_SOURCES`), so an
error can name exactly what to change. Standard Vault variables (``VAULT_ADDR``,
``VAULT_TOKEN``, ``VAULT_CACERT``, ``VAULT_NAMESPACE``, ``VAULT_CLIENT_CERT``,
``VAULT_CLIENT_KEY``) are honoured so an operator's usual environment just works.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from meshca.backends.errors import BackendError
from meshca.backends.vault.path_settings import PATH_SETTINGS
from meshca.issuer.errors import KeyTypeError
from meshca.issuer.key_type import KeyType
from meshca.util.durations import DurationError, parse_duration

DEFAULT_ADDR = "https://127.0.0.1:8200"
DEFAULT_MOUNT = "pki"
DEFAULT_K8S_JWT_FILE = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
DEFAULT_TIMEOUT = 5.0
DEFAULT_INTERMEDIATE_TTL = timedelta(days=30)


class VaultSettingsError(BackendError):
    """A Vault setting that is missing, malformed or inconsistent with another."""


class VaultMode(enum.StrEnum):
    INTERMEDIATE = "intermediate"  # Vault signs meshca's intermediate; leaves are signed here
    PER_WORKLOAD = "per-workload"  # Vault signs every SVID; meshca holds no signing key


class AuthMethod(enum.StrEnum):
    TOKEN = "token"
    APPROLE = "approle"
    KUBERNETES = "kubernetes"
    CERT = "cert"


# field -> (flag, environment variable)
SETTING_SOURCES: dict[str, tuple[str, str]] = {
    "addr": ("--vault-addr", "VAULT_ADDR"),
    "mode": ("--vault-mode", "MESHCA_VAULT_MODE"),
    "mount": ("--vault-mount", "MESHCA_VAULT_MOUNT"),
    "role": ("--vault-role", "MESHCA_VAULT_ROLE"),
    "issuer": ("--vault-issuer", "MESHCA_VAULT_ISSUER"),
    "verbatim": ("--vault-verbatim", "MESHCA_VAULT_VERBATIM"),
    "auth": ("--vault-auth", "MESHCA_VAULT_AUTH"),
    "auth_mount": ("--vault-auth-mount", "MESHCA_VAULT_AUTH_MOUNT"),
    "token": ("--vault-token", "VAULT_TOKEN"),
    "token_file": ("--vault-token-file", "MESHCA_VAULT_TOKEN_FILE"),
    "role_id": ("--vault-role-id", "MESHCA_VAULT_ROLE_ID"),
    "secret_id": ("--vault-secret-id", "MESHCA_VAULT_SECRET_ID"),
    "secret_id_file": ("--vault-secret-id-file", "MESHCA_VAULT_SECRET_ID_FILE"),
    "k8s_role": ("--vault-k8s-role", "MESHCA_VAULT_K8S_ROLE"),
    "k8s_jwt_file": ("--vault-k8s-jwt-file", "MESHCA_VAULT_K8S_JWT_FILE"),
    "cert_role": ("--vault-cert-role", "MESHCA_VAULT_CERT_ROLE"),
    "client_cert": ("--vault-client-cert", "VAULT_CLIENT_CERT"),
    "client_key": ("--vault-client-key", "VAULT_CLIENT_KEY"),
    "ca_cert": ("--vault-cacert", "VAULT_CACERT"),
    "namespace": ("--vault-namespace", "VAULT_NAMESPACE"),
    "timeout": ("--vault-timeout", "MESHCA_VAULT_TIMEOUT"),
    "intermediate_ttl": ("--vault-intermediate-ttl", "MESHCA_VAULT_INTERMEDIATE_TTL"),
    "key_type": ("--vault-key-type", "MESHCA_VAULT_KEY_TYPE"),
}


def hint(setting: str) -> str:
    """``--vault-mount / MESHCA_VAULT_MOUNT``: where a user changes ``setting``."""
    flag, env = SETTING_SOURCES[setting]
    return f"{flag} / {env}"


SECRET_NAMES = {
    "token": "the token",
    "token_file": "the token",
    "secret_id": "the AppRole secret ID",
    "secret_id_file": "the AppRole secret ID",
    "k8s_jwt_file": "the service-account token",
}


def clean_secret(value: str, setting: str, where: str = "") -> str:
    """A token or secret ID as sent in a header or login: surrounding whitespace (the
    newline that ends a file or an ``echo``) dropped; empty, or holding a line break,
    a control character or anything but printable ASCII inside, refused. The error names
    where the value came from and never the value (it would reach logs and callers)."""
    what = SECRET_NAMES.get(setting, "the secret")
    source = where or hint(setting)
    cleaned = value.strip()
    if not cleaned:
        raise VaultSettingsError(f"vault: {what} from {source} is empty")
    if not all("!" <= c <= "~" for c in cleaned):
        raise VaultSettingsError(
            f"vault: {what} from {source} holds a line break, a control character or a "
            "space: it must be one line of printable characters (check that the file "
            "holds the token alone)"
        )
    return cleaned


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class VaultSettings:
    """How to reach Vault, authenticate, and which PKI mount, role and mode to use.

    Secrets (``token``, ``secret_id``) are kept out of ``repr`` so they never reach a log.
    """

    addr: str = DEFAULT_ADDR
    mode: VaultMode = VaultMode.INTERMEDIATE
    mount: str = DEFAULT_MOUNT
    role: str | None = None
    issuer: str | None = None
    verbatim: bool = False
    auth: AuthMethod | None = None
    auth_mount: str | None = None
    token: str | None = field(default=None, repr=False)
    token_file: Path | None = None
    role_id: str | None = None
    secret_id: str | None = field(default=None, repr=False)
    secret_id_file: Path | None = None
    k8s_role: str | None = None
    k8s_jwt_file: Path = DEFAULT_K8S_JWT_FILE
    cert_role: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    ca_cert: Path | None = None
    namespace: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    intermediate_ttl: timedelta = DEFAULT_INTERMEDIATE_TTL
    key_type: KeyType = KeyType.EC_P256

    def __post_init__(self) -> None:
        for name in _TYPED:  # accept strings for typed fields, as from_mapping does
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, _convert(name, value))
        addr = self.addr.strip().rstrip("/")
        parts = urlsplit(addr)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path:
            raise VaultSettingsError(
                f"vault: address {self.addr!r} is not an http(s)://host[:port] URL "
                f"(check {hint('addr')})"
            )
        object.__setattr__(self, "addr", addr)
        for secret in ("token", "secret_id"):
            value = getattr(self, secret)
            if value is not None:
                object.__setattr__(self, secret, clean_secret(value, secret))
        mount = self.mount.strip().strip("/")
        if not mount or any(c.isspace() for c in mount):
            raise VaultSettingsError(
                f"vault: mount {self.mount!r} is not a mount path (check {hint('mount')})"
            )
        object.__setattr__(self, "mount", mount)
        if self.auth_mount is not None:
            object.__setattr__(self, "auth_mount", self.auth_mount.strip().strip("/") or None)
        if self.timeout <= 0:
            raise VaultSettingsError(f"vault: timeout must be positive (check {hint('timeout')})")
        if self.intermediate_ttl <= timedelta(0):
            raise VaultSettingsError(
                f"vault: intermediate TTL must be positive (check {hint('intermediate_ttl')})"
            )
        if self.mode is VaultMode.PER_WORKLOAD and not self.verbatim and not self.role:
            raise VaultSettingsError(
                "vault: per-workload mode signs through a PKI role: set "
                f"{hint('role')} (or {hint('verbatim')} to use sign-verbatim)"
            )
        if (self.client_cert is None) != (self.client_key is None):
            raise VaultSettingsError(
                "vault: a client certificate needs both "
                f"{hint('client_cert')} and {hint('client_key')}"
            )
        self._check_auth(self.auth_method)

    @property
    def auth_method(self) -> AuthMethod:
        """The chosen method, or the one the given credentials imply."""
        if self.auth is not None:
            return self.auth
        if self.token or self.token_file:
            return AuthMethod.TOKEN
        if self.role_id:
            return AuthMethod.APPROLE
        if self.k8s_role:
            return AuthMethod.KUBERNETES
        if self.client_cert:
            return AuthMethod.CERT
        raise VaultSettingsError(
            "vault: no authentication configured: set a token "
            f"({hint('token')} or {hint('token_file')}), an AppRole ({hint('role_id')} "
            f"and {hint('secret_id')}), a Kubernetes role ({hint('k8s_role')}) or a "
            f"client certificate ({hint('client_cert')})"
        )

    @property
    def auth_path(self) -> str:
        """Where the auth method is mounted (``auth/<path>/login``)."""
        return self.auth_mount or self.auth_method.value

    def _check_auth(self, method: AuthMethod) -> None:
        def need(setting: str, *alternatives: str) -> None:
            if not any(getattr(self, name) for name in (setting, *alternatives)):
                choices = " or ".join(hint(name) for name in (setting, *alternatives))
                raise VaultSettingsError(f"vault: {method.value} authentication needs {choices}")

        if method is AuthMethod.TOKEN:
            need("token", "token_file")
        elif method is AuthMethod.APPROLE:
            need("role_id")
            need("secret_id", "secret_id_file")
        elif method is AuthMethod.KUBERNETES:
            need("k8s_role")
        elif method is AuthMethod.CERT:
            need("client_cert")
            if urlsplit(self.addr).scheme != "https":
                raise VaultSettingsError(
                    f"vault: certificate authentication needs an https:// address "
                    f"(check {hint('addr')})"
                )

    # construction -----------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> VaultSettings:
        """Build from field names to raw values (strings from flags, config or environment,
        or already typed values); ``None`` means "not set". Unknown names are refused."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise VaultSettingsError(f"vault: unknown setting(s): {', '.join(unknown)}")
        converted: dict[str, object] = {}
        for name, raw in values.items():
            if raw is None:
                continue
            converted[name] = _convert(name, raw)
        return cls(**converted)  # type: ignore[arg-type]

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, **overrides: object
    ) -> VaultSettings:
        """Read every setting's environment variable; ``overrides`` (field names) win."""
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for name, (_flag, variable) in SETTING_SOURCES.items():
            if env.get(variable):
                values[name] = env[variable]
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_mapping(values)


_TYPED = (
    *sorted(PATH_SETTINGS),
    "mode",
    "auth",
    "verbatim",
    "timeout",
    "intermediate_ttl",
    "key_type",
)


def _convert(name: str, raw: object) -> object:
    if not isinstance(raw, str):
        return raw
    value = raw.strip()
    try:
        if name in PATH_SETTINGS:
            return Path(value).expanduser()
        if name == "mode":
            return VaultMode(value.lower())
        if name == "auth":
            return AuthMethod(value.lower())
        if name == "verbatim":
            if value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError(value)
        if name == "timeout":
            return _seconds(value)
        if name == "intermediate_ttl":
            return parse_duration(value)
        if name == "key_type":
            return KeyType.parse(value)
    except (ValueError, DurationError, KeyTypeError) as exc:
        raise VaultSettingsError(
            f"vault: invalid {name} {raw!r}: {_why(name, exc)} (check {hint(name)})"
        ) from None
    return value


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:
        return parse_duration(value).total_seconds()


def _why(name: str, exc: Exception) -> str:
    if name == "mode":
        return "choose " + " or ".join(m.value for m in VaultMode)
    if name == "auth":
        return "choose " + ", ".join(m.value for m in AuthMethod)
    if name == "verbatim":
        return "use true or false"
    return str(exc)

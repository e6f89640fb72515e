"""Vault authentication: the four login methods, and the keeper of the token they yield.

The keeper renews a renewable token at about 2/3 of its TTL, logs in again when it
cannot be renewed (or renewal hits the token's maximum TTL), and after a 403 tries
once to obtain a fresh token. A static token cannot log in again by itself; read from
a file (Vault Agent's sink, a mounted secret) it is re-read when it changes.
Tokens never reach a log or a ``repr``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import hvac.exceptions

from meshca.backends.errors import BackendError
from meshca.backends.vault.settings import (
    AuthMethod,
    VaultSettings,
    VaultSettingsError,
    clean_secret,
    hint,
)
from meshca.util.logger import get_logger
from meshca.util.retry import Backoff

log = get_logger("meshca.backends.vault")

RENEW_FRACTION = 2 / 3

# (method, path, json body, token) -> decoded JSON response; raises hvac/requests errors
Send = Callable[[str, str, dict[str, Any] | None, str | None], dict[str, Any]]


class LoginRejected(BackendError):
    """Vault refused the credentials (wrong, expired or revoked)."""


@dataclass(frozen=True)
class TokenGrant:
    """A token and its lease as known when it was obtained (wall-clock seconds)."""

    token: str = field(repr=False)
    ttl: float
    renewable: bool
    obtained_at: float

    @property
    def expires_at(self) -> float | None:
        return None if self.ttl <= 0 else self.obtained_at + self.ttl

    @property
    def renew_at(self) -> float | None:
        return None if self.ttl <= 0 else self.obtained_at + self.ttl * RENEW_FRACTION


def _read_secret(path: Path, setting: str) -> str:
    """The one-line secret in ``path`` (see :func:`clean_secret`), re-read at each use."""
    try:
        value = path.read_text()
    except OSError as exc:
        raise VaultSettingsError(
            f"vault: cannot read {path}: {exc.strerror} (check {hint(setting)})"
        ) from None
    except UnicodeDecodeError:
        raise VaultSettingsError(f"vault: {path} is not text (check {hint(setting)})") from None
    return clean_secret(value, setting, f"{path} ({hint(setting)})")


def _grant_from_login(response: dict[str, Any], now: float) -> TokenGrant:
    auth = response.get("auth") or {}
    token = auth.get("client_token")
    if not token:
        raise BackendError("vault: the login response carried no token")
    return TokenGrant(
        token, float(auth.get("lease_duration") or 0), bool(auth.get("renewable")), now
    )


def _rejected(what: str, exc: hvac.exceptions.VaultError, settings: str) -> LoginRejected:
    reason = ", ".join(exc.errors or []) or "permission denied"
    return LoginRejected(f"vault: {what} was rejected: {reason} (check {settings})")


def _post_login(
    send: Send, path: str, body: dict[str, Any], now: float, what: str, settings: str
) -> TokenGrant:
    """Log in at ``path`` with ``body``: the token granted, or LoginRejected naming ``what``
    and the ``settings`` to check."""
    try:
        response = send("post", path, body, None)
    except (hvac.exceptions.InvalidRequest, hvac.exceptions.Forbidden) as exc:
        raise _rejected(what, exc, settings) from None
    return _grant_from_login(response, now)


class LoginMethod(Protocol):
    """One way to obtain a token; ``can_login`` says whether it can get a fresh one alone."""

    name: str
    can_login: bool
    settings_hint: str

    def login(self, send: Send, now: float) -> TokenGrant: ...


class StaticToken:
    """A token given as a setting or in a file; the file is re-read on every login."""

    name = "token"
    can_login = False

    def __init__(self, token: str | None, token_file: Path | None) -> None:
        self._token = token
        self._file = token_file
        self.settings_hint = hint("token_file") if token_file else hint("token")

    def current(self) -> str:
        if self._file is not None:
            return _read_secret(self._file, "token_file")
        assert self._token is not None
        return self._token

    def login(self, send: Send, now: float) -> TokenGrant:
        token = self.current()
        try:
            data = send("get", "auth/token/lookup-self", None, token).get("data") or {}
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest) as exc:
            raise _rejected("the token", exc, self.settings_hint) from None
        return TokenGrant(token, float(data.get("ttl") or 0), bool(data.get("renewable")), now)


class AppRoleLogin:
    name = "approle"
    can_login = True

    def __init__(self, settings: VaultSettings) -> None:
        self._path = f"auth/{settings.auth_path}/login"
        self._role_id = settings.role_id or ""
        self._secret_id = settings.secret_id
        self._secret_id_file = settings.secret_id_file
        secret = "secret_id_file" if settings.secret_id_file else "secret_id"
        self.settings_hint = f"{hint('role_id')} and {hint(secret)}"

    def login(self, send: Send, now: float) -> TokenGrant:
        secret_id = (
            _read_secret(self._secret_id_file, "secret_id_file")
            if self._secret_id_file is not None
            else self._secret_id
        )
        body = {"role_id": self._role_id, "secret_id": secret_id}
        what = f"AppRole login at {self._path}"
        return _post_login(send, self._path, body, now, what, self.settings_hint)


class KubernetesLogin:
    """The service-account JWT is re-read at each login: projected tokens rotate."""

    name = "kubernetes"
    can_login = True

    def __init__(self, settings: VaultSettings) -> None:
        self._path = f"auth/{settings.auth_path}/login"
        self._role = settings.k8s_role or ""
        self._jwt_file = settings.k8s_jwt_file
        self.settings_hint = f"{hint('k8s_role')} and {hint('k8s_jwt_file')}"

    def login(self, send: Send, now: float) -> TokenGrant:
        jwt = _read_secret(self._jwt_file, "k8s_jwt_file")
        body = {"role": self._role, "jwt": jwt}
        what = f"Kubernetes login at {self._path} (role {self._role!r})"
        return _post_login(send, self._path, body, now, what, self.settings_hint)


class CertLogin:
    """TLS certificate login: the HTTP session presents the client certificate."""

    name = "cert"
    can_login = True

    def __init__(self, settings: VaultSettings) -> None:
        self._path = f"auth/{settings.auth_path}/login"
        self._role = settings.cert_role
        self.settings_hint = f"{hint('client_cert')}, {hint('client_key')} and {hint('cert_role')}"

    def login(self, send: Send, now: float) -> TokenGrant:
        body = {"name": self._role} if self._role else {}
        what = f"certificate login at {self._path}"
        return _post_login(send, self._path, body, now, what, self.settings_hint)


def login_method(settings: VaultSettings) -> LoginMethod:
    method = settings.auth_method
    if method is AuthMethod.TOKEN:
        return StaticToken(settings.token, settings.token_file)
    if method is AuthMethod.APPROLE:
        return AppRoleLogin(settings)
    if method is AuthMethod.KUBERNETES:
        return KubernetesLogin(settings)
    return CertLogin(settings)


class TokenKeeper:
    """Holds the current token: logs in on first use, renews or re-logs in when due.

    ``clock`` is the wall clock (token leases are wall-clock times). A failed renewal
    while the token is still valid is logged and retried with backoff; requests keep
    using the current token meanwhile.
    """

    def __init__(
        self,
        method: LoginMethod,
        send: Send,
        *,
        clock: Callable[[], float] = time.time,
        backoff: Backoff | None = None,
    ) -> None:
        self.method = method
        self._send = send
        self._clock = clock
        self._backoff = backoff or Backoff(initial=1.0, maximum=60.0)
        self._lock = threading.RLock()
        self._grant: TokenGrant | None = None
        self._login_ttl = 0.0
        self._retry_at: float | None = None
        self._failures = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewals = 0
        self.logins = 0

    @property
    def grant(self) -> TokenGrant | None:
        return self._grant

    def token(self) -> str:
        """A token to send now (logs in, renews or re-logs in first when needed)."""
        grant = self._grant
        if grant is not None and not self._due(self._clock()):
            return grant.token
        with self._lock:
            if self._grant is None:
                self._login()
            else:
                self.maintain()
            assert self._grant is not None
            return self._grant.token

    def _login(self) -> None:
        grant = self.method.login(self._send, self._clock())
        self._grant = grant
        self._login_ttl = grant.ttl
        self._retry_at = None
        self._failures = 0
        self.logins += 1
        log.info(
            "vault: logged in with %s (ttl %ss, renewable %s)",
            self.method.name,
            int(grant.ttl),
            grant.renewable,
        )
        self._wake.set()

    def _due(self, now: float) -> bool:
        grant = self._grant
        if grant is None:
            return True
        if self._retry_at is not None:
            return now >= self._retry_at
        renew_at = grant.renew_at
        return renew_at is not None and now >= renew_at

    def maintain(self, now: float | None = None) -> None:
        """Renew or re-login if the token is due (``now`` lets a test move the clock)."""
        with self._lock:
            now = self._clock() if now is None else now
            if not self._due(now):
                return
            try:
                self._refresh(now)
            except Exception as exc:
                delay = self._backoff.delay(self._failures)
                self._failures += 1
                self._retry_at = now + delay
                grant = self._grant
                expires = grant.expires_at if grant else None
                if grant is None or (expires is not None and now >= expires):
                    raise
                log.warning(
                    "vault: token refresh failed (%s); the current token stays in use, "
                    "retrying in %.1fs",
                    exc,
                    delay,
                )

    def _refresh(self, now: float) -> None:
        grant = self._grant
        assert grant is not None
        if grant.renewable and self._renew(grant, now):
            return
        if self.method.can_login:
            self._login()
            return
        if isinstance(self.method, StaticToken) and self.method.current() != grant.token:
            self._login()
            return
        # a static token that cannot be extended: warn once per lease, then use it to its end
        self._retry_at = grant.expires_at
        log.warning(
            "vault: the token cannot be renewed further and expires at %s; provide a new one (%s)",
            time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(grant.expires_at or now)),
            self.method.settings_hint,
        )

    def _renew(self, grant: TokenGrant, now: float) -> bool:
        """Renew in place; False when the renewal no longer buys enough time (max TTL)."""
        try:
            body = {"increment": f"{int(self._login_ttl)}s"} if self._login_ttl > 0 else {}
            response = self._send("post", "auth/token/renew-self", body, grant.token)
        except (hvac.exceptions.Forbidden, hvac.exceptions.InvalidRequest) as exc:
            log.info("vault: token renewal refused (%s)", ", ".join(exc.errors or []) or exc)
            return False
        renewed = _grant_from_login(response, now)
        self._grant = renewed
        self._retry_at = None
        self._failures = 0
        self.renewals += 1
        log.info("vault: token renewed (ttl %ss)", int(renewed.ttl))
        # capped by the token's maximum TTL, renewals return less and less: log in afresh
        capped = renewed.ttl < self._login_ttl  # uncapped, Vault grants the increment exactly
        return not (self.method.can_login and capped)

    def relogin(self, rejected: str) -> bool:
        """After Vault refused ``rejected`` with 403: get another token if possible.

        Returns whether a different token is now current (another thread may already
        have replaced it).
        """
        with self._lock:
            current = self._grant
            if current is not None and current.token != rejected:
                return True
            if self.method.can_login:
                self._login()
                return True
            if isinstance(self.method, StaticToken) and self.method.current() != rejected:
                self._login()
                return True
            return False

    # background renewal: a token must stay valid even when nothing is signed for hours
    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._run, name="meshca-vault-token", daemon=True
            )
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _seconds_until_due(self) -> float:
        grant = self._grant
        if grant is None:
            return 60.0
        when = self._retry_at if self._retry_at is not None else grant.renew_at
        if when is None:
            return 3600.0
        return max(0.0, when - self._clock())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._wake.wait(min(self._seconds_until_due(), 3600.0))
            if self._stop.is_set():
                return
            if self._grant is None:
                continue
            try:
                self.maintain()
            except Exception as exc:  # expired and could not refresh: requests will say so
                log.warning("vault: token refresh failed: %s", exc)
                self._stop.wait(self._backoff.delay(self._failures))

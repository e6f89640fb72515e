"""One authenticated HTTP connection to Vault, and whether Vault is healthy.

Every request goes through :meth:`VaultClient.request`, which turns the many ways a
request can fail into two kinds of error: :class:`BackendUnavailable` (down, sealed,
timing out, overloaded: transient, retried with backoff) and :class:`BackendError`
(a refusal that needs an operator, worded to name the setting to fix). While Vault is
unavailable, requests fail fast and a monitor thread probes ``sys/health`` with
exponential backoff and jitter, so the backend recovers by itself.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import hvac.adapters
import hvac.exceptions
import requests
from requests.adapters import HTTPAdapter

from meshca.backends.errors import BackendError, BackendUnavailable
from meshca.backends.vault.auth import TokenKeeper, login_method
from meshca.backends.vault.settings import VaultSettings, hint
from meshca.util.logger import get_logger
from meshca.util.retry import Backoff, Breaker

log = get_logger("meshca.backends.vault")

POOL_SIZE = 32

# Vault (or a proxy before it) answers these when sealed, overloaded or not ready. A 500
# is not among them: the PKI engine answers 500 to configuration errors (unknown issuer).
_TRANSIENT = (
    hvac.exceptions.VaultDown,
    hvac.exceptions.BadGateway,
    hvac.exceptions.RateLimitExceeded,
    hvac.exceptions.VaultNotInitialized,
)


class VaultRequestError(BackendError):
    """Vault answered, and refused the request (4xx other than 403)."""

    def __init__(self, status: int, path: str, errors: list[str]) -> None:
        self.status = status
        self.path = path
        self.errors = errors
        super().__init__(f"vault: {path} refused ({status}): {'; '.join(errors) or 'no detail'}")


class PermissionDenied(BackendError):
    """A valid token whose policies do not allow ``path``."""

    def __init__(self, message: str, path: str) -> None:
        super().__init__(message)
        self.path = path


def _status(exc: hvac.exceptions.VaultError) -> int:
    statuses = {
        hvac.exceptions.InvalidRequest: 400,
        hvac.exceptions.Unauthorized: 401,
        hvac.exceptions.Forbidden: 403,
        hvac.exceptions.InvalidPath: 404,
        hvac.exceptions.PreconditionFailed: 412,
        hvac.exceptions.UnsupportedOperation: 405,
        hvac.exceptions.InternalServerError: 500,
    }
    return statuses.get(type(exc), 0)


def _describe(exc: Exception, addr: str) -> str:
    """One line for a transport failure (no stack of nested urllib3 reprs)."""
    if isinstance(exc, requests.exceptions.SSLError):
        return (
            f"vault: cannot reach {addr}: TLS verification failed "
            f"(check {hint('ca_cert')} and {hint('addr')})"
        )
    if isinstance(exc, requests.exceptions.Timeout):
        return f"vault: cannot reach {addr}: timed out (check {hint('addr')})"
    if isinstance(exc, requests.exceptions.ConnectionError):
        text = str(exc)
        reason = "connection failed"
        if "Connection refused" in text:
            reason = "connection refused"
        elif "Name or service not known" in text or "nodename nor servname" in text:
            reason = "unknown host"
        return f"vault: cannot reach {addr}: {reason} (check {hint('addr')})"
    if isinstance(exc, hvac.exceptions.VaultDown):
        return f"vault: {addr} is sealed or in maintenance (503)"
    if isinstance(exc, hvac.exceptions.VaultNotInitialized):
        return f"vault: {addr} is not initialized (501)"
    if isinstance(exc, hvac.exceptions.RateLimitExceeded):
        return f"vault: {addr} is rate-limiting requests (429)"
    if isinstance(exc, hvac.exceptions.BadGateway):
        return f"vault: {addr} answered 502 bad gateway (a proxy in front of Vault?)"
    # Only the kind of any other failure: its text can quote the request (a header
    # holding the token, in requests' InvalidHeader), and this line reaches the log.
    detail = type(exc).__name__
    if isinstance(exc, hvac.exceptions.VaultError):
        detail = ", ".join(exc.errors or []) or detail
    return f"vault: {addr} failed: {detail}"


def _environment_ca_bundle() -> str | bool:
    """What requests would use without VAULT_CACERT (its own variables, then certifi)."""
    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True


class VaultClient:
    """Requests to one Vault server with one identity; thread-safe."""

    def __init__(
        self,
        settings: VaultSettings,
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        session = requests.Session()
        pool = HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE, max_retries=0)
        session.mount("http://", pool)
        session.mount("https://", pool)
        # The environment (proxies, CA bundle) is read once here, not scanned by requests on
        # every call; verify/cert go on the session: hvac prefers them to its arguments.
        session.trust_env = False
        session.proxies = requests.utils.get_environ_proxies(settings.addr)
        session.verify = str(settings.ca_cert) if settings.ca_cert else _environment_ca_bundle()
        if settings.client_cert:
            session.cert = (str(settings.client_cert), str(settings.client_key))
        self._http = hvac.adapters.JSONAdapter(
            base_uri=settings.addr,
            cert=session.cert,
            verify=session.verify,
            timeout=settings.timeout,
            session=session,
            namespace=settings.namespace,
        )
        self.breaker = Breaker(backoff or Backoff(initial=0.5, maximum=30.0))
        self.keeper = TokenKeeper(login_method(settings), self.send, clock=clock)
        self._stop = threading.Event()
        self._outage = threading.Event()
        self._recovery_listeners: list[Callable[[], None]] = []
        self._monitor: threading.Thread | None = None

    # health -----------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        return self.breaker.healthy

    @property
    def last_error(self) -> str | None:
        return self.breaker.last_error

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        message = _describe(exc, self.settings.addr)
        was_healthy = self.breaker.healthy
        delay = self.breaker.record_failure(message)
        if was_healthy:
            log.warning(
                "%s; serving what is cached, retrying with backoff (next in %.1fs)", message, delay
            )
        self._outage.set()
        return BackendUnavailable(message)

    def _recovered(self) -> None:
        failures = self.breaker.failures
        if self.breaker.record_success():
            log.warning(
                "vault: %s reachable again after %d failure(s)", self.settings.addr, failures
            )
            for listener in list(self._recovery_listeners):
                try:
                    listener()
                except Exception:  # a broken listener must not fail the request
                    log.exception("vault: recovery listener failed")

    def on_recovery(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (in the thread that saw it) whenever Vault answers again after
        an outage; returns the function that stops the calls."""
        self._recovery_listeners.append(callback)

        def stop() -> None:
            with contextlib.suppress(ValueError):
                self._recovery_listeners.remove(callback)

        return stop

    def probe(self) -> bool:
        """Ask ``sys/health`` (unauthenticated); records the outcome. True when usable."""
        try:
            self._http.request("get", "/v1/sys/health", params={"standbyok": "true"})
        except (requests.RequestException, hvac.exceptions.VaultError) as exc:
            self._unavailable(exc)
            return False
        self._recovered()
        return True

    # requests ---------------------------------------------------------------------
    def send(
        self, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None
    ) -> dict[str, Any]:
        """One raw request: hvac and requests exceptions pass through untranslated."""
        headers = {"X-Vault-Token": token} if token else {}
        kwargs: dict[str, Any] = {"headers": headers}
        if body is not None:
            kwargs["json"] = body
        result = self._http.request(method, f"/v1/{path}", **kwargs)
        return result if isinstance(result, dict) else {}

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, auth: bool = True
    ) -> dict[str, Any]:
        """A request as this identity, with errors translated (see the module docstring)."""
        if not self.breaker.allows():
            wait = self.breaker.seconds_until_retry()
            raise BackendUnavailable(
                f"{self.last_error or 'vault: unavailable'} (next attempt in {wait:.1f}s)"
            )
        try:
            result = self._authorized(method, path, body, auth)
        except requests.exceptions.ConnectionError as exc:
            if not self.breaker.healthy or isinstance(
                exc, requests.exceptions.SSLError | requests.exceptions.ConnectTimeout
            ):
                raise self._unavailable(exc) from None
            try:  # a pooled keep-alive connection may have died with a restarted server
                result = self._authorized(method, path, body, auth)
            except (requests.RequestException, *_TRANSIENT) as again:
                raise self._unavailable(again) from None
        except (requests.RequestException, *_TRANSIENT) as exc:
            raise self._unavailable(exc) from None
        except hvac.exceptions.VaultError as exc:
            self._recovered()  # Vault answered: it is up, the request was wrong
            raise VaultRequestError(_status(exc), path, list(exc.errors or [])) from None
        self._recovered()
        return result

    def _authorized(
        self, method: str, path: str, body: dict[str, Any] | None, auth: bool
    ) -> dict[str, Any]:
        if not auth:
            return self.send(method, path, body)
        token = self.keeper.token()
        try:
            return self.send(method, path, body, token)
        except hvac.exceptions.Forbidden:
            if not self.keeper.relogin(token):
                raise self._permission_error(method, path) from None
        try:
            return self.send(method, path, body, self.keeper.token())
        except hvac.exceptions.Forbidden:
            raise self._permission_error(method, path) from None

    def _permission_error(self, method: str, path: str) -> BackendError:
        """403: tell a rejected token from a policy that lacks this path."""
        grant = self.keeper.grant
        try:
            data = self.send("get", "auth/token/lookup-self", None, grant.token) if grant else {}
        except hvac.exceptions.Forbidden:
            data = {}
        info = data.get("data") if data else None
        if not info:
            return BackendError(
                f"vault: the token was rejected by {self.settings.addr} (invalid, expired or "
                f"revoked) (check {self.keeper.method.settings_hint})"
            )
        policies = ", ".join(info.get("policies") or []) or "none"
        verb = "write" if method in ("post", "put") else "read"
        return PermissionDenied(
            f"vault: permission denied: the token's policies ({policies}) do not allow "
            f"{verb} on {path}",
            path,
        )

    # lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        """Background work: token renewal, and recovery probes during an outage."""
        self.keeper.start()
        if self._monitor is None:
            self._stop.clear()
            self._monitor = threading.Thread(
                target=self._watch, name="meshca-vault-health", daemon=True
            )
            self._monitor.start()

    def close(self) -> None:
        self._stop.set()
        self._outage.set()
        self.keeper.close()
        if self._monitor is not None:
            self._monitor.join(timeout=5)
            self._monitor = None
        self._http.close()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self._outage.wait()
            self._outage.clear()
            while not self._stop.is_set() and not self.breaker.healthy:
                self._stop.wait(self.breaker.seconds_until_retry())
                if not self._stop.is_set():
                    self.probe()

"""``meshca init --backend vault``: check everything Vault must provide, report all gaps.

Each item is checked as far as the ones before it allow (no auth check without a
reachable Vault), and every failure says what to change, so an operator fixes the
whole configuration in one pass instead of one error per run.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import hvac.exceptions
import requests

from meshca.backends.errors import BackendError
from meshca.backends.vault.client import VaultClient, VaultRequestError
from meshca.backends.vault.pki import VaultPki
from meshca.backends.vault.settings import VaultMode, VaultSettings, hint
from meshca.issuer import LeafRequest
from meshca.issuer.authority import workload_csr
from meshca.issuer.errors import ChainError
from meshca.issuer.keys import generate_private_key
from meshca.issuer.verify import verify_chain
from meshca.spiffe import SpiffeId, TrustDomain

CHECK_ID = "/meshca/vault-check"
CHECK_TTL = timedelta(seconds=60)


@dataclass(frozen=True)
class CheckItem:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
class CheckReport:
    items: tuple[CheckItem, ...]

    @property
    def ok(self) -> bool:
        return all(item.ok for item in self.items)

    @property
    def failures(self) -> tuple[CheckItem, ...]:
        return tuple(item for item in self.items if not item.ok)

    def lines(self) -> list[str]:
        width = max((len(item.name) for item in self.items), default=0)
        return [
            f"{'ok  ' if item.ok else 'FAIL'}  {item.name:<{width}}  {item.detail}"
            for item in self.items
        ]


def _sign_paths(settings: VaultSettings) -> list[str]:
    s = settings
    if s.mode is VaultMode.INTERMEDIATE:
        if s.issuer:
            return [f"{s.mount}/issuer/{s.issuer}/sign-intermediate"]
        return [f"{s.mount}/root/sign-intermediate"]
    if s.verbatim:
        return [f"{s.mount}/sign-verbatim" + (f"/{s.role}" if s.role else "")]
    return [f"{s.mount}/sign/{s.role}"]


def check_vault(settings: VaultSettings, trust_domain: TrustDomain) -> CheckReport:
    """Connectivity, authentication, mount and CA, issuer, permissions and (per-workload)
    a trial signature through the role, checked as a real SVID would be."""
    client = VaultClient(settings)
    items: list[CheckItem] = []
    try:
        _check(client, VaultPki(client, trust_domain), items)
    finally:
        client.close()
    return CheckReport(tuple(items))


def _check(client: VaultClient, pki: VaultPki, items: list[CheckItem]) -> None:
    settings = client.settings
    add = items.append
    health = _health(client)
    add(CheckItem("address", health[0], health[1]))
    if not health[0]:
        add(CheckItem("auth", False, "not checked: Vault is not usable"))
        return
    authenticated = _check_auth(client, items)
    try:
        bundle = pki.roots()
    except BackendError as exc:
        add(CheckItem("mount", False, str(exc)))
    else:
        add(CheckItem("mount", True, f"'{settings.mount}' holds {len(bundle)} root(s)"))
    if settings.issuer:
        try:
            client.request("get", f"{settings.mount}/issuer/{settings.issuer}/json", auth=False)
        except VaultRequestError as exc:
            add(CheckItem("issuer", False, str(pki.explain(exc, "reading the issuer"))))
        except BackendError as exc:
            add(CheckItem("issuer", False, str(exc)))
        else:
            add(CheckItem("issuer", True, f"'{settings.issuer}' found"))
    if not authenticated:
        add(CheckItem("permissions", False, "not checked: authentication failed"))
        return
    _check_permissions(client, items)
    if settings.mode is VaultMode.PER_WORKLOAD:
        _trial_signature(pki, items)


def _health(client: VaultClient) -> tuple[bool, str]:
    addr = client.settings.addr
    try:
        data = client.send("get", "sys/health")
    except requests.exceptions.SSLError:
        return False, (
            f"cannot reach {addr}: TLS verification failed (check {hint('ca_cert')} "
            f"and {hint('addr')})"
        )
    except requests.RequestException as exc:
        reason = "timed out" if isinstance(exc, requests.Timeout) else "connection failed"
        if "Connection refused" in str(exc):
            reason = "connection refused"
        return False, f"cannot reach {addr}: {reason} (check {hint('addr')})"
    except hvac.exceptions.VaultDown:
        return False, f"{addr} is sealed: unseal it"
    except hvac.exceptions.VaultNotInitialized:
        return False, f"{addr} is not initialized"
    except hvac.exceptions.VaultError as exc:  # 429 standby etc. still answer
        return True, f"{addr} answers ({exc})"
    version = data.get("version", "?")
    return True, f"{addr} reachable (version {version}, unsealed)"


def _check_auth(client: VaultClient, items: list[CheckItem]) -> bool:
    try:
        info = client.request("get", "auth/token/lookup-self").get("data") or {}
    except BackendError as exc:
        items.append(CheckItem("auth", False, str(exc)))
        return False
    policies = ", ".join(info.get("policies") or []) or "none"
    ttl = int(info.get("ttl") or 0)
    lifetime = "never expires" if ttl == 0 else f"{ttl}s"
    method = client.settings.auth_method.value
    items.append(
        CheckItem("auth", True, f"{method} login ok (policies: {policies}; ttl: {lifetime})")
    )
    return True


def _check_permissions(client: VaultClient, items: list[CheckItem]) -> None:
    paths = _sign_paths(client.settings)
    try:
        answer = client.request("post", "sys/capabilities-self", {"paths": paths})
    except BackendError as exc:
        items.append(CheckItem("permissions", False, f"cannot read capabilities: {exc}"))
        return
    caps: dict[str, Any] = answer.get("data") or answer
    missing = [p for p in paths if not {"update", "create", "root"} & set(caps.get(p) or [])]
    if missing:
        items.append(
            CheckItem(
                "permissions",
                False,
                "the token may not write to " + ", ".join(missing) + " (grant 'update': see the "
                "policy in docs/vault.md)",
            )
        )
    else:
        items.append(CheckItem("permissions", True, "may write to " + ", ".join(paths)))


def _trial_signature(pki: VaultPki, items: list[CheckItem]) -> None:
    settings = pki.settings
    spiffe_id = SpiffeId(pki.trust_domain, CHECK_ID)
    key = generate_private_key()
    request = LeafRequest(
        spiffe_id, key.public_key(), CHECK_TTL, csr=workload_csr(key, spiffe_id, ())
    )
    name = "role" if not settings.verbatim else "sign-verbatim"
    try:
        chain = pki.sign_leaf(request)
        verify_chain(chain[0], chain[1:], pki.roots())
    except (BackendError, ChainError) as exc:
        items.append(CheckItem(name, False, str(exc)))
        return
    leaf = chain[0]
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    items.append(
        CheckItem(
            name,
            True,
            f"trial SVID for {spiffe_id} is valid (lifetime {int(life.total_seconds())}s "
            f"including backdating)",
        )
    )

"""The backend for the commands, chosen once (``--backend``): the local CA or Vault,
opened as an :class:`~meshca.backends.opened.OpenedBackend`; Vault's settings from the
option table and ``meshca init``'s check. Serving from Vault (the roots' poll, the backend's health,
rotation of the intermediate) is the server's, as for the local CA.

Options set as flags, ``MESHCA_VAULT_*`` variables or config keys win; the standard
Vault variables (``VAULT_ADDR``, ``VAULT_TOKEN``, ``VAULT_CACERT``, ...) fill in the rest.
The Vault modules (hvac, requests) are imported only when the Vault backend is chosen.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from meshca.cli.commands.common import open_ca, write_out
from meshca.cli.options import Settings
from meshca.issuer.errors import IssuerError

if TYPE_CHECKING:
    from meshca.backends.opened import OpenedBackend
    from meshca.backends.vault.settings import VaultSettings
    from meshca.issuer.bundle import TrustBundle

VAULT = "vault"
STATE_DIR = "vault"  # <data-dir>/vault keeps the intermediate across restarts
ROOTS_FILE = "root-cert.pem"  # in STATE_DIR: the roots served (as the Vault backend writes)


def uses_vault(settings: Settings) -> bool:
    return bool(settings["backend"] == VAULT)


def vault_settings(settings: Settings, environ: Mapping[str, str] | None = None) -> VaultSettings:
    from dataclasses import fields

    from meshca.backends.vault.settings import SETTING_SOURCES, VaultSettings

    environ = os.environ if environ is None else environ
    explicit: dict[str, object] = {}
    for field in fields(VaultSettings):
        name = f"vault_{field.name}"
        if not settings.is_explicit(name):
            continue
        standard = SETTING_SOURCES[field.name][1]  # VAULT_ADDR, ... or MESHCA_VAULT_*
        if settings.source(name).startswith("config file") and environ.get(standard):
            continue  # the environment beats the config file, as for every option
        explicit[field.name] = settings[name]
    return VaultSettings.from_env(environ, **explicit)


def stored_roots_path(settings: Settings) -> Path:
    """Where a server holding a Vault-signed intermediate keeps the trust bundle it serves
    (Vault's roots, and during a rotation every root still in use)."""
    return Path(settings["data_dir"]) / STATE_DIR / ROOTS_FILE


def uses_stored_vault_roots(settings: Settings, local_ca: bool) -> bool:
    """Whether the commands that read the trust bundle take Vault's: ``--backend vault``,
    or a data directory without a local CA that holds Vault's roots."""
    return uses_vault(settings) or (not local_ca and stored_roots_path(settings).exists())


def vault_trust_bundle(settings: Settings) -> tuple[TrustBundle, str]:
    """(the trust bundle in Vault mode, where it was read): the copy on disk that the
    server serves, or else Vault's roots read now; IssuerError saying why neither can."""
    from meshca.issuer.bundle import TrustBundle

    path = stored_roots_path(settings)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
    except OSError as exc:
        raise IssuerError(f"cannot read Vault's roots in {path}: {exc.strerror}") from None
    if data is not None:
        return TrustBundle.from_pem(settings["trust_domain"], data), f"the trust bundle in {path}"
    try:
        with opened(settings) as backend:
            return backend.authority.bundle(), "Vault's roots"
    except IssuerError as exc:
        raise IssuerError(
            f"no copy of Vault's roots in {path} (meshca serve keeps one there when Vault "
            f"signs its intermediate; per-workload mode keeps none), and Vault cannot be "
            f"read: {exc}"
        ) from None


def vault_mode(settings: Settings) -> str:
    """The Vault mode asked for (``--vault-mode``), read without needing the rest of the
    settings (address, token) to be complete."""
    mode = settings["vault_mode"]
    return str(mode).strip().lower() if mode else "intermediate"


def open_backend(settings: Settings, *, serving: bool = False) -> OpenedBackend:
    """The backend, chosen here once and opened with what it can do: the data
    directory's local CA, or Vault. A server also checks a fresh intermediate's
    remaining life against the leaf TTL and runs token renewal and outage recovery."""
    if not uses_vault(settings):
        return open_ca(settings).opened()
    from meshca.backends.vault.backend import open_vault_authority

    return open_vault_authority(
        vault_settings(settings),
        settings["trust_domain"],
        state_dir=settings["data_dir"] / STATE_DIR,
        leaf_ttl=settings["leaf_ttl"] if serving else None,
        start=serving,
    ).opened()


@contextlib.contextmanager
def opened(settings: Settings) -> Iterator[OpenedBackend]:
    backend = open_backend(settings)
    try:
        yield backend
    finally:
        backend.close()


def init_vault(settings: Settings) -> int:
    """``meshca init --backend vault``: check everything, print every gap, refuse if any."""
    from meshca.backends.vault.check import check_vault

    config = vault_settings(settings)
    report = check_vault(config, settings["trust_domain"])
    lines = [f"Vault backend for {settings['trust_domain']} ({config.mode.value} mode):"]
    lines += ["  " + line for line in report.lines()]
    write_out("\n".join(lines) + "\n")
    if not report.ok:
        missing = ", ".join(item.name for item in report.failures)
        raise IssuerError(f"the Vault backend is not ready: fix {missing} (see above)")
    return 0

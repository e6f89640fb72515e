"""The backend, opened once: the authority that signs, and what else it can do.

The command line chooses the backend (the data directory's CA, or Vault) and opens it
into one :class:`OpenedBackend`; ``meshca serve`` hands it to everything that cares:
the issuer signs through :attr:`~OpenedBackend.authority`, metrics label with
:attr:`~OpenedBackend.name`, health reads :attr:`~OpenedBackend.health` and the
:attr:`~OpenedBackend.signer`'s key, the bundle poll follows
:attr:`~OpenedBackend.roots`, rotation takes its CA source from
:attr:`~OpenedBackend.rotation`, and the command closes it. An optional capability is a
typed field that is None when the backend does not have it: nothing downstream probes
the authority or works out again which backend it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from meshca.issuer import ActiveSigner, Signer, SigningAuthority, TrustBundle


class BackendHealth(Protocol):
    """A backend that can be unreachable (Vault): whether it answers now, and why not."""

    @property
    def healthy(self) -> bool:
        """False while the backend is unreachable."""
        ...

    @property
    def last_error(self) -> str | None:
        """Why it is unreachable (stable while the outage lasts)."""
        ...

    def on_recovery(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) each time the backend is seen healthy
        again after an outage; returns a function that stops the calls."""
        ...


class RootsSource(Protocol):
    """A backend whose roots can change outside meshca (a new Vault issuer)."""

    def refresh_bundle(self) -> TrustBundle:
        """Re-read the roots and adopt them (blocking; BackendUnavailable in an outage)."""
        ...


class IntermediateCa(BackendHealth, Protocol):
    """A backend that has a remote CA sign meshca's intermediate (Vault's intermediate
    mode): what signing-CA rotation uses of it."""

    @property
    def active_signer(self) -> ActiveSigner: ...

    def roots(self) -> TrustBundle:
        """The backend's roots now (blocking; BackendUnavailable during an outage)."""
        ...

    def obtain_intermediate(self, ttl: timedelta | None = None) -> Signer:
        """A new intermediate, signed by the backend (blocking)."""
        ...

    def save_state(self, signer: Signer, bundle: TrustBundle) -> None:
        """Keep the active intermediate and bundle for the next start."""
        ...

    def describe(self) -> str:
        """Where intermediates come from, for messages (``mount 'pki' at https://...``)."""
        ...


@dataclass(frozen=True)
class LocalCaRotation:
    """Rotation makes new CAs from the data directory's keys (``<data_dir>/ca``) and
    switches ``authority``'s signer."""

    data_dir: Path
    authority: ActiveSigner


@dataclass(frozen=True)
class IntermediateRotation:
    """Rotation obtains new intermediates from the backend."""

    backend: IntermediateCa


def _nothing() -> None:
    pass


@dataclass(frozen=True)
class OpenedBackend:
    """One backend, chosen and opened once. ``signer`` is the in-process holder of the
    signing key when there is one (the local CA, Vault's intermediate; None when the
    backend signs remotely); ``rotation`` None means meshca does not rotate this CA."""

    name: str  # a metrics label: "local", "vault"
    authority: SigningAuthority
    signer: ActiveSigner | None = None
    health: BackendHealth | None = None
    roots: RootsSource | None = None
    rotation: LocalCaRotation | IntermediateRotation | None = None
    close: Callable[[], None] = _nothing

    @classmethod
    def in_process(cls, authority: ActiveSigner, *, name: str = "local") -> OpenedBackend:
        """A key held in this process and nothing else: no health to watch, no roots to
        follow, no rotation (a CA not kept in a data directory, e.g. in tests)."""
        return cls(name, authority, signer=authority)

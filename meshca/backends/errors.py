"""Errors a signing backend raises, shared by every backend and understood by callers.

A :class:`BackendUnavailable` is transient (the backend may come back by itself: keep
serving what you have and retry); any other :class:`BackendError` needs an operator.
"""

from __future__ import annotations

from meshca.issuer.errors import IssuerError


class BackendError(IssuerError):
    """The backend refused or cannot be used as configured; the message names the setting."""


class BackendUnavailable(BackendError):
    """The backend cannot be reached right now (down, sealed, timing out, overloaded)."""

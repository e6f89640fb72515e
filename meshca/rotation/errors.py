"""Rotation's refusal, light enough for the ``meshca ca`` client to raise it without
loading the rotation machinery."""

from __future__ import annotations

from meshca.issuer.errors import IssuerError


class RotationError(IssuerError):
    """A rotation step refused or impossible; the message says why and what to do."""

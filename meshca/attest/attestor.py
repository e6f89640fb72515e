"""Attestors: how an agent proves who it is before its first CSR.

An attestor reads one kind of evidence and answers with what the agent is (its name
under ``/meshca/agent/<attestor>/``) and what it is entitled to. Join tokens are the
first; Kubernetes service-account tokens (``kube_tokens.py``, TokenReview) the second.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from meshca.attest.tokens import ATTESTOR as JOIN_TOKEN
from meshca.attest.tokens import TokenError, TokenStore
from meshca.spiffe import SpiffeId


class AttestationError(Exception):
    """The evidence does not attest an agent; the message is safe to return and log."""


@dataclass(frozen=True)
class Attestation:
    attestor: str
    name: str  # one path segment: the agent ID is /meshca/agent/<attestor>/<name>
    identity: SpiffeId | None  # sidecar mode: the one workload identity
    node: bool  # node mode: registration entries decide
    expires: datetime | None = None  # the evidence's own end: renewals stop there
    kube_node: str | None = None  # a Kubernetes node agent: only pods on this node
    subject: str = ""  # what the evidence named, for the log (never the evidence)


class Attestor(Protocol):
    name: str

    async def attest(self, evidence: bytes) -> Attestation:
        """Check ``evidence``; AttestationError when it attests nothing."""
        ...


class JoinTokenAttestor:
    """A one-time join token from ``meshca token create``; the agent is named after the
    token's ID (a prefix of its hash), so each redemption yields a new agent ID."""

    name = JOIN_TOKEN

    def __init__(self, tokens: TokenStore) -> None:
        self.tokens = tokens

    async def attest(self, evidence: bytes) -> Attestation:
        return await asyncio.to_thread(self._redeem, evidence)  # the token file's lock

    def _redeem(self, evidence: bytes) -> Attestation:
        try:
            token = evidence.decode("utf-8")
        except UnicodeDecodeError:
            raise AttestationError("join token refused: not UTF-8 text") from None
        if not token.strip() or len(token) > 1024:
            raise AttestationError("join token refused: empty or too long")
        try:
            found = self.tokens.redeem(token)
        except TokenError as exc:
            raise AttestationError(str(exc)) from None
        return Attestation(self.name, found.id, found.identity, found.node)

"""Join tokens: one-time, expiring secrets an operator hands to ``meshca agent``.

A token is 256 random bits, shown once by ``meshca token create``; the data directory
keeps only its SHA-256 (``agents/tokens.json``, 0600). Redeeming a token deletes it
under the lock, so two agents racing with one token get one agent SVID between them.
A token carries what the agent it admits is entitled to: one workload identity
(sidecar mode), or registration entries naming the agent (``--node``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from meshca.attest.state_file import RecordFile, parsing
from meshca.spiffe import SpiffeId
from meshca.util.formats import rfc3339

ATTESTOR = "join_token"  # the attestor that redeems join tokens (agent IDs name it)
TOKENS_FILE = "tokens.json"
TOKEN_BYTES = 32
TOKEN_PREFIX = "mca-jt-"  # recognisable in a secret scanner; not part of the secret
ID_LENGTH = 16  # hex digits of the hash that name a token (and the agent it admits)
MAX_TOKENS = 10_000  # outstanding, unexpired tokens: the file stays small
DEFAULT_TOKEN_TTL = timedelta(hours=1)
MAX_TOKEN_TTL = timedelta(days=30)


class TokenError(ValueError):
    """A token that cannot be created or redeemed; the message never contains the token."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.strip().encode("utf-8", "replace")).hexdigest()


@dataclass(frozen=True)
class JoinToken:
    """What the store knows of a token: never the token itself."""

    digest: str
    identity: SpiffeId | None  # sidecar mode: the one workload identity
    node: bool  # node mode: entitlements come from registration entries
    created: datetime
    expires: datetime

    @property
    def id(self) -> str:
        return self.digest[:ID_LENGTH]

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": str(self.identity) if self.identity else None,
            "node": self.node,
            "created": int(self.created.timestamp()),
            "expires": int(self.expires.timestamp()),
        }

    @classmethod
    def from_json(cls, digest: str, data: dict[str, Any]) -> JoinToken:
        with parsing(f"token {digest[:ID_LENGTH]}"):
            identity = SpiffeId.parse(data["identity"]) if data.get("identity") else None
            return cls(
                digest,
                identity,
                bool(data.get("node", False)),
                datetime.fromtimestamp(int(data["created"]), UTC),
                datetime.fromtimestamp(int(data["expires"]), UTC),
            )


class TokenStore:
    """The join tokens of one data directory (safe across processes)."""

    def __init__(self, data_dir: Path) -> None:
        self.file = RecordFile(data_dir, TOKENS_FILE, JoinToken.from_json)

    def _load(self, now: datetime) -> dict[str, JoinToken]:
        """Unexpired tokens (expired ones are dropped at the next write)."""
        return {d: t for d, t in self.file.read().items() if t.expires > now}

    def create(
        self,
        identity: SpiffeId | None,
        *,
        node: bool = False,
        ttl: timedelta = DEFAULT_TOKEN_TTL,
        now: datetime | None = None,
    ) -> tuple[str, JoinToken]:
        """A new token (returned once, never stored) and its record."""
        if (identity is None) == (not node):
            raise TokenError("a join token needs --identity ID (sidecar mode) or --node")
        if identity is not None and identity.is_agent:
            raise TokenError(
                f"{identity} is under the reserved path /meshca/agent: agent IDs are "
                "assigned at attestation, no workload may have one"
            )
        if not timedelta(0) < ttl <= MAX_TOKEN_TTL:
            raise TokenError(f"a token's lifetime must be positive and at most {MAX_TOKEN_TTL}")
        now = now or datetime.now(UTC)
        token = TOKEN_PREFIX + secrets.token_urlsafe(TOKEN_BYTES)
        record = JoinToken(token_hash(token), identity, node, now, now + ttl)
        with self.file.locked():
            tokens = self._load(now)
            if len(tokens) >= MAX_TOKENS:
                raise TokenError(
                    f"{len(tokens)} unexpired join tokens already exist (at most {MAX_TOKENS})"
                )
            tokens[record.digest] = record
            self.file.write(tokens)
        return token, record

    def list(self, now: datetime | None = None) -> list[JoinToken]:
        with self.file.locked():
            tokens = self._load(now or datetime.now(UTC))
        return sorted(tokens.values(), key=lambda t: (t.expires, t.digest))

    def redeem(self, token: str, now: datetime | None = None) -> JoinToken:
        """The token's record, deleted so it can never be used again; TokenError if the
        token is unknown or already used (the same answer for both) or expired."""
        now = now or datetime.now(UTC)
        digest = token_hash(token)
        with self.file.locked():
            stored = self.file.read()
            found = next((t for d, t in stored.items() if hmac.compare_digest(d, digest)), None)
            live = {d: t for d, t in stored.items() if t.expires > now and d != digest}
            if found is not None or len(live) != len(stored):
                self.file.write(live)
        if found is None:
            raise TokenError("join token refused: unknown, already used, or expired")
        if found.expires <= now:
            raise TokenError(
                f"join token {found.id} refused: it expired at {rfc3339(found.expires)}"
            )
        return found

    def delete(self, token_id: str) -> bool:
        """Revoke an unused token by its ID (the hash prefix ``token list`` shows)."""
        with self.file.locked():
            tokens = self._load(datetime.now(UTC))
            matches = [d for d in tokens if d.startswith(token_id)] if token_id else []
            if len(matches) != 1:
                return False
            del tokens[matches[0]]
            self.file.write(tokens)
        return True

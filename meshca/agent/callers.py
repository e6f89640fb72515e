"""Who calls the agent's socket.

Sidecar mode: every local caller is the one workload the agent attested for: the socket
(0600, or a group the operator chose) lives in the workload's private directory, so
reaching it is the proof. The caller's SO_PEERCRED is still recorded and logged.

Node mode: the caller is attested from its SO_PEERCRED (uid, gid, pid) and the
executable of that pid (``/proc/<pid>/exe``); it holds the identity of every
registration entry whose selectors it all matches, and nothing when none does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grpc.aio

from meshca.agent.ca_client import Entry
from meshca.spiffe import SpiffeId, TrustDomain
from meshca.xds.auth import (
    UDS,
    AuthError,
    Caller,
    CallerAuthenticator,
    PeerCred,
    PeerCredLookup,
)


class SidecarAuthenticator(CallerAuthenticator):
    def __init__(self, identity: SpiffeId, peer_creds: PeerCredLookup) -> None:
        super().__init__(identity.trust_domain, peer_creds)
        self.identity = identity

    def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        peer = context.peer() or ""
        cred = self.peer_creds.lookup(peer) if self.peer_creds is not None else None
        if cred is None:
            raise AuthError(f"caller {peer} did not come through the agent's socket")
        return Caller((self.identity,), UDS, f"uid={cred.uid} pid={cred.pid}")


def executable_of(pid: int) -> str | None:
    """The caller's executable, or None when it cannot be read (the process is gone, or
    belongs to someone /proc hides from the agent): then no path selector matches."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def selectors_of(cred: PeerCred) -> set[str]:
    found = {f"unix:uid:{cred.uid}", f"unix:gid:{cred.gid}"}
    path = executable_of(cred.pid)
    if path is not None:
        found.add(f"unix:path:{path}")
    return found


class NodeAuthenticator(CallerAuthenticator):
    def __init__(self, trust_domain: TrustDomain, peer_creds: PeerCredLookup) -> None:
        super().__init__(trust_domain, peer_creds)
        self.entries: tuple[Entry, ...] = ()

    def update(self, entries: Sequence[Entry]) -> None:
        self.entries = tuple(entries)

    def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Caller:
        peer = context.peer() or ""
        cred = self.peer_creds.lookup(peer) if self.peer_creds is not None else None
        if cred is None:
            raise AuthError(f"caller {peer} did not come through the agent's socket")
        described = f"uid={cred.uid} gid={cred.gid} pid={cred.pid}"
        have = selectors_of(cred)
        identities = tuple(
            dict.fromkeys(e.spiffe_id for e in self.entries if set(e.selectors) <= have)
        )
        if not identities:
            raise AuthError(f"no registration entry matches the caller {described}")
        return Caller(identities, UDS, described)

"""Who calls the agent's socket. In sidecar mode every local caller is the one workload
the agent attested for: the socket (0600, or a group the operator chose) lives in the
workload's private directory, so reaching it is the proof. The caller's SO_PEERCRED is
still recorded by the front door and logged with every call."""

from __future__ import annotations

from typing import Any

import grpc.aio

from meshca.spiffe import SpiffeId
from meshca.xds.auth import UDS, AuthError, Caller, CallerAuthenticator, PeerCredLookup


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

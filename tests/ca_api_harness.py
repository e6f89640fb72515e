"""A ``meshca serve`` with the CSR API (in-process, attestation listener on loopback)
and an agent-side client of it, for the CSR API and agent tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from meshca.agent.ca_client import CaClient, Signed
from meshca.agent.runtime import AgentConfig, MeshcaAgent
from meshca.attest.tokens import TokenStore
from meshca.issuer.keys import generate_private_key
from meshca.serve.server import MeshcaServer
from meshca.spiffe import SpiffeId
from tests.serve_harness import TD, default_config, make_data_dir, served


@dataclass
class CaApi:
    server: MeshcaServer
    tokens: TokenStore

    @property
    def address(self) -> str:
        return f"localhost:{self.server.tcp_port}"

    @property
    def attest_address(self) -> str:
        return f"localhost:{self.server.attest_port}"

    def client(self) -> CaClient:
        return CaClient(
            self.address, TD, self.server.store.bundle(), attest_server=self.attest_address
        )

    def token(self, identity: SpiffeId) -> str:
        return self.tokens.create(identity)[0]

    async def attested(self, identity: SpiffeId) -> tuple[CaClient, Signed]:
        """A client holding a fresh agent SVID entitled to ``identity``."""
        client = self.client()
        signed = await asyncio.to_thread(
            client.attest, self.token(identity), generate_private_key()
        )
        client.use(signed.svid, signed.bundle)
        return client, signed


@contextlib.asynccontextmanager
async def ca_api(root: Path, **overrides: Any) -> AsyncIterator[CaApi]:
    make_data_dir(root)
    config = default_config(root, attest_listen=("127.0.0.1", 0), **overrides)
    async with served(config) as server:
        yield CaApi(server, TokenStore(config.data_dir))


@contextlib.asynccontextmanager
async def agent_for(
    api: CaApi,
    root: Path,
    identity: SpiffeId | None,
    name: str = "agent",
    token: str | None = None,
    **overrides: Any,
) -> AsyncIterator[MeshcaAgent]:
    """A ``meshca agent`` (in-process) attested with ``token`` or a fresh token for
    ``identity``, its socket at ``<root>/<name>.sock``."""
    token_file = root / f"{name}.token"
    if token is None:
        assert identity is not None
        token = api.token(identity)
    token_file.write_text(token)
    config = AgentConfig(
        server=api.address,
        attest_server=api.attest_address,
        bundle=api.server.store.bundle(),
        data_dir=root / f"{name}-data",
        socket=root / f"{name}.sock",
        token_file=token_file,
        **overrides,
    )
    agent = MeshcaAgent(config)
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()

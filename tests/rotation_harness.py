"""Helpers for the rotation tests: CA sources that count (or stop) what they create,
real SDS proxies that ACK on command, and certificate checks."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from meshca.backends.local import import_cacerts, init_local_ca, load_local_ca
from meshca.issuer import Signer, TrustBundle
from meshca.issuer.keys import generate_private_key, private_key_pem
from meshca.issuer.profile import build_ca
from meshca.issuer.svid import certificates_pem
from meshca.rotation.acks import chains_to
from meshca.rotation.journal import SigningCa
from meshca.rotation.local_ca import LocalCaSource
from meshca.spiffe import TrustDomain
from tests.sds_harness import SdsHarness, Stream, secrets_of, sotw

TD = TrustDomain("cluster.local")


class SimulatedCrash(Exception):
    """Raised at a chosen point to leave the data directory as a crash there would."""


class CountingSource(LocalCaSource):
    """The local source, counting the CAs it creates; ``crash_in`` stops it at a point."""

    def __init__(self, data_dir: Path, **kwargs: Any) -> None:
        super().__init__(data_dir, TD, **kwargs)
        self.created = 0
        self.crash_in: str | None = None  # "create" or "publish"

    def create(self, active: SigningCa, *, new_root: bool) -> SigningCa:
        if self.crash_in == "create":
            raise SimulatedCrash("crashed while creating a CA")
        self.created += 1
        return super().create(active, new_root=new_root)

    def publish(self, active: SigningCa, bundle: TrustBundle) -> None:
        if self.crash_in == "publish":
            raise SimulatedCrash("crashed while publishing")
        super().publish(active, bundle)


def init_ca(data_dir: Path, *, intermediate_ttl: timedelta | None = None) -> Path:
    init_local_ca(data_dir, TD, intermediate_ttl=intermediate_ttl)
    return data_dir


def init_self_signed_ca(data_dir: Path, ttl: timedelta) -> Path:
    """A data directory whose signing CA is a self-signed root (no intermediate)."""
    key = generate_private_key()
    root = build_ca(TD, key, ttl, role="root")
    source = data_dir.parent / "cacerts"
    source.mkdir(parents=True, exist_ok=True)
    (source / "ca-cert.pem").write_bytes(certificates_pem([root]))
    (source / "ca-key.pem").write_bytes(private_key_pem(key))
    (source / "root-cert.pem").write_bytes(certificates_pem([root]))
    import_cacerts(data_dir, source, TD)
    return data_dir


def loaded_signer_and_bundle(data_dir: Path) -> tuple[Signer, TrustBundle]:
    ca = load_local_ca(data_dir)
    return ca.signer, ca.bundle


def chain_root(chain: tuple[x509.Certificate, ...], bundle: TrustBundle) -> x509.Certificate:
    """The root of ``bundle`` a leaf-first chain ends at (AssertionError if none)."""
    for root in bundle:
        if chains_to(chain, root):
            return root
    raise AssertionError("the chain leads to no root of the bundle")


class Proxy:
    """A real SotW SDS stream asking for its own certificate and the bundle, like Envoy.

    It ACKs every response unless ``holding``; a held response is ACKed by ``release``.
    While ``refusing`` it NACKs every response, as a proxy that rejects the content does.
    ``acked`` is what it has acknowledged (name -> Secret), i.e. what it would use.
    """

    NAMES = ("default", "ROOTCA")

    def __init__(self, harness: SdsHarness, identity: Any, node_id: str) -> None:
        self.node_id = node_id
        channel = harness.mtls_channel(identity)
        self.stream = Stream(harness.stub(channel).StreamSecrets())
        self.holding = False
        self.refusing = False
        self.nacked = 0
        self.held: list[Any] = []
        self.acked: dict[str, Any] = {}
        self.version = ""  # of the last response ACKed (a NACK repeats it)
        self.responses = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Proxy:
        await self.stream.send(sotw(self.NAMES, node_id=self.node_id))
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            response = await self.stream.recv(timeout=3600)
            self.responses += 1
            if self.refusing:
                await self.stream.send(
                    sotw(
                        self.NAMES,
                        nonce=response.nonce,
                        version=self.version,
                        error="refused by this proxy",
                    )
                )
                self.nacked += 1
            elif self.holding:
                self.held.append(response)
            else:
                await self._ack(response)

    async def _ack(self, response: Any) -> None:
        await self.stream.send(
            sotw(self.NAMES, nonce=response.nonce, version=response.version_info)
        )
        self.version = response.version_info
        self.acked.update(secrets_of(response))

    async def release(self) -> None:
        """ACK the latest held response (SotW: it carries every resource)."""
        self.holding = False
        if self.held:
            latest, self.held = self.held[-1], []
            await self._ack(latest)

    def bundle(self) -> list[x509.Certificate]:
        secret = self.acked["ROOTCA"]
        return x509.load_pem_x509_certificates(secret.validation_context.trusted_ca.inline_bytes)

    def chain(self) -> tuple[x509.Certificate, ...]:
        secret = self.acked["default"]
        data = secret.tls_certificate.certificate_chain.inline_bytes
        return tuple(x509.load_pem_x509_certificates(data))

    async def stop(self) -> None:
        self.stream.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task

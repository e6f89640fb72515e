"""The agent's signing authority: the secret store's keys, certified by meshca serve.

The agent's :class:`meshca.store.SecretStore` is the same one ``meshca serve`` uses;
only its authority differs. The Issuer generates each workload key here, in memory, and
(because ``requires_csr``) puts a CSR for it in the request; this authority sends that
CSR through the CSR API and returns the chain. "meshca serve's SDS half, fed by CSRs
instead of a local signer." CSRs of several workloads due at once go in one call
(:mod:`meshca.agent.batching`).
"""

from __future__ import annotations

from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from meshca.agent.batching import BatchingSigner
from meshca.agent.ca_client import CaClient
from meshca.issuer import IssuerError, LeafRequest, TrustBundle
from meshca.spiffe import TrustDomain


class RemoteAuthority:
    requires_csr = True

    def __init__(self, client: CaClient, ttl: timedelta | None = None) -> None:
        self.client = client
        self.ttl = ttl  # None: meshca's leaf TTL decides (the local policy's is ignored)
        self.signer = BatchingSigner(client)

    @property
    def trust_domain(self) -> TrustDomain:
        return self.client.trust_domain

    def sign(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        if request.csr is None:
            raise IssuerError("the agent signs only through CSRs")
        csr = request.csr.public_bytes(serialization.Encoding.DER)
        signed = self.signer.sign(request.spiffe_id, csr, self.ttl)
        if signed.svid.spiffe_id != request.spiffe_id:
            raise IssuerError(f"meshca certified {signed.svid.spiffe_id}, not {request.spiffe_id}")
        self.client.use(bundle=signed.bundle)
        return signed.svid.chain

    def bundle(self) -> TrustBundle:
        return self.client.bundle

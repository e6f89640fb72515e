"""meshca's own TLS server credentials, which follow its serving SVID and the trust bundle.

gRPC asks a certificate-config fetcher at every handshake; it answers with a new
configuration only after the serving SVID was renewed or the bundle changed (None
otherwise, meaning "keep the current one"), so established connections are untouched
and new handshakes use the new certificate and roots. Client certificates are required
and verified against the bundle; which identity a caller has is the SDS layer's
business.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import cast

import grpc

from meshca.issuer import TrustBundle, X509Svid


def default_dns_names(namespace: str) -> tuple[str, ...]:
    """The DNS names meshca's serving certificate carries unless ``--server-dns`` says
    otherwise: ``localhost`` and the in-cluster names of a ``meshca`` Service in
    ``namespace``."""
    return (
        "localhost",
        "meshca",
        f"meshca.{namespace}",
        f"meshca.{namespace}.svc",
        f"meshca.{namespace}.svc.cluster.local",
    )


def _certificate_config(svid: X509Svid, bundle: TrustBundle) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(svid.private_key_pem(), svid.chain_pem())], root_certificates=bundle.pem()
    )


class ServingCredentials:
    """Holds the current serving certificate and roots; safe to call from gRPC's threads."""

    def __init__(self, svid: X509Svid, bundle: TrustBundle) -> None:
        self._lock = threading.Lock()
        self._svid = svid
        self._bundle = bundle
        self._config = _certificate_config(svid, bundle)
        self._version = 0
        self._fetched_version = 0

    def update(self, *, svid: X509Svid | None = None, bundle: TrustBundle | None = None) -> None:
        """Use a renewed serving SVID and/or a changed bundle for handshakes from now on."""
        with self._lock:
            self._svid = svid or self._svid
            self._bundle = bundle or self._bundle
            self._config = _certificate_config(self._svid, self._bundle)
            self._version += 1

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            if self._fetched_version == self._version:
                return None
            self._fetched_version = self._version
            return self._config

    def server_credentials(self, *, require_client_auth: bool = True) -> grpc.ServerCredentials:
        """Credentials for one server (each server needs its own ServingCredentials: the
        fetcher hands every new configuration out once). Without client authentication
        only for the attestation listener, where the evidence is the credential."""
        with self._lock:
            initial = self._config
            self._fetched_version = self._version
        # gRPC documents None as "no change"; grpc-stubs types the fetcher too narrowly
        fetch = cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch)
        return grpc.dynamic_ssl_server_credentials(
            initial, fetch, require_client_authentication=require_client_auth
        )

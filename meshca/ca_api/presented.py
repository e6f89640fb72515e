"""The client certificates agents present to the CSR API, parsed once.

gRPC hands every call the PEM of the certificate its connection was opened with (TLS
verified its chain to the trust bundle at the handshake). Reading it and checking it
follows the X.509-SVID profile is the same work on every call of a connection, about a
fifth of a millisecond; this cache keeps the result, keyed by the exact PEM bytes.

What is cached is only what those bytes alone decide: the parsed certificate and the
SPIFFE ID its profile check yielded. Everything that changes with time is checked by
the caller on every call: the certificate's validity period against the clock, and the
agent's record (evicted, or past its maximum age). A certificate whose profile check
failed is not cached (it is refused, and re-read if presented again). Bounded: the least
recently presented certificate is dropped past ``max_entries``.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from cryptography import x509

from meshca.issuer.svid import spiffe_id_of
from meshca.spiffe import SpiffeId

MAX_PRESENTED = 1024  # certificates kept (about 1 KB of PEM each, with the parsed object)


@dataclass(frozen=True)
class Presented:
    certificate: x509.Certificate
    spiffe_id: SpiffeId


class PresentedCertificates:
    def __init__(self, max_entries: int = MAX_PRESENTED) -> None:
        self.max_entries = max_entries
        self._parsed: OrderedDict[bytes, Presented] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._parsed)

    def read(self, pem: bytes) -> Presented:
        """The certificate in ``pem`` and the SPIFFE ID of its X.509-SVID profile; raises
        ``ValueError`` (unreadable) or :class:`meshca.issuer.errors.SvidError`."""
        with self._lock:
            held = self._parsed.get(pem)
            if held is not None:
                self._parsed.move_to_end(pem)
                return held
        certificate = x509.load_pem_x509_certificate(pem)
        presented = Presented(certificate, spiffe_id_of(certificate))
        with self._lock:
            self._parsed[pem] = presented
            while len(self._parsed) > self.max_entries:
                self._parsed.popitem(last=False)
        return presented

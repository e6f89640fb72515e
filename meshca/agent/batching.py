"""Workload CSRs due at once go to meshca serve in one ``BatchSignWorkload`` call.

The agent's secret store signs each identity from its own worker thread. The first
thread to sign sends its CSR alone (``SignWorkload``); CSRs that arrive while a call is
in flight wait for it to end and then go together, up to :data:`MAX_BATCH` per call,
sent by whichever thread is sending. Nothing waits on a timer: a lone renewal costs one
call as before, and a burst (start-up, a signing-CA switch that renews every SVID, a
node agent's many workloads) costs one call per batch instead of one per workload.

Each entry is answered on its own: a refused entry raises in its own thread only. A
failure of the whole call (meshca unreachable, the agent's credential refused) raises
in every thread of that batch. A server without ``BatchSignWorkload`` (UNIMPLEMENTED)
is sent single calls from then on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import timedelta

import grpc

from meshca.agent.ca_client import CaClient, CaRefused, Signed
from meshca.spiffe import SpiffeId

MAX_BATCH = 64  # the server's bound (meshca.ca_api.service.MAX_BATCH)


@dataclass
class _Pending:
    spiffe_id: SpiffeId
    csr: bytes
    ttl: timedelta | None
    done: threading.Event = field(default_factory=threading.Event)
    signed: Signed | None = None
    error: BaseException | None = None

    def settle(self, outcome: Signed | BaseException) -> None:
        if isinstance(outcome, BaseException):
            self.error = outcome
        else:
            self.signed = outcome
        self.done.set()


class BatchingSigner:
    def __init__(self, client: CaClient, max_batch: int = MAX_BATCH) -> None:
        self.client = client
        self.max_batch = max_batch
        self.batches = 0  # BatchSignWorkload calls sent
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._sending = False
        self._batch_supported = True

    def sign(self, spiffe_id: SpiffeId, csr: bytes, ttl: timedelta | None = None) -> Signed:
        """What :meth:`CaClient.sign` answers (blocking), sent with whatever other CSRs
        are waiting."""
        pending = _Pending(spiffe_id, csr, ttl)
        with self._lock:
            self._queue.append(pending)
            leading = not self._sending
            self._sending = True
        if leading:
            self._send_until_empty()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.signed is not None
        return pending.signed

    def _send_until_empty(self) -> None:
        while True:
            with self._lock:
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                if not batch:
                    self._sending = False
                    return
            try:
                outcomes = self._send(batch)
            except BaseException as exc:  # every entry of the call gets the call's failure
                outcomes = [exc] * len(batch)
            for pending, outcome in zip(batch, outcomes, strict=True):
                pending.settle(outcome)

    def _send(self, batch: list[_Pending]) -> list[Signed | BaseException]:
        if len(batch) > 1 and self._batch_supported:
            requests = [(p.spiffe_id, p.csr, p.ttl) for p in batch]
            try:
                answers = self.client.sign_batch(requests)
            except CaRefused as exc:
                if exc.code is not grpc.StatusCode.UNIMPLEMENTED:
                    raise
                self._batch_supported = False  # an older meshca serve: one CSR per call
            else:
                self.batches += 1
                return list(answers)
        outcomes: list[Signed | BaseException] = []
        for pending in batch:
            try:
                outcomes.append(self.client.sign(pending.spiffe_id, pending.csr, pending.ttl))
            except Exception as exc:
                outcomes.append(exc)
        return outcomes

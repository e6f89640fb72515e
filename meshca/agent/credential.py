"""The agent's own credential: attested once from a join token (or a Kubernetes
service-account token), then renewed over mutual TLS before it expires, until the maximum
age meshca set at attestation.

The agent SVID and its key are kept in ``<data dir>/agent/`` (0600, written atomically)
so that a restarted agent renews instead of needing a new token; workload keys are never
written anywhere. Renewal happens at half the SVID's life (± jitter), from its own
NotAfter on the wall clock; a failed renewal is retried with backoff while the current
SVID is still valid. When meshca refuses the agent (evicted, maximum age reached) and
the token file holds a new token, the agent attests again with it (a Kubernetes token's
expiry is such a maximum age; the kubelet has refreshed the projected token by then).
"""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime
from pathlib import Path

from meshca.agent.ca_client import JOIN_TOKEN, CaClient, CaRefused, CaUnavailable, Signed
from meshca.issuer import IssuerError, TrustBundle, X509Svid
from meshca.issuer.keys import (
    PrivateKey,
    generate_private_key,
    key_matches,
    load_private_key_pem,
    private_key_pem,
)
from meshca.issuer.policy import issued_at, renewal_time
from meshca.issuer.svid import certificates_pem, load_certificates_pem, spiffe_id_of
from meshca.util.aio import set_event
from meshca.util.files import PRIVATE, atomic_write, ensure_private_dir
from meshca.util.formats import rfc3339, serial_hex
from meshca.util.logger import get_logger
from meshca.util.retry import Backoff

log = get_logger("meshca.agent")

CREDENTIAL_DIR = "agent"
SVID_FILE = "agent-svid.pem"
KEY_FILE = "agent-key.pem"
USED_TOKEN_FILE = "used-token.sha256"
RETRY = Backoff(initial=1.0, maximum=30.0)


class AgentError(IssuerError):
    """The agent cannot get or keep its credential; the message says what to do."""


def _read_token(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AgentError(f"--token-file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise AgentError(f"--token-file {path}: not UTF-8 text") from None
    return token or None


class AgentCredential:
    def __init__(
        self,
        client: CaClient,
        data_dir: Path,
        token_file: Path | None,
        *,
        attestor: str = JOIN_TOKEN,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.directory = Path(data_dir) / CREDENTIAL_DIR
        self.token_file = token_file
        self.attestor = attestor
        self._rng = rng or random.Random()
        self.svid: X509Svid | None = None
        self.reattest_by: datetime | None = None
        self.renewals = 0
        self._renewed = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # where run() waits on _renewed

    # --- the files ------------------------------------------------------------------
    def _save(self, svid: X509Svid) -> None:
        ensure_private_dir(self.directory)
        atomic_write(self.directory / KEY_FILE, svid.private_key_pem(), PRIVATE)
        atomic_write(self.directory / SVID_FILE, svid.chain_pem(), PRIVATE)

    def _load(self) -> X509Svid | None:
        """The saved agent SVID, if there is one that is still valid."""
        try:
            chain = load_certificates_pem((self.directory / SVID_FILE).read_bytes())
            key = load_private_key_pem((self.directory / KEY_FILE).read_bytes())
        except (OSError, IssuerError, ValueError):
            return None
        try:
            svid = X509Svid(spiffe_id_of(chain[0]), tuple(chain), key)
        except IssuerError:
            return None
        if not key_matches(key, svid.leaf) or datetime.now(UTC) >= svid.not_after:
            return None
        return svid

    # --- getting one ------------------------------------------------------------------
    def _adopt(self, signed: Signed) -> None:
        self.svid = signed.svid
        self.reattest_by = signed.reattest_by
        self.client.use(signed.svid, signed.bundle)
        self._save(signed.svid)
        set_event(self._renewed, self._loop)  # renew_now runs in a worker thread

    def _attest(self) -> Signed:
        token = _read_token(self.token_file)
        if token is None:
            if self.attestor != JOIN_TOKEN:
                raise AgentError(
                    f"no valid agent SVID and no token: --token-file must hold the pod's "
                    f"projected service-account token (attestor {self.attestor})"
                )
            raise AgentError(
                "no valid agent SVID and no join token: give --token-file with a token from "
                "'meshca token create'"
            )
        signed = self.client.attest(token, generate_private_key(), self.attestor)
        log.info(
            "attested as %s; entitled to %s; must attest again by %s",
            signed.svid.spiffe_id,
            ", ".join(str(i) for i in signed.entitled) or "nothing yet",
            rfc3339(signed.reattest_by),
        )
        return signed

    def establish(self) -> X509Svid:
        """Load the saved agent SVID or attest with the token (blocking)."""
        saved = self._load()
        if saved is not None:
            self.client.use(saved)
            try:
                signed = self.client.renew(generate_private_key())
                self._adopt(signed)
                log.info("resumed as %s", signed.svid.spiffe_id)
                assert self.svid is not None
                return self.svid
            except CaRefused as exc:
                log.warning("the saved agent SVID was refused (%s): attesting again", exc)
        self._adopt(self._attest())
        assert self.svid is not None
        return self.svid

    def renew_now(self) -> X509Svid:
        """Renew over mutual TLS (blocking); attest again with a new token if refused."""
        key: PrivateKey = generate_private_key()
        try:
            signed = self.client.renew(key)
        except CaRefused as exc:
            log.error("meshca refused to renew the agent SVID: %s", exc)
            signed = self._attest()  # AgentError when there is no token to try
        self._adopt(signed)
        self.renewals += 1
        assert self.svid is not None
        log.info(
            "agent SVID renewed: serial=%s not_after=%s",
            serial_hex(self.svid.serial),
            rfc3339(self.svid.not_after),
        )
        return self.svid

    # --- keeping it -------------------------------------------------------------------
    def _due(self) -> datetime:
        assert self.svid is not None
        start = issued_at(self.svid.not_before, self.svid.not_after)
        return renewal_time(start, self.svid.not_after, rng=self._rng)

    async def run(self) -> None:
        """Renew at half-life (± jitter), retrying with backoff; runs until cancelled."""
        failures = 0
        self._loop = asyncio.get_running_loop()
        while True:
            self._renewed.clear()
            delay = (self._due() - datetime.now(UTC)).total_seconds()
            if failures:
                delay = min(delay, RETRY.delay(failures - 1, self._rng))
            if delay > 0:
                try:  # an early renewal (a CA change) restarts the schedule
                    await asyncio.wait_for(self._renewed.wait(), timeout=delay)
                    failures = 0
                    continue
                except TimeoutError:
                    pass
            try:
                await asyncio.to_thread(self.renew_now)
                failures = 0
            except (CaUnavailable, CaRefused, AgentError) as exc:
                failures += 1
                if failures == 1:
                    log.warning("agent SVID renewal failed (%s); retrying with backoff", exc)

    @property
    def bundle(self) -> TrustBundle:
        return self.client.bundle

    def bundle_pem(self) -> bytes:
        return certificates_pem(list(self.client.bundle))

    def key_pem(self) -> bytes:
        assert self.svid is not None and self.svid.private_key is not None
        return private_key_pem(self.svid.private_key)

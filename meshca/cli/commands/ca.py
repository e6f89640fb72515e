"""``meshca ca``: signing-CA and root rotation for operators (docs/rotation.md).

``status``, ``rotate`` and ``rotate-root`` go to a running ``meshca serve`` through its
admin socket (``<data-dir>/admin.sock``) so that waits are driven by what connected
proxies acknowledged; with no server running they act on the data directory directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Coroutine
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from meshca.cli.commands.common import (
    CONFIGURATION,
    Action,
    Command,
    OneOf,
    UsageError,
    arg,
    write_out,
)
from meshca.cli.options import ConfigError, Settings
from meshca.issuer.errors import IssuerError
from meshca.rotation.operator import ADMIN_SOCKET, LAST_STEP
from meshca.util.durations import parse_duration

if TYPE_CHECKING:
    from cryptography import x509

    from meshca.rotation.acks import AckTracker
    from meshca.rotation.admin import CaOperations
    from meshca.rotation.manager import RotationManager


NAME = "ca"
DEFAULT_TIMEOUT = "5m"
DEFAULT_STATUS_TIMEOUT = "30s"
_ANSWER_MARGIN = 30.0  # seconds the client waits beyond the server's own timeout


class PerWorkloadMode(IssuerError):
    """Vault signs every SVID: meshca holds no CA, so there is no rotation."""


def _request(args: argparse.Namespace, timeout: timedelta) -> dict[str, Any]:
    if args.ca_action == "status":
        return {"op": "status"}
    if args.ca_action == "rotate":
        return {"op": "rotate"}
    if args.ca_action == "jwt-key":
        if args.force and args.jwt_step != "retire":
            raise UsageError("--force applies to 'retire' only (activate: --force-unacked)")
        if args.force_unacked and args.jwt_step != "activate":
            raise UsageError("--force-unacked applies to 'activate' only")
        return {
            "op": "jwt-key",
            "step": args.jwt_step,
            "force": bool(args.force or args.force_unacked),
            "timeout": timeout.total_seconds(),
        }
    return {
        "op": "rotate-root",
        "step": args.step,
        "rollback": bool(args.rollback),
        "timeout": timeout.total_seconds(),
        "force": bool(args.force_unacked),
    }


def _direct(
    data_dir: Path,
    settings: Settings,
    action: Callable[[CaOperations], Coroutine[Any, Any, Any]],
    *,
    agents: bool = False,
) -> Any:
    """Run ``action`` on the data directory itself (no server, so no proxies to wait for).
    With ``agents``, the attested agents' saved ACKs are asked (what a root rotation's
    waits and a JWT key activation need; nobody polls meanwhile, so a wait is judged at
    once)."""
    import asyncio

    from meshca.cli.commands.vault_backend import vault_mode
    from meshca.rotation.admin import CaOperations
    from meshca.rotation.journal import JournalLockedError, RotationError
    from meshca.rotation.local_ca import LocalCaSource, open_local_ca
    from meshca.rotation.manager import RotationManager, RotationPolicy
    from meshca.rotation.root import RootRotation

    if settings["backend"] == "vault" and vault_mode(settings) == "per-workload":
        raise PerWorkloadMode(
            "in Vault per-workload mode Vault signs every SVID and meshca holds no CA of "
            "its own: there is no CA rotation to report or run (the server opens no admin "
            "socket); rotate the issuer in Vault"
        )
    if settings["backend"] == "vault":
        raise RotationError(
            f"with --backend vault, 'meshca ca' talks to the running 'meshca serve' through "
            f"{data_dir / ADMIN_SOCKET}, and none answers: start the server first"
        )
    ca = open_local_ca(data_dir)
    if settings.is_explicit("trust_domain") and settings["trust_domain"] != ca.trust_domain:
        raise ConfigError(
            f"the CA in {ca.directory} is for trust domain {ca.trust_domain}, but "
            f"{settings.source('trust_domain')} names {settings['trust_domain']}"
        )
    try:
        policy = RotationPolicy(
            prepare_fraction=settings["rotation_prepare_at"],
            activate_fraction=settings["rotation_activate_at"],
            leaf_ttl=settings["leaf_ttl"],
            jwt_key_ttl=settings["rotation_jwt_key_ttl"],
        )
    except RotationError as exc:
        raise ConfigError(
            f"rotation_prepare_at / rotation_activate_at / rotation_jwt_key_ttl: {exc}"
        ) from None
    source = LocalCaSource(data_dir, ca.trust_domain, ca_ttl=settings["rotation_ca_ttl"])
    manager = RotationManager(data_dir, ca.authority(), source, policy=policy)
    if agents:
        manager.acks = _saved_agent_acks(data_dir, manager)
    try:
        manager.open()
    except JournalLockedError:
        raise RotationError(
            f"a meshca server holds {data_dir} but does not answer on "
            f"{data_dir / ADMIN_SOCKET}; check that it is healthy"
        ) from None
    try:
        operations = CaOperations(manager, RootRotation(manager, polled=False), polled=False)
        return asyncio.run(action(operations))
    finally:
        manager.close()


def _saved_agent_acks(data_dir: Path, manager: RotationManager) -> AckTracker:
    """The attested agents, judged by the ACKs the server saved when it last ran."""
    from meshca.attest.records import AgentRecords
    from meshca.ca_api.sightings import AgentSightings
    from meshca.ca_api.sightings_file import SightingsFileError, load, sightings_path
    from meshca.serve.agent_acks import AgentAcks

    sightings = AgentSightings()
    try:
        sightings.restore(load(sightings_path(data_dir), manager.authority.trust_domain))
    except SightingsFileError as exc:
        print(f"meshca: warning: every agent counts as unseen: {exc}", file=sys.stderr)

    def chains() -> list[tuple[x509.Certificate, ...]]:
        signers = [manager.ca(record.id).signer for record in manager.journal.slots]
        return [(s.certificate, *s.intermediates) for s in signers]

    return AgentAcks(AgentRecords(data_dir), sightings, chains)


def run(args: argparse.Namespace, settings: Settings) -> int:
    from meshca.rotation.admin_client import AdminUnavailable, admin_request

    try:
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        raise UsageError(f"--timeout: {exc}") from None
    if timeout.total_seconds() <= 0:
        raise UsageError("--timeout: must be longer than 0s")
    data_dir = Path(settings["data_dir"])
    request = _request(args, timeout)
    # status: the timeout is the wait for the answer; the others: for the proxies' ACKs,
    # which the server's answer follows.
    wait = timeout.total_seconds()
    if args.ca_action != "status":
        wait += _ANSWER_MARGIN
    server = True
    try:
        result = admin_request(data_dir / ADMIN_SOCKET, request, timeout=wait)
    except AdminUnavailable:
        server = False

        async def action(operations: CaOperations) -> dict[str, Any]:
            return await operations.perform(request)

        try:
            agents = args.ca_action in ("jwt-key", "rotate-root", "status")
            result = _direct(data_dir, settings, action, agents=agents)
        except PerWorkloadMode as exc:
            if args.ca_action != "status":
                raise
            note = str(exc)
            answer = {"backend": "vault", "mode": "per-workload", "rotation": None, "note": note}
            write_out(json.dumps(answer, indent=2) + "\n" if args.json else note + "\n")
            return 0
    if args.json:
        write_out(json.dumps(result, indent=2) + "\n")
    elif args.ca_action == "status":
        write_out(format_status(result, server=server))
    else:
        write_out(format_outcome(result, server=server))
    return 0


def _short(fp: str) -> str:
    return fp[:23] + "..."


def format_status(status: dict[str, Any], *, server: bool) -> str:
    lines = [
        f"trust domain {status['trust_domain']} "
        f"({'server running' if server else 'no server running: no proxies connected'})",
        "signing CAs:",
    ]
    for slot in status["slots"]:
        lines.append(
            f"  {slot['id']}  {slot['status']:<8}  {slot.get('what', slot['kind']):<22}  "
            f"not after {slot['not_after']}  root {_short(slot['root'])}"
        )
    schedule = status["schedule"]
    lines.append(
        f"schedule: next CA prepared at {schedule['prepare_at']}, "
        f"activated at {schedule['activate_at']}"
    )
    lines.append(f"trust bundle: {len(status['bundle'])} root(s)")
    for root in status["bundle"]:
        lines.append(
            f"  {_short(root['fingerprint'])}  not after {root['not_after']}  "
            f"({root['served_under']} served certificates chain to it)"
        )
    rotation = status.get("root_rotation")
    if rotation is None:
        lines.append("root rotation: none in progress")
    elif rotation["rolling_back"]:
        lines.append("root rotation: rolling back")
    else:
        lines.append(
            f"root rotation: step {rotation['done']} of {LAST_STEP} done"
            + (f", step {rotation['running']} running" if rotation["running"] else "")
            + f"; next: step {rotation['next_step']} ({rotation['next_step_title']})"
        )
    waiting = status.get("waiting_on") or []
    more = int(status.get("waiting_count", len(waiting))) - len(waiting)
    shown = ", ".join(waiting) + (f" and {more} more" if more > 0 else "")
    lines.append(f"proxies still to ACK: {shown}" if waiting else "proxies still to ACK: none")
    if status.get("problem"):
        lines.append(f"problem: {status['problem']}")
    elif status.get("renewal"):
        lines.append(f"renewal: {status['renewal']}")
    jwt = status.get("jwt_keys")
    if jwt:
        lines.append("JWT signing keys (all published in the JWKS):")
        for key in jwt["keys"]:
            when = (
                f"published until {key['retire_at']}"
                if key["retire_at"]
                else f"signing since {key['activated']}"
                if key["activated"]
                else f"published since {key['created']}, not signing yet"
            )
            lines.append(f"  {key['id']}  {key['status']:<8}  kid {key['kid']}  {when}")
        lines.append(
            f"JWT schedule: next key prepared at {jwt['schedule']['prepare_at']}, "
            f"activated at {jwt['schedule']['activate_at']}"
        )
        held = jwt.get("waiting_on") or []
        if held:
            more = int(jwt.get("waiting_count", len(held))) - len(held)
            lines.append(
                "JWT key activation waits for agents to fetch it: "
                + ", ".join(held)
                + (f" and {more} more" if more > 0 else "")
            )
    return "\n".join(lines) + "\n"


def format_outcome(result: dict[str, Any], *, server: bool) -> str:
    lines = []
    if "activated" in result:
        lines.append(f"slot {result['activated']} now signs; every served SVID was re-issued")
    if "jwt_prepared" in result:
        lines.append(
            f"JWT key {result['jwt_prepared']} (kid {result['kid']}) is published in the "
            "JWKS; it signs once activated"
        )
    if "jwt_activated" in result:
        lines.append(
            f"JWT key {result['jwt_activated']} (kid {result['kid']}) signs JWT-SVIDs now; "
            "the previous key stays published until its tokens have expired"
        )
    if "jwt_retired" in result:
        retired = result["jwt_retired"]
        lines.append(
            f"JWT keys {', '.join(retired)} left the JWKS" if retired else "no JWT key to retire"
        )
    for step in result.get("steps", []):
        label = "rollback" if step["step"] == 0 else f"step {step['step']}"
        lines.append(f"{label}: {step['detail']}")
    lines.append("")
    lines.append(format_status(result["status"], server=server).rstrip("\n"))
    return "\n".join(lines) + "\n"


_JSON = arg("--json", action="store_true", help="print JSON")
_WAIT = arg(
    "--timeout",
    default=DEFAULT_TIMEOUT,
    metavar="D",
    help=(
        f"longest wait for proxies' ACKs (default {DEFAULT_TIMEOUT}); the command "
        f"gives up {_ANSWER_MARGIN:g}s later if the server has not answered"
    ),
)
COMMAND = Command(
    NAME,
    run,
    description=(
        "Inspect and rotate the CA. Talks to a running 'meshca serve' through "
        f"<data-dir>/{ADMIN_SOCKET}; without one, acts on the data directory directly."
    ),
    actions=(
        Action(
            "status",
            "slots, trust bundle, rotation stage, proxies still to ACK",
            "Show the CA slots (active, prepared, retired), the trust bundle's roots and "
            "how many served SVIDs chain to each, the rotation schedule, a root rotation's "
            "stage and the proxies that still have to ACK it. Read-only.",
            arguments=(
                _JSON,
                CONFIGURATION,
                arg(
                    "--timeout",
                    default=DEFAULT_STATUS_TIMEOUT,
                    metavar="D",
                    help=f"longest wait for the server's answer (default {DEFAULT_STATUS_TIMEOUT})",
                ),
            ),
        ),
        Action(
            "rotate",
            "a new signing CA under the same root, signing now",
            "Make a new signing CA under the same root and sign with it now (the trust "
            "bundle does not change; served SVIDs move to it at their next renewal). Needs "
            "the root key (<data-dir>/ca/root-key.pem): with the root offline, or when the "
            "root signs directly, use rotate-root.",
            arguments=(CONFIGURATION, _JSON, _WAIT),
        ),
        Action(
            "jwt-key",
            "rotate the JWT-SVID signing key: prepare, activate, retire",
            "The JWT-SVID signing key rotates on its own schedule (rotation_jwt_key_ttl); "
            "this runs one step now. prepare: a new key is published in the JWKS beside "
            "the signing one (agents and validators fetch it). activate: it signs new "
            "JWT-SVIDs, once every attested agent has fetched it (waits up to --timeout, "
            "then refuses naming them); the previous key stays published until every "
            "token it signed has expired. retire: old keys past that moment leave the JWKS.",
            arguments=(
                arg(
                    "jwt_step",
                    choices=("prepare", "activate", "retire"),
                    metavar="STEP",
                    help="prepare, activate or retire",
                ),
                arg(
                    "--force",
                    action="store_true",
                    help=(
                        "retire: remove old keys now, although tokens they signed have not "
                        "all expired (they stop validating: for a key that leaked)"
                    ),
                ),
                arg(
                    "--force-unacked",
                    action="store_true",
                    help=(
                        "activate: sign with the prepared key although some attested agents "
                        "have not fetched it (tokens it signs do not validate there until "
                        "they do)"
                    ),
                ),
                CONFIGURATION,
                _JSON,
                _WAIT,
            ),
        ),
        Action(
            "rotate-root",
            "replace the root: every step, one --step, or --rollback",
            "Root rotation in five steps: 1 add the new root to the bundle; 2 wait for "
            "every proxy to ACK it; 3 sign under the new root and re-issue every SVID; "
            "4 wait for those ACKs; 5 remove the old root. Without --step every remaining "
            "step runs. --rollback returns to the old root (until step 5 starts).",
            arguments=(
                OneOf(
                    (
                        arg(
                            "--step",
                            type=int,
                            choices=range(1, LAST_STEP + 1),
                            metavar="N",
                            help="run step N only",
                        ),
                        arg("--rollback", action="store_true", help="return to the old root"),
                    )
                ),
                arg(
                    "--force-unacked",
                    action="store_true",
                    help=(
                        "when a wait times out, or only proxies that refuse (NACK) the change "
                        "are left, go on without them (logged) instead of holding the rotation"
                    ),
                ),
                CONFIGURATION,
                _JSON,
                _WAIT,
            ),
        ),
    ),
)

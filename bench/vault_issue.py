"""SVID issuance through Vault: meshca's overhead over a bare hvac call, and the
intermediate mode against the local backend.

Run: ``.venv/bin/python bench/vault_issue.py [--requests 300] [--rounds 6] [--threads 8]``

A real OpenBao dev server is started on loopback (the PKI mount and role of
docs/vault.md) and stopped at the end. Figures, all in the same run:
  hvac_sign      ``pki/sign/<role>`` called with hvac directly, the same CSR every time,
                 from a pool of ``--threads`` threads (one hvac client each)
  meshca_sign    ``Issuer.sign_csr`` of that CSR in per-workload mode (parse and check
                 the CSR, Vault's signature, then the leaf and chain checks), same pool
  meshca_issue   ``Issuer.issue`` in per-workload mode (also a key and a CSR per SVID)
  overhead       hvac_sign / meshca_sign (goal <= 1.10)
  overhead_issue hvac_sign / meshca_issue: what the secret store's issuance costs
  local_issue    ``Issuer.issue`` with the local backend, one thread
  intermediate   ``Issuer.issue`` in intermediate mode, one thread
  local_ratio    local_issue / intermediate (goal: 1.0, the same signing code)
Each round measures every contender, in alternating order; rates are medians over the
rounds and ratios are medians of the per-round ratios: these machines are shared and
noisy, so only the ratios mean much. The last line is
one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import hvac
from cryptography.hazmat.primitives import serialization

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshca.backends.local import init_local_ca
from meshca.backends.vault.backend import open_vault_authority
from meshca.backends.vault.settings import VaultSettings
from meshca.issuer import Issuer, KeyType, TtlPolicy
from meshca.issuer.authority import workload_csr
from meshca.issuer.keys import generate_private_key
from meshca.spiffe import SpiffeId, TrustDomain
from tests.bao_harness import WORKLOAD_ROLE, BaoServer, prepared, running

TD = TrustDomain("cluster.local")
WEB = SpiffeId.from_kubernetes("bench", "web", TD)
TTL_SECONDS = 3600
GOAL_OVERHEAD = 1.10


def rate(count: int, work: Callable[[int], Any], threads: int) -> float:
    """Completed calls per second of ``work`` over ``count`` calls on ``threads`` threads."""
    started = time.perf_counter()
    if threads == 1:
        for i in range(count):
            work(i)
    else:
        with ThreadPoolExecutor(threads) as pool:
            for _ in pool.map(work, range(count)):
                pass
    return count / (time.perf_counter() - started)


def the_csr() -> bytes:
    key = generate_private_key(KeyType.EC_P256)
    return workload_csr(key, WEB, ()).public_bytes(serialization.Encoding.PEM)


def per_workload(server: BaoServer, args: argparse.Namespace) -> dict[str, float]:
    token = server.token(["meshca-per-workload"])
    settings = VaultSettings.from_mapping(
        {"addr": server.url, "token": token, "mode": "per-workload", "role": WORKLOAD_ROLE}
    )
    authority = open_vault_authority(settings, TD, start=False)
    issuer = Issuer(authority, TtlPolicy(default=timedelta(seconds=TTL_SECONDS)))
    csr = the_csr()
    body = {
        "csr": csr.decode(),
        "uri_sans": str(WEB),
        "ttl": f"{TTL_SECONDS}s",
        "exclude_cn_from_sans": True,
        "format": "pem",
    }
    local = threading.local()

    def hvac_sign(_: int) -> None:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = hvac.Client(url=server.url, token=token)
        client.write_data(f"pki/sign/{WORKLOAD_ROLE}", data=body)

    def meshca_sign(_: int) -> None:
        issuer.sign_csr(WEB, csr)

    def meshca_issue(_: int) -> None:
        issuer.issue(WEB)

    contenders = {"hvac_sign": hvac_sign, "meshca_sign": meshca_sign, "meshca_issue": meshca_issue}
    figures: dict[str, list[float]] = {name: [] for name in contenders}
    ratios: list[float] = []
    issue_ratios: list[float] = []
    for work in contenders.values():  # warm-up: connections, logins, caches
        rate(args.threads * 4, work, args.threads)
    try:
        for round_number in range(args.rounds):
            order = list(contenders.items())
            if round_number % 2:  # alternate the order: drift on a shared machine cancels
                order.reverse()
            for name, work in order:
                figures[name].append(rate(args.requests, work, args.threads))
            ratios.append(figures["hvac_sign"][-1] / figures["meshca_sign"][-1])
            issue_ratios.append(figures["hvac_sign"][-1] / figures["meshca_issue"][-1])
    finally:
        authority.close()
    result = {name: statistics.median(values) for name, values in figures.items()}
    result["overhead"] = statistics.median(ratios)
    result["overhead_issue"] = statistics.median(issue_ratios)
    return result


def intermediate_vs_local(server: BaoServer, args: argparse.Namespace) -> dict[str, float]:
    settings = VaultSettings(addr=server.url, token=server.token(["meshca-intermediate"]))
    vault_issuer = Issuer(open_vault_authority(settings, TD, start=False))
    with tempfile.TemporaryDirectory() as data_dir:
        local_issuer = Issuer(init_local_ca(Path(data_dir), TD).authority())
    count = args.requests * 4
    contenders = {
        "local_issue": lambda _: local_issuer.issue(WEB),
        "intermediate": lambda _: vault_issuer.issue(WEB),
    }
    figures: dict[str, list[float]] = {name: [] for name in contenders}
    ratios: list[float] = []
    for work in contenders.values():
        rate(count // 4, work, 1)  # warm-up
    for round_number in range(args.rounds):
        order = list(contenders.items())
        if round_number % 2:
            order.reverse()
        for name, work in order:
            figures[name].append(rate(count, work, 1))
        ratios.append(figures["local_issue"][-1] / figures["intermediate"][-1])
    result = {name: statistics.median(values) for name, values in figures.items()}
    result["local_ratio"] = statistics.median(ratios)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="calls per round and figure")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=8, help="pool size for Vault calls")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny counts: checks that it runs (make test does)"
    )
    args = parser.parse_args()
    if args.smoke:
        args.requests, args.rounds, args.threads = 8, 1, 2
    with running(BaoServer.dev) as server:
        prepared(server)
        figures = per_workload(server, args)
        figures.update(intermediate_vs_local(server, args))
    print(f"per-workload, {args.threads} threads, {args.requests} calls x {args.rounds} rounds:")
    for name in ("hvac_sign", "meshca_sign", "meshca_issue"):
        print(f"  {name:<13} {figures[name]:8.1f} SVIDs/s")
    for name in ("overhead", "overhead_issue"):
        verdict = "ok" if figures[name] <= GOAL_OVERHEAD else "over the goal"
        print(f"  {name:<14}{figures[name]:8.3f} (goal <= {GOAL_OVERHEAD}: {verdict})")
    print("intermediate mode against the local backend, 1 thread:")
    for name in ("local_issue", "intermediate"):
        print(f"  {name:<13} {figures[name]:8.1f} SVIDs/s")
    print(f"  local_ratio   {figures['local_ratio']:8.3f} (goal: 1.0)")
    summary: dict[str, Any] = {k: round(v, 3) for k, v in figures.items()}
    summary.update(threads=args.threads, requests=args.requests, rounds=args.rounds)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The Vault mode against hostile input and outages, on a real OpenBao server: tokens and
secret IDs are one clean line or refused without being shown; SDS callers never see a
backend's detail; the data directory and the intermediate's key stay private; and
renewals that failed during an outage run as soon as Vault answers again."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from meshca.backends.vault.backend import open_vault_authority
from meshca.backends.vault.settings import VaultSettings, VaultSettingsError
from meshca.cli import main as cli_main
from meshca.spiffe import SpiffeId
from meshca.util.retry import Backoff
from tests.bao_harness import (
    TRUST_DOMAIN,
    WORKLOAD_ROLE,
    BaoServer,
    bao,  # noqa: F401  # the module's OpenBao server (a fixture)
    workload_role,
)
from tests.cli_harness import assert_one_line_error
from tests.sds_harness import wait_until
from tests.serve_harness import (
    TD,
    default_config,
    fetch,
    kube_id,
    served,
    short_tempdir,
    uds_channel,
)

pytestmark = [pytest.mark.vault, pytest.mark.timeout(120)]

WEB = SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/web")
A = kube_id("shop", "a")
B = kube_id("shop", "b")
PER_WORKLOAD = ("--backend", "vault", "--vault-mode", "per-workload", "--vault-role")

Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def cli(
    bao: BaoServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[Cli]:
    """``meshca ...`` in process against the server (VAULT_ADDR; no token set)."""
    for name in list(os.environ):
        if name.startswith(("MESHCA_", "VAULT_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("VAULT_ADDR", bao.url)
    monkeypatch.chdir(tmp_path)
    previous = os.umask(0o022)

    def run(*argv: str | Path) -> tuple[int, str, str]:
        code = cli_main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    try:
        yield run
    finally:
        os.umask(previous)


def _token(bao: BaoServer) -> str:  # noqa: F811
    return bao.token(["meshca-per-workload", "meshca-intermediate"])


# tokens and secret IDs ---------------------------------------------------------------


def test_a_token_file_ending_in_a_newline_works(
    cli: Cli,
    bao: BaoServer,  # noqa: F811
) -> None:
    Path("token").write_text(_token(bao) + "\n")  # what `echo $TOKEN > token` writes
    code, _, err = cli("issue", WEB, "--out", "out", *PER_WORKLOAD, WORKLOAD_ROLE,
                       "--vault-token-file", "token")  # fmt: skip
    assert code == 0, err


@pytest.mark.parametrize(
    "shape",
    [
        lambda token: f"{token}\n{token[::-1]}\n",  # two lines: two tokens pasted
        lambda token: f"{token[:8]}\r\n{token[8:]}",
        lambda token: f"{token[:8]}\x1b[2J{token[8:]}",  # a terminal escape inside
        lambda token: f"{token[:8]} {token[8:]}",
    ],
    ids=["two-lines", "crlf-inside", "escape", "space-inside"],
)
@pytest.mark.parametrize("source", ["file", "environment", "flag"])
def test_a_token_that_is_not_one_clean_line_is_refused_without_showing_it(
    cli: Cli,
    bao: BaoServer,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    shape: Callable[[str], str],
    source: str,
) -> None:
    token = _token(bao)
    value = shape(token)
    flags: tuple[str, ...] = ()
    if source == "file":
        Path("token").write_text(value)
        flags = ("--vault-token-file", "token")
    elif source == "environment":
        monkeypatch.setenv("VAULT_TOKEN", value)
    else:
        flags = ("--vault-token", value)
    code, out, err = cli("issue", WEB, "--out", "out", *PER_WORKLOAD, WORKLOAD_ROLE, *flags)
    assert code == 1 and out == ""
    assert_one_line_error(err, "the token from")
    assert "line break, a control character or a space" in err
    logged = "\n".join(r.getMessage() for r in caplog.records)
    for part in (token, token[:8], token[8:], token[::-1]):
        assert part not in err and part not in logged
    assert not Path("out").exists()


def test_a_secret_id_that_is_not_one_clean_line_is_refused_without_showing_it(
    bao: BaoServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    secret = "4c2e8f0a-1b2c-4d5e-8f90-123456789abc"
    with pytest.raises(VaultSettingsError) as caught:
        VaultSettings.from_mapping({"addr": bao.url, "role_id": "r", "secret_id": secret + "\nx"})
    assert "the AppRole secret ID" in str(caught.value) and secret not in str(caught.value)
    # a file is read at each login: refused there, with the file named and not its content
    path = tmp_path / "secret-id"
    path.write_text(f"{secret}\n{secret}\n")
    settings = VaultSettings.from_mapping(
        {"addr": bao.url, "role_id": "r", "secret_id_file": str(path), "timeout": 5}
    )
    with pytest.raises(VaultSettingsError) as caught:
        open_vault_authority(settings, TD, start=False)
    assert str(path) in str(caught.value) and secret not in str(caught.value)


# what SDS callers are told ------------------------------------------------------------


def _per_workload(bao: BaoServer, token: str) -> VaultSettings:  # noqa: F811
    return VaultSettings.from_mapping(
        {
            "addr": bao.url,
            "token": token + "\n",  # as VAULT_TOKEN=$(cat file) often ends: accepted
            "mode": "per-workload",
            "role": WORKLOAD_ROLE,
            "timeout": 1,
        }
    )


async def test_an_sds_caller_gets_a_generic_unavailable_and_the_log_keeps_the_detail(
    bao: BaoServer,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Vault hangs (SIGSTOP): a caller asking for a certificate meshca must now sign gets
    UNAVAILABLE saying only that the CA's backend is unavailable; the address and the
    reason are in the server log, and the token is in neither."""
    token = bao.token(["meshca-per-workload"])
    authority = open_vault_authority(
        _per_workload(bao, token), TD, leaf_ttl=timedelta(hours=1), backoff=Backoff(0.1, 0.5)
    )
    caplog.set_level(logging.DEBUG)
    with short_tempdir() as root:
        config = default_config(root, listen=None, uds_identities={os.getuid(): (A, B)})
        try:
            async with (
                served(config, backend=authority.opened()) as server,
                uds_channel(server) as channel,
            ):
                (first,) = await fetch(channel, [str(A)])  # Vault signs: the token works
                bao.pause()
                try:
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await fetch(channel, [str(B)])
                finally:
                    bao.resume()
        finally:
            authority.close()
    assert first.tls_certificate.private_key.inline_bytes
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert error.details() == f"cannot issue a certificate for {B}: the CA's backend is unavailable"
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"cannot issue a certificate for {B}: vault: cannot reach {bao.url}" in logged
    assert token not in logged


# files -------------------------------------------------------------------------------


def test_vault_mode_keeps_its_data_directory_and_key_private(
    cli: Cli,
    bao: BaoServer,  # noqa: F811
) -> None:
    Path("token").write_text(_token(bao))
    flags = ("--backend", "vault", "--vault-mode", "intermediate", "--vault-token-file", "token")
    code, _, err = cli("issue", WEB, "--out", "out", *flags)
    assert code == 0, err
    data = Path(".meshca")
    for directory in (data, *(p for p in data.rglob("*") if p.is_dir())):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory
    [key] = [p for p in data.rglob("*key*.pem")]
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    key.chmod(0o644)  # a world-readable intermediate key: refused, not used nor replaced
    for argv in (("issue", WEB, "--out", "again"), ("serve", "--uds", "meshca.sock")):
        code, _, err = cli(*argv, *flags)
        assert code == 1
        assert_one_line_error(err, "has mode 0644: private keys must be 0600")
        assert f"run: chmod 600 {key.resolve()}" in err or f"run: chmod 600 {key}" in err


# renewals after an outage --------------------------------------------------------------


async def test_renewals_that_failed_in_an_outage_run_when_vault_answers_again(
    bao: BaoServer,  # noqa: F811
) -> None:
    """Per-workload SVIDs of 24 s are renewed at about 12 s. Vault hangs (SIGSTOP) over
    that renewal, which fails; the next attempt is a minute away (the renewal backoff)
    or at expiry, 12 s later. Vault resumes: the renewal must run as soon as meshca sees
    Vault healthy (its probes back off only up to half a second), so within 6 s."""
    role = {**workload_role(TRUST_DOMAIN), "not_before_duration": "60s"}
    bao.client().write_data(f"pki/roles/{WORKLOAD_ROLE}", data=role)
    authority = open_vault_authority(
        _per_workload(bao, bao.token(["meshca-per-workload"])),
        TD,
        leaf_ttl=timedelta(seconds=24),
        backoff=Backoff(initial=0.1, maximum=0.5),
    )
    with short_tempdir() as root:
        config = default_config(
            root,
            listen=None,
            uds_identities={os.getuid(): (A,)},
            leaf_ttl=timedelta(seconds=24),
            renew_backoff=Backoff(initial=60, maximum=60, jitter=0),
        )
        try:
            async with (
                served(config, backend=authority.opened()) as server,
                uds_channel(server) as channel,
            ):
                await fetch(channel, [str(A)])
                first = server.store.cached(A)
                assert first is not None
                bao.pause()
                try:
                    await wait_until(
                        lambda: A in server.store.failing(),
                        timeout=30,
                        what="the renewal to fail during the outage",
                    )
                finally:
                    bao.resume()
                await wait_until(
                    lambda: server.store.cached(A) is not first,
                    timeout=6,
                    what="the renewal once Vault answers again",
                )
                assert not server.store.failing()
        finally:
            authority.close()

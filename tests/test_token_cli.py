"""``meshca token``: a one-time token printed once, stored only hashed (0600), listed by
ID, revocable, and refused input in one line."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from meshca.attest.state_file import agents_dir
from meshca.attest.tokens import TOKENS_FILE, TokenError, TokenStore, token_hash
from meshca.spiffe import SpiffeId
from tests.cli_harness import assert_refused, clean_environment, runner

ID = "spiffe://cluster.local/ns/shop/sa/web"


@pytest.fixture(autouse=True)
def _cwd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_environment(monkeypatch, tmp_path)


def test_create_prints_a_token_that_is_stored_only_hashed(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    run = runner(capsys)
    code, out, err = run("token", "create", "--identity", ID, "--ttl", "10m")
    assert code == 0, err
    token = out.strip()
    assert token.startswith("mca-jt-") and len(token) > 40
    stored = agents_dir(tmp_path / ".meshca") / TOKENS_FILE
    assert stored.stat().st_mode & 0o777 == 0o600
    assert token not in stored.read_text()
    assert token_hash(token) in json.loads(stored.read_text())
    code, listing, _ = run("token", "list")
    assert code == 0 and token not in listing
    token_id = token_hash(token)[:16]
    assert token_id in listing and ID in listing
    code, listing, _ = run("token", "list", "--json")
    assert json.loads(listing)[0]["id"] == token_id
    assert run("token", "delete", token_id)[0] == 0
    assert run("token", "list")[1] == ""
    with pytest.raises(TokenError):  # a revoked token redeems nothing
        TokenStore(tmp_path / ".meshca").redeem(token)


def test_two_tokens_differ_and_each_redeems_once(tmp_path: Path) -> None:
    store = TokenStore(tmp_path)
    first, _ = store.create(SpiffeId.parse(ID))
    second, _ = store.create(SpiffeId.parse(ID), ttl=timedelta(days=30))
    assert first != second
    assert store.redeem(first).identity == SpiffeId.parse(ID)
    with pytest.raises(TokenError, match="already used"):
        store.redeem(first)
    assert store.redeem(second)


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["token", "create"], 2, "--identity"),
        (["token", "create", "--identity", "spiffe://cluster.local/meshca/agent/x"], 1, "reserved"),
        (["token", "create", "--identity", ID, "--ttl", "31d"], 1, "at most"),
        (["token", "create", "--identity", "not-an-id"], 1, "--identity"),
        (["token", "delete", "0123"], 2, "no unused token"),
    ],
)
def test_refusals_are_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], code: int, needle: str
) -> None:
    assert_refused(capsys, argv, code, needle)

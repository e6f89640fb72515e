"""Serial numbers, times and names are written one way everywhere: as openssl shows a
serial (leading zeros kept), RFC 3339 times ending in ``Z``, ``serialNumber=`` in
subjects, in text and JSON alike."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshca.cli import main as cli_main
from meshca.issuer import profile
from meshca.util.formats import name_text, rfc3339, serial_hex
from tests.cli_harness import meshca_process

RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")


def certificate(serial: int) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(hours=1))
        .sign(key, hashes.SHA256())
    )


@pytest.mark.parametrize(
    "serial",
    [0x0F << 120 | 0xABC, (1 << 127) | 5, 0x6D4FD31838E070AAAED8A5B34F2E753F8C022237],
    ids=["leading-zero-digit", "top-bit", "vault-20-bytes"],
)
def test_serial_is_written_as_openssl_shows_it(serial: int, tmp_path: Path) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not on PATH")
    path = tmp_path / "cert.pem"
    path.write_bytes(certificate(serial).public_bytes(serialization.Encoding.PEM))
    shown = subprocess.run(
        [openssl, "x509", "-in", str(path), "-noout", "-serial"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert serial_hex(serial) == shown.removeprefix("serial=").lower()


def test_a_short_serial_is_padded_to_meshcas_width() -> None:
    """meshca's serials are 128 bits: always 32 digits, even when the top byte is 0."""
    assert serial_hex(0x1234) == "0" * 28 + "1234"


def test_times_are_rfc3339_utc() -> None:
    moment = datetime(2026, 12, 3, 6, 16, 50, 123456, tzinfo=UTC)
    assert rfc3339(moment) == "2026-12-03T06:16:50Z"
    assert rfc3339(moment.astimezone(datetime.now().astimezone().tzinfo)) == rfc3339(moment)


def test_names_spell_out_serial_number() -> None:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshca"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "0a1b"),
        ]
    )
    assert name_text(name) == "serialNumber=0a1b,O=meshca"


def test_ca_status_uses_the_same_subjects_and_times_in_text_and_json(tmp_path: Path) -> None:
    assert meshca_process("init", cwd=tmp_path).returncode == 0
    status = json.loads(meshca_process("ca", "status", "--json", cwd=tmp_path).stdout)
    text = meshca_process("ca", "status", cwd=tmp_path).stdout
    subjects = [s["subject"] for s in status["slots"]] + [r["subject"] for r in status["bundle"]]
    assert subjects and all("serialNumber=" in s and "2.5.4.5" not in s for s in subjects)
    times = [status["schedule"]["prepare_at"], status["schedule"]["activate_at"]]
    times += [slot[k] for slot in status["slots"] for k in ("not_before", "not_after")]
    times += [root["not_after"] for root in status["bundle"]]
    assert all(RFC3339.match(t) for t in times), times
    for moment in (status["slots"][0]["not_after"], status["schedule"]["prepare_at"]):
        assert moment in text, text


def test_issue_and_inspect_keep_a_serials_leading_zero(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """One SVID in 16 has a serial whose first hex digit is 0: here, the next one."""
    monkeypatch.chdir(tmp_path)
    assert cli_main(["init"]) == 0
    serial = 0x0123456789ABCDEF0123456789ABCDEF
    monkeypatch.setattr(profile, "random_serial", lambda: serial)
    capsys.readouterr()
    assert (
        cli_main(["issue", "spiffe://cluster.local/ns/shop/sa/web", "--out", "web", "--json"]) == 0
    )
    issued = json.loads(capsys.readouterr().out)
    assert cli_main(["inspect", "web/cert.pem", "--json"]) == 0
    inspected = json.loads(capsys.readouterr().out)
    assert issued["serial"] == inspected["serial"] == "0123456789abcdef0123456789abcdef"
    cert = x509.load_pem_x509_certificate((tmp_path / "web" / "cert.pem").read_bytes())
    assert cert.serial_number == serial
    assert issued["not_after"] == inspected["not_after"] == rfc3339(cert.not_valid_after_utc)


def test_a_negative_serial_is_shown_not_a_crash(tmp_path: Path) -> None:
    """RFC 5280 forbids negative serials, but a damaged or foreign certificate can carry
    one: it is shown with a sign, as openssl does, and ``meshca inspect`` answers."""
    assert serial_hex(-0x1234) == "-" + "0" * 28 + "1234"
    serial = 0x0123456789ABCDEF0123456789ABCDEF
    der = bytearray(certificate(serial).public_bytes(serialization.Encoding.DER))
    at = bytes(der).index(serial.to_bytes(16, "big"))
    der[at] = 0x81  # the INTEGER's top bit set: now a negative serial
    path = tmp_path / "negative.der"
    path.write_bytes(bytes(der))
    with pytest.warns(UserWarning, match="wasn.t positive"):  # cryptography's own warning
        assert x509.load_der_x509_certificate(bytes(der)).serial_number < 0
    result = meshca_process("inspect", path, cwd=tmp_path)
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr and result.stderr.count("\n") <= 1

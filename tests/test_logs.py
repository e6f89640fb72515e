"""Logs: one event per line (text or JSON), the call's context on SDS events, and never
private key material, checked on the formatter and on a real ``meshca serve`` process
at debug level that hands out private keys over SDS."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import queue
import re
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.rpc import status_pb2

from meshca.issuer.keys import KeyType, generate_private_key, private_key_pem
from meshca.util.logs import REDACTED, bind, bound, make_handler, parse_log_format
from tests.serve_harness import (
    MESHCA,
    SECRET_TYPE,
    ServeProcess,
    clean_env,
    kube_id,
    meshca,
    node,
    secrets_of,
    serving,
    short_tempdir,
)

pytestmark = pytest.mark.timeout(60)

WEB = kube_id("shop", "web")
OTHER = kube_id("shop", "other")
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# --- a real `meshca serve` process ----------------------------------------------------------


def sds_request(names: list[str], **fields: Any) -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(
        type_url=SECRET_TYPE, resource_names=names, node=node(str(WEB)), **fields
    )


def stream_and_ack(channel: grpc.Channel, name: str) -> secret_pb2.Secret:
    """A state-of-the-world stream: request, receive, ACK, then close."""
    outbox: queue.Queue[discovery_pb2.DiscoveryRequest | None] = queue.Queue()
    outbox.put(sds_request([name]))

    def requests() -> Iterator[discovery_pb2.DiscoveryRequest]:
        while (item := outbox.get(timeout=20)) is not None:
            yield item

    responses = sds_pb2_grpc.SecretDiscoveryServiceStub(channel).StreamSecrets(
        requests(), timeout=20
    )
    first = next(responses)
    outbox.put(sds_request([name], response_nonce=first.nonce, version_info=first.version_info))
    # then a NACK-shaped request on a stale nonce, logged at debug, and close
    outbox.put(
        sds_request(
            [name],
            response_nonce="stale",
            error_detail=status_pb2.Status(code=3, message="bad"),
        )
    )
    outbox.put(None)
    with contextlib.suppress(grpc.RpcError):
        for _ in responses:
            pass
    (secret,) = secrets_of(first.resources)
    return secret


def refuse_a_client_without_a_certificate(server: ServeProcess) -> None:
    """A TLS client with no certificate on the mutual-TLS port: the handshake fails
    (gRPC's C core reports that on stderr itself, outside meshca's log format, unless
    told otherwise)."""
    assert server.tcp_port is not None, server.stdout.read_text()
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", server.tcp_port), timeout=10) as raw,
        contextlib.suppress(ssl.SSLError, ConnectionError),
        context.wrap_socket(raw) as tls,
    ):
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        tls.recv(100)  # the server's alert: a certificate is required


def events(text: str) -> list[dict[str, Any]]:
    """Every line of a JSON log, parsed: a line that is not one JSON object fails."""
    parsed = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"line {number} is not JSON: {line!r}") from None
        assert isinstance(event, dict), line
        parsed.append(event)
    return parsed


def key_body_lines(pem: bytes) -> list[str]:
    """The base64 lines of a PEM private key (what would leak if it reached a log)."""
    return [line for line in pem.decode().splitlines() if line and not line.startswith("-----")]


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    with short_tempdir("mca-logs-") as path:
        meshca("init", "--data-dir", str(path / "data"))
        yield path


def test_serve_logs_json_events_with_the_caller_and_no_key_material(root: Path) -> None:
    """``--log-format json --log-level debug``: every stderr line is a JSON event with ts,
    level, logger and msg; SDS events carry the caller, peer and request id; the private
    keys handed out over SDS appear nowhere in the log."""
    uid = os.getuid()
    with serving(
        root,
        root / "data",
        "--uds-identity",
        f"{uid}={WEB}",
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--listen",
        "127.0.0.1:0",
    ) as server:
        refuse_a_client_without_a_certificate(server)
        with grpc.insecure_channel(f"unix:{server.uds}") as channel:
            stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            fetched = stub.FetchSecrets(sds_request([str(WEB)]), timeout=20)
            (first,) = secrets_of(fetched.resources)
            streamed = stream_and_ack(channel, "default")
            with pytest.raises(grpc.RpcError) as refused:
                stub.FetchSecrets(sds_request([str(OTHER)]), timeout=20)
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert server.stop() == 0
        log = server.log()

    keys = [s.tls_certificate.private_key.inline_bytes for s in (first, streamed)]
    assert all(k.startswith(b"-----BEGIN PRIVATE KEY-----") for k in keys)
    assert "PRIVATE KEY" not in log
    for key in keys:
        for line in key_body_lines(key):
            assert line not in log

    parsed = events(log)
    assert len(parsed) > 10
    for event in parsed:
        assert TIMESTAMP.match(event["ts"]), event
        assert event["level"] in ("debug", "info", "warning", "error", "critical"), event
        assert event["logger"] and isinstance(event["msg"], str), event
    assert {e["level"] for e in parsed} >= {"debug", "info", "warning"}
    refusal = [e for e in parsed if e["level"] == "warning" and str(OTHER) in e["msg"]]
    assert refusal, "the PERMISSION_DENIED request is logged"
    (denied,) = refusal
    assert denied["caller"] == str(WEB)
    assert denied["transport"] == "uds"
    assert denied["peer"].startswith("unix:")
    sds_events = [e for e in parsed if "request_id" in e]
    assert {e["logger"] for e in sds_events} >= {"meshca.xds"}
    assert all(e["caller"] == str(WEB) for e in sds_events)
    # three calls (fetch, stream, refused fetch): three request ids, the stream's events
    # (opened, stale nonce, closed) sharing one
    stream_events = [e for e in sds_events if "stream" in e["msg"]]
    assert len({e["request_id"] for e in stream_events}) == 1
    assert denied["request_id"] not in {e["request_id"] for e in stream_events}


def test_serve_text_logs_are_one_event_per_line(root: Path) -> None:
    """The default text format: every line starts with a timestamp and a level (nothing
    spills over a line, not even a refusal message naming several things)."""
    with serving(
        root, root / "data", "--uds-identity", f"{os.getuid()}={WEB}", name="text"
    ) as server:
        with grpc.insecure_channel(f"unix:{server.uds}") as channel:
            stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
            with pytest.raises(grpc.RpcError):
                stub.FetchSecrets(sds_request([str(OTHER), "not a name\nat all"]), timeout=20)
        assert server.stop() == 0
        lines = server.log().splitlines()
    assert lines
    shape = re.compile(r"^\d{4}-\d\d-\d\dT[\d:.]+Z (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
    for line in lines:
        assert shape.match(line), line
    assert any("caller=spiffe://cluster.local/ns/shop/sa/web" in line for line in lines)


def test_a_bad_log_format_is_one_clear_error(root: Path) -> None:
    result = subprocess.run(
        [*MESHCA, "serve", "--data-dir", str(root / "data"), "--uds", str(root / "x.sock")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean_env(), "MESHCA_LOG_FORMAT": "xml"},
    )
    assert result.returncode == 1
    assert result.stderr == (
        "meshca: error: environment MESHCA_LOG_FORMAT: 'xml' is not a log format (text or json)\n"
    )
    assert parse_log_format(" JSON ") == "json"


# --- the formatter and the filters, on their own ----------------------------------------------


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, list[str]]]:
    """A logger whose events go through meshca's handler into a buffer; the third item
    selects the format for the next events (``formats.append("text")``)."""
    buffer = io.StringIO()
    formats = ["json"]
    logger = logging.getLogger("meshca.test.logs")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)

    class Switching(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            make_handler(formats[-1], buffer).handle(record)

    switching = Switching()
    logger.addHandler(switching)
    try:
        yield logger, buffer, formats
    finally:
        logger.removeHandler(switching)
        logger.propagate = True


def test_json_events_carry_bound_fields_extras_and_tracebacks_on_one_line(
    capture: tuple[logging.Logger, io.StringIO, list[str]],
) -> None:
    logger, buffer, _ = capture
    with bound(caller="spiffe://td/ns/a/sa/a", request_id="1f"):
        logger.info("two\nlines", extra={"secret": "default"})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed: %s", "x")
    logger.warning("after the call\u2028with a line separator\x85and a C1 control")
    first, second, third = events(buffer.getvalue())  # str.splitlines splits at those
    assert first["msg"] == "two\nlines"
    assert first["level"] == "info" and first["logger"] == "meshca.test.logs"
    assert (first["caller"], first["request_id"], first["secret"]) == (
        "spiffe://td/ns/a/sa/a",
        "1f",
        "default",
    )
    assert second["msg"] == "failed: x" and second["level"] == "error"
    assert "ValueError: boom" in second["exc"] and "Traceback" in second["exc"]
    assert "caller" not in third, "fields end with the call"
    assert third["msg"] == "after the call\u2028with a line separator\x85and a C1 control"


def test_text_events_escape_newlines_and_show_fields(
    capture: tuple[logging.Logger, io.StringIO, list[str]],
) -> None:
    logger, buffer, formats = capture
    formats.append("text")
    with bound(peer="unix:/run/x", caller="a b"):
        try:
            raise RuntimeError("bad\nthing")
        except RuntimeError:
            logger.exception("line one\nline two\u2028three\rfour")
    (line,) = buffer.getvalue().splitlines()
    assert (
        " ERROR meshca.test.logs: line one\\nline two\\u2028three\\rfour "
        'peer=unix:/run/x caller="a b"'
    ) in line
    assert "RuntimeError: bad\\nthing" in line


async def test_bound_fields_belong_to_the_task_that_bound_them(
    capture: tuple[logging.Logger, io.StringIO, list[str]],
) -> None:
    logger, buffer, _ = capture

    async def call(request_id: str, turns: asyncio.Event, wait: asyncio.Event) -> None:
        bind(request_id=request_id)
        turns.set()
        await wait.wait()
        logger.info("serving %s", request_id)

    first_bound, second_bound = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(call("a", first_bound, second_bound))
    await first_bound.wait()
    second = asyncio.create_task(call("b", second_bound, first_bound))
    await asyncio.gather(first, second)
    logged = {e["msg"]: e["request_id"] for e in events(buffer.getvalue())}
    assert logged == {"serving a": "a", "serving b": "b"}


@pytest.mark.parametrize("key_type", [KeyType.EC_P256, KeyType.EC_P384, KeyType.RSA_2048])
def test_private_key_material_is_redacted_in_every_shape_and_the_event_kept(
    capture: tuple[logging.Logger, io.StringIO, list[str]], key_type: KeyType
) -> None:
    logger, buffer, formats = capture
    pem = private_key_pem(generate_private_key(key_type))
    body = key_body_lines(pem)
    secret = secret_pb2.Secret(name="default", tls_certificate=common_pb2.TlsCertificate())
    secret.tls_certificate.private_key.inline_bytes = pem
    shapes: list[tuple[str, Any, dict[str, Any]]] = [
        ("the key: %s", pem.decode(), {}),
        ("as bytes: %r", pem, {}),
        ("the body only: %s", "".join(body), {}),
        ("the first base64 line: %s", body[0], {}),
        ("a protobuf dump: %s", secret, {}),
        ("in a field", None, {"key": pem.decode()}),
    ]
    for fmt in ("json", "text"):
        formats.append(fmt)
        for message, arg, extra in shapes:
            if arg is None:
                logger.debug(message, extra=extra)
            else:
                logger.debug(message, arg, extra=extra)
        with bound(caller="spiffe://td/ns/a/sa/a"):
            try:
                raise ValueError(pem.decode())
            except ValueError:
                logger.exception("while parsing")
    out = buffer.getvalue()
    assert "PRIVATE KEY" not in out
    for line in body:
        assert line not in out
    lines = out.splitlines()
    assert len(lines) == 2 * (len(shapes) + 1)
    assert all(REDACTED in line for line in lines)
    assert all("meshca.test.logs" in line for line in lines)
    json_events = events("\n".join(lines[: len(shapes) + 1]))
    assert {e["level"] for e in json_events} == {"warning", "error"}  # raised to be seen
    # the events themselves are kept: what was logged, minus the key
    assert [e["msg"].split(":")[0] for e in json_events[:-2]] == [
        m.split(":")[0] for m, _, _ in shapes[:-1]
    ]
    assert json_events[-2]["key"].strip() == REDACTED
    assert json_events[-1]["caller"] == "spiffe://td/ns/a/sa/a"  # harmless fields stay
    assert json_events[-1]["msg"] == "while parsing" and "ValueError" in json_events[-1]["exc"]


def test_certificates_and_ordinary_text_are_not_withheld(
    capture: tuple[logging.Logger, io.StringIO, list[str]], root: Path
) -> None:
    logger, buffer, _ = capture
    certificate = (root / "data" / "ca" / "ca-cert.pem").read_text()
    logger.info("the signing CA: %s", certificate)
    logger.info("the key type is %s, its file 0600", "ec-p256", extra={"path": "ca-key.pem"})
    first, second = events(buffer.getvalue())
    assert first["msg"] == f"the signing CA: {certificate}"
    assert second["path"] == "ca-key.pem"

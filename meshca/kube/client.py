"""Reaching the Kubernetes API: where the server is and who meshca is to it.

Configuration is lightkube's (docs/design.md says why that library): a kubeconfig file
outside a pod (``--kubeconfig``: client certificates, tokens, token files, exec plugins),
or the pod's service-account files inside one (the token re-read when the kubelet
rotates it). What meshca asks of the API is only lists and watches, decoded as plain
JSON (:class:`KubeApi`): no typed models for ten thousand pods.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
from lightkube.config import client_adapter
from lightkube.config.kubeconfig import SERVICE_ACCOUNT, KubeConfig
from lightkube.core.exceptions import ConfigError

from meshca.util.files import YamlFileError, read_yaml
from meshca.util.logs import shorten

# One watch event is one object; a larger line is refused rather than held.
MAX_EVENT_BYTES = 4 * 1024 * 1024
_CONNECT_TIMEOUT = 10.0
_READ_TIMEOUT = 30.0  # a list page; watches are bounded by timeoutSeconds instead


class KubeConfigError(ValueError):
    """No usable configuration for the API server; the message says what is missing."""


class KubeApiError(Exception):
    """The API server answered with an error status (``status`` is its HTTP status code,
    ``reason`` its Status reason: ``Expired`` and ``Gone`` for 410)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {shorten(message, 300)}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class KubeTarget:
    """Where the API server is (for the log: never a credential)."""

    server: str
    source: str  # "kubeconfig PATH (context NAME)" or "in-cluster service account"


def load_config(kubeconfig: Path | None) -> tuple[Any, KubeTarget]:
    """lightkube's single-context configuration: ``kubeconfig`` (its current context), or
    in-cluster from the pod's service-account files when None. KubeConfigError names what
    is missing."""
    try:
        if kubeconfig is not None:
            # meshca's bounded YAML reader (size, aliases), then lightkube's parser
            document = read_yaml(kubeconfig, "kubeconfig")
            if not isinstance(document, dict):
                raise KubeConfigError(f"--kubeconfig {kubeconfig}: not a kubeconfig (a mapping)")
            config = KubeConfig.from_dict(document, fname=kubeconfig).get()
            source = f"kubeconfig {kubeconfig}"
        else:
            if not os.environ.get("KUBERNETES_SERVICE_HOST"):
                raise KubeConfigError(
                    "not inside a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set): "
                    "give --kubeconfig PATH"
                )
            config = KubeConfig.from_service_account().get()
            source = f"in-cluster service account ({SERVICE_ACCOUNT})"
    except KubeConfigError:
        raise
    except (ConfigError, YamlFileError, OSError, ValueError, TypeError, AttributeError) as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "in-cluster configuration"
        raise KubeConfigError(f"{where}: {shorten(str(exc) or type(exc).__name__, 300)}") from None
    except KeyError as exc:
        where = f"--kubeconfig {kubeconfig}" if kubeconfig else "in-cluster configuration"
        raise KubeConfigError(f"{where}: missing {shorten(str(exc), 100)}") from None
    if config is None or config.cluster is None or not config.cluster.server:
        raise KubeConfigError(f"--kubeconfig {kubeconfig}: no current context with a server")
    return config, KubeTarget(str(config.cluster.server), source)


class KubeApi:
    """Lists and watches on one API server, as JSON (and merge patches of status)."""

    def __init__(self, config: Any) -> None:
        params = client_adapter.ConnectionParams(
            timeout=httpx.Timeout(_READ_TIMEOUT, connect=_CONNECT_TIMEOUT),
            trust_env=False,  # the API server is reached directly, never through a proxy
        )
        try:
            self._client: httpx.AsyncClient = client_adapter.AsyncClient(config, params)
        except (ConfigError, OSError, ValueError) as exc:
            raise KubeConfigError(f"API server client: {shorten(str(exc), 300)}") from None

    async def close(self) -> None:
        await self._client.aclose()

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        """One GET; the decoded object, or KubeApiError."""
        return _answer(await self._client.get(path, params=dict(params or {})))

    async def merge_patch(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A JSON merge patch (a status subresource's, say); KubeApiError when refused."""
        response = await self._client.patch(
            path,
            content=json.dumps(body).encode(),
            headers={"Content-Type": "application/merge-patch+json"},
        )
        return _answer(response)

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """A POST of a new object (a TokenReview); the API server's answer, or
        KubeApiError when refused."""
        return _answer(await self._client.post(path, json=dict(body)))

    @asynccontextmanager
    async def watch(
        self, path: str, params: Mapping[str, str], timeout: float
    ) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """A watch request (``watch=1`` is added): the events, one decoded object each.
        The stream ends when the server closes it (its ``timeoutSeconds``); ``timeout``
        bounds a silence on the connection."""
        query = {**params, "watch": "1"}
        request = self._client.build_request(
            "GET",
            path,
            params=query,
            timeout=httpx.Timeout(timeout, connect=_CONNECT_TIMEOUT),
        )
        response = await self._client.send(request, stream=True)
        try:
            if response.status_code >= 400:
                body = await response.aread()
                raise _api_error(response.status_code, body[:4096])
            yield _events(response)
        finally:
            await response.aclose()


async def _events(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    pending = b""
    async for chunk in response.aiter_bytes():
        pending += chunk
        while True:
            line, newline, rest = pending.partition(b"\n")
            if not newline:
                break
            pending = rest
            if line.strip():
                yield _event(line)
        if len(pending) > MAX_EVENT_BYTES:
            raise KubeApiError(0, "TooLarge", f"a watch event over {MAX_EVENT_BYTES} bytes")
    if pending.strip():
        yield _event(pending)


def _event(line: bytes) -> dict[str, Any]:
    try:
        event = json.loads(line)
    except ValueError:
        raise KubeApiError(0, "BadResponse", "a watch event that is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("object"), dict):
        raise KubeApiError(0, "BadResponse", "a watch event without an object")
    return event


def _answer(response: httpx.Response) -> dict[str, Any]:
    """The decoded object of a plain request's answer; KubeApiError for a refusal and for
    an answer that is not a JSON object (a proxy's error page, a cut-off body), so callers
    that retry on KubeApiError never see a bare decoding error."""
    if response.status_code >= 400:
        raise _api_error(response.status_code, response.content)
    try:
        decoded = json.loads(response.content)
    except ValueError:
        decoded = None
    if not isinstance(decoded, dict):
        raise KubeApiError(response.status_code, "BadResponse", "not a JSON object")
    return decoded


def _api_error(status: int, body: bytes) -> KubeApiError:
    try:
        decoded = json.loads(body)
    except ValueError:
        decoded = None
    if isinstance(decoded, dict):
        return KubeApiError(
            status, str(decoded.get("reason") or ""), str(decoded.get("message") or "")
        )
    return KubeApiError(status, "", body[:200].decode("utf-8", "replace"))


def status_error(status: Mapping[str, Any]) -> KubeApiError:
    """A watch's ERROR event (a Status object) as an error."""
    code = status.get("code")
    return KubeApiError(
        code if isinstance(code, int) else 0,
        str(status.get("reason") or ""),
        str(status.get("message") or ""),
    )

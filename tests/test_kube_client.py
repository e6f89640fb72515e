"""The Kubernetes client's answers that are not what an API server sends: one clear
error, and a list-watch that keeps retrying instead of ending (no API server is needed:
a plain HTTP server on loopback answers with an error page, as a misrouted proxy would)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from meshca.kube.client import KubeApi, KubeApiError, load_config
from meshca.kube.objects import SERVICES
from meshca.kube.watch import Reflector
from meshca.util.retry import Backoff


class ErrorPage(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # the http.server interface
        body = b"<html><body>502 Bad Gateway</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def error_page(tmp_path: Path) -> Iterator[Path]:
    """A kubeconfig whose server answers every request with an HTML page."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ErrorPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}
                ],
                "users": [{"name": "u", "user": {"token": "not-a-secret"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    try:
        yield kubeconfig
    finally:
        server.shutdown()
        server.server_close()


async def test_an_answer_that_is_not_json_is_one_clear_error(error_page: Path) -> None:
    config, _ = load_config(error_page)
    api = KubeApi(config)
    try:
        with pytest.raises(KubeApiError, match="BadResponse"):
            await api.get("/api/v1/services")
    finally:
        await api.close()


async def test_the_list_watch_keeps_retrying_after_an_answer_that_is_not_json(
    error_page: Path,
) -> None:
    config, _ = load_config(error_page)
    api = KubeApi(config)
    reflector = Reflector(api, SERVICES, lambda: None, retry=Backoff(initial=0.01, maximum=0.05))
    task = asyncio.create_task(reflector.run())
    try:
        for _ in range(500):
            if reflector.failures >= 3 or task.done():
                break
            await asyncio.sleep(0.01)
        assert not task.done()  # the list-watch did not end on a bad answer
        assert reflector.failures >= 3 and not reflector.synced.is_set()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await api.close()

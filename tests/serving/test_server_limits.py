"""The server as a network service: connection cap, head and body timeouts, busy, auth, metrics,
graceful shutdown. Real uvicorn on loopback (the `instdisc serve` config), raw sockets as the
misbehaving clients."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from serving_helpers import running_server, write_images
from serving_helpers import tiny, embedder  # noqa: F401 (fixtures)

from conftest import wait_healthy
from instdisc.io import file_sha256
from instdisc.serving.app import Limits, create_app
from instdisc.serving.embedder import Embedder
from instdisc.serving.server import ServerLimits

FAST = ServerLimits(max_connections=8, header_timeout_s=1.0, keep_alive_s=1.0,
                    shutdown_timeout_s=1.0)


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True when the server closes `sock` (EOF or reset) within `within` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(65536) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_connections_over_the_cap_are_closed_and_half_open_ones_time_out(embedder, caplog):
    caplog.set_level(logging.INFO, logger="instdisc.serving.server")
    with running_server(create_app(embedder), limits=FAST) as url:
        idle = [_connect(url) for _ in range(30)]                  # half-open: never a byte
        time.sleep(0.3)
        refused = sum(_closed_by_server(s, 0.2) for s in idle)
        assert refused >= 30 - FAST.max_connections              # over the cap: closed at once
        assert caplog.text.count("refusing connections over --max-connections") == 1
        held = [s for s in idle if not _closed_by_server(s, 0.0)]
        assert all(_closed_by_server(s, FAST.header_timeout_s + 1.5) for s in held)
        assert "no complete request head within" in caplog.text
        assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}
        for s in idle:
            s.close()


def test_a_request_head_sent_one_byte_at_a_time_is_cut_off(embedder):
    with running_server(create_app(embedder), limits=FAST) as url:
        sock = _connect(url)
        start, cut = time.monotonic(), False
        for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                cut = True
                break
            if _closed_by_server(sock, 0.1):
                cut = True
                break
        assert cut and time.monotonic() - start < FAST.header_timeout_s + 2
        sock.close()
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200


def test_a_slow_upload_gets_a_408_and_the_service_keeps_serving(embedder, tiny, tmp_path):
    app = create_app(embedder, limits=Limits(body_timeout_s=1.0))
    with running_server(app) as url:
        sock = _connect(url)
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 1000\r\n\r\n" + b"\x89PNG")
        sock.settimeout(5)
        start, reply = time.monotonic(), b""
        while b"\r\n\r\n" not in reply or b"}" not in reply:
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 408") and b"--body-timeout" in reply
        assert time.monotonic() - start < 3
        sock.close()
        image = write_images(tmp_path, 1)[0].read_bytes()
        ok = httpx.post(f"{url}/embed", content=image, headers={"content-type": "image/png"})
        assert ok.status_code == 200 and ok.json()["count"] == 1


class HeldEmbedder(Embedder):
    """The real session, held at the start of each run until `release` is set."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered, self.release = threading.Event(), threading.Event()

    def run(self, batch: np.ndarray) -> np.ndarray:
        self.entered.set()
        self.release.wait(30)
        return super().run(batch)


def test_images_over_max_pending_are_a_503_until_the_session_catches_up(tiny, tmp_path):
    held = HeldEmbedder(tiny.onnx_path, device="cpu")
    app = create_app(held, limits=Limits(max_pending=1, max_images=1))
    body = write_images(tmp_path, 1)[0].read_bytes()
    headers = {"content-type": "image/png"}
    with running_server(app) as url, httpx.Client(base_url=url, timeout=30) as client:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(
            response=client.post("/embed", content=body, headers=headers)))
        worker.start()
        assert held.entered.wait(10)                              # one image in the session
        busy = client.post("/embed", content=body, headers=headers)
        assert busy.status_code == 503 and "service busy" in busy.json()["error"]
        assert busy.headers["retry-after"] == "1"
        assert "--max-pending" in busy.json()["error"]
        held.release.set()
        worker.join(30)
        assert first["response"].status_code == 200
        assert client.post("/embed", content=body, headers=headers).status_code == 200
        metrics = client.get("/metrics").text
        assert 'instdisc_requests_total{route="/embed",status="503"} 1.0' in metrics
        assert 'instdisc_requests_total{route="/embed",status="200"} 2.0' in metrics
        assert "instdisc_images_pending 0.0" in metrics and "instdisc_batches 2.0" in metrics
        assert f'instdisc_model_info{{sha256="{file_sha256(tiny.onnx_path)}"}} 1.0' in metrics


def test_an_api_key_guards_every_route_but_health_and_docs_are_off_by_default(embedder):
    with running_server(create_app(embedder, api_key="s3cret")) as url:
        assert httpx.get(f"{url}/health").status_code == 200      # liveness probes carry no key
        for path in ("/metadata", "/metrics", "/ready"):
            denied = httpx.get(f"{url}{path}")
            assert denied.status_code == 401 and "API key" in denied.json()["error"], path
            assert httpx.get(f"{url}{path}", headers={"Authorization": "Bearer nope"}
                             ).status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        meta = httpx.get(f"{url}/metadata", headers=key)
        assert meta.status_code == 200
        embedded = httpx.post(f"{url}/embed", content=b"junk", headers={**key,
                              "content-type": "image/png"})
        assert embedded.status_code == 400                        # past the guard: the app's error
        assert httpx.get(f"{url}/openapi.json", headers=key).status_code == 404
        assert httpx.get(f"{url}/docs", headers=key).status_code == 404
    with running_server(create_app(embedder, docs=True)) as url:
        assert httpx.get(f"{url}/openapi.json").status_code == 200


def test_sigterm_with_a_slow_upload_open_exits_within_the_shutdown_timeout(tiny, tmp_path):
    port = _free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as handle:
        proc = subprocess.Popen([sys.executable, "-m", "instdisc.cli", "serve", "--model",
                                 str(tiny.onnx_path), "--device", "cpu", "--port", str(port),
                                 "--shutdown-timeout", "2", "--body-timeout", "60"],
                                stdout=handle, stderr=subprocess.STDOUT)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, log, timeout=120)
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 100000\r\n\r\n\x89PNG")          # and then nothing
        time.sleep(0.5)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        assert time.monotonic() - start < 2 + 5, log.read_text()[-2000:]
        assert '"GET /health HTTP/1.1" 200' in log.read_text()       # the access log
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("flag", ["--max-connections=0", "--header-timeout=0"])
def test_bad_server_limits_are_refused(tiny, flag):
    from instdisc import cli

    assert cli.main(["serve", "--model", str(tiny.onnx_path), "--device", "cpu", flag]) == 2


def test_a_client_that_leaves_mid_upload_costs_one_log_line(embedder, caplog):
    caplog.set_level(logging.INFO)
    with running_server(create_app(embedder)) as url:
        sock = _connect(url)
        sock.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                     b"Content-Length: 5000\r\n\r\n\x89PNG")
        time.sleep(0.3)
        sock.close()
        deadline = time.monotonic() + 5
        while "left before its request was read" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        assert httpx.get(f"{url}/health").status_code == 200
    assert "Traceback" not in caplog.text and "ERROR" not in caplog.text

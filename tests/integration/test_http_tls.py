"""HTTPS on an API/UI listener: `bootsvc serve` with ``tls: {cert, key}`` on a listener whose roles are
api/ui/webhook/metrics, a self-signed certificate made by ``openssl`` here, and two clients that verify
it (curl ``--cacert`` and Python's ssl). The boot plane is not on that listener (404), plain HTTP to
it gets no answer, and clients that open TCP and never finish the TLS handshake hold no thread."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.serve import http_serve

PORT = 18393


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    work = tmp_path_factory.mktemp("tls")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "2", "-subj", "/CN=bootsvc-test", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(work / "key.pem"), "-out", str(work / "cert.pem")], check=True, capture_output=True)
    cfg = work / "c.yaml"
    cfg.write_text(f"database: {{url: 'sqlite:///{work}/s.db'}}\nstate_dir: {work}/state\n"
                   f"security: {{node_key_ref: 'file:{work}/node.key'}}\n"
                   f"listeners:\n  http:\n    - address: 127.0.0.1\n      port: {PORT}\n"
                   f"      roles: [api, ui, webhook, metrics]\n"
                   f"      tls: {{cert: {work}/cert.pem, key: {work}/key.pem}}\n")
    env = {"BOOTSVC_HTTP_WORKERS": "1", "BOOTSVC_HTTP_THREADS": "4"}
    with http_serve(cfg, work, lambda: get(work, "/healthz")[0] == 200, env):
        yield work
    assert "Traceback" not in (work / "serve.log").read_text(errors="replace")


def get(work: Path, path: str, timeout: float = 5) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(work / "cert.pem"))  # verifies chain and 127.0.0.1 SAN
    c = http.client.HTTPSConnection("127.0.0.1", PORT, context=ctx, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_https_with_a_verified_certificate(server: Path) -> None:
    status, body = get(server, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    out = subprocess.run(["curl", "-sS", "--cacert", str(server / "cert.pem"), "-o", "/dev/null", "-w",
                          "%{http_code} %{ssl_verify_result}", f"https://127.0.0.1:{PORT}/api/v1/nodes"],
                         capture_output=True, text=True, timeout=20)
    assert out.stdout == "401 0", out  # the API answers (a token is needed), over a verified TLS session
    # an untrusted client refuses it: it really is the test's certificate
    bad = subprocess.run(["curl", "-sS", "-o", "/dev/null", f"https://127.0.0.1:{PORT}/healthz"],
                         capture_output=True, text=True, timeout=20)
    assert bad.returncode == 60, bad  # CURLE_PEER_FAILED_VERIFICATION


def test_the_boot_plane_is_not_on_the_api_listener(server: Path) -> None:
    assert get(server, "/boot/ipxe?mac=52:54:00:00:00:01")[0] == 404
    assert get(server, "/images/os/1/vmlinuz")[0] == 404


def test_plain_http_to_the_tls_port_gets_no_page(server: Path) -> None:
    with socket.create_connection(("127.0.0.1", PORT), timeout=10) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = s.recv(4096)
        except ConnectionResetError:
            answer = b""
    assert b"status" not in answer


def test_unfinished_handshakes_hold_no_thread(server: Path) -> None:
    """100 connections that never send a ClientHello and 100 that send half of one: 4 threads, and
    HTTPS requests are still answered."""
    socks = []
    try:
        for i in range(200):
            s = socket.create_connection(("127.0.0.1", PORT), timeout=5)
            if i % 2:
                s.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a TLS record header, then silence
            socks.append(s)
        for _ in range(10):
            t0 = time.monotonic()
            assert get(server, "/healthz", timeout=3)[0] == 200
            assert time.monotonic() - t0 < 3
    finally:
        for s in socks:
            s.close()

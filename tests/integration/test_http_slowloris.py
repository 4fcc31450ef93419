"""Slow clients cannot starve the HTTP plane (the slowloris attack, run for real on loopback).

`bootsvc serve --only http` (gunicorn, 2 workers x 8 threads: the default), then 1,000 connections
that each send ``GET / HTTP/1.1\\r\\nHost: x\\r\\n`` and stop - an unfinished request head. With
gunicorn's stock gthread worker 40 such connections held every thread and no iPXE script was served;
bootsvc.web.serve.HeadFirstWorker reads heads in its event loop, so scripts keep coming within a
deadline, and each slow connection gets 408 once its head deadline passes. Malformed framing gets a
4xx from the server stack or the app, never a 500 or a traceback in the log.
"""

from __future__ import annotations

import http.client
import json
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.serve import http_serve

PORT = 18391
SLOW = 1000
HEAD_TIMEOUT = 8.0
SCRIPT_DEADLINE = 2.0  # a well-behaved client's script, request to last byte


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    work = tmp_path_factory.mktemp("slowloris")
    cfg = work / "c.yaml"
    cfg.write_text(f"database: {{url: 'sqlite:///{work}/s.db'}}\nstate_dir: {work}/state\n"
                   f"security: {{node_key_ref: 'file:{work}/node.key',\n"
                   "  boot_sweep_rate: 1000000, boot_sweep_burst: 1000000}\n"  # many scripts from one address
                   f"images: {{catalog: {work}/catalog.yaml, root: {work}}}\n"
                   f"listeners:\n  http:\n    - {{address: 127.0.0.1, port: {PORT}}}\n")
    (work / "catalog.yaml").write_text("images: []\n")
    env = {"BOOTSVC_HTTP_WORKERS": "2", "BOOTSVC_HTTP_THREADS": "8",
           "BOOTSVC_HTTP_HEAD_TIMEOUT": str(HEAD_TIMEOUT), "BOOTSVC_HTTP_BODY_TIMEOUT": "5"}
    with http_serve(cfg, work, lambda: get("/healthz", 2)[0] == 200, env):
        yield {"work": work, "log": work / "serve.log"}


def get(path: str, timeout: float, method: str = "GET") -> tuple[int, bytes]:
    c = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    try:
        c.request(method, path)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def raw(data: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are, return everything the server answers before it closes or goes quiet."""
    with socket.create_connection(("127.0.0.1", PORT), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
        return out


def open_slow(n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", PORT), timeout=5)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line that ends the head
        socks.append(s)
    return socks


def still_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""  # data waiting (a 408) also means: not held any more
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


def test_scripts_keep_coming_while_1000_slow_connections_are_open(server: dict[str, object]) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < SLOW + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    assert get("/boot/ipxe?mac=52:54:00:5e:00:01", 15)[0] == 200
    started = time.monotonic()
    socks = open_slow(SLOW)
    try:
        opened = time.monotonic()
        served, worst = 0, 0.0
        trickle, next_trickle = socks[:20], time.monotonic()
        # well-behaved clients, each a new connection, while every slow one is still held open
        while time.monotonic() - started < HEAD_TIMEOUT - 2.5:
            if time.monotonic() >= next_trickle:  # the classic slowloris: one more header line now and then,
                for s in trickle:                   # which a per-read timeout would never end
                    s.sendall(b"X-a: b\r\n")
                next_trickle = time.monotonic() + 1
            t0 = time.monotonic()
            status, body = get(f"/boot/ipxe?mac=52:54:00:5e:{served // 256:02x}:{served % 256:02x}",
                               SCRIPT_DEADLINE)
            worst = max(worst, time.monotonic() - t0)
            assert status == 200 and body.startswith(b"#!ipxe"), (status, body[:200])
            served += 1
        held = sum(still_open(s) for s in socks)
        print(f"slowloris: {SLOW} slow connections opened in {opened - started:.1f} s; {served} scripts "
              f"served meanwhile, slowest {worst * 1000:.0f} ms; {held} slow connections still open")
        assert served >= 20 and worst < SCRIPT_DEADLINE
        assert held >= SLOW * 0.95  # the attack was really in place while the scripts were served
        # past the head deadline each slow connection, trickling or silent, is told 408 and closed
        # (RFC 9110 §15.5.9)
        for s in trickle:
            s.sendall(b"X-a: b\r\n")
        probe = trickle + socks[-20:]
        for s in probe:
            s.settimeout(HEAD_TIMEOUT + 5)
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    finally:
        for s in socks:
            s.close()
    assert get("/healthz", 5)[0] == 200


@pytest.mark.parametrize(("name", "request_bytes", "allowed"), [
    ("bad chunk size", b"POST /boot/discover HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", {400}),
    ("chunk without terminator", b"POST /boot/discover HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                 b"\r\n5\r\n{}{}{}{}{}{}\r\n0\r\n\r\n", {400}),
    ("non-numeric Content-Length", b"POST /boot/discover HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n{}",
     {400}),
    ("two different Content-Lengths", b"POST /boot/discover HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                      b"Content-Length: 3\r\n\r\n{}x", {400}),
    ("Content-Length and chunked", b"POST /boot/discover HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n", {400}),
    ("one header of 20 KiB", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n",
     {400, 431}),
    ("a head of 100 KiB", b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 12_000 + b"\r\n",
     {400, 431}),
    ("deep JSON", b"POST /boot/discover HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 20000\r\n\r\n" + b"[" * 10_000 + b"]" * 10_000, {400}),
])
def test_malformed_framing_is_a_4xx_never_a_500(server: dict[str, object], name: str, request_bytes: bytes,
                                               allowed: set[int]) -> None:
    answer = raw(request_bytes)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else 0
    assert status in allowed, (name, answer[:300])
    log = Path(str(server["log"])).read_text(errors="replace")
    assert "Traceback" not in log and "internal_error" not in log, log[-3000:]


def _read_to_close(s: socket.socket) -> bytes:
    """Everything the server sends until it closes (the head and the body may arrive in two segments)."""
    chunks = []
    while True:
        b = s.recv(4096)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def test_a_slow_body_is_408_not_a_held_thread(server: dict[str, object]) -> None:
    """A chunked body that stops half-way: the thread reading it gives up at the body deadline."""
    with socket.create_connection(("127.0.0.1", PORT), timeout=60) as s:
        s.sendall(b"POST /boot/discover HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
        t0 = time.monotonic()
        answer = _read_to_close(s)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"] == "request_timeout"
    assert time.monotonic() - t0 < 40

"""TFTP under flood, written as the attack: thousands of never-ACKed RRQs from many source addresses
against a server with systemd's default open-file limit (1024). On 89d089e the worker died of EMFILE
(its ERROR reply opened a socket per refusal outside any guard) and the NBP was never served. Now: caps,
eviction of never-acknowledged transfers, ERROR 0 "server busy", and the legitimate client gets its file.

Everything on loopback (127.0.0.0/8: the flood's sources are 127.1.x.y addresses bound by this test and
never read, like spoofed sources that never ACK); bounded in packets and time; the server subprocess
is stopped by closing its stdin and killed by PID if it does not exit."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.tftp import TftpServer
from scapy.layers.tftp import TFTP

from bootsvc import metrics, tftp

REPO = Path(__file__).resolve().parents[2]
FLOOD = 5000

SERVER = r"""
import json, os, resource, sys, threading
sys.path.insert(0, sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))  # systemd's default soft limit, not raisable here
from pathlib import Path
from bootsvc import tftp
svc = tftp.TftpService("127.0.0.1", 0, tftp.Resolver(Path(sys.argv[2])), timeout=2.0, retries=5)
print(svc.port, flush=True)
stop = threading.Event()
th = threading.Thread(target=svc.serve, args=(stop,), daemon=True)
th.start()
sys.stdin.read()  # the test closes stdin to stop us
alive = th.is_alive()
stop.set()
th.join(timeout=10)
print(json.dumps({"alive": alive, "refused": getattr(svc, "refused", {}), "evicted": getattr(svc, "evicted", 0),
                  "internal": getattr(svc, "internal_errors", 0), "completed": svc.completed}), flush=True)
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "snponly.efi").write_bytes(os.urandom(1 << 20))
    return r


@pytest.fixture
def server(root: Path) -> Iterator[tuple[subprocess.Popen[str], int]]:
    p = subprocess.Popen([sys.executable, "-c", SERVER, str(REPO), str(root)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None
        port = int(p.stdout.readline())
        yield p, port
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=5)


def _flood(port: int, started: threading.Event, done: list[float], socks: list[socket.socket]) -> None:
    """FLOOD RRQs: 4,500 from distinct 127.1.x.y addresses, 500 from one address (the per-client cap),
    in bursts of 50 every 30 ms (~3 s). The sockets stay open and unread: no ACK, no ICMP."""
    rq = struct.pack("!H", 1) + b"snponly.efi\0octet\0blksize\0001468\0tsize\0000\0"
    one = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    one.bind(("127.1.255.254", 0))
    socks.append(one)
    for i in range(FLOOD):
        if i % 10 == 9:
            one.sendto(rq, ("127.0.0.1", port))
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind((f"127.1.{(i >> 8) & 0xFF}.{(i & 0xFF) or 1}", 0))
            s.sendto(rq, ("127.0.0.1", port))
            socks.append(s)
        if i == 1000:
            started.set()
        if i % 50 == 49:
            time.sleep(0.03)
    done.append(time.monotonic())


def test_legitimate_client_gets_its_nbp_during_a_5000_rrq_flood(server: tuple[subprocess.Popen[str], int],
                                                                 root: Path, tmp_path: Path) -> None:
    proc, port = server
    started, done, socks = threading.Event(), [], []  # type: ignore[var-annotated]
    flood = threading.Thread(target=_flood, args=(port, started, done, socks), daemon=True)
    flood.start()
    try:
        assert started.wait(30)
        results = []
        tries: list[str] = []
        for i in range(3):  # three downloads back to back while the flood runs
            out = tmp_path / f"nbp{i}"
            t0 = time.monotonic()
            # A client may retry, as firmware does (EDK2's PXE retries its RRQ): curl's TFTP client itself
            # gives up on some replies under load (seen once in CI: "(72) getpeername() failed" from
            # curl's UDP socket). Each download gets three attempts; on 89d089e all of them fail.
            for _attempt in range(3):
                r = subprocess.run(["curl", "-sS", "--max-time", "30", "--tftp-blksize", "1468", "-o", str(out),
                                    f"tftp://127.0.0.1:{port}/snponly.efi"], capture_output=True, text=True,
                                   timeout=40)
                if r.returncode == 0:
                    break
                tries.append(f"download {i}: {r.stderr.strip()}")
            results.append((r.returncode, r.stderr.strip(), t0))
        print(f"\nretried attempts during the flood: {tries or 'none'}")
        flood.join(timeout=60)
        assert done, "the flood did not finish"
        want = hashlib.sha256((root / "snponly.efi").read_bytes()).hexdigest()
        for i, (rc, err, _t0) in enumerate(results):
            assert rc == 0, f"download {i} failed during the flood: {err}"
            assert hashlib.sha256((tmp_path / f"nbp{i}").read_bytes()).hexdigest() == want
        assert results[0][2] < done[0], "the first download did not start during the flood"
        # and it still serves afterwards
        r = subprocess.run(["curl", "-sS", "--max-time", "30", "-o", str(tmp_path / "after"),
                            f"tftp://127.0.0.1:{port}/snponly.efi"], capture_output=True, text=True, timeout=40)
        assert r.returncode == 0, r.stderr
    finally:
        for s in socks:
            s.close()
    out, err = proc.communicate(input="", timeout=30)  # EOF on stdin stops the server
    assert "Traceback" not in err, err[-3000:]
    stats = json.loads(out.strip().splitlines()[-1])
    print(f"\nflood of {FLOOD} RRQs: {stats}")
    assert stats["alive"] and stats["internal"] == 0
    assert stats["evicted"] > 0 and stats["refused"].get("busy_client", 0) > 0


# ---------------------------------------------------------------- admission, in-process
def _client(addr: str = "127.0.0.1") -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind((addr, 0))
    c.settimeout(3)
    return c


def _open(srv: TftpServer, src: str, ack: bool) -> tuple[socket.socket, TFTP]:
    c = _client(src)
    c.sendto(struct.pack("!H", 1) + b"snponly.efi\0octet\0tsize\x000\0", srv.addr)
    buf, peer = c.recvfrom(2048)
    if ack and buf[:2] == b"\0\6":
        c.sendto(struct.pack("!HH", 4, 0), peer)  # established: ACKed the OACK
        c.recvfrom(2048)  # DATA 1
    return c, TFTP(buf)


def test_busy_when_every_slot_holds_a_live_client(root: Path) -> None:
    srv = TftpServer(root, max_transfers=2, timeout=5.0)
    socks = []
    try:
        for src in ("127.0.2.1", "127.0.2.2"):
            c, p = _open(srv, src, ack=True)
            socks.append(c)
            assert p.op == 6
        c, p = _open(srv, "127.0.2.3", ack=False)
        socks.append(c)
        assert (p.op, p.errorcode, p.errormsg) == (5, 0, b"server busy")  # RFC 1350 code 0
        assert srv.svc.refused.get("busy") == 1
    finally:
        for c in socks:
            c.close()
        srv.close()


def test_never_acked_transfer_is_evicted_for_a_new_request(root: Path) -> None:
    srv = TftpServer(root, max_transfers=2, timeout=5.0)
    socks = []
    try:
        for src in ("127.0.3.1", "127.0.3.2"):
            c, _p = _open(srv, src, ack=False)  # spoofed-like: never ACK
            socks.append(c)
        c, p = _open(srv, "127.0.3.3", ack=True)
        socks.append(c)
        assert p.op == 6 and srv.svc.evicted == 1
    finally:
        for c in socks:
            c.close()
        srv.close()


def test_per_client_cap(root: Path) -> None:
    srv = TftpServer(root, max_per_client=2, timeout=5.0)
    socks = []
    try:
        replies = []
        for _ in range(3):
            c, p = _open(srv, "127.0.4.1", ack=False)
            socks.append(c)
            replies.append((p.op, getattr(p, "errormsg", b"")))
        assert replies == [(6, b""), (6, b""), (5, b"server busy")]
        c, p = _open(srv, "127.0.4.2", ack=False)  # another address is not affected
        socks.append(c)
        assert p.op == 6
    finally:
        for c in socks:
            c.close()
        srv.close()


def test_emfile_answered_busy_counted_and_logged_at_most_once_a_second(
        root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    srv = TftpServer(root)
    real = srv.svc._session_socket
    error_sock = real("127.0.0.1")  # the refusal socket exists before descriptors run out
    srv.svc._err_socks["127.0.0.1"] = error_sock

    def no_fds(local: str) -> socket.socket:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(srv.svc, "_session_socket", no_fds)
    before = metrics.counters.get("bootsvc_tftp_os_errors_total", {"errno": "EMFILE"})
    caplog.set_level(logging.WARNING, logger="bootsvc.tftp")
    try:
        for _ in range(30):
            c, p = _open(srv, "127.0.5.1", ack=False)
            c.close()
            assert (p.op, p.errorcode, p.errormsg) == (5, 0, b"server busy")
        assert srv.thread.is_alive()
    finally:
        srv.close()
    assert metrics.counters.get("bootsvc_tftp_os_errors_total", {"errno": "EMFILE"}) - before == 30
    lines = [r for r in caplog.records if "Too many open files" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]


def test_open_file_limit_raised_to_the_hard_limit_at_start() -> None:
    code = ("import resource, sys; sys.path.insert(0, sys.argv[1]);"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096));"
            "from bootsvc.tftp import raise_nofile;"
            "print(raise_nofile(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])")
    r = subprocess.run([sys.executable, "-c", code, str(REPO)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["4096", "4096"]


def test_listener_cap_is_shared_by_the_workers(root: Path) -> None:
    """Two workers on one port (as bootsvc/tftp/run.py forks them) count against one listener-wide cap:
    a worker with no never-ACKed transfer of its own to drop answers "server busy"."""
    counts = [0, 0]
    a = TftpServer(root, max_transfers=2, timeout=5.0, slots=tftp.Slots(counts, 0))
    b = TftpServer(root, max_transfers=2, timeout=5.0, slots=tftp.Slots(counts, 1))
    socks = []
    try:
        c, p = _open(a, "127.0.8.1", ack=True)
        socks.append(c)
        c, q = _open(b, "127.0.8.2", ack=True)
        socks.append(c)
        assert (p.op, q.op, counts) == (6, 6, [1, 1])
        c, r = _open(a, "127.0.8.3", ack=False)
        socks.append(c)
        assert (r.op, r.errorcode, r.errormsg) == (5, 0, b"server busy")
    finally:
        for c in socks:
            c.close()
        a.close()
        b.close()
    assert counts == [0, 0]

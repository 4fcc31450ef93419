"""bootsvc.tftp against a raw-socket TFTP client on loopback: options, refusals, TIDs, retransmission,
block-number rollover, reply source address, SO_REUSEPORT workers. No root needed."""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.netns import Netns
from helpers.tftp import TftpServer


def _grub(rel: str, ip: str) -> bytes | None:
    return f"#generated {rel} for {ip}\n".encode() if rel.startswith("grub/grub.cfg-") else None


class Server(TftpServer):
    """With per-node GRUB configs generated as ``#generated <name> for <address>``."""

    def __init__(self, root: Path, address: str = "127.0.0.1", port: int = 0, **kw: object) -> None:
        super().__init__(root, address, port, generator=_grub, **kw)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    (r / "arm64").mkdir(parents=True)
    (r / "small.bin").write_bytes(b"x" * 1000)
    (r / "exact.bin").write_bytes(b"y" * 1024)
    (r / "big.bin").write_bytes(os.urandom(300_000))
    (r / "arm64" / "grubnetaa64.efi").write_bytes(b"grub")
    (tmp_path / "secret").write_text("top secret")
    (r / "link").symlink_to(tmp_path / "secret")
    return r


@pytest.fixture
def srv(root: Path) -> Iterator[Server]:
    s = Server(root, timeout=0.3, retries=3)
    yield s
    s.close()


def rrq(name: bytes | str, **opts: object) -> bytes:
    n = name.encode() if isinstance(name, str) else name
    return struct.pack("!H", 1) + n + b"\0octet\0" + b"".join(f"{k}\0{v}\0".encode() for k, v in opts.items())


def client(timeout: float = 2.0) -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0))
    c.settimeout(timeout)
    return c


def parse_oack(b: bytes) -> dict[str, str]:
    parts = b[2:].split(b"\0")[:-1]
    return {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts), 2)}


def download(addr: tuple[str, int], name: str, blksize: int | None = None,
             tsize: bool = True) -> tuple[bytes, dict[str, str], tuple[str, int]]:
    c = client()
    opts: dict[str, object] = {}
    if blksize:
        opts["blksize"] = blksize
    if tsize:
        opts["tsize"] = 0
    c.sendto(rrq(name, **opts), addr)
    pkt, peer = c.recvfrom(70000)
    oack: dict[str, str] = {}
    bs = 512
    data = bytearray()
    expect = 1
    if struct.unpack("!H", pkt[:2])[0] == 6:
        oack = parse_oack(pkt)
        bs = int(oack.get("blksize", 512))
        c.sendto(struct.pack("!HH", 4, 0), peer)
        pkt, peer2 = c.recvfrom(70000)
        assert peer2 == peer
    while True:
        op, num = struct.unpack("!HH", pkt[:4])
        assert op == 3, pkt
        assert num == expect & 0xFFFF
        data += pkt[4:]
        c.sendto(struct.pack("!HH", 4, num), peer)
        if len(pkt) - 4 < bs:
            break
        expect += 1
        pkt, _ = c.recvfrom(70000)
    c.close()
    return bytes(data), oack, peer


def error_of(addr: tuple[str, int], packet: bytes) -> tuple[int, str]:
    c = client()
    c.sendto(packet, addr)
    pkt, _ = c.recvfrom(2048)
    c.close()
    op, code = struct.unpack("!HH", pkt[:4])
    assert op == 5, pkt
    return code, pkt[4:-1].decode()


def test_download_with_options(srv: Server, root: Path) -> None:
    data, oack, peer = download(srv.addr, "big.bin", blksize=1468)
    assert hashlib.sha256(data).digest() == hashlib.sha256((root / "big.bin").read_bytes()).digest()
    assert oack == {"blksize": "1468", "tsize": "300000"}
    assert peer[0] == "127.0.0.1" and peer[1] != srv.addr[1]  # RFC 1350: a new TID per transfer


def test_download_without_options_and_exact_multiple(srv: Server) -> None:
    data, oack, _ = download(srv.addr, "small.bin", tsize=False)
    assert oack == {} and data == b"x" * 1000
    data, _, _ = download(srv.addr, "/exact.bin", blksize=512)  # 2 full blocks + an empty final DATA
    assert data == b"y" * 1024


def test_blksize_clamped_and_names_case_insensitive(srv: Server) -> None:
    c = client()
    c.sendto(rrq("small.bin", BLKSIZE=70000, TSize=0), srv.addr)
    pkt, _ = c.recvfrom(2048)
    assert parse_oack(pkt) == {"blksize": "65464", "tsize": "1000"}
    # RFC 2348 §2: the server may only answer a blksize <= the one asked, and 8 is the minimum: a
    # request for 4 is an option the server cannot accept, so it is ignored (no OACK: DATA 1 of 512)
    c.sendto(rrq("small.bin", blksize=4), srv.addr)
    pkt, _ = c.recvfrom(2048)
    assert pkt[:4] == struct.pack("!HH", 3, 1) and len(pkt) == 4 + 512
    c.close()


def test_generated_grub_config(srv: Server) -> None:
    data, _, _ = download(srv.addr, "/grub/grub.cfg-52:54:00:77:00:20", blksize=1024)
    assert data == b"#generated grub/grub.cfg-52:54:00:77:00:20 for 127.0.0.1\n"


def test_upload_refused(srv: Server, root: Path) -> None:
    wrq = struct.pack("!H", 2) + b"evil.bin\0octet\0"
    assert error_of(srv.addr, wrq) == (2, "Access violation")
    assert not (root / "evil.bin").exists()


@pytest.mark.parametrize("name", [
    b"../secret", b"/../secret", b"arm64/../../secret", b"link", b"a\\..\\secret", b"caf\xc3\xa9",
    b"\xc0\xae\xc0\xae/secret", b"//etc/passwd", b"%2e%2e/secret",
])
def test_traversal_refused(srv: Server, name: bytes) -> None:
    code, msg = error_of(srv.addr, rrq(name))
    assert (code, msg) == (2, "Access violation"), name


def test_not_found_and_malformed(srv: Server) -> None:
    assert error_of(srv.addr, rrq("/etc/passwd"))[0] == 1  # relative to the root: not found
    assert error_of(srv.addr, rrq("nope.efi"))[0] == 1
    assert error_of(srv.addr, struct.pack("!H", 1) + b"x")[0] == 4  # no NULs
    assert error_of(srv.addr, rrq("small.bin") + b"blksize\0")[0] == 4  # odd options
    assert error_of(srv.addr, rrq("x" * 600))[0] == 4  # oversized request


def test_unknown_tid_gets_error5_and_transfer_continues(srv: Server) -> None:
    c = client()
    c.sendto(rrq("small.bin"), srv.addr)
    pkt, peer = c.recvfrom(2048)
    assert pkt[:4] == struct.pack("!HH", 3, 1)
    stranger = client()
    stranger.sendto(struct.pack("!HH", 4, 1), peer)
    err, _ = stranger.recvfrom(2048)
    assert struct.unpack("!HH", err[:4]) == (5, 5)
    c.sendto(struct.pack("!HH", 4, 1), peer)  # the real client still finishes (1000 bytes: 2 blocks)
    pkt, _ = c.recvfrom(2048)
    assert pkt[:4] == struct.pack("!HH", 3, 2) and len(pkt) == 4 + 488


def test_transfer_socket_is_connected_and_its_twin_closed_after(srv: Server) -> None:
    """The session socket is connected to the client (send/recv per block); the same port's
    unconnected twin (for ERROR 5) exists while the transfer runs and both are gone after it."""
    data, _oack, peer = download(srv.addr, "big.bin", blksize=1468)
    assert len(data) == 300_000
    deadline = time.monotonic() + 5
    while (srv.svc.transfers or srv.svc.strays) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not srv.svc.transfers and not srv.svc.strays
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.bind(("127.0.0.1", peer[1]))  # the port is free again: nothing of the transfer left open
    finally:
        probe.close()


def test_retransmit_on_timeout_not_on_duplicate_ack(srv: Server) -> None:
    c = client()
    c.sendto(rrq("big.bin"), srv.addr)
    first, peer = c.recvfrom(2048)
    again, _ = c.recvfrom(2048)  # no ACK: the same DATA 1 comes again after the timeout (0.3 s)
    assert again == first
    c.sendto(struct.pack("!HH", 4, 1), peer)
    d2, _ = c.recvfrom(2048)
    assert d2[:4] == struct.pack("!HH", 3, 2)
    c.sendto(struct.pack("!HH", 4, 1), peer)  # duplicate ACK 1: must NOT trigger another DATA 2 now
    c.settimeout(0.15)
    with pytest.raises(TimeoutError):
        c.recvfrom(2048)


def test_block_number_rolls_over(tmp_path: Path) -> None:
    r = tmp_path / "r"
    r.mkdir()
    blob = os.urandom(8 * 65540 + 3)  # 65541 blocks of 8 bytes: wraps past 65535
    (r / "roll.bin").write_bytes(blob)
    s = Server(r)
    try:
        data, _, _ = download(s.addr, "roll.bin", blksize=8)
    finally:
        s.close()
    assert data == blob


def test_reply_source_is_the_listener_address(root: Path) -> None:
    """Bound to 127.0.0.2, every reply must come from 127.0.0.2 (tftpy's unbound session sockets would
    answer from 127.0.0.1, the kernel's choice for a 127.0.0.1 client)."""
    s = Server(root, address="127.0.0.2")
    try:
        _, _, peer = download(s.addr, "small.bin")
        assert peer[0] == "127.0.0.2"
        c = client()
        c.sendto(struct.pack("!H", 2) + b"x\0octet\0", s.addr)
        _, epeer = c.recvfrom(2048)
        assert epeer[0] == "127.0.0.2"
    finally:
        s.close()


def test_pinned_worker_serves_one_datagram_per_wakeup(root: Path) -> None:
    """A worker started for a CPU (as a pinned one is) answers one ACK per epoll wake-up instead of
    trying the socket again: whole files still arrive intact at both block sizes, nothing resent."""
    s = Server(root, timeout=0.3, retries=3, cpu=sorted(os.sched_getaffinity(0))[0])
    try:
        assert s.svc._reread is False
        for bs in (None, 1468):
            data, _oack, _peer = download(s.addr, "big.bin", blksize=bs)
            assert data == (root / "big.bin").read_bytes()
        deadline = time.monotonic() + 5
        while s.svc.completed < 2 and time.monotonic() < deadline:  # the final ACKs, then the counts
            time.sleep(0.01)
        assert (s.svc.completed, s.svc.resent) == (2, 0)
    finally:
        s.close()


def test_reuseport_workers_share_the_port(root: Path) -> None:
    # 16 clients from one address: above the per-address cap (tftp.max_per_client, default 8)
    a = Server(root, max_per_client=100)
    b = Server(root, port=a.addr[1], max_per_client=100)
    try:
        results: list[bytes] = []
        def one() -> None:
            results.append(download(a.addr, "big.bin", blksize=1468)[0])
        ts = [threading.Thread(target=one) for _ in range(16)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(timeout=30)
        want = (root / "big.bin").read_bytes()
        assert len(results) == 16 and all(r == want for r in results)
        deadline = time.monotonic() + 2
        while a.svc.completed + b.svc.completed < 16 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert a.svc.completed + b.svc.completed == 16
    finally:
        a.close()
        b.close()


@pytest.mark.netns
def test_wildcard_listener_answers_from_the_requested_address(root: Path) -> None:
    """A 0.0.0.0 listener on a multi-homed host (two addresses here) answers each client from the address
    that client asked - what tftpy's unbound session sockets get wrong. Runs in a namespace of its own."""
    if os.geteuid() != 0:
        pytest.skip("needs root (network namespace)")
    import sys

    with Netns("bbt") as ns:
        for addr in ("10.99.0.1/32", "10.99.0.2/32"):
            ns.ip("addr", "add", addr, "dev", "lo")
        code = f"""
import socket, struct, sys, threading
from pathlib import Path
from bootsvc import tftp
svc = tftp.TftpService("0.0.0.0", 0, tftp.Resolver(Path({str(root)!r})), reuse_port=False)
stop = threading.Event(); threading.Thread(target=svc.serve, args=(stop,), daemon=True).start()
out = []
for dst in ("10.99.0.1", "10.99.0.2"):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.bind(("10.99.0.1", 0)); c.settimeout(3)
    c.sendto(struct.pack("!H", 1) + b"small.bin\\0octet\\0", (dst, svc.port))
    _, peer = c.recvfrom(2048); out.append(peer[0])
    c.sendto(struct.pack("!H", 2) + b"x\\0octet\\0", (dst, svc.port))
    _, peer = c.recvfrom(2048); out.append(peer[0])
stop.set()
print(",".join(out))
"""
        r = ns.run(sys.executable, "-c", code, timeout=30)
        assert r.stdout.strip() == "10.99.0.1,10.99.0.1,10.99.0.2,10.99.0.2"


def test_completed_transfers_count_bytes_for_metrics(srv: Server, root: Path) -> None:
    from bootsvc import metrics

    before_bytes = metrics.counters.get("bootsvc_tftp_bytes_total")
    before_ok = metrics.counters.get("bootsvc_tftp_transfers_total", {"result": "ok"})
    data, _oack, _peer = download(srv.addr, "big.bin", blksize=1468)
    deadline = time.monotonic() + 10
    while metrics.counters.get("bootsvc_tftp_transfers_total", {"result": "ok"}) == before_ok:
        assert time.monotonic() < deadline, "the finished transfer was never counted"
        time.sleep(0.02)
    assert metrics.counters.get("bootsvc_tftp_bytes_total") - before_bytes == len(data) == 300000

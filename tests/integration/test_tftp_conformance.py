"""TFTP conformance (RFC 1350, 2347, 2348, 2349, 7440) on loopback, seen from outside bootsvc: real
clients (atftp, tftp-hpa's tftp, curl) and hand-built packets whose replies are decoded by scapy's TFTP
layers or plain struct code here - never by bootsvc's own codec. docs/conformance.md (TFTP) maps each
requirement to these tests."""

from __future__ import annotations

import hashlib
import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.tftp import TftpServer
from scapy.layers.tftp import TFTP
from scapy.packet import Raw

TEXT = b"line one\nline two\r\nbare CR\rend\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    (r / "nbp.efi").write_bytes(bytes((i * 7) % 256 for i in range(1_000_003)))
    (r / "exact.bin").write_bytes(b"e" * 4096)
    (r / "text.txt").write_bytes(TEXT)
    return r


@pytest.fixture
def srv(root: Path) -> Iterator[TftpServer]:
    s = TftpServer(root, timeout=5.0, retries=3)
    yield s
    s.close()


def rrq(name: str, mode: str = "octet", **opts: object) -> bytes:
    return (struct.pack("!H", 1) + name.encode() + b"\0" + mode.encode() + b"\0"
            + b"".join(f"{k}\0{v}\0".encode() for k, v in opts.items()))


def sock(timeout: float = 3.0) -> socket.socket:
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind(("127.0.0.1", 0))
    c.settimeout(timeout)
    return c


def first_reply(addr: tuple[str, int], packet: bytes) -> TFTP:
    c = sock()
    try:
        c.sendto(packet, addr)
        buf, peer = c.recvfrom(70000)
        c.sendto(struct.pack("!HH", 5, 0) + b"done\0", peer)  # end the transfer (RFC 2347: ERROR to an OACK)
    finally:
        c.close()
    return TFTP(buf)


def options_of(p: TFTP) -> dict[str, str]:
    assert p.op == 6, p.summary()
    return {o.oname.decode().lower(): o.value.decode() for o in p.options}


def fetch(addr: tuple[str, int], name: str, mode: str = "octet", **opts: object) -> tuple[bytes, dict[str, str], int]:
    """A hand-built client (RFC 1350 lock-step, or RFC 7440 windows when asked): data, OACK, DATA count."""
    c = sock()
    c.sendto(rrq(name, mode, **opts), addr)
    buf, peer = c.recvfrom(70000)
    oack: dict[str, str] = {}
    blksize, window = 512, 1
    if struct.unpack("!H", buf[:2])[0] == 6:
        oack = options_of(TFTP(buf))
        blksize, window = int(oack.get("blksize", 512)), int(oack.get("windowsize", 1))
        c.sendto(struct.pack("!HH", 4, 0), peer)
        buf, _ = c.recvfrom(70000)
    data = bytearray()
    expect, in_window, packets = 1, 0, 0
    while True:
        op, num = struct.unpack("!HH", buf[:4])
        assert op == 3, TFTP(buf).summary()
        packets += 1
        assert num == expect & 0xFFFF, (num, expect)
        data += buf[4:]
        in_window += 1
        last = len(buf) - 4 < blksize
        if last or in_window == window:
            c.sendto(struct.pack("!HH", 4, num), peer)
            in_window = 0
        if last:
            break
        expect += 1
        buf, p2 = c.recvfrom(70000)
        assert p2 == peer
    c.close()
    return bytes(data), oack, packets


# ---------------------------------------------------------------- RFC 2347 / 2348 / 2349 / 7440 options
@pytest.mark.parametrize("opts,want", [
    ({"tsize": 0}, {"tsize": "1000003"}),
    ({"timeout": 3}, {"timeout": "3"}),
    ({"windowsize": 8}, {"windowsize": "8"}),
    ({"blksize": 1468}, {"blksize": "1468"}),
    ({"blksize": 1024, "tsize": 0, "windowsize": 4, "timeout": 2},
     {"blksize": "1024", "tsize": "1000003", "windowsize": "4", "timeout": "2"}),
])
def test_oack_carries_only_requested_options(srv: TftpServer, opts: dict[str, object], want: dict[str, str]) -> None:
    assert options_of(first_reply(srv.addr, rrq("nbp.efi", **opts))) == want


def test_unknown_options_are_ignored(srv: TftpServer) -> None:
    p = first_reply(srv.addr, rrq("nbp.efi", multicast="", foo="bar"))
    assert p.op == 3 and p.block == 1  # nothing acceptable asked: plain RFC 1350, DATA 1
    assert options_of(first_reply(srv.addr, rrq("nbp.efi", foo="bar", tsize=0))) == {"tsize": "1000003"}


@pytest.mark.parametrize("asked,answer", [(8, "8"), (65464, "65464"), (65465, "65464"), (70000, "65464")])
def test_blksize_bounds(srv: TftpServer, asked: int, answer: str) -> None:
    assert options_of(first_reply(srv.addr, rrq("nbp.efi", blksize=asked)))["blksize"] == answer


@pytest.mark.parametrize("opts", [{"blksize": 7}, {"blksize": 0}, {"timeout": 0}, {"timeout": 256},
                                  {"windowsize": 0}, {"tsize": "x"}])
def test_out_of_range_options_are_ignored(srv: TftpServer, opts: dict[str, object]) -> None:
    p = first_reply(srv.addr, rrq("nbp.efi", **opts))
    assert p.op == 3 and p.block == 1 and len(p[Raw].load) == 512


def test_tsize_in_netascii_is_the_translated_size(srv: TftpServer) -> None:
    assert options_of(first_reply(srv.addr, rrq("text.txt", "netascii", tsize=0)))["tsize"] == str(
        len(TEXT.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")))


def test_timeout_option_sets_the_retransmission_timer(srv: TftpServer) -> None:
    """RFC 2349 §2: the timeout the client asks (1 s) is used, not the server's (5 s here)."""
    c = sock(timeout=4.0)
    c.sendto(rrq("nbp.efi", timeout=1), srv.addr)
    first, peer = c.recvfrom(2048)
    t0 = time.monotonic()
    again, _ = c.recvfrom(2048)
    waited = time.monotonic() - t0
    c.sendto(struct.pack("!HH", 5, 0) + b"bye\0", peer)
    c.close()
    assert again == first and 0.7 <= waited <= 2.0, waited


def test_windowsize_transfer_and_rollover(srv: TftpServer, root: Path) -> None:
    """RFC 7440: windows of 16 blocks, and the block number wraps past 65535 at blksize 8."""
    data, oack, packets = fetch(srv.addr, "nbp.efi", blksize=8, windowsize=16)
    assert oack == {"blksize": "8", "windowsize": "16"}
    assert data == (root / "nbp.efi").read_bytes() and packets == 1_000_003 // 8 + 1 > 65536


def test_final_block_empty_when_size_is_a_multiple(srv: TftpServer) -> None:
    """RFC 1350 §6: 4096 bytes at 1024 per block end with a zero-length DATA 5."""
    data, _, packets = fetch(srv.addr, "exact.bin", blksize=1024)
    assert data == b"e" * 4096 and packets == 5


def test_netascii_is_translated(srv: TftpServer) -> None:
    """RFC 1350 §5 / RFC 764: LF -> CR LF, CR -> CR NUL on the wire."""
    data, _, _ = fetch(srv.addr, "text.txt", "netascii")
    assert data == b"line one\r\nline two\r\0\r\nbare CR\r\0end\r\n"
    data2, _, _ = fetch(srv.addr, "text.txt", "NetASCII")  # modes are case-insensitive (RFC 1350 §5)
    assert data2 == data


def test_mail_mode_refused_clearly(srv: TftpServer) -> None:
    p = first_reply(srv.addr, rrq("text.txt", "mail"))
    assert p.op == 5 and p.errorcode == 4 and b"mode" in p.errormsg


def test_unknown_tid_gets_error5_without_disturbing_the_transfer(srv: TftpServer) -> None:
    c = sock()
    c.sendto(rrq("exact.bin"), srv.addr)
    d1, peer = c.recvfrom(2048)
    stranger = sock()
    stranger.sendto(struct.pack("!HH", 4, 1), peer)  # RFC 1350 §4: another TID's ACK for our block
    err = TFTP(stranger.recvfrom(2048)[0])
    stranger.close()
    assert err.op == 5 and err.errorcode == 5
    c.sendto(struct.pack("!HH", 4, 1), peer)
    d2 = TFTP(c.recvfrom(2048)[0])
    c.close()
    assert TFTP(d1).block == 1 and d2.op == 3 and d2.block == 2


# ---------------------------------------------------------------- real clients
def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.mark.skipif(shutil.which("atftp") is None, reason="atftp not installed (Makefile APT_TEST)")
@pytest.mark.parametrize("opts", [[], ["blksize 1468", "tsize 0"], ["blksize 1024", "windowsize 8"]])
def test_atftp_downloads(srv: TftpServer, root: Path, tmp_path: Path, opts: list[str]) -> None:
    out = tmp_path / "out"
    cmd = ["atftp", *[a for o in opts for a in ("--option", o)], "-g", "-r", "nbp.efi", "-l", str(out),
           "127.0.0.1", str(srv.port)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert _sha(out) == _sha(root / "nbp.efi")


@pytest.mark.skipif(shutil.which("atftp") is None, reason="atftp not installed (Makefile APT_TEST)")
def test_atftp_netascii_round_trip(srv: TftpServer, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = subprocess.run(["atftp", "--option", "mode netascii", "-g", "-r", "text.txt", "-l", str(out), "127.0.0.1",
                        str(srv.port)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == TEXT  # the client's reverse translation gives back the bytes on disk


@pytest.mark.skipif(shutil.which("tftp") is None, reason="tftp-hpa not installed")
@pytest.mark.parametrize("mode", ["octet", "netascii"])
def test_tftp_hpa_downloads(srv: TftpServer, root: Path, tmp_path: Path, mode: str) -> None:
    name = "nbp.efi" if mode == "octet" else "text.txt"
    out = tmp_path / "out"
    r = subprocess.run(["tftp", "-m", mode, "127.0.0.1", str(srv.port), "-c", "get", name, str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "Error" not in r.stdout + r.stderr, r.stdout + r.stderr
    assert _sha(out) == _sha(root / name)


@pytest.mark.parametrize("blksize", [None, 512, 1468, 8192])
def test_curl_downloads(srv: TftpServer, root: Path, tmp_path: Path, blksize: int | None) -> None:
    out = tmp_path / "out"
    extra = ["--tftp-blksize", str(blksize)] if blksize else []
    r = subprocess.run(["curl", "-sS", "--max-time", "60", *extra, "-o", str(out),
                        f"tftp://127.0.0.1:{srv.port}/nbp.efi"], capture_output=True, text=True, timeout=70)
    assert r.returncode == 0, r.stderr
    assert _sha(out) == _sha(root / "nbp.efi")


@pytest.mark.skipif(shutil.which("atftp") is None, reason="atftp not installed (Makefile APT_TEST)")
def test_atftp_sees_errors_for_missing_and_upload(srv: TftpServer, tmp_path: Path) -> None:
    r = subprocess.run(["atftp", "--trace", "-g", "-r", "nope.efi", "-l", str(tmp_path / "o"), "127.0.0.1",
                        str(srv.port)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "File not found" in r.stdout + r.stderr
    (tmp_path / "up").write_bytes(b"x")
    r = subprocess.run(["atftp", "--trace", "-p", "-l", str(tmp_path / "up"), "-r", "up", "127.0.0.1",
                        str(srv.port)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0 and "Access violation" in r.stdout + r.stderr

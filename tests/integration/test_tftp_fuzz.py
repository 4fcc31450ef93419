"""100,000 fuzzed TFTP packets against a server on loopback: no crash, no traceback in its log, no
internal error counted, and it still serves a real client (curl) afterwards. The counts are printed.

Packets: scapy's ``fuzz()`` of TFTP layers (random opcodes and fields), seeded mutations of valid
requests (bit flips, truncation, junk tails, odd and duplicated options, overlong values, every
mode), random bytes, stray DATA/ACK/ERROR/OACK on the request port, and fuzzed packets sent to the
transfer TIDs the server opened (wrong block numbers, short packets, errors). Bounded: a fixed count,
paced in bursts; the server subprocess stops on EOF and is killed by PID otherwise."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from scapy.layers.tftp import TFTP, TFTP_ACK, TFTP_DATA, TFTP_ERROR, TFTP_OACK, TFTP_RRQ, TFTP_WRQ
from scapy.packet import fuzz

REPO = Path(__file__).resolve().parents[2]
TOTAL = 100_000
SCAPY = 3_000  # scapy's fuzz() costs ~1 ms a packet; the rest come from the seeded mutator

SERVER = r"""
import json, logging, sys, threading
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
from pathlib import Path
from bootsvc import tftp
svc = tftp.TftpService("127.0.0.1", 0, tftp.Resolver(Path(sys.argv[2])), timeout=1.0, retries=2, max_transfers=200)
print(svc.port, flush=True)
stop = threading.Event()
th = threading.Thread(target=svc.serve, args=(stop,), daemon=True)
th.start()
sys.stdin.read()
alive = th.is_alive()
stop.set()
th.join(timeout=10)
print(json.dumps({"alive": alive, "refused": svc.refused, "evicted": svc.evicted, "internal": svc.internal_errors,
                  "transfers": svc.completed}), flush=True)
"""

NAMES = [b"nbp.efi", b"small.txt", b"/nbp.efi", b"missing.efi", b"../etc/passwd", b"grub/grub.cfg-52:54:00:00:00:01",
         b"a" * 300, b"", b"\xff\xfe", b"nbp.efi\x00x", b"%2e%2e/x", b"dir", b"dir/"]
MODES = [b"octet", b"OCTET", b"netascii", b"NetAscii", b"mail", b"binary", b"", b"\xff" * 10]
OPTS = [b"blksize", b"BLKSIZE", b"tsize", b"timeout", b"windowsize", b"multicast", b"rollover", b"x" * 100, b""]
VALUES = [b"0", b"1", b"7", b"8", b"512", b"1468", b"65464", b"65465", b"99999999999999999999999", b"-1", b"abc",
          b"", b"\xff", b"1e3", b" 512", b"0x200", b"65535", b"65536", b"255", b"256"]


def mutated(rng: random.Random) -> bytes:
    kind = rng.randrange(7)
    if kind == 0:
        return rng.randbytes(rng.randrange(0, 700))
    if kind == 1:  # stray opcodes on the request port, and unknown ones
        return struct.pack("!HH", rng.choice([3, 4, 5, 6, 0, 7, 9, 0xFFFF]), rng.randrange(65536)) + rng.randbytes(
            rng.randrange(0, 40))
    op = rng.choice([1, 1, 1, 2])
    body = rng.choice(NAMES) + b"\0" + rng.choice(MODES) + b"\0"
    for _ in range(rng.randrange(0, 6)):
        body += rng.choice(OPTS) + b"\0" + rng.choice(VALUES) + b"\0"
    pkt = bytearray(struct.pack("!H", op) + body)
    if kind == 3 and pkt:  # bit flips
        for _ in range(rng.randrange(1, 6)):
            i = rng.randrange(len(pkt))
            pkt[i] ^= 1 << rng.randrange(8)
    elif kind == 4:  # truncated
        pkt = pkt[: rng.randrange(len(pkt) + 1)]
    elif kind == 5:  # junk tail, maybe oversized
        pkt += rng.randbytes(rng.randrange(0, 600))
    return bytes(pkt)


def scapy_fuzzed(rng: random.Random) -> bytes:
    layer = rng.choice([TFTP_RRQ, TFTP_WRQ, TFTP_DATA, TFTP_ACK, TFTP_ERROR, TFTP_OACK])
    return bytes(fuzz(TFTP() / layer()))


def test_100k_fuzzed_packets(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "dir").mkdir(parents=True)
    (root / "nbp.efi").write_bytes(os.urandom(200_000))
    (root / "small.txt").write_bytes(b"a\nb\rc\r\n" * 50)
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(REPO), str(root)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    counts: collections.Counter[str] = collections.Counter()
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        server = ("127.0.0.1", port)
        rng = random.Random(0x7F7F)
        fz = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        fz.bind(("127.0.7.1", 0))  # the fuzzer's own address may hit the per-client cap; curl is 127.0.0.1
        fz.setblocking(False)
        tids: list[tuple[str, int]] = []
        sent = 0
        t0 = time.monotonic()
        while sent < TOTAL:
            for _ in range(200):
                r = rng.random()
                dest = server
                if sent < SCAPY:
                    pkt, kind = scapy_fuzzed(rng), "scapy"
                elif tids and r < 0.15:  # to a transfer's TID
                    dest = rng.choice(tids)
                    pkt = rng.choice([struct.pack("!HH", 4, rng.randrange(65536)), b"\x00\x04", b"\x00",
                                      struct.pack("!HH", 5, rng.randrange(10)) + b"x\0",
                                      struct.pack("!HH", 3, 1) + rng.randbytes(20), rng.randbytes(rng.randrange(30))])
                    kind = "to_tid"
                else:
                    pkt, kind = mutated(rng), "mutated"
                try:
                    fz.sendto(pkt, dest)
                except OSError:
                    counts["send_error"] += 1
                counts[kind] += 1
                sent += 1
            while True:  # replies: remember the transfers' TIDs (new ones replace old ones)
                try:
                    buf, peer = fz.recvfrom(70000)
                except BlockingIOError:
                    break
                counts[f"reply_op{buf[1] if len(buf) > 1 else '?'}"] += 1
                if peer[1] != port and len(buf) > 1 and buf[1] in (3, 6):
                    tids.append(peer)
                    del tids[:-50]
            time.sleep(0.002)
        elapsed = time.monotonic() - t0
        fz.close()
        out = tmp_path / "after"
        r = subprocess.run(["curl", "-sS", "--max-time", "30", "-o", str(out), f"tftp://127.0.0.1:{port}/nbp.efi"],
                           capture_output=True, text=True, timeout=40)
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256((root / "nbp.efi").read_bytes()).digest()
    finally:
        if proc.poll() is None:
            stdout, stderr = proc.communicate(input="", timeout=30)
        else:
            stdout, stderr = proc.communicate(timeout=5)
        if proc.poll() is None:
            proc.kill()
    stats = json.loads(stdout.strip().splitlines()[-1])
    print(f"\nfuzz: {sent} packets in {elapsed:.1f} s: {dict(sorted(counts.items()))}\nserver: {stats}")
    assert "Traceback" not in stderr and "internal error" not in stderr, stderr[-3000:]
    assert stats["alive"] and stats["internal"] == 0
    assert sum(counts[k] for k in ("scapy", "mutated", "to_tid")) == TOTAL

#!/usr/bin/env python3
"""In-process DORA micro-benchmark of the bootsvc DHCP packet path (no sockets, no namespaces).

Feeds perfdhcp-like relayed DISCOVER/REQUEST datagrams (giaddr set, options 53/55, REQUEST with
50/54) through ``DhcpService.handle`` and group-commits the pending ACKs to a real SQLite WAL file
every ``--batch`` requests, like the loop does at ~4 000 DORA/s with a 10 ms window. Replies go to
a socket stand-in that only counts them. Reports process CPU µs per DORA (median of ``--repeat``
rounds, each with fresh clients) so codec/decide/store changes can be compared in seconds; the
netns bench (``run.py``) stays the number of record.

``--prefill N`` binds N other clients first (untimed), so the cost per DORA can be compared with
1k vs 20k bound leases in the index (it must not grow with the lease table).

usage: python bench/dhcp/micro.py [--n 5000] [--repeat 5] [--batch 40] [--prefill 0] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import os
import pstats
import statistics
import struct
import tempfile
import time
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from bootsvc import config as cfgmod
from bootsvc import db
from bootsvc.config import DhcpListener
from bootsvc.dhcp import decide as dec
from bootsvc.dhcp.server import DhcpService, RateLimiter
from bootsvc.models import Base

GI = bytes((198, 18, 0, 2))
SID = bytes((198, 18, 0, 1))
_HDR = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s4s")


def dgram(mt: int, xid: int, mac: bytes, extra: bytes = b"") -> bytes:
    hdr = _HDR.pack(1, 1, 6, 1, xid, 0, 0, bytes(4), bytes(4), bytes(4), GI, mac.ljust(16, b"\0"),
                    bytes(64), bytes(128), b"c\x82Sc")
    opts = bytes((53, 1, mt)) + extra + bytes((55, 7, 1, 28, 2, 3, 15, 6, 12)) + b"\xff"
    return hdr + opts


class _Sock:
    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def sendto(self, data: bytes, addr: Any) -> int:
        self.sent.append(data)
        return len(data)


def make_service(d: Path) -> DhcpService:
    cfg = cfgmod.from_mapping({
        "database": {"url": f"sqlite:///{d / 'micro.db'}"},
        "networks": [{"name": "bench", "zone": 0, "cidr": "198.18.0.0/16", "gateway": "198.18.0.1",
                      "pools": [{"start": "198.18.1.0", "end": "198.18.255.254"}], "relays": ["198.18.0.2"],
                      "boot_server": "198.18.0.1", "lease_seconds": 43200}],
        "dhcp": {"unknown_clients": "serve", "per_mac_rate": 100, "per_relay_rate": 1000000},
    }, env={})
    e = db.make_engine(cfg.database.url)
    Base.metadata.create_all(e)
    svc = DhcpService(cfg, DhcpListener(interface="lo", address=IPv4Address("198.18.0.1")),
                      db.session_factory(e))
    svc.networks = [dec.NetworkView.from_config(n) for n in cfg.networks]
    svc.local = []
    svc.policy = dec.Policy(unknown_clients="serve", my_ids=frozenset({SID}))
    svc.sock = _Sock()  # type: ignore[assignment]
    svc.mac_limit = RateLimiter(100)
    svc.store.load()
    if hasattr(svc, "_prepare"):
        svc._prepare()
    # what DhcpService.start() does after set-up
    gc.collect()
    gc.freeze()
    gc.set_threshold(100_000, 50, 100)
    return svc


def one_round(svc: DhcpService, base: int, n: int, batch: int) -> float:
    sock: _Sock = svc.sock  # type: ignore[assignment]
    discovers = [dgram(1, base + i, b"\x02\xbd" + (base + i).to_bytes(4, "big")) for i in range(n)]
    t0 = time.process_time()
    pending: list[Any] = []
    handle = svc.handle
    for i, data in enumerate(discovers):
        handle(data, (), None)
        offer = sock.sent[-1]
        yi = offer[16:20]
        req = dgram(3, base + i, b"\x02\xbd" + (base + i).to_bytes(4, "big"),
                    bytes((50, 4)) + yi + bytes((54, 4)) + SID)
        p = handle(req, (), None)
        if p is not None:
            pending.append(p)
        if len(pending) >= batch:
            svc._flush(pending)
            pending = []
    if pending:
        svc._flush(pending)
    t1 = time.process_time()
    acks = sum(1 for s in sock.sent[-2 * n:] if s[242] == 5)
    assert acks == n, (acks, n, svc.counters())
    sock.sent.clear()
    # request bytes are built inside the timed loop; subtract their cost below
    return (t1 - t0) / n * 1e6


def req_build_cost(n: int) -> float:
    t0 = time.process_time()
    for i in range(n):
        dgram(3, i, b"\x02\xbd" + i.to_bytes(4, "big"), bytes((50, 4)) + b"abcd" + bytes((54, 4)) + SID)
    return (time.process_time() - t0) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--prefill", type=int, default=0, help="bound leases to hold before the timed rounds")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--log-info", type=int, default=None, metavar="RATE",
                    help="log decisions at INFO to /dev/null with this per-second INFO budget")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bdpmicro-") as td:
        svc = make_service(Path(td))
        if a.log_info is not None:
            import logging

            logging.basicConfig(level=logging.INFO, filename=os.devnull,
                                format="%(asctime)s %(levelname)s %(message)s")
            svc._info = True
            svc.log_rate = a.log_info
        if a.prefill:
            one_round(svc, 10_000_000, a.prefill, a.batch)  # bound leases held during the rounds
        one_round(svc, 1_000_000, 500, a.batch)  # warm-up
        if a.profile:
            pr = cProfile.Profile()
            pr.enable()
            one_round(svc, 2_000_000, a.n, a.batch)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)
            return 0
        res = [one_round(svc, 3_000_000 + r * a.n, a.n, a.batch) for r in range(a.repeat)]
        rb = req_build_cost(a.n)
        svc.store.close()
    res = [x - rb for x in res]
    print(f"µs/DORA (process CPU, handle+commit+encode, no syscalls): median {statistics.median(res):.1f} "
          f"[{min(res):.1f}-{max(res):.1f}] over {a.repeat}x{a.n}, batch {a.batch}, prefill {a.prefill}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

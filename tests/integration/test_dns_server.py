"""bootsvc.dns.run on loopback: UDP and TCP answers from a real (SQLite) database, refreshed as leases change."""

from __future__ import annotations

import datetime as dt
import socket
import threading
import time
from pathlib import Path

from dnslib import EDNS0, QTYPE, RCODE, DNSRecord

from bootsvc import config as config_mod
from bootsvc import dns, inventory, metrics
from bootsvc.db import make_engine, session_factory
from bootsvc.models import Base, Lease


def _free_port() -> int:
    """A loopback port free for UDP *and* TCP: the DNS service binds both on it (TCP without
    SO_REUSEADDR). A port picked for UDP alone collided with another socket's TCP port in CI."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = int(u.getsockname()[1])
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no loopback port free for both UDP and TCP")


def test_runner_udp_tcp_and_refresh(tmp_path: Path) -> None:
    port = _free_port()
    cfg = config_mod.from_mapping({
        "database": {"url": f"sqlite:///{tmp_path}/db.sqlite"},
        "site": {"domain": "prov.test"},
        "networks": [{"name": "oob", "zone": 0, "cidr": "10.77.0.0/24", "boot_server": "10.77.0.1"}],
        "listeners": {"dns": [{"address": "127.0.0.1", "port": port}]},
    }, env={})
    engine = make_engine(cfg.database.url)
    Base.metadata.create_all(engine)
    sessions = session_factory(engine)
    with sessions() as s:
        nodes = inventory.enroll(s, [
            inventory.NodeSpec("dpu-1", "dpu", "S1", nics=[
                inventory.NicSpec("52:54:00:00:00:01", "oob"),
                inventory.NicSpec("52:54:00:00:00:02", "bmc", "10.77.0.11")]),
            inventory.NodeSpec("host-1", "host", "S2", nics=[inventory.NicSpec("52:54:00:00:00:03", "host-pf")]),
        ], actor="t")
        dpu_id, host_id = nodes[0].id, nodes[1].id
    stop = threading.Event()
    t = threading.Thread(target=dns.run, args=(cfg, 0, stop), kwargs={"refresh_seconds": 0.2}, daemon=True)
    t.start()
    try:
        def ask(name: str, qtype: str = "A", tcp: bool = False) -> DNSRecord:
            deadline = time.monotonic() + 5
            while True:
                try:
                    q = DNSRecord.question(name, qtype)
                    q.add_ar(EDNS0(udp_len=1232))
                    return DNSRecord.parse(q.send("127.0.0.1", port, tcp=tcp, timeout=1))
                except (OSError, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)

        assert str(ask("dpu-1-bmc.prov.test").rr[0].rdata) == "10.77.0.11"
        assert ask("dpu-1.prov.test").header.rcode == RCODE.NOERROR  # exists (has a NIC), no address yet
        assert ask("nobody.prov.test", tcp=True).header.rcode == RCODE.NXDOMAIN
        assert ask("example.org").header.rcode == RCODE.REFUSED
        with sessions() as s:
            s.add(Lease(vrf="", network="oob", address="10.77.0.50", mac="52:54:00:00:00:01", node_id=dpu_id,
                        state="bound", expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)))
            s.commit()
        deadline = time.monotonic() + 5
        while not ask("dpu-1.prov.test").rr:
            assert time.monotonic() < deadline, "refresh did not pick up the lease"
            time.sleep(0.05)
        assert str(ask("dpu-1.prov.test", tcp=True).rr[0].rdata) == "10.77.0.50"
        ptr = ask("50.0.77.10.in-addr.arpa", "PTR")
        assert ptr.rr[0].rtype == QTYPE.PTR and str(ptr.rr[0].rdata) == "dpu-1.prov.test."
        # the refresher rebuilds only when the database moved - or when a lease in the zone expires,
        # which writes nothing: the record must still go within a few refreshes, not the minute
        with sessions() as s:
            s.add(Lease(vrf="", network="oob", address="10.77.0.51", mac="52:54:00:00:00:03", node_id=host_id,
                        state="bound", expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=2)))
            s.commit()
        deadline = time.monotonic() + 5
        while not ask("host-1.prov.test").rr:
            assert time.monotonic() < deadline, "refresh did not pick up the second lease"
            time.sleep(0.05)
        deadline = time.monotonic() + 8
        while ask("host-1.prov.test").rr:
            assert time.monotonic() < deadline, "the expired lease is still in the zone"
            time.sleep(0.1)
        # the runner's counters reach the process registry that /metrics renders
        seen = {dict(x.labels).get("event"): x.value for x in metrics.counters.snapshot()
                if x.name == "bootsvc_dns_events_total"}
        assert seen.get("udp_queries", 0) >= 5 and seen.get("tcp_queries", 0) >= 2, seen
    finally:
        stop.set()
        t.join(timeout=5)
        engine.dispose()
    assert not t.is_alive()

"""Two bootsvc lease stores (two instances) on one PostgreSQL never lease the same (VRF, address):
the unique constraint plus the guarded upsert make the database the arbiter, the loser learns it
from the commit, marks the address taken and retries with the next free one."""

from __future__ import annotations

import threading
import time
from ipaddress import IPv4Address, IPv4Network

import pytest
from sqlalchemy import text

from bootsvc import db
from bootsvc.config import AddressRange, NetworkConfig
from bootsvc.dhcp.decide import LeaseIntent
from bootsvc.dhcp.leases import LeaseStore
from bootsvc.dhcp.packet import ip_bytes
from bootsvc.models import Base

pytestmark = pytest.mark.postgres

NETS = [
    NetworkConfig(name="pod", zone=0, cidr=IPv4Network("198.18.40.0/24"), gateway=IPv4Address("198.18.40.1"),
                  pools=(AddressRange(start=IPv4Address("198.18.40.10"), end=IPv4Address("198.18.40.250")),),
                  boot_server=IPv4Address("198.18.40.1")),
]


def intent(mac: str, addr: bytes, now: float, vrf: str = "", network: str = "pod") -> LeaseIntent:
    return LeaseIntent(action="bind", vrf=vrf, network=network, address=addr, mac=mac, expires_at=now + 600)


def bind_all(store: LeaseStore, macs: list[str], barrier: threading.Barrier, stats: dict[str, int]) -> None:
    """What a server does for each REQUEST it ACKs: pick, stage, group-commit; on conflict NAK and
    the client comes back (here: retry at once with the next candidate)."""
    todo = list(macs)
    barrier.wait()
    for _ in range(20):
        if not todo:
            return
        now = time.time()
        batch = []
        for mac in todo:
            addr = store.candidate("", "pod", mac, now)
            assert addr is not None
            batch.append(store.stage(intent(mac, addr, now), now))
        ok = store.commit(batch, now)
        nxt = []
        for (it, _prev), good in zip(batch, ok, strict=True):
            if not good:
                stats["conflicts"] += 1
                store.conflict(it, now)
                nxt.append(it.mac)
        todo = nxt
        store.refresh()
    raise AssertionError(f"{len(todo)} clients never got an address")


def test_two_instances_never_lease_the_same_address(pg_url: str) -> None:
    engine = db.make_engine(pg_url)
    Base.metadata.create_all(engine)
    a, b = LeaseStore(engine, NETS), LeaseStore(db.make_engine(pg_url), NETS)
    a.load()
    b.load()
    macs_a = [f"02:aa:00:00:00:{i:02x}" for i in range(100)]
    macs_b = [f"02:bb:00:00:00:{i:02x}" for i in range(100)]
    barrier = threading.Barrier(2)
    stats_a, stats_b = {"conflicts": 0}, {"conflicts": 0}
    errs: list[BaseException] = []

    def run(store: LeaseStore, macs: list[str], stats: dict[str, int]) -> None:
        try:
            bind_all(store, macs, barrier, stats)
        except BaseException as e:  # surfaced below
            errs.append(e)

    ts = [threading.Thread(target=run, args=(a, macs_a, stats_a)),
          threading.Thread(target=run, args=(b, macs_b, stats_b))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errs, errs
    # both started from an empty index and picked the same first addresses: one side must have lost
    assert stats_a["conflicts"] + stats_b["conflicts"] > 0
    with engine.connect() as c:
        rows = c.execute(text("SELECT vrf, address, mac FROM leases WHERE state = 'bound'")).all()
    assert len(rows) == 200
    assert len({(r.vrf, r.address) for r in rows}) == 200
    assert {r.mac for r in rows} == set(macs_a) | set(macs_b)
    a.close()
    b.close()


def test_same_address_in_two_vrfs_and_guarded_takeover(pg_url: str) -> None:
    engine = db.make_engine(pg_url)
    Base.metadata.create_all(engine)
    nets = [*NETS, NetworkConfig(name="blue", zone=1, vrf="blue", cidr=IPv4Network("198.18.40.0/24"),
                                 pools=NETS[0].pools, boot_server=IPv4Address("198.18.40.1"))]
    s = LeaseStore(engine, nets)
    now = time.time()
    addr = ip_bytes("198.18.40.10")
    ok = s.commit([s.stage(intent("02:00:00:00:00:01", addr, now), now),
                   s.stage(intent("02:00:00:00:00:02", addr, now, vrf="blue", network="blue"), now)], now)
    assert ok == [True, True]
    # a third client cannot take a live lease, even through a store that does not know about it
    other = LeaseStore(engine, nets)
    assert other.commit([(intent("02:00:00:00:00:03", addr, now), None)], now) == [False]
    # after a RELEASE the address may be re-used
    rel = LeaseIntent(action="release", vrf="", network="pod", address=addr, mac="02:00:00:00:00:01",
                      expires_at=now)
    assert s.commit([(rel, None)], now) == [True]
    assert other.commit([(intent("02:00:00:00:00:03", addr, now), None)], now) == [True]
    with engine.connect() as c:
        rows = c.execute(text("SELECT vrf, mac, state FROM leases ORDER BY vrf")).all()
    assert [(r.vrf, r.mac, r.state) for r in rows] == [("", "02:00:00:00:00:03", "bound"),
                                                        ("blue", "02:00:00:00:00:02", "bound")]
    s.close()
    other.close()

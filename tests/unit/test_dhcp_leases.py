"""Lease store (allocation, reservations, quarantine, durable commits on SQLite), the server's packet
path without sockets (hostile input never raises; counters per drop reason; an ACK is only sent after
its commit), and the ``bootsvc leases`` CLI."""

from __future__ import annotations

import json
import sqlite3
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from bootsvc import config as cfgmod
from bootsvc import db
from bootsvc.config import AddressRange, DhcpListener, NetworkConfig
from bootsvc.dhcp import decide as dec
from bootsvc.dhcp.decide import LeaseIntent
from bootsvc.dhcp.leases import LeaseStore
from bootsvc.dhcp.packet import Packet, encode_suboptions, ip_bytes, ip_str, parse
from bootsvc.dhcp.server import DhcpService, RateLimiter
from bootsvc.models import Base

NET = NetworkConfig(
    name="lan", zone=0, cidr=IPv4Network("198.18.50.0/24"), gateway=IPv4Address("198.18.50.1"),
    pools=(AddressRange(start=IPv4Address("198.18.50.10"), end=IPv4Address("198.18.50.14")),),
    reserved=(AddressRange(start=IPv4Address("198.18.50.11"), end=IPv4Address("198.18.50.11")),),
    boot_server=IPv4Address("198.18.50.1"),
)


@pytest.fixture
def engine(tmp_path: Path) -> Any:
    e = db.make_engine(f"sqlite:///{tmp_path / 'b.db'}")
    Base.metadata.create_all(e)
    return e


def bind(mac: str, addr: str, now: float, action: str = "bind") -> LeaseIntent:
    return LeaseIntent(action=action, vrf="", network="lan", address=ip_bytes(addr), mac=mac,  # type: ignore[arg-type]
                       expires_at=now + 600)


def test_allocation_skips_reserved_ranges_reservations_and_live_leases(engine: Any) -> None:
    s = LeaseStore(engine, [NET])
    s.set_reservations([("", "198.18.50.12", "02:00:00:00:00:99")])
    now = 1000.0
    got = []
    for i in range(3):
        mac = f"02:00:00:00:00:0{i}"
        a = s.candidate("", "lan", mac, now)
        assert a is not None
        s.offer(bind(mac, ip_str(a), now, "offer"), now)
        got.append(ip_str(a))
    # .11 is a config-reserved range, .12 belongs to another node's fixed address
    assert got == ["198.18.50.10", "198.18.50.13", "198.18.50.14"]
    assert s.candidate("", "lan", "02:00:00:00:00:05", now) is None  # pool exhausted
    # the reservation holder gets its address; an offer from before is re-offered to its client
    assert s.candidate("", "lan", "02:00:00:00:00:99", now, reserved=ip_bytes("198.18.50.12")) == \
        ip_bytes("198.18.50.12")
    assert s.candidate("", "lan", "02:00:00:00:00:01", now) == ip_bytes("198.18.50.13")
    # offers expire after the offer TTL and the addresses come back
    later = now + s.offer_ttl + 1
    assert s.candidate("", "lan", "02:00:00:00:00:05", later) == ip_bytes("198.18.50.10")


def test_scan_of_a_full_pool_is_bounded(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool held by a flood of other MACs: each DISCOVER looks at no more than SCAN_BUDGET
    addresses (no offer: pool exhausted) and the next one goes on from there, so the one free
    address far from the cursor is still found, after a few DISCOVERs."""
    from bootsvc.dhcp import leases as leases_mod

    big = NetworkConfig(name="lan", zone=0, cidr=IPv4Network("198.18.0.0/16"),
                        pools=(AddressRange(start=IPv4Address("198.18.1.0"), end=IPv4Address("198.18.20.255")),))
    s = LeaseStore(engine, [big])
    now = 1000.0
    size = s.pools["lan"].size
    assert size == 5120 and size > 3 * leases_mod.SCAN_BUDGET
    free_at = size - 10
    for i in range(size):
        if i != free_at:
            a = ip_str((int(IPv4Address("198.18.1.0")) + i).to_bytes(4, "big"))
            s.offer(bind(f"02:aa:00:00:{i >> 8:02x}:{i & 0xFF:02x}", a, now, "offer"), now)
    looked = []
    real_free = s._free
    monkeypatch.setattr(s, "_free", lambda *a: looked.append(1) or real_free(*a))
    got = []
    for _ in range(size // leases_mod.SCAN_BUDGET + 1):
        looked.clear()
        got.append(s.candidate("", "lan", "02:00:00:00:00:01", now))
        assert len(looked) <= leases_mod.SCAN_BUDGET
        if got[-1] is not None:
            break
    assert got[0] is None
    assert got[-1] == (int(IPv4Address("198.18.1.0")) + free_at).to_bytes(4, "big")


def test_commit_is_durable_and_guarded(engine: Any, tmp_path: Path) -> None:
    s = LeaseStore(engine, [NET])
    now = time.time()
    ok = s.commit([s.stage(bind("02:00:00:00:00:01", "198.18.50.10", now), now)], now)
    assert ok == [True]
    # a second store (another instance) that does not know the lease cannot take the address
    other = LeaseStore(engine, [NET])
    assert other.commit([(bind("02:00:00:00:00:02", "198.18.50.10", now), None)], now) == [False]
    # ... but it sees it after load(), and allocates around it
    assert other.load() == 1
    assert other.candidate("", "lan", "02:00:00:00:00:02", now) == ip_bytes("198.18.50.12")
    con = sqlite3.connect(tmp_path / "b.db")
    assert con.execute("SELECT mac, state FROM leases").fetchall() == [("02:00:00:00:00:01", "bound")]
    # moving to another address releases the old one in the same transaction
    s.commit([s.stage(bind("02:00:00:00:00:01", "198.18.50.13", now), now)], now)
    rows = dict(con.execute("SELECT address, state FROM leases").fetchall())
    assert rows == {"198.18.50.10": "released", "198.18.50.13": "bound"}
    s.close()
    other.close()


def test_decline_quarantines_address(engine: Any) -> None:
    s = LeaseStore(engine, [NET], quarantine_seconds=100)
    now = time.time()
    s.commit([s.stage(bind("02:00:00:00:00:01", "198.18.50.10", now), now)], now)
    s.commit([s.stage(bind("02:00:00:00:00:01", "198.18.50.10", now, "decline"), now)], now)
    assert s.candidate("", "lan", "02:00:00:00:00:01", now) != ip_bytes("198.18.50.10")
    assert s.held_by_other("", ip_bytes("198.18.50.10"), "02:00:00:00:00:07", now)
    assert not s.held_by_other("", ip_bytes("198.18.50.10"), "02:00:00:00:00:07", now + 101)
    fresh = LeaseStore(engine, [NET], quarantine_seconds=100)
    fresh.load()
    assert fresh.held_by_other("", ip_bytes("198.18.50.10"), "02:00:00:00:00:07", now)


def test_rate_limiter_bounds_bursts_and_memory() -> None:
    r = RateLimiter(rate=2.0, burst=3.0, max_keys=10)
    assert [r.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert r.allow("a", 0.6)  # refilled 1.2 tokens
    for i in range(20):
        r.allow(i, 100.0)
    assert len(r.buckets) <= 10


# ---- the packet path without sockets ------------------------------------------------------------


def service(tmp_path: Path, unknown: str = "serve") -> tuple[DhcpService, list[tuple[Packet, Any]]]:
    cfg = cfgmod.from_mapping({
        "database": {"url": f"sqlite:///{tmp_path / 's.db'}"},
        "networks": [{"name": "lan", "zone": 0, "cidr": "198.18.50.0/24", "gateway": "198.18.50.1",
                      "pools": [{"start": "198.18.50.10", "end": "198.18.50.200"}], "relays": ["198.18.60.1"],
                      "boot_server": "198.18.50.1"}],
        "dhcp": {"unknown_clients": unknown, "per_mac_rate": 5},
    }, env={})
    e = db.make_engine(cfg.database.url)
    Base.metadata.create_all(e)
    svc = DhcpService(cfg, DhcpListener(interface="lo", address=IPv4Address("198.18.50.1")), db.session_factory(e),
                      clock=lambda: 1000.0)
    svc.networks = [dec.NetworkView.from_config(n) for n in cfg.networks]
    svc.local = list(svc.networks)
    svc.policy = dec.Policy(unknown_clients=unknown, my_ids=frozenset({ip_bytes("198.18.50.1")}))
    sent: list[tuple[Packet, Any]] = []
    svc._send = lambda r, d, q: sent.append((r, d))  # type: ignore[method-assign]
    return svc, sent


def req(mt: int, mac: bytes, **opts: bytes) -> bytes:
    o = {53: bytes((mt,))}
    o.update({int(k[1:]): v for k, v in opts.items()})
    return Packet(op=1, xid=0x42, chaddr=mac.ljust(16, b"\0"), options=o, flags=0x8000).encode()


def test_ack_only_after_commit(tmp_path: Path) -> None:
    svc, sent = service(tmp_path)
    mac = bytes.fromhex("02bd00000001")
    assert svc.handle(req(1, mac)) is None
    offer = sent[-1][0]
    assert offer.msg_type == 2
    pend = svc.handle(req(3, mac, o50=offer.yiaddr, o54=ip_bytes("198.18.50.1")))
    assert pend is not None and len(sent) == 1  # the ACK waits for the commit
    con = sqlite3.connect(tmp_path / "s.db")
    assert con.execute("SELECT count(*) FROM leases").fetchone()[0] == 0
    svc._flush([pend])
    assert con.execute("SELECT address, state FROM leases").fetchall() == [(ip_str(offer.yiaddr), "bound")]
    assert sent[-1][0].msg_type == 5
    c = svc.counters()
    assert (c["rx_discover"], c["rx_request"], c["ack"], c["committed"]) == (1, 1, 1, 1)


def test_failed_commit_sends_no_ack(tmp_path: Path) -> None:
    svc, sent = service(tmp_path)
    mac = bytes.fromhex("02bd00000002")
    svc.handle(req(1, mac))
    offer = sent[-1][0]
    pend = svc.handle(req(3, mac, o50=offer.yiaddr, o54=ip_bytes("198.18.50.1")))
    assert pend is not None

    def boom(*_a: object) -> list[bool]:
        raise RuntimeError("database down")

    svc.store.commit = boom  # type: ignore[method-assign]
    svc._flush([pend])
    assert [p.msg_type for p, _ in sent] == [2]
    assert svc.counters()["drop_db_error"] == 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\x01" * 10, "drop_short"),
        (Packet(op=2, options={53: b"\x01"}).encode(), "drop_not_request"),
        (Packet(op=1, hlen=16, options={53: b"\x01"}).encode(), "drop_bad_htype"),
        (Packet(op=1, options={12: b"x"}).encode(), "drop_no_msg_type"),
        (Packet(op=1, options={53: b"\x09"}).encode(), "drop_bad_msg_type"),
        (Packet(op=1, options={53: b"\x03", 50: b"\x01\x02"}).encode(), "drop_bad_option"),
        (Packet(op=1, giaddr=ip_bytes("10.9.9.9"), options={53: b"\x01"}).encode(), "drop_unknown_relay"),
        (Packet(op=1, giaddr=ip_bytes("198.18.60.1"), options={53: b"\x01", 82: b"\x01\x09ab"}).encode(),
         "drop_bad_suboption"),
        (Packet(op=1, giaddr=ip_bytes("198.18.60.1"), options={
            53: b"\x01", 82: encode_suboptions([(151, b"\x00nope"), (152, b"")])}).encode(), "drop_unknown_vrf"),
        (Packet(op=1, giaddr=ip_bytes("198.18.60.1"), options={53: b"\x01", 82: bytes(1000)}).encode(),
         "drop_bad_option82"),
    ],
)
def test_hostile_packets_are_counted_by_reason(tmp_path: Path, data: bytes, reason: str) -> None:
    svc, sent = service(tmp_path)
    assert svc.handle(data) is None
    assert svc.counters().get(reason) == 1, svc.counters()
    assert not sent


def test_per_mac_rate_limit(tmp_path: Path) -> None:
    svc, _sent = service(tmp_path)
    mac = bytes.fromhex("02bd00000003")
    for _ in range(30):
        svc.handle(req(1, mac))
    c = svc.counters()
    assert c["drop_rate_mac"] > 0 and c["offer"] < 30


def test_unknown_ignored_by_default(tmp_path: Path) -> None:
    svc, sent = service(tmp_path, unknown="ignore")
    svc.handle(req(1, bytes.fromhex("02bd00000004")))
    assert not sent and svc.counters()["ignored_unknown"] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=236, max_size=600), st.binary(max_size=300))
def test_fuzz_server_never_raises(tmp_path_factory: pytest.TempPathFactory, head: bytes, opts: bytes) -> None:
    svc, _sent = _fuzz_service(tmp_path_factory)
    data = bytearray(head[:236].ljust(236, b"\0")) + b"c\x82Sc" + opts
    data[0] = 1
    data[1], data[2] = 1, 6
    before = svc.counters().get("drop_internal_error", 0)
    svc.handle(bytes(data))
    assert svc.counters().get("drop_internal_error", 0) == before


_FUZZ: dict[str, Any] = {}


def _fuzz_service(f: pytest.TempPathFactory) -> tuple[DhcpService, list[Any]]:
    if "svc" not in _FUZZ:
        _FUZZ["svc"] = service(f.mktemp("fuzz"), unknown="serve")
    svc: DhcpService = _FUZZ["svc"][0]
    svc.mac_limit = RateLimiter(1e9)
    return _FUZZ["svc"]  # type: ignore[no-any-return]


def test_overload_sheds_discovers_but_answers_requests(tmp_path: Path) -> None:
    """While the receive queue is too full (``shedding``), DISCOVERs are dropped before parsing;
    REQUESTs are still answered (they complete DORAs)."""
    svc, sent = service(tmp_path)
    mac = bytes.fromhex("02bd000000c1")
    assert svc.handle(req(1, mac)) is None
    assert [p.msg_type for p, _ in sent] == [2]
    offer = sent[-1][0]
    svc.shedding = True
    assert svc.handle(req(1, bytes.fromhex("02bd000000c2"))) is None
    assert len(sent) == 1
    c = svc.counters()
    assert (c["drop_overload"], c["rx_discover"]) == (1, 2)
    pend = svc.handle(req(3, mac, o50=offer.yiaddr, o54=ip_bytes("198.18.50.1")))
    assert pend is not None
    svc._flush([pend])
    assert [p.msg_type for p, _ in sent] == [2, 5]


def test_backlog_reads_the_receive_queue(tmp_path: Path) -> None:
    """``backlog()`` (what the loop compares with the buffer size) sees queued datagrams."""
    import socket

    svc, _sent = service(tmp_path)
    assert svc.backlog() == 0  # no socket
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        rx.bind(("127.0.0.1", 0))
        svc.sock = rx
        assert svc.backlog() == 0
        for _ in range(4):
            tx.sendto(bytes(300), rx.getsockname())
        deadline = time.monotonic() + 5
        while svc.backlog() < 4 * 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert svc.backlog() >= 4 * 300
    finally:
        svc.sock = None
        rx.close()
        tx.close()


# ---- metrics ------------------------------------------------------------------------------------


class _CountingSock:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, Any]] = []

    def sendto(self, data: bytes, addr: Any) -> int:
        self.sent.append((data, addr))
        return len(data)


def test_counters_show_up_in_the_metrics_snapshot(tmp_path: Path) -> None:
    """The runner's source puts DHCP per message type and drop reason into the snapshot file the
    supervisor's flusher writes (and /metrics renders), with the listener's interface as a label."""
    from bootsvc import metrics
    from bootsvc.dhcp.server import publish_metrics
    from bootsvc.web.metrics import render, with_labels

    svc, _sent = service(tmp_path)
    del svc._send  # the helper's stub: send through a counting socket so tx_* counters move
    sock = _CountingSock()
    svc.sock = sock  # type: ignore[assignment]
    reg = metrics.Registry()
    publish_metrics(svc, reg)
    flusher = metrics.Flusher(tmp_path / "metrics", "dhcp", "0", registry=reg)

    mac = bytes.fromhex("02bd000000aa")
    assert svc.handle(req(1, mac)) is None
    offer = parse(sock.sent[-1][0])
    pend = svc.handle(req(3, mac, o50=offer.yiaddr, o54=ip_bytes("198.18.50.1")))
    assert pend is not None
    svc._flush([pend])
    svc.handle(b"\x01" * 10)  # short
    svc.handle(Packet(op=1, giaddr=ip_bytes("10.9.9.9"), options={53: b"\x01"}).encode())  # unknown relay
    flusher.flush()

    def values() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        fresh, stale = metrics.read_snapshots(tmp_path / "metrics")
        assert [s.service for s in fresh] == ["dhcp"] and not stale
        return {(x.name, x.labels): x.value for x in fresh[0].samples}

    v = values()
    msg, drop = "bootsvc_dhcp_messages_total", "bootsvc_dhcp_dropped_total"
    lo = ("interface", "lo")
    assert v[(msg, (("direction", "in"), lo, ("type", "DISCOVER")))] == 2
    assert v[(msg, (("direction", "in"), lo, ("type", "REQUEST")))] == 1
    assert v[(msg, (("direction", "out"), lo, ("type", "OFFER")))] == 1
    assert v[(msg, (("direction", "out"), lo, ("type", "ACK")))] == 1
    assert v[(drop, (lo, ("reason", "short")))] == 1
    assert v[(drop, (lo, ("reason", "unknown_relay")))] == 1
    assert v[("bootsvc_dhcp_events_total", (("event", "committed"), lo))] == 1

    # counters keep counting between flushes (Prometheus counters: monotonic per process)
    svc.handle(req(1, bytes.fromhex("02bd000000ab")))
    flusher.flush()
    v = values()
    assert v[(msg, (("direction", "in"), lo, ("type", "DISCOVER")))] == 3
    assert v[(msg, (("direction", "out"), lo, ("type", "OFFER")))] == 2

    fresh, _ = metrics.read_snapshots(tmp_path / "metrics")
    text = render(with_labels(fresh[0].samples, {"service": "dhcp", "instance": "0"}))
    assert "# TYPE bootsvc_dhcp_dropped_total counter" in text
    assert ('bootsvc_dhcp_messages_total{direction="in",instance="0",interface="lo",service="dhcp",'
            'type="DISCOVER"} 3') in text


# ---- CLI --------------------------------------------------------------------------------------


def test_leases_cli_list_show_release(engine: Any, tmp_path: Path) -> None:
    from bootsvc.cli import cli

    s = LeaseStore(engine, [NET])
    now = time.time()
    s.commit([s.stage(bind("02:00:00:00:00:01", "198.18.50.10", now), now),
              s.stage(bind("02:00:00:00:00:02", "198.18.50.13", now), now)], now)
    url = f"sqlite:///{tmp_path / 'b.db'}"
    run = CliRunner()
    r = run.invoke(cli, ["--db", url, "leases", "list"])
    assert r.exit_code == 0, r.output
    assert "198.18.50.10" in r.output and "02:00:00:00:00:02" in r.output and "ADDRESS" in r.output
    r = run.invoke(cli, ["--db", url, "leases", "list", "--json"])
    rows = json.loads(r.output)
    assert {x["address"] for x in rows} == {"198.18.50.10", "198.18.50.13"}
    assert all(x["state"] == "bound" and x["remaining_s"] > 500 for x in rows)
    r = run.invoke(cli, ["--db", url, "leases", "show", "02:00:00:00:00:01", "--json"])
    assert json.loads(r.output)["address"] == "198.18.50.10"
    r = run.invoke(cli, ["--db", url, "leases", "release", "198.18.50.10", "--yes"])
    assert r.exit_code == 0 and "released 198.18.50.10" in r.output
    r = run.invoke(cli, ["--db", url, "leases", "list", "--json"])
    assert [x["address"] for x in json.loads(r.output)] == ["198.18.50.13"]
    r = run.invoke(cli, ["--db", url, "leases", "release", "198.18.50.10", "--yes"])
    assert r.exit_code == 1
    r = run.invoke(cli, ["--db", url, "leases", "show", "198.18.50.99"])
    assert r.exit_code == 1
    # the store that wrote the lease learns of the release and may hand the address out again
    fresh = LeaseStore(engine, [NET])
    fresh.load()
    assert fresh.candidate("", "lan", "02:00:00:00:00:09", time.time()) == ip_bytes("198.18.50.10")
    assert parse(Packet().encode()).op == 1


def test_instances_offer_from_their_own_stripe_then_from_the_whole_pool(engine: Any) -> None:
    """Two instances that both see every DISCOVER (a relay forwarding to both) offer different
    addresses to different clients - instance i of n from the offsets o mod n == i - so neither
    loses a binding to the other at the database; once its stripe is full an instance still offers
    any free address, and a client keeps the address it holds whichever instance answers."""
    net = NetworkConfig(name="lan", zone=0, cidr=IPv4Network("198.18.60.0/24"),
                        pools=(AddressRange(start=IPv4Address("198.18.60.10"), end=IPv4Address("198.18.60.17")),))
    a, b = LeaseStore(engine, [net], instance=(0, 2)), LeaseStore(engine, [net], instance=(1, 2))
    now = time.time()
    got: dict[str, list[str]] = {"a": [], "b": []}
    for i in range(4):  # the same 4 clients reach both
        mac = f"02:00:00:00:01:{i:02x}"
        for name, s in (("a", a), ("b", b)):
            addr = s.candidate("", "lan", mac, now)
            assert addr is not None
            s.offer(bind(mac, ip_str(addr), now, "offer"), now)
            got[name].append(ip_str(addr))
    assert got["a"] == ["198.18.60.10", "198.18.60.12", "198.18.60.14", "198.18.60.16"]
    assert got["b"] == ["198.18.60.11", "198.18.60.13", "198.18.60.15", "198.18.60.17"]
    # each client binds where its first OFFER came from: a for even, b for odd clients; no conflicts
    for i in range(4):
        mac = f"02:00:00:00:01:{i:02x}"
        s, addr = (a, got["a"][i]) if i % 2 == 0 else (b, got["b"][i])
        assert s.commit([s.stage(bind(mac, addr, now), now)], now) == [True]
    # a's stripe is full: it spills into the rest of the pool (b's free addresses)
    a_free = a.candidate("", "lan", "02:00:00:00:02:00", now)
    assert a_free is not None and ip_str(a_free) in got["b"]
    # a client bound by b (learnt by a refresh) gets its own address from a, not a new one
    a.refresh()
    assert a.candidate("", "lan", "02:00:00:00:01:01", now) == ip_bytes(got["b"][1])
    with pytest.raises(ValueError):
        LeaseStore(engine, [net], instance=(2, 2))


def test_instance_index_must_be_below_count() -> None:
    with pytest.raises(ValueError, match=r"instance_index 2 must be below dhcp\.instance_count 2"):
        cfgmod.DhcpConfig(instance_index=2, instance_count=2)
    assert cfgmod.DhcpConfig(instance_index=1, instance_count=2).instance_count == 2


def test_inventory_refresh_rebuilds_only_the_nodes_dhcp_decides_on_that_changed(engine: Any) -> None:
    """The maintenance thread refreshes the MAC -> node cache every 2 s: unchanged nodes are not
    rebuilt (a storm's state changes included), a new fixed address, a renamed node and a deleted
    node are seen at the next refresh."""
    from sqlalchemy import delete, update

    from bootsvc import inventory
    from bootsvc.dhcp.clients import Inventory
    from bootsvc.models import Nic, Node

    sessions = db.session_factory(engine)
    with sessions() as s:
        inventory.enroll(s, [inventory.NodeSpec(name=f"n{i}", kind="dpu", serial=f"S{i}",
                                                nics=[inventory.NicSpec(mac=f"02:00:00:00:09:0{i}", role="oob")])
                             for i in range(3)], actor="test")
        s.commit()
    inv = Inventory(sessions)
    inv.reload()
    assert inv.rebuilt == 3 and set(inv.by_mac) == {f"02:00:00:00:09:0{i}" for i in range(3)}
    with sessions() as s:  # a state change (what a storm does all the time) is not DHCP's business
        s.execute(update(Node).where(Node.name == "n0").values(state="provisioning", version=Node.version + 1))
        s.commit()
    inv.reload()
    assert inv.rebuilt == 0
    with sessions() as s:
        s.execute(update(Nic).where(Nic.mac == "02:00:00:00:09:01").values(ipv4="198.18.50.13"))
        s.execute(update(Node).where(Node.name == "n2").values(name="n2b"))
        s.execute(delete(Nic).where(Nic.mac == "02:00:00:00:09:00"))
        s.execute(delete(Node).where(Node.name == "n0"))
        s.commit()
    inv.reload()
    assert inv.rebuilt == 2
    assert set(inv.by_mac) == {"02:00:00:00:09:01", "02:00:00:00:09:02"}
    assert inv.reservations == [("", "198.18.50.13", "02:00:00:00:09:01")]
    assert inv.by_mac["02:00:00:00:09:02"].name == "n2b"


def test_instance_answers_its_share_of_discovers_and_any_client_retrying_long_enough(tmp_path: Path) -> None:
    """Instance 0 of 2: DISCOVERs of the other instance's share (hash of chaddr) are dropped and
    counted while the client's secs is below lb_max_seconds (3), answered from then on - a dead
    peer's clients are served after a few retransmissions."""
    import zlib

    svc, sent = service(tmp_path)
    svc.lb = (0, 2, 3)  # what dhcp: {instance_index: 0, instance_count: 2} sets up
    macs = [bytes.fromhex(f"02bd000001{i:02x}") for i in range(40)]
    mine = [m for m in macs if zlib.crc32(m) % 2 == 0]
    theirs = [m for m in macs if zlib.crc32(m) % 2 == 1]
    assert mine and theirs
    for m in macs:
        svc.handle(req(1, m))
    assert len(sent) == len(mine) and svc.counters()["drop_peer_share"] == len(theirs)
    # their REQUEST in SELECTING too (the instances may share one server identifier, boot_server)
    assert svc.handle(req(3, theirs[1], o50=ip_bytes("198.18.50.20"), o54=ip_bytes("198.18.50.1"))) is None
    assert svc.counters()["drop_peer_share"] == len(theirs) + 1
    late = Packet(op=1, xid=0x43, secs=3, chaddr=theirs[0].ljust(16, b"\0"), options={53: b"\x01"},
                  flags=0x8000).encode()
    svc.handle(late)
    assert len(sent) == len(mine) + 1 and sent[-1][0].msg_type == 2


def test_allocation_never_offers_another_instances_boot_server(engine: Any) -> None:
    """Several instances on one network: every one's address (boot_servers) stays out of the pool."""
    net = NET.model_copy(update={"pools": (AddressRange(start=IPv4Address("198.18.50.2"),
                                                        end=IPv4Address("198.18.50.5")),),
                                 "reserved": (), "boot_servers": (IPv4Address("198.18.50.1"),
                                                                  IPv4Address("198.18.50.3"))})
    s = LeaseStore(engine, [net])
    got = set()
    for i in range(4):
        mac = f"02:00:00:00:01:0{i}"
        a = s.candidate("", "lan", mac, 1000.0)
        if a is None:
            break
        s.offer(bind(mac, ip_str(a), 1000.0, "offer"), 1000.0)
        got.add(ip_str(a))
    assert got == {"198.18.50.2", "198.18.50.4", "198.18.50.5"}


def test_inventory_refresh_reads_a_signature_then_only_new_rows_and_falls_back_to_a_full_reload() -> None:
    """The maintenance thread's refresh must not grow with the fleet: unchanged, it reads only the
    signature (no rows, no views); an enrollment is taken in incrementally (the new nodes, and the
    host a new DPU fronts); edits, deletes, a tenant's VRF and in-place NIC changes fall back to the
    full reload; every full_seconds a full reload runs anyway."""
    import tempfile

    from sqlalchemy import delete, update

    from bootsvc import inventory
    from bootsvc.dhcp.clients import Inventory
    from bootsvc.models import Nic, Node, Tenant

    with tempfile.TemporaryDirectory() as td:
        e = db.make_engine(f"sqlite:///{td}/inv.db")
        Base.metadata.create_all(e)
        sessions = db.session_factory(e)

        def enroll(*specs: inventory.NodeSpec) -> None:
            with sessions() as s:
                inventory.enroll(s, list(specs), actor="test")
                s.commit()

        def mac(i: int) -> str:
            return f"02:00:00:00:0a:{i:02x}"

        with sessions() as s:
            s.add(Tenant(name="acme", vrf="vrf-acme", l3vni=5001, prefixes=[]))
            s.commit()
        enroll(*[inventory.NodeSpec(name=f"h{i}", kind="host", serial=f"H{i}", tenant="acme",
                                    nics=[inventory.NicSpec(mac=mac(i), role="host-pf")]) for i in range(3)])
        now = [0.0]
        inv = Inventory(sessions, full_seconds=100.0, edit_every=1, clock=lambda: now[0])
        inv.refresh()  # the first call is a full reload
        assert (inv.full_reloads, inv.incremental, inv.rebuilt) == (1, 0, 3)

        with sessions() as s:  # state changes (a storm's) are not DHCP's business: nothing read
            s.execute(update(Node).values(state="provisioning", version=Node.version + 1))
            s.commit()
        inv.refresh()
        assert (inv.full_reloads, inv.incremental, inv.rebuilt) == (1, 0, 0)

        # enrollment: the new DPU and the host it fronts, nothing else; no full reload
        enroll(inventory.NodeSpec(name="d0", kind="dpu", serial="D0", host="h0", tenant="acme",
                                  nics=[inventory.NicSpec(mac=mac(50), role="oob", ipv4="10.98.0.50")]))
        inv.refresh()
        assert (inv.full_reloads, inv.incremental, inv.rebuilt) == (1, 1, 2)
        assert inv.by_mac[mac(50)].name == "d0" and inv.by_mac[mac(0)].dpu_ids == (inv.by_mac[mac(50)].id,)
        assert inv.reservations == [("", "10.98.0.50", mac(50))]

        def full_after(change: Any) -> None:
            n = inv.full_reloads
            with sessions() as s:
                change(s)
                s.commit()
            inv.refresh()
            assert inv.full_reloads == n + 1, "the change was not seen"

        full_after(lambda s: s.execute(update(Node).where(Node.name == "h1").values(tenant_id=None)))
        assert inv.by_mac[mac(1)].tenant is None
        full_after(lambda s: s.execute(update(Node).where(Node.name == "h2").values(name="h2-renamed")))
        assert inv.by_mac[mac(2)].name == "h2-renamed"
        full_after(lambda s: s.execute(update(Nic).where(Nic.mac == mac(1)).values(ipv4="10.0.0.7")))
        assert ("", "10.0.0.7", mac(1)) in inv.reservations  # h1 has no tenant now
        full_after(lambda s: s.execute(update(Tenant).values(vrf="vrf-b")))
        assert inv.by_mac[mac(0)].tenant is not None and inv.by_mac[mac(0)].tenant.vrf == "vrf-b"
        full_after(lambda s: (s.execute(delete(Nic).where(Nic.mac == mac(2))),
                              s.execute(delete(Node).where(Node.name == "h2-renamed"))))
        assert mac(2) not in inv.by_mac
        # the same aggregates (an address swapped for one of the same length): seen at the full reload
        with sessions() as s:
            s.execute(update(Nic).where(Nic.mac == mac(1)).values(ipv4="10.0.0.8"))
            s.commit()
        inv.refresh()
        assert ("", "10.0.0.7", mac(1)) in inv.reservations
        now[0] = 100.0
        inv.refresh()
        assert ("", "10.0.0.8", mac(1)) in inv.reservations
        e.dispose()


def test_inventory_full_reload_runs_every_full_seconds_or_less_often_when_it_costs_more() -> None:
    """The periodic full reload (the safety net for writes that keep every aggregate) spends at most
    full_share of a core: a reload costing 0.2 s of CPU with full_share 0.001 runs every 200 s, not
    every 100; a cheap one every full_seconds."""
    import tempfile

    from sqlalchemy import update

    from bootsvc import inventory
    from bootsvc.dhcp.clients import Inventory
    from bootsvc.models import Nic

    with tempfile.TemporaryDirectory() as td:
        e = db.make_engine(f"sqlite:///{td}/inv.db")
        Base.metadata.create_all(e)
        sessions = db.session_factory(e)
        with sessions() as s:
            inventory.enroll(s, [inventory.NodeSpec(name="h0", kind="host", serial="H0", nics=[
                inventory.NicSpec(mac="02:00:00:00:0c:01", role="host-pf", ipv4="10.0.0.7")])], actor="test")
            s.commit()
        now, cpu, cost, calls = [0.0], [0.0], [0.2], [0]

        def cpu_clock() -> float:
            """A reload reads it at its start, around its view builds and at its end: the reads
            (between the first and the last, without the builds) cost ``cost``, the builds 5 s,
            which must not count (a first reload builds every view)."""
            calls[0] += 1
            cpu[0] += {1: 0.0, 2: cost[0], 3: 5.0, 0: 0.0}[calls[0] % 4]
            return cpu[0]

        inv = Inventory(sessions, full_seconds=100.0, edit_every=1, clock=lambda: now[0], full_share=0.001,
                        cpu_clock=cpu_clock)
        inv.refresh()
        assert inv.full_reloads == 1 and inv.full_every == pytest.approx(200.0)
        with sessions() as s:  # an edit no aggregate sees: only the full reload finds it
            s.execute(update(Nic).values(ipv4="10.0.0.8"))
            s.commit()
        now[0] = 150.0
        inv.refresh()
        assert inv.full_reloads == 1 and inv.reservations == [("", "10.0.0.7", "02:00:00:00:0c:01")]
        cost[0] = 0.01  # cheap now: back to every full_seconds
        now[0] = 201.0
        inv.refresh()
        assert inv.full_reloads == 2 and inv.reservations == [("", "10.0.0.8", "02:00:00:00:0c:01")]
        assert inv.full_every == 100.0
        now[0] = 300.0
        inv.refresh()
        assert inv.full_reloads == 2
        now[0] = 301.0
        inv.refresh()
        assert inv.full_reloads == 3
        e.dispose()


def test_inventory_refresh_sees_enrollments_every_period_and_edits_every_edit_every_periods() -> None:
    """Between signatures the refresh reads maximum ids only: a new node is served at the next
    refresh, an in-place edit (a host's tenant) and a delete within edit_every refreshes."""
    import tempfile

    from sqlalchemy import delete, update

    from bootsvc import inventory
    from bootsvc.dhcp.clients import Inventory
    from bootsvc.models import Nic, Node, Tenant

    with tempfile.TemporaryDirectory() as td:
        e = db.make_engine(f"sqlite:///{td}/inv.db")
        Base.metadata.create_all(e)
        sessions = db.session_factory(e)
        with sessions() as s:
            s.add(Tenant(name="acme", vrf="vrf-acme", l3vni=5001, prefixes=[]))
            s.commit()

        def enroll(i: int) -> None:
            with sessions() as s:
                inventory.enroll(s, [inventory.NodeSpec(name=f"h{i}", kind="host", serial=f"H{i}", tenant="acme",
                                                        nics=[inventory.NicSpec(mac=f"02:00:00:00:0b:{i:02x}",
                                                                                role="host-pf")])], actor="test")
                s.commit()

        enroll(0)
        inv = Inventory(sessions, edit_every=3)
        inv.refresh()
        with sessions() as s:
            s.execute(update(Node).where(Node.name == "h0").values(tenant_id=None))
            s.commit()
        seen = []
        for _ in range(3):
            inv.refresh()
            seen.append(inv.by_mac["02:00:00:00:0b:00"].tenant is None)
        assert seen == [False, False, True]
        enroll(1)
        inv.refresh()
        assert "02:00:00:00:0b:01" in inv.by_mac and inv.full_reloads == 2 and inv.incremental == 1
        with sessions() as s:  # a delete below the highest id: looked for with the edits (no row counts
            s.execute(delete(Nic).where(Nic.mac == "02:00:00:00:0b:00"))  # between signatures)
            s.execute(delete(Node).where(Node.name == "h0"))
            s.commit()
        gone = []
        for _ in range(3):
            inv.refresh()
            gone.append("02:00:00:00:0b:00" not in inv.by_mac)
        assert gone == [False, True, True] and "02:00:00:00:0b:01" in inv.by_mac
        e.dispose()

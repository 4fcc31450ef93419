"""The client identifier (RFC 2131 §2) in the durable guard, on SQLite and PostgreSQL: two instances
sharing a database agree that another client identifier behind the same chaddr is another client
(the row is refused), the same identifier is the same client (the row is renewed), and with
``match_client_id=False`` (Kea's ``match-client-id: false``) the chaddr decides."""

from __future__ import annotations

import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from bootsvc import db
from bootsvc.config import AddressRange, NetworkConfig
from bootsvc.dhcp.decide import LeaseIntent
from bootsvc.dhcp.leases import LeaseStore
from bootsvc.dhcp.packet import ip_bytes
from bootsvc.models import Base

NETS = [
    NetworkConfig(name="pod", zone=0, cidr=IPv4Network("198.18.41.0/24"), gateway=IPv4Address("198.18.41.1"),
                  pools=(AddressRange(start=IPv4Address("198.18.41.10"), end=IPv4Address("198.18.41.20")),),
                  boot_server=IPv4Address("198.18.41.1")),
]
MAC = "02:cd:00:00:00:01"
ADDR = ip_bytes("198.18.41.10")


def bind(cid: bytes | None, now: float, action: str = "bind", addr: bytes = ADDR) -> LeaseIntent:
    return LeaseIntent(action=action, vrf="", network="pod", address=addr, mac=MAC,  # type: ignore[arg-type]
                       expires_at=now + 600, client_id=cid)


def _engine(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> Engine:
    if kind == "sqlite":
        e = db.make_engine(f"sqlite:///{tmp_path / 'c.db'}")
    else:
        e = db.make_engine(request.getfixturevalue("pg_url"))
    Base.metadata.create_all(e)
    return e


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_guard_compares_client_identifiers(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    e = _engine(kind, tmp_path, request)
    a, b = LeaseStore(e, NETS), LeaseStore(e, NETS)
    now = time.time()
    assert a.commit([a.stage(bind(b"\x00A-id", now), now)], now) == [True]
    # instance b has not refreshed: it believes the address is free, the database says no
    assert b.commit([b.stage(bind(b"\x00B-id", now), now)], now) == [False]
    # the same identifier (from either instance) is the same client: renewed
    assert b.commit([b.stage(bind(b"\x00A-id", now + 1), now + 1)], now + 1) == [True]
    with e.connect() as c:
        rows = c.execute(text("SELECT client_id, mac, state FROM leases")).all()
    assert [tuple(r) for r in rows] == [(b"\x00A-id".hex(), MAC, "bound")]
    # a RELEASE by the other identifier does not free A's row; A's own does
    b.commit([b.stage(bind(b"\x00B-id", now, "release"), now)], now + 2)
    with e.connect() as c:
        assert c.execute(text("SELECT state FROM leases")).scalar_one() == "bound"
    b.commit([b.stage(bind(b"\x00A-id", now, "release"), now)], now + 3)
    with e.connect() as c:
        assert c.execute(text("SELECT state FROM leases")).scalar_one() == "released"
    # a fresh instance loads who holds what
    fresh = LeaseStore(e, NETS)
    fresh.load()
    assert fresh.lookup("", "id:" + b"\x00A-id".hex()) is not None
    assert fresh.lookup("", MAC) is None


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_match_client_id_false_guard_uses_chaddr(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    e = _engine(kind, tmp_path, request)
    a = LeaseStore(e, NETS, match_client_id=False)
    b = LeaseStore(e, NETS, match_client_id=False)
    now = time.time()
    assert a.commit([a.stage(bind(b"\x00A-id", now), now)], now) == [True]
    assert b.commit([b.stage(bind(b"\x00B-id", now), now)], now) == [True]  # same chaddr: same client
    fresh = LeaseStore(e, NETS, match_client_id=False)
    fresh.load()
    v = fresh.lookup("", MAC)
    assert v is not None and v.address == ADDR


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_guard_identifier_equal_to_chaddr_is_the_chaddr(kind: str, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    e = _engine(kind, tmp_path, request)
    a, b = LeaseStore(e, NETS), LeaseStore(e, NETS)
    now = time.time()
    assert a.commit([a.stage(bind(None, now), now)], now) == [True]  # PXE firmware, no option 61
    hw = b"\x01" + bytes.fromhex(MAC.replace(":", ""))
    assert b.commit([b.stage(bind(hw, now + 1), now + 1)], now + 1) == [True]  # iPXE: 01:<mac>
    assert b.commit([b.stage(bind(b"\xff\x00\x01duid", now + 2), now + 2)], now + 2) == [False]
    fresh = LeaseStore(e, NETS)
    fresh.load()
    v = fresh.lookup("", MAC)
    assert v is not None and v.address == ADDR

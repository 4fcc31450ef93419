"""``inventory.holds`` (one statement per authenticated boot/agent request) answers exactly what
``inventory.node_addresses`` answers: reservations, bound default-VRF leases by MAC or by node, a host's
traffic through the DPU in front of it; never other VRFs, other states or other nodes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from helpers.conductor import enroll_machine, make_db, site_config
from sqlalchemy import select

from bootsvc import inventory
from bootsvc.models import Lease, Nic, Node


def test_holds_matches_node_addresses(tmp_path: Path, any_db_url: str) -> None:
    cfg = site_config(any_db_url, tmp_path)
    sessions = make_db(cfg)
    host, dpu = enroll_machine(sessions, "m1", host_bmc="fake://a", dpu_bmc="fake://b", index=1)
    host2, dpu2 = enroll_machine(sessions, "m2", host_bmc="fake://c", dpu_bmc="fake://d", index=2)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)
    with sessions() as s:
        mac = s.query(Nic).filter(Nic.node_id == dpu).one().mac
        mac2 = s.query(Nic).filter(Nic.node_id == dpu2).one().mac
        s.add_all([
            Lease(vrf="", network="mgmt", address="10.98.0.101", mac=mac, state="bound", expires_at=later),
            Lease(vrf="", network="mgmt", address="10.98.0.102", mac="02:00:00:00:00:09", node_id=dpu,
                  state="bound", expires_at=later),
            Lease(vrf="", network="mgmt", address="10.98.0.103", mac=mac, state="released", expires_at=later),
            Lease(vrf="vrf-acme", network="acme-hosts", address="10.98.0.104", mac=mac, state="bound",
                  expires_at=later),
            Lease(vrf="", network="mgmt", address="10.98.0.105", mac=mac2, state="bound", expires_at=later),
        ])
        s.commit()
    probes = ["10.98.0.101", "10.98.0.102", "10.98.0.103", "10.98.0.104", "10.98.0.105", "10.0.0.11", "10.0.0.12",
              "10.98.0.200", ""]
    with sessions() as s:
        for node_id in (host, dpu, host2, dpu2):
            want = inventory.node_addresses(s, node_id)
            got = {a for a in probes if inventory.holds(s, node_id, a)}
            assert got == want & set(probes), (node_id, got, want)
            # the boot plane's form: a column of the node's own read (correlated), the same answers
            col = {a for a in probes if s.scalar(select(inventory.holds_column(a)).where(Node.id == node_id))}
            assert col == got, (node_id, col, got)
        # the cases spelled out: the DPU by MAC and by node; the host through its DPU; not the other pair
        assert inventory.holds(s, dpu, "10.98.0.101") and inventory.holds(s, dpu, "10.98.0.102")
        assert inventory.holds(s, host, "10.98.0.101") and inventory.holds(s, host, "10.0.0.11")
        assert not inventory.holds(s, dpu, "10.98.0.103") and not inventory.holds(s, dpu, "10.98.0.104")
        assert not inventory.holds(s, host2, "10.98.0.101") and inventory.holds(s, host2, "10.98.0.105")

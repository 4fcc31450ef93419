"""The enroll form's host address: the host's fixed IPv4 address in its tenant's network, reserved on its
host-facing NIC at enrollment (what `--mac MAC,host-pf,IP` does on the CLI and ``nics[].ipv4`` in the
API). On an EVPN site (``fabric.asn``) the DPU announces that address as the host's /32 and the boot gate
waits for it, so a host enrolled through the UI must be able to carry it from the start."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.ui import Env, enroll, login, make_env
from sqlalchemy import select

from bootsvc.conductor_policy import host_addresses
from bootsvc.models import Node, Tenant
from bootsvc.web import ui

SITE = {
    # the tenants' rows come from make_env (red) and the fixture (blue, green)
    "tenants": [{"name": "red", "vrf": "red", "l3vni": 5001}, {"name": "blue", "vrf": "blue", "l3vni": 5002},
                {"name": "green", "vrf": "green", "l3vni": 5003}],
    "networks": [
        {"name": "red-hosts", "zone": 1, "vrf": "red", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"},
        # blue overlaps red (tenants may, each in its own VRF)
        {"name": "blue-hosts", "zone": 1, "vrf": "blue", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1"},
    ],
    "fabric": {"asn": 4200000000},
}
OTHER = {"host_serial": "N1", "dpu_serial": "N2", "slot": "8", "host_mac": "02:00:00:00:00:08",
         "dpu_mac": "02:00:00:00:00:09"}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    for e in make_env(tmp_path, SITE):
        with e.sessions() as s:
            s.add_all([Tenant(name="blue", vrf="blue", l3vni=5002, prefixes=[]),
                       Tenant(name="green", vrf="green", l3vni=5003, prefixes=[])])  # green: no network
            s.commit()
        yield e


def field_error(page: str, field: str) -> str:
    m = re.search(rf'<p class="field-error" id="e-{field}" role="alert">(.*?)</p>', page, re.S)
    assert m is not None, f"no error next to {field}"
    return m.group(1)


def test_the_form_asks_for_the_host_address_and_says_where_it_lives(env: Env) -> None:
    c, _ = env.logged_in()
    page = c.get("/ui/enroll").text
    assert 'id="f-host_ip" name="host_ip"' in page
    m = re.search(r'<p class="help" id="h-host_ip">(.*?)</p>', page, re.S)
    assert m is not None
    assert "red 10.0.0.0/24" in m.group(1) and "blue 10.0.0.0/24" in m.group(1)
    assert "EVPN" in m.group(1) and "green" not in m.group(1)


def test_the_address_is_reserved_on_the_host_nic_and_is_what_the_dpu_announces(env: Env) -> None:
    c = env.client()
    r = enroll(c, login(c), host_ip=" 10.0.0.11 ")
    assert r.status_code == 302, r.text
    page = c.get(r.headers["Location"]).text
    assert "Enrolled host r1-u07 and DPU r1-u07-dpu." in page and "has no host address" not in page
    with env.sessions() as s:
        host = s.scalars(select(Node).where(Node.name == "r1-u07")).one()
        dpu = s.scalars(select(Node).where(Node.name == "r1-u07-dpu")).one()
        assert [(n.role, n.ipv4) for n in host.nics] == [("host-pf", "10.0.0.11")]
        assert [n.ipv4 for n in dpu.nics] == [None]
        # the read the DPU's EVPN policy and the boot gate's host_prefix check use
        assert host_addresses(s, [host.id]) == {host.id: ("10.0.0.11/32",)}


@pytest.mark.parametrize(("over", "text"), [
    ({"host_ip": "10.0.0.300"}, "is not an IPv4 address"),
    ({"host_ip": "hs-0001"}, "is not an IPv4 address"),
    ({"host_ip": "10.77.0.20"}, "is not in tenant red&#39;s network (10.0.0.0/24)"),  # a Zone 0 address
    ({"host_ip": "10.0.0.1"}, "is the gateway address of red-hosts"),
    ({"host_ip": "10.0.0.0"}, "is the network address of red-hosts"),
    ({"host_ip": "10.0.0.255"}, "is the broadcast address of red-hosts"),
    ({"host_ip": "10.0.0.11", "tenant": ""}, "pick the tenant above"),
    ({"host_ip": "10.0.0.11", "tenant": "green"}, "Tenant green has no network in the site config"),
])
def test_a_bad_host_address_is_named_next_to_its_field_and_nothing_is_enrolled(env: Env, over: dict[str, str],
                                                                               text: str) -> None:
    c = env.client()
    r = enroll(c, login(c), **over)
    assert r.status_code == 422
    assert text in field_error(r.text, "host_ip")
    assert r.text.count('class="field-error"') == 1, "only the wrong field is marked"
    with env.sessions() as s:
        assert s.scalars(select(Node)).first() is None


def test_an_address_is_reserved_once_per_tenant_and_tenants_may_overlap(env: Env) -> None:
    c, csrf = env.logged_in()
    assert enroll(c, csrf, host_ip="10.0.0.11", dpu_oob_ip="10.77.0.11").status_code == 302
    holder = env.node("r1-u07")
    r = enroll(c, csrf, **OTHER, host_ip="10.0.0.11")
    assert r.status_code == 422
    err = field_error(r.text, "host_ip")
    assert "10.0.0.11 is already reserved for host r1-u07 in tenant red" in err
    assert f'href="/ui/machines/{holder.id}">Open it</a>' in err
    # the same number in tenant blue's VRF is another address
    assert enroll(c, csrf, **OTHER, host_ip="10.0.0.11", tenant="blue").status_code == 302
    assert [n.ipv4 for n in env.node("r1-u08").nics] == ["10.0.0.11"]
    # and a tenant address does not hold the same number in Zone 0 (the default VRF)
    r = enroll(c, csrf, host_serial="N3", dpu_serial="N4", slot="9", host_mac="02:00:00:00:00:0a",
               dpu_mac="02:00:00:00:00:0b", host_ip="10.0.0.12", dpu_oob_ip="10.77.0.12")
    assert r.status_code == 302, r.text


def test_without_an_address_on_an_evpn_site_the_tech_is_told_how_to_add_one(env: Env) -> None:
    c = env.client()
    r = enroll(c, login(c))
    assert r.status_code == 302
    page = c.get(r.headers["Location"]).text
    assert "r1-u07 has no host address: this site runs EVPN, so it cannot boot until one is reserved in " \
           "tenant red&#39;s network" in page
    assert "bootsvc node set r1-u07 --mac aa:bb:cc:00:00:01,host-pf,ADDRESS" in page


def test_the_inventory_error_of_the_host_address_lands_on_its_field() -> None:
    assert ui.enroll_field("0.nics.0.ipv4") == "host_ip"
    assert ui.enroll_field("1.nics.0.ipv4") == "dpu_oob_ip"


def test_without_evpn_the_address_stays_optional_and_no_hint_is_given(tmp_path: Path) -> None:
    for e in make_env(tmp_path):  # no fabric.asn: static peer lists, no boot gate on a host prefix
        c = e.client()
        csrf = login(c)
        page = c.get("/ui/enroll").text
        assert '<label for="f-host_ip">Host address (optional)</label>' in page
        assert "empty: one from the tenant pool" in page and "EVPN" not in page
        r = enroll(c, csrf)
        assert r.status_code == 302
        assert "has no host address" not in c.get(r.headers["Location"]).text

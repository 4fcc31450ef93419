"""Several bootsvc instances build the same policy for a DPU (bootsvc.policy): the document names every
instance's Zone 0 address (``boot_servers``), never the building instance's own ``boot_server``, so
the instances do not revert each other's policy at their drift checks. One-instance configs
(``boot_server`` only) keep the document they had, with ``relay.servers`` = [that address]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers.conductor import site_tree

from bootsvc import config as config_mod
from bootsvc.agent import policy as agent_policy
from bootsvc.config import Config, ConfigError
from bootsvc.policy import Peer, TenantInfo, boot_server, boot_servers, build

SITE = ["10.98.0.3", "10.98.0.1", "10.98.0.2"]  # three instances, listed in no particular order
ACME = TenantInfo("acme", "vrf-acme", 5001, None)


def instance_config(tmp: Path, own: str, listed: list[str] | None, **over: Any) -> Config:
    tree = site_tree("sqlite:///:memory:", tmp, **over)
    zone0 = {**tree["networks"][0], "boot_server": own}
    if listed is not None:
        zone0["boot_servers"] = listed
    tree["networks"] = [zone0, *tree["networks"][1:]]
    return config_mod.from_mapping(tree, "<test>", env={})


def dpu_doc(cfg: Config, tenant: TenantInfo | None = ACME) -> dict[str, Any]:
    return build(cfg, node_id=7, node_name="m1-dpu", serial="MT-m1", tenant=tenant,
                 peers=[Peer("10.255.0.7", ("10.0.0.100/32",))])


@pytest.mark.parametrize("fabric", [{}, {"asn": 4200000000}])  # static peers, EVPN
def test_instances_differing_only_in_their_own_address_build_the_same_policy(
        tmp_path: Path, fabric: dict[str, Any]) -> None:
    docs = [dpu_doc(instance_config(tmp_path, own, list(reversed(SITE)) if own == "10.98.0.2" else SITE,
                                    fabric=fabric)) for own in SITE]
    assert len({d["version"] for d in docs}) == 1
    assert docs[0] == docs[1] == docs[2]


def test_the_document_names_every_instance_for_relay_and_flows(tmp_path: Path) -> None:
    cfg = instance_config(tmp_path, "10.98.0.2", SITE)
    d = dpu_doc(cfg)
    ordered = sorted(SITE, key=lambda a: tuple(int(x) for x in a.split(".")))
    assert d["relay"]["servers"] == ordered
    assert d["relay"]["server"] == ordered[0]  # schema-1 agents that read only "server" reach one of them
    zone0 = {(f["proto"], f["dst"], f["dport"]) for f in d["flows"] if f["zone"] == 0}
    assert zone0 == {(p, f"{a}/32", port) for a in SITE for p, port in (("udp", 69), ("tcp", 8080))}
    # the instance's own address is still its own (a BMC this instance drives fetches from it)
    assert str(boot_server(cfg)) == "10.98.0.2"
    assert [str(a) for a in boot_servers(cfg)] == ordered
    # and the agent accepts it and relays to all of them
    p = agent_policy.parse(d)
    assert p.tenant is not None and p.tenant.relay is not None
    assert [str(a) for a in p.tenant.relay.targets] == ordered


def test_an_instance_missing_from_the_list_would_build_another_policy(tmp_path: Path) -> None:
    """The test above can fail: a list that differs between instances gives another version."""
    a = dpu_doc(instance_config(tmp_path, "10.98.0.1", SITE))
    b = dpu_doc(instance_config(tmp_path, "10.98.0.1", SITE[1:]))
    assert a["version"] != b["version"]


def test_one_instance_config_without_the_list_is_unchanged(tmp_path: Path) -> None:
    d = dpu_doc(instance_config(tmp_path, "10.98.0.1", None))
    assert d["relay"]["server"] == "10.98.0.1" and d["relay"]["servers"] == ["10.98.0.1"]
    assert {f["dst"] for f in d["flows"] if f["zone"] == 0} == {"10.98.0.1/32"}
    # the isolated document (no tenant) names no server at all
    assert "relay" not in dpu_doc(instance_config(tmp_path, "10.98.0.1", None), tenant=None)


def test_own_address_outside_the_list_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"boot_server 10\.98\.0\.9 is not in boot_servers"):
        instance_config(tmp_path, "10.98.0.9", SITE)
    with pytest.raises(ConfigError, match="twice"):
        instance_config(tmp_path, "10.98.0.1", ["10.98.0.1", "10.98.0.1"])
    with pytest.raises(ConfigError, match="at most 16"):  # what an agent accepts (relay.servers)
        instance_config(tmp_path, "10.98.0.1", [f"10.98.0.{i}" for i in range(1, 18)])


def test_agent_reads_documents_with_and_without_the_list() -> None:
    base = {"schema": 1, "version": "v", "node": "d", "host_port": "pf0hpf", "tenant": "acme",
            "vrf_name": "vrf-acme", "vrf_table": 5001, "l3vni": 5001, "vtep": "10.255.0.7",
            "host_gateway": "10.0.0.1/24"}
    old = agent_policy.parse({**base, "relay": {"server": "10.98.0.1"}})
    assert old.tenant is not None and old.tenant.relay is not None
    assert [str(a) for a in old.tenant.relay.targets] == ["10.98.0.1"]
    new = agent_policy.parse({**base, "relay": {"server": "10.98.0.1", "servers": ["10.98.0.1", "10.98.0.2"]}})
    assert new.tenant is not None and new.tenant.relay is not None
    assert [str(a) for a in new.tenant.relay.targets] == ["10.98.0.1", "10.98.0.2"]
    for bad, why in (({"server": "10.98.0.1", "servers": "10.98.0.2"}, "relay.servers: want a list"),
                     ({"server": "10.98.0.1", "servers": []}, "relay.servers: want a list"),
                     ({"server": "10.98.0.1", "servers": ["x"]}, r"relay.servers\[0\]"),
                     ({"server": "10.98.0.1", "servers": ["10.98.0.2"]}, "does not contain relay.server"),
                     ({"server": "10.98.0.1", "servers": ["10.98.0.1"] * 17}, "want a list of 1..16")):
        with pytest.raises(agent_policy.PolicyError, match=why):
            agent_policy.parse({**base, "relay": bad})

"""Config validation: shipped files load; bad files fail naming the file, the field and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootsvc import config
from bootsvc.config import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["bootsvc.yaml", "lab.yaml", "site-example.yaml"])
def test_shipped_configs_load(name: str) -> None:
    c = config.load(ROOT / "config" / name, env={})
    assert c.source.endswith(name)


def test_default_config_serves_no_dhcp_tftp_dns() -> None:
    c = config.load(ROOT / "config" / "bootsvc.yaml", env={})
    assert c.listeners.dhcp == () and c.listeners.tftp == () and c.listeners.dns == ()
    assert all(str(x.address) == "127.0.0.1" for x in c.listeners.http)
    assert config.load(None, env={}).listeners.dhcp == ()


def test_example_site_has_overlapping_tenants_in_separate_vrfs() -> None:
    c = config.load(ROOT / "config" / "site-example.yaml", env={})
    prefixes = [str(p) for t in c.tenants for p in t.prefixes]
    assert len(c.tenants) == 3 and prefixes.count("10.0.0.0/16") == 3
    assert len({t.vrf for t in c.tenants}) == 3


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "site.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "field", "reason"),
    [
        ("networks:\n  - {name: a, zone: 0, cidr: 10.0.0.0/24, gateway: 10.9.9.9}\n", "networks.0", "outside"),
        ("networks:\n  - {name: a, zone: 7, cidr: 10.0.0.0/24}\n", "networks.0.zone", "Input should be"),
        ("networks:\n  - {name: a, zone: 0, cidr: 10.0.0.0/33}\n", "networks.0.cidr", ""),
        ("tenants:\n  - {name: A B, vrf: x, l3vni: 5}\n", "tenants.0.name", "pattern"),
        ("tenants:\n  - {name: a, vrf: x, l3vni: 99999999}\n", "tenants.0.l3vni", "less than"),
        ("listeners:\n  http:\n    - {port: 70000}\n", "listeners.http.0.port", "less than"),
        ("bogus: 1\n", "bogus", "Extra inputs"),
        ("networks:\n  - {name: a, zone: 1, vrf: nope, cidr: 10.0.0.0/24}\n", "", "unknown tenant VRF"),
        ("networks:\n  - {name: a, zone: 0, cidr: 10.0.0.0/24, pools: [{start: 10.0.0.9, end: 10.0.0.2}]}\n",
         "networks.0.pools.0", "before start"),
        ("bmc_credentials:\n  x: {ref: 'plain:secret'}\n", "bmc_credentials.x.ref", "must start"),
    ],
)
def test_bad_config_names_file_field_and_reason(tmp_path: Path, text: str, field: str, reason: str) -> None:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        config.load(p, env={})
    msg = str(e.value)
    assert msg.startswith(str(p)), msg
    assert field in msg and reason in msg, msg


def test_same_cidr_twice_in_one_vrf_is_an_error_but_fine_across_vrfs(tmp_path: Path) -> None:
    tenants = "tenants:\n  - {name: a, vrf: a, l3vni: 1}\n  - {name: b, vrf: b, l3vni: 2}\n"
    ok = tenants + ("networks:\n  - {name: x, zone: 1, vrf: a, cidr: 10.0.0.0/16}\n"
                    "  - {name: y, zone: 1, vrf: b, cidr: 10.0.0.0/16}\n")
    config.load(write(tmp_path, ok), env={})
    bad = tenants + ("networks:\n  - {name: x, zone: 1, vrf: a, cidr: 10.0.0.0/16}\n"
                     "  - {name: y, zone: 1, vrf: a, cidr: 10.0.5.0/24}\n")
    with pytest.raises(ConfigError, match="overlap in VRF"):
        config.load(write(tmp_path, bad), env={})


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path / "missing.yaml", env={})
    with pytest.raises(ConfigError, match="line 2"):
        config.load(write(tmp_path, "a: 1\nb: @reserved\n"), env={})
    with pytest.raises(ConfigError, match="expected a mapping"):
        config.load(write(tmp_path, "- 1\n"), env={})


def test_env_overrides(tmp_path: Path) -> None:
    p = write(tmp_path, "database: {url: 'sqlite:///a.db'}\n")
    c = config.load(p, env={"BOOTSVC_DATABASE__URL": "sqlite:///b.db", "BOOTSVC_DHCP__UNKNOWN_CLIENTS": "discover"})
    assert c.database.url == "sqlite:///b.db" and c.dhcp.unknown_clients == "discover"
    assert config.load(p, env={"BOOTSVC_DB_URL": "sqlite:///c.db"}).database.url == "sqlite:///c.db"
    with pytest.raises(ConfigError, match=r"dhcp\.unknown_clients"):
        config.load(p, env={"BOOTSVC_DHCP__UNKNOWN_CLIENTS": "maybe"})


def test_config_is_frozen() -> None:
    c = config.load(None, env={})
    with pytest.raises(Exception, match="frozen"):
        c.site.domain = "x"  # type: ignore[misc]

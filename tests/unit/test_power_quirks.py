"""BMC identity and the quirks table: what real firmware says -> which BMC kind, with the evidence."""

from __future__ import annotations

from dataclasses import fields

import pytest

from bootsvc.power.quirks import QUIRK_RULES, Identity, QuirkRule, Quirks, match, match_identity

BF3_2410 = Identity(root_vendor="Nvidia", root_product="Nvidia-BMCMezz", systems=("Bluefield",),
                    managers=("Bluefield_BMC",), manufacturer="https://www.mellanox.com",
                    model="BlueField-3 SmartNIC Main Card", firmware="BF-24.10-10")
# BF-23.10: neither Manufacturer nor Model on Systems/Bluefield (bluefield-real.md §1)
BF3_2310 = Identity(root_vendor="Nvidia", root_product="Nvidia-BMCMezz", systems=("Bluefield",),
                    managers=("Bluefield_BMC",), firmware="BF-23.10-5")


def test_sushy_emulator() -> None:
    q, names = match("Sushy Emulator", None, "1.00")
    assert names == ("sushy-tools",)
    assert q.no_session_service and q.ignores_once and q.clear_target == "Hdd"
    assert not q.settings_resource


@pytest.mark.parametrize("ident", [BF3_2410, BF3_2310], ids=["BF-24.10", "BF-23.10"])
def test_bluefield_from_root_and_members(ident: Identity) -> None:
    m = match_identity(ident)
    assert m.names == ("nvidia-bluefield-bmc",)
    q = m.quirks
    assert q.is_dpu and q.settings_resource and q.boot_mode_uefi and q.update_target_relative
    assert not q.image_uri_scheme
    assert (q.system_id, q.manager_id) == ("Bluefield", "Bluefield_BMC")
    assert "root Vendor 'Nvidia' ~ 'nvidia'" in m.evidence[0] and "Systems member 'Bluefield'" in m.evidence[0]


def test_bluefield_from_manufacturer_model_fallback_only() -> None:
    m = match_identity(Identity(manufacturer="https://www.mellanox.com", model="BlueField-3 SmartNIC Main Card"))
    assert m.names == ("nvidia-bluefield-bmc",)
    assert m.evidence == ("nvidia-bluefield-bmc: System Manufacturer 'https://www.mellanox.com' ~ '*mellanox*'; "
                          "System Model 'BlueField-3 SmartNIC Main Card' ~ '*bluefield*'",)


def test_nvidia_but_not_bluefield_gets_nothing() -> None:
    m = match_identity(Identity(root_vendor="NVIDIA", systems=("DGX",), manufacturer="NVIDIA", model="DGX H100"))
    assert m.names == () and m.quirks == Quirks()


def test_unknown_or_missing_identity_is_standard_redfish() -> None:
    assert match(None, None, None) == (Quirks(), ())
    assert match_identity(Identity()).kind.startswith("standard Redfish")


@pytest.mark.parametrize(("ident", "name"), [
    (Identity(root_vendor="Dell", manufacturer="Dell Inc.", model="PowerEdge R750"), "dell-idrac"),
    (Identity(root_vendor="HPE", manufacturer="HPE", model="ProLiant DL385 Gen10 Plus v2"), "hpe-ilo"),
    (Identity(manufacturer="Contoso", model="3500"), "dmtf-mockup"),
])
def test_x86_vendors_by_root_vendor(ident: Identity, name: str) -> None:
    m = match_identity(ident)
    assert m.names == (name,) and m.evidence


def test_hpe_clears_without_target() -> None:
    assert match_identity(Identity(root_vendor="HPE")).quirks.clear_without_target


@pytest.mark.parametrize(("vendor", "flag"), [
    ("Supermicro", "sends_boot_object_whole"), ("Supermicro", "bootnext_for_uefi_pxe"),
    ("Lenovo", "needs_if_match"), ("Huawei", "needs_if_match"), ("GIGA-BYTE TECHNOLOGY", "needs_if_match"),
])
def test_vendor_rules(vendor: str, flag: str) -> None:
    q, names = match(vendor, "x", "y")
    assert getattr(q, flag) is True and len(names) == 1


def test_firmware_glob_and_later_rules_override_earlier() -> None:
    rules = (
        QuirkRule("acme-all", when=(("manufacturer", "acme*"),),
                  flags=(("needs_if_match", True), ("ignores_once", True))),
        QuirkRule("acme-fixed", when=(("manufacturer", "acme*"), ("firmware", "2.*")),
                  flags=(("ignores_once", False),)),
    )
    old, old_names = match("ACME Corp", "R1", "1.9.3", rules)
    new, new_names = match("ACME Corp", "R1", "2.0.1", rules)
    assert old_names == ("acme-all",) and old.ignores_once and old.needs_if_match
    assert new_names == ("acme-all", "acme-fixed") and not new.ignores_once and new.needs_if_match


def test_every_rule_uses_known_flags_keys_and_cites_a_source() -> None:
    known = {f.name for f in fields(Quirks)}
    keys = {f.name for f in fields(Identity)}
    for rule in QUIRK_RULES:
        assert {k for k, _ in rule.flags} <= known, rule.name
        assert {k for k, _ in rule.when} <= keys, rule.name
        assert rule.when, rule.name
        assert rule.source and rule.note, rule.name


def test_overrides_and_active() -> None:
    q = Quirks().with_overrides({"settings_resource": True, "system_id": "Bluefield"})
    assert q.active() == {"settings_resource": True, "system_id": "Bluefield"}
    assert Quirks().with_overrides(None) == Quirks()
    with pytest.raises(ValueError, match="unknown quirk flag"):
        Quirks().with_overrides({"ignore_once": True})

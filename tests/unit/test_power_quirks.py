"""The BMC quirks table: matching by vendor/model/firmware globs and merging flags."""

from __future__ import annotations

from dataclasses import fields

import pytest

from bootsvc.power.quirks import QUIRK_RULES, QuirkRule, Quirks, match


def test_sushy_emulator() -> None:
    q, names = match("Sushy Emulator", None, "1.00")
    assert names == ("sushy-tools",)
    assert q.no_session_service and q.ignores_once and q.clear_target == "Hdd"
    assert not q.settings_resource


@pytest.mark.parametrize("vendor", ["Nvidia", "NVIDIA", "NVIDIA Corporation"])
def test_bluefield_bmc_case_insensitive(vendor: str) -> None:
    q, names = match(vendor, "BlueField-3 DPU", "BF-24.10-5")
    assert names == ("nvidia-bluefield-bmc",)
    assert q.settings_resource and q.ignores_once and q.reset_drops_connection and q.update_target_relative
    assert (q.system_id, q.manager_id) == ("Bluefield", "Bluefield_BMC")


def test_nvidia_but_not_bluefield_gets_nothing() -> None:
    q, names = match("NVIDIA", "DGX H100", "1.0")
    assert names == () and q == Quirks()


def test_unknown_or_missing_identity_is_standard_redfish() -> None:
    assert match(None, None, None) == (Quirks(), ())
    assert match("Dell Inc.", "PowerEdge R760", "7.10") == (Quirks(), ())


@pytest.mark.parametrize(("vendor", "flag"), [
    ("Supermicro", "sends_boot_object_whole"), ("Lenovo", "needs_if_match"),
    ("Huawei", "needs_if_match"), ("GIGA-BYTE TECHNOLOGY", "needs_if_match"),
])
def test_vendor_rules(vendor: str, flag: str) -> None:
    q, names = match(vendor, "x", "y")
    assert getattr(q, flag) is True and len(names) == 1


def test_firmware_glob_and_later_rules_override_earlier() -> None:
    rules = (
        QuirkRule("acme-all", vendor="acme*", flags=(("needs_if_match", True), ("ignores_once", True))),
        QuirkRule("acme-fixed", vendor="acme*", firmware="2.*", flags=(("ignores_once", False),)),
    )
    old, old_names = match("ACME Corp", "R1", "1.9.3", rules)
    new, new_names = match("ACME Corp", "R1", "2.0.1", rules)
    assert old_names == ("acme-all",) and old.ignores_once and old.needs_if_match
    assert new_names == ("acme-all", "acme-fixed") and not new.ignores_once and new.needs_if_match


def test_every_rule_uses_known_flags_and_says_why() -> None:
    known = {f.name for f in fields(Quirks)}
    for rule in QUIRK_RULES:
        assert {k for k, _ in rule.flags} <= known, rule.name
        assert rule.note, rule.name
    assert len({r.name for r in QUIRK_RULES}) == len(QUIRK_RULES)


def test_overrides_and_active() -> None:
    q = Quirks().with_overrides({"settings_resource": True, "system_id": "Bluefield"})
    assert q.active() == {"settings_resource": True, "system_id": "Bluefield"}
    assert Quirks().with_overrides(None) == Quirks()
    with pytest.raises(ValueError, match="unknown quirk flag"):
        Quirks().with_overrides({"ignore_once": True})

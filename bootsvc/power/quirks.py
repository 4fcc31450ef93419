"""BMC quirks as data: which Redfish implementation needs which workaround.

Owns: the `Quirks` flag set, the `QUIRK_RULES` table (vendor / model / firmware glob patterns, case
insensitive, first-to-last; later rules override earlier ones flag by flag) and `match()`. The Redfish
driver asks this module instead of branching on vendor names. Pure: no I/O.

Flags (default = standard Redfish behaviour):
- ``sends_boot_object_whole``: PATCH the whole Boot object (target, enabled, mode, URI), not only the
  changed fields; Supermicro resets BootSourceOverrideMode otherwise (redfishtool #106, brief §5.1).
- ``needs_if_match``: PATCH without If-Match is refused with 428 (AMI-based incl. Lenovo AMD, Huawei
  iBMC, Lenovo XCC, Gigabyte; brief §5.4). We send If-Match whenever we have an ETag anyway; with this
  flag and no ETag we send ``If-Match: *`` (RFC 9110 §13.1.1).
- ``ignores_once``: BMC reports/keeps Continuous when Once was asked (sushy-tools, BlueField BMC,
  whose override "persists until reset or next BFB update"); expected, so not warned about. The
  driver marks such overrides sticky and `clear_boot_override` removes them after use.
- ``settings_resource``: boot changes go to the System's ``/Settings`` (pending) resource and apply at
  the next boot (BlueField BMC, brief §4.7). Also used when the System advertises @Redfish.Settings.
- ``no_session_service``: skip session login and use HTTP Basic (sushy-tools has no SessionService).
- ``reset_drops_connection``: the BMC may reset before answering a reset POST (BlueField): a dropped
  connection on ComputerSystem.Reset counts as accepted instead of "unknown".
- ``update_target_relative``: UpdateService Targets are written without the leading slash
  (``redfish/v1/UpdateService/FirmwareInventory/DPU_OS``), as NVIDIA's BF BMC docs and DPF do.
- ``system_id`` / ``manager_id``: fixed resource ids (BlueField: ``Bluefield`` / ``Bluefield_BMC``).
- ``clear_target``: BootSourceOverrideTarget written when clearing an override (sushy's libvirt
  backend cannot boot "None", so it gets "Hdd").
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Quirks:
    sends_boot_object_whole: bool = False
    needs_if_match: bool = False
    ignores_once: bool = False
    settings_resource: bool = False
    no_session_service: bool = False
    reset_drops_connection: bool = False
    update_target_relative: bool = False
    system_id: str | None = None
    manager_id: str | None = None
    clear_target: str = "None"

    def with_overrides(self, overrides: dict[str, Any] | None) -> Quirks:
        if not overrides:
            return self
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown quirk flag(s) {sorted(unknown)}; known: {sorted(known)}")
        return replace(self, **overrides)

    def active(self) -> dict[str, Any]:
        """Flags that differ from the defaults (for `bmc check`)."""
        base = Quirks()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(base, f.name)}


@dataclass(frozen=True, slots=True)
class QuirkRule:
    name: str
    vendor: str  # glob against Manufacturer (System) / Vendor (service root)
    model: str = "*"  # glob against System Model
    firmware: str = "*"  # glob against Manager FirmwareVersion
    flags: tuple[tuple[str, Any], ...] = ()
    note: str = ""

    def matches(self, vendor: str, model: str, firmware: str) -> bool:
        return (fnmatch.fnmatchcase(vendor.lower(), self.vendor.lower())
                and fnmatch.fnmatchcase(model.lower(), self.model.lower())
                and fnmatch.fnmatchcase(firmware.lower(), self.firmware.lower()))


QUIRK_RULES: tuple[QuirkRule, ...] = (
    QuirkRule("sushy-tools", vendor="Sushy Emulator",
              flags=(("no_session_service", True), ("ignores_once", True), ("clear_target", "Hdd")),
              note="OpenStack sushy-tools emulator: no SessionService, Once reported as Continuous"),
    QuirkRule("nvidia-bluefield-bmc", vendor="nvidia*", model="*bluefield*",
              flags=(("settings_resource", True), ("ignores_once", True), ("reset_drops_connection", True),
                     ("update_target_relative", True), ("system_id", "Bluefield"),
                     ("manager_id", "Bluefield_BMC")),
              note="BF3 DPU BMC (OpenBMC): /Settings for boot, reset may drop the connection"),
    QuirkRule("supermicro", vendor="supermicro*",
              flags=(("sends_boot_object_whole", True),),
              note="resets BootSourceOverrideMode unless resent"),
    QuirkRule("lenovo", vendor="lenovo*", flags=(("needs_if_match", True),), note="XCC/AMI: 428 without If-Match"),
    QuirkRule("huawei", vendor="huawei*", flags=(("needs_if_match", True),), note="iBMC: 428 without If-Match"),
    QuirkRule("gigabyte", vendor="giga*byte*", flags=(("needs_if_match", True),), note="AMI MegaRAC"),
    QuirkRule("ami", vendor="ami*", flags=(("needs_if_match", True),), note="AMI MegaRAC"),
)


def match(vendor: str | None, model: str | None, firmware: str | None,
          rules: tuple[QuirkRule, ...] = QUIRK_RULES) -> tuple[Quirks, tuple[str, ...]]:
    """Merge every rule that matches, in table order; returns the flags and the matched rule names."""
    v, m, f = vendor or "", model or "", firmware or ""
    q = Quirks()
    names: list[str] = []
    for rule in rules:
        if rule.matches(v, m, f):
            q = replace(q, **dict(rule.flags))
            names.append(rule.name)
    return q, tuple(names)

"""BMC identity and quirks as data: which Redfish implementation this is, and which workaround it needs.

Owns: the `Identity` a BMC reveals (service root ``Vendor``/``Product``, the ids of its System and
Manager members, the System's ``Manufacturer``/``Model``, the Manager's ``FirmwareVersion``), the
`Quirks` flag set, the `QUIRK_RULES` table and `match()`. Every rule row names the evidence it needs
(all of its conditions must hold, case-insensitive globs) and the source that documents the
behaviour; `match()` returns, besides the merged flags, the evidence each matching row saw, so
``bootsvc bmc check`` can print *why* a BMC was taken for what it is. Rows merge first-to-last, later
rows override earlier ones flag by flag; several rows may share a name (different evidence for the
same BMC kind: a firmware that drops Manufacturer/Model is still recognised by its root and members).
Pure: no I/O.

Identity order (what real firmware says first): service root ``Vendor``/``Product`` and the
member ids (NVIDIA/libredfish ``src/model/service_root.rs`` keys on the root), then
``Manufacturer``/``Model`` as a fallback (a BF-23.10 BMC has neither, ``../shared/docs/bluefield-real.md`` §1).

Flags (default = standard Redfish behaviour):
- ``sends_boot_object_whole``: PATCH the whole Boot object (target, enabled, mode, URI); Supermicro
  resets BootSourceOverrideMode otherwise (DMTF Redfishtool issue #106).
- ``needs_if_match``: PATCH without If-Match is refused with 428 (AMI MegaRAC based BMCs incl.
  Lenovo XCC, Huawei iBMC, Gigabyte). With this flag and no ETag we send ``If-Match: *``
  (RFC 9110 §13.1.1).
- ``ignores_once``: the BMC keeps an override after use (sushy-tools reports Continuous; the
  BlueField BMC keeps it "until set to None or a BFB is installed", bluefieldbmcv2309 boot order
  configuration). The driver marks such overrides sticky and clears them after use.
- ``settings_resource``: force boot writes to the System's ``/Settings`` object even when the
  System does not advertise ``@Redfish.Settings`` (normally detected per field, see redfish.py).
- ``boot_mode_uefi``: send ``BootSourceOverrideMode: UEFI`` with every override (BlueField:
  libredfish ``nvidia_dpu.rs::set_boot_override``; bluefieldbmcv2510 boot-configuration).
- ``no_session_service``: skip session login and use HTTP Basic (sushy-tools has no SessionService).
- ``reset_drops_connection``: the BMC may reset before answering a reset POST (BlueField).
- ``update_target_relative``: UpdateService Targets without the leading slash
  (``redfish/v1/UpdateService/FirmwareInventory/DPU_OS``; nvbmc-docs BFB-fw-update-via-redfish).
- ``image_uri_scheme``: SimpleUpdate ImageURI keeps its ``http://`` scheme. Off for the BlueField
  BMC, whose documentation and NVIDIA's tools send ``<server>/<path>`` with the protocol in
  ``TransferProtocol`` (bluefield-real.md §3.3); a site may turn it on per firmware glob
  (``power.bfb_uri_scheme_firmware``).
- ``is_dpu``: a BlueField DPU BMC (Arm never fully off; PowerCycle deferred while the host runs;
  bluefieldbmcv2401 reset control). Decides reset choice and "never wait for Off".
- ``clear_without_target``: clearing an override sends only ``BootSourceOverrideEnabled:
  Disabled`` and leaves the target alone. HPE iLO 5 is reported to refuse "clear to None" [verify]:
  iLO's own one-time-boot scripts (python-redfish-utility examples ``Set_One_Time_Boot``) treat
  "None" as a target meaning "the boot order", not as a reset of the override.
- ``bootnext_for_uefi_pxe``: a UEFI PXE override reads back as ``UefiBootNext`` (Supermicro X12/X13
  maps it onto BootNext; libredfish ``src/supermicro.rs``). Accepted as the same override.
- ``system_id`` / ``manager_id``: fixed resource ids (BlueField: ``Bluefield`` / ``Bluefield_BMC``).
- ``clear_target``: BootSourceOverrideTarget written when clearing an override (sushy's libvirt
  backend cannot boot "None", so it gets "Hdd").
"""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, fields, replace
from typing import Any


@dataclass(frozen=True, slots=True)
class Quirks:
    sends_boot_object_whole: bool = False
    needs_if_match: bool = False
    ignores_once: bool = False
    settings_resource: bool = False
    boot_mode_uefi: bool = False
    no_session_service: bool = False
    reset_drops_connection: bool = False
    update_target_relative: bool = False
    image_uri_scheme: bool = True
    is_dpu: bool = False
    clear_without_target: bool = False
    bootnext_for_uefi_pxe: bool = False
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
class Identity:
    """What a BMC says about itself. Missing fields are "" (never None) so globs can test them."""

    root_vendor: str = ""
    root_product: str = ""
    systems: tuple[str, ...] = ()  # member ids of /redfish/v1/Systems (last path segment)
    managers: tuple[str, ...] = ()  # member ids of /redfish/v1/Managers
    manufacturer: str = ""  # System Manufacturer
    model: str = ""  # System Model
    firmware: str = ""  # Manager FirmwareVersion

    def values(self, key: str) -> tuple[str, ...]:
        v = getattr(self, key)
        return tuple(v) if isinstance(v, tuple) else (str(v),)


# Condition keys a rule may test (Identity field -> how `bmc check` names it).
KEYS: dict[str, str] = {
    "root_vendor": "root Vendor", "root_product": "root Product", "systems": "Systems member",
    "managers": "Managers member", "manufacturer": "System Manufacturer", "model": "System Model",
    "firmware": "Manager FirmwareVersion",
}


@dataclass(frozen=True, slots=True)
class QuirkRule:
    name: str
    when: tuple[tuple[str, str], ...]  # (Identity key, glob); all must match; tuple keys: any member
    flags: tuple[tuple[str, Any], ...] = ()
    source: str = ""
    note: str = ""

    def evidence(self, ident: Identity) -> tuple[str, ...] | None:
        """What matched (one line per condition), or None when a condition fails."""
        out: list[str] = []
        for key, glob in self.when:
            hit = next((v for v in ident.values(key) if fnmatch.fnmatchcase(v.lower(), glob.lower())), None)
            if hit is None:
                return None
            out.append(f"{KEYS[key]} {hit!r} ~ {glob!r}")
        return tuple(out)


_BF = (("settings_resource", True), ("boot_mode_uefi", True), ("ignores_once", True),
       ("reset_drops_connection", True), ("update_target_relative", True), ("image_uri_scheme", False),
       ("is_dpu", True), ("system_id", "Bluefield"), ("manager_id", "Bluefield_BMC"))
_BF_NOTE = "BlueField-3 DPU BMC: /Settings + UEFI for boot, slash-less Targets, scheme-less ImageURI"

QUIRK_RULES: tuple[QuirkRule, ...] = (
    QuirkRule("sushy-tools", when=(("root_vendor", "Sushy Emulator"),),
              flags=(("no_session_service", True), ("ignores_once", True), ("clear_target", "Hdd")),
              source="openstack/sushy-tools emulator: no SessionService, Once reported as Continuous",
              note="OpenStack sushy-tools emulator"),
    QuirkRule("sushy-tools", when=(("manufacturer", "Sushy Emulator"),),
              flags=(("no_session_service", True), ("ignores_once", True), ("clear_target", "Hdd")),
              source="openstack/sushy-tools fake driver System Manufacturer", note="OpenStack sushy-tools emulator"),
    # BlueField-3: the root and the member names first (present on every documented firmware) ...
    QuirkRule("nvidia-bluefield-bmc", when=(("root_vendor", "nvidia"), ("systems", "bluefield")), flags=_BF,
              source="capture nvidia-bf3-bmc-24.10 (root Vendor Nvidia, Systems/Bluefield); "
                     "NVIDIA/libredfish src/model/service_root.rs", note=_BF_NOTE),
    QuirkRule("nvidia-bluefield-bmc", when=(("root_product", "nvidia-bmcmezz"), ("managers", "bluefield_bmc")),
              flags=_BF, source="capture nvidia-bf3-bmc-24.10 (Product Nvidia-BMCMezz, Managers/Bluefield_BMC); "
                                "bluefield-real.md §1", note=_BF_NOTE),
    # ... then Manufacturer/Model (BF-24.10 says mellanox.com + BlueField-3; BF-23.10 says nothing)
    QuirkRule("nvidia-bluefield-bmc", when=(("manufacturer", "*mellanox*"), ("model", "*bluefield*")), flags=_BF,
              source="capture nvidia-bf3-bmc-24.10 Systems/Bluefield Manufacturer/Model", note=_BF_NOTE),
    QuirkRule("nvidia-bluefield-bmc", when=(("manufacturer", "nvidia*"), ("model", "*bluefield*")), flags=_BF,
              source="older lab emulators and docs spelling Manufacturer NVIDIA", note=_BF_NOTE),
    QuirkRule("supermicro", when=(("manufacturer", "supermicro*"),),
              flags=(("sends_boot_object_whole", True), ("bootnext_for_uefi_pxe", True)),
              source="DMTF Redfishtool #106 (Mode reset unless resent); NVIDIA/libredfish src/supermicro.rs "
                     "(UEFI PXE read back as UefiBootNext)", note="Supermicro"),
    QuirkRule("supermicro", when=(("root_vendor", "supermicro*"),),
              flags=(("sends_boot_object_whole", True), ("bootnext_for_uefi_pxe", True)),
              source="Supermicro service root Vendor", note="Supermicro"),
    QuirkRule("dell-idrac", when=(("root_vendor", "dell"),), flags=(),
              source="capture dell-idrac9-r750 (root Vendor Dell, Product Integrated Dell Remote Access "
                     "Controller); standard Redfish boot override on the System", note="Dell iDRAC 9"),
    QuirkRule("hpe-ilo", when=(("root_vendor", "hpe"),), flags=(("clear_without_target", True),),
              source="capture hpe-ilo5-dl385 (root Vendor HPE, weak ETags); clear-to-None refusal [verify]",
              note="HPE iLO 5"),
    QuirkRule("lenovo", when=(("manufacturer", "lenovo*"),), flags=(("needs_if_match", True),),
              source="Lenovo XCC Redfish guide: PATCH needs If-Match (428 otherwise)", note="XCC/AMI"),
    QuirkRule("huawei", when=(("manufacturer", "huawei*"),), flags=(("needs_if_match", True),),
              source="Huawei iBMC Redfish API: If-Match required on PATCH", note="iBMC"),
    QuirkRule("gigabyte", when=(("manufacturer", "giga*byte*"),), flags=(("needs_if_match", True),),
              source="AMI MegaRAC Redfish: 428 without If-Match", note="AMI MegaRAC"),
    QuirkRule("ami", when=(("manufacturer", "ami*"),), flags=(("needs_if_match", True),),
              source="AMI MegaRAC Redfish: 428 without If-Match", note="AMI MegaRAC"),
    QuirkRule("dmtf-mockup", when=(("manufacturer", "contoso"),), flags=(),
              source="capture dmtf-public-rackmount1 (DMTF Redfish-Mockup-Server public-rackmount1)",
              note="DMTF reference mockup (fictional vendor Contoso)"),
)


@dataclass(frozen=True, slots=True)
class Match:
    quirks: Quirks
    names: tuple[str, ...]  # matched rule names, deduplicated, table order
    evidence: tuple[str, ...]  # "rule: cond; cond" per matching row

    @property
    def kind(self) -> str:
        """A human name for what this BMC is."""
        return self.names[-1] if self.names else "standard Redfish (no rule matched)"


def match_identity(ident: Identity, rules: tuple[QuirkRule, ...] = QUIRK_RULES) -> Match:
    """Merge every rule whose conditions all hold, in table order."""
    if rules is QUIRK_RULES:
        return _match_table(ident)
    return _match(ident, rules)


@functools.lru_cache(maxsize=1024)
def _match_table(ident: Identity) -> Match:
    # A login and a discovery each match an identity (~0.1-0.2 ms of fnmatch over the table); a fleet
    # has a handful of distinct ones (vendor, product, member names, model, firmware). Match is frozen.
    return _match(ident, QUIRK_RULES)


def _match(ident: Identity, rules: tuple[QuirkRule, ...]) -> Match:
    q = Quirks()
    names: list[str] = []
    evidence: list[str] = []
    for rule in rules:
        seen = rule.evidence(ident)
        if seen is None:
            continue
        q = replace(q, **dict(rule.flags))
        if rule.name not in names:
            names.append(rule.name)
        evidence.append(f"{rule.name}: " + "; ".join(seen))
    return Match(q, tuple(names), tuple(evidence))


def match(vendor: str | None, model: str | None, firmware: str | None,
          rules: tuple[QuirkRule, ...] = QUIRK_RULES) -> tuple[Quirks, tuple[str, ...]]:
    """Manufacturer/Model/firmware only (no root, no members): the fallback path."""
    m = match_identity(Identity(manufacturer=vendor or "", model=model or "", firmware=firmware or "",
                                root_vendor=vendor or ""), rules)
    return m.quirks, m.names

"""The scanner-friendly enroll form's checks: each field validated with a message that says what to
scan or type next (and a link to the machine that already holds a serial, MAC or slot), and the host +
DPU `inventory.NodeSpec` built when all is well. `operations.enroll` stays the authority; this only
answers a tech in the form's own words before it is asked. The two fixed addresses (the DPU's in Zone 0,
the host's in its tenant's network) follow one rule, per VRF as DHCP keys them."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any

from flask import url_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from bootsvc import inventory
from bootsvc.config import Config, NetworkConfig
from bootsvc.models import Nic, Node, Tenant
from bootsvc.power.base import BmcAddress, BmcError
from bootsvc.power.credentials import destination_problem

ENROLL_FIELDS = ("rack", "slot", "host_serial", "host_mac", "dpu_serial", "dpu_mac", "tenant", "hostname",
                 "host_ip", "host_bmc", "dpu_bmc", "bmc_driver", "bmc_credential", "host_bmc_mac", "dpu_bmc_mac",
                 "dpu_oob_ip", "host_arch", "dpu_arch", "provision")
# CPU architecture per kind: it picks the installer kernel (a BlueField is aarch64; the lab's x86 DPU VMs
# and most hosts are x86_64). The form's defaults are the common case.
ARCHES = ("x86_64", "aarch64")
DEFAULT_ARCH = {"host": "x86_64", "dpu": "aarch64"}
# What stays filled in for the next machine after an enroll (a tech scans a batch of the same kind).
ENROLL_KEEP = ("rack", "tenant", "bmc_driver", "bmc_credential", "host_arch", "dpu_arch")
_RACK_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")


def _name_from(text: str) -> str:
    n = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return re.sub(r"-{2,}", "-", n)[:57].strip("-")


def _link_to(n: Node) -> str:
    return url_for("ui.machine", node_id=n.id)


@dataclass
class EnrollResult:
    errors: dict[str, str] = field(default_factory=dict)
    links: dict[str, str] = field(default_factory=dict)  # field -> machine URL relevant to the error
    values: dict[str, str] = field(default_factory=dict)


def validate_enroll(s: Session, form: dict[str, str],
                    config: Config) -> tuple[EnrollResult, list[inventory.NodeSpec]]:
    """Check each field and say what to do next; build the host + DPU specs when all is well."""
    r = EnrollResult(values=dict(form))
    err, link = r.errors, r.links
    rack = form.get("rack", "").strip()
    if not rack:
        err["rack"] = "Type or scan the rack name (e.g. R12), as written on the rack label."
    elif not _RACK_RE.match(rack):
        err["rack"] = "Use letters, digits, '.', '_' or '-' (at most 32), e.g. R12."
    slot_text = form.get("slot", "").strip()
    slot: int | None = None
    if not slot_text:
        err["slot"] = "Type the slot (U position) number printed on the rack rail, e.g. 17."
    elif not slot_text.isdigit() or not 0 <= int(slot_text) <= 1000:
        err["slot"] = f"{slot_text!r} is not a slot number: type a whole number between 0 and 1000."
    else:
        slot = int(slot_text)
    macs: dict[str, str] = {}
    for fld, what in (("host_mac", "host NIC"), ("dpu_mac", "DPU OOB port"), ("host_bmc_mac", "host BMC"),
                      ("dpu_bmc_mac", "DPU BMC")):
        text = form.get(fld, "").strip()
        if not text:
            if fld in ("host_mac", "dpu_mac"):
                err[fld] = f"Scan the {what} MAC label (12 hex digits, any format)."
            continue
        try:
            m = inventory.normalize_mac(text)
        except ValueError:
            err[fld] = (f"{text!r} is not a MAC address. Scan the label marked MAC (12 hex digits, e.g. "
                        "B8:3F:D2:12:34:56), not the serial number.")
            continue
        if m in macs.values():
            other = next(k for k, v in macs.items() if v == m)
            err[fld] = (f"{m} was already scanned above ({other.replace('_', ' ')}): "
                        "scan this NIC's own label.")
            continue
        owner = s.scalars(select(Node).join(Nic).where(Nic.mac == m)).first()
        if owner is not None:
            err[fld] = (f"{m} already belongs to {owner.kind} {owner.name} (serial {owner.serial}). "
                        "Check you scanned the right card; if the card moved, retire or edit that node first.")
            link[fld] = _link_to(owner)
            continue
        macs[fld] = m
    serials: dict[str, str] = {}
    for fld, what in (("host_serial", "host"), ("dpu_serial", "DPU")):
        text = form.get(fld, "").strip()
        if not text:
            err[fld] = f"Scan the {what}'s serial number label."
            continue
        if len(text) > 64 or not text.isprintable():
            err[fld] = "A serial is at most 64 printable characters: rescan the label."
            continue
        try:
            inventory.normalize_mac(text)
            looks_mac = True
        except ValueError:
            looks_mac = False
        if looks_mac:
            err[fld] = (f"{text!r} looks like a MAC address, not a serial: scan the label marked S/N "
                        f"for the {what}.")
            continue
        if text in serials.values():
            err[fld] = "Host and DPU cannot have the same serial: scan the DPU card's own S/N label."
            continue
        owner = s.scalars(select(Node).where(Node.serial == text)).first()
        if owner is not None:
            err[fld] = f"Serial {text} is already enrolled as {owner.kind} {owner.name}: open it instead."
            link[fld] = _link_to(owner)
            continue
        serials[fld] = text
    tenant = form.get("tenant", "").strip() or None
    tenant_row = s.scalars(select(Tenant).where(Tenant.name == tenant)).first() if tenant else None
    if tenant and tenant_row is None:
        err["tenant"] = f"No tenant named {tenant!r}: pick one from the list (or leave it empty)."
    hostname = form.get("hostname", "").strip().lower()
    if hostname:
        if not re.match(r"^[a-z0-9]([a-z0-9-]{0,57}[a-z0-9])?$", hostname):
            err["hostname"] = ("Use lower-case letters, digits and '-' (a DNS name, at most 59 characters), "
                               "or leave it empty to name it after rack and slot.")
    elif rack and slot is not None and "rack" not in err:
        hostname = _name_from(f"{rack}-u{slot:02d}")
    elif serials.get("host_serial"):
        hostname = _name_from(serials["host_serial"])
    dpu_name = f"{hostname}-dpu" if hostname else ""
    if hostname and "hostname" not in err:
        for nm, fld in ((hostname, "hostname"), (dpu_name, "hostname")):
            owner = s.scalars(select(Node).where(Node.name == nm)).first()
            if owner is not None:
                err[fld] = (f"A node named {nm} exists ({owner.kind}, serial {owner.serial}). Type another "
                            "host name, or check rack and slot.")
                link[fld] = _link_to(owner)
                break
    if rack and slot is not None and "rack" not in err and "slot" not in err:
        taken = s.scalars(select(Node).where(Node.rack == rack, Node.slot == slot, Node.kind == "host")).first()
        if taken is not None:
            err["slot"] = (f"Rack {rack} slot {slot} already holds host {taken.name} (serial {taken.serial}). "
                           "Check the slot number; if that machine was removed, retire it first.")
            link["slot"] = _link_to(taken)
    driver = form.get("bmc_driver", "redfish") or "redfish"
    if driver not in ("redfish", "fake"):
        err["bmc_driver"] = "Choose redfish (real BMCs) or fake (lab only)."
    cred = form.get("bmc_credential", "").strip() or None
    if cred and cred not in config.bmc_credentials:
        err["bmc_credential"] = f"No BMC credential named {cred!r} in the site config: pick one from the list."
    for fld in ("host_bmc", "dpu_bmc"):
        addr = form.get(fld, "").strip()
        if addr and driver == "redfish":
            try:
                BmcAddress.parse(addr)
            except BmcError as e:
                err[fld] = f"{e.message}: type the BMC as an IP or host name, e.g. 10.1.2.3 or https://10.1.2.3."
                continue
            why = destination_problem(cred, addr, config.bmc_credentials) \
                if cred and cred in config.bmc_credentials else None
            if why is not None:
                err[fld] = f"{why[0].upper()}{why[1:]}: type this BMC's IP address, or pick its credential."
    dpu_ip = _check_oob_ip(s, form.get("dpu_oob_ip", "").strip(), config, err, link)
    host_ip = _check_host_ip(s, form.get("host_ip", "").strip(), tenant, tenant_row, config, err, link)
    arch: dict[str, str] = {}
    for kind in ("host", "dpu"):
        arch[kind] = form.get(f"{kind}_arch", "").strip() or DEFAULT_ARCH[kind]
        if arch[kind] not in ARCHES:
            err[f"{kind}_arch"] = (f"Choose the {'DPU' if kind == 'dpu' else 'host'} CPU architecture: "
                                   f"{' or '.join(ARCHES)}.")
    if err:
        return r, []
    host_nics = [inventory.NicSpec(macs["host_mac"], "host-pf", ipv4=host_ip)]
    if "host_bmc_mac" in macs:
        host_nics.append(inventory.NicSpec(macs["host_bmc_mac"], "bmc"))
    dpu_nics = [inventory.NicSpec(macs["dpu_mac"], "oob", ipv4=dpu_ip)]
    if "dpu_bmc_mac" in macs:
        dpu_nics.append(inventory.NicSpec(macs["dpu_bmc_mac"], "bmc"))
    common: dict[str, Any] = {"rack": rack, "slot": slot, "tenant": tenant, "bmc_driver": driver,
                              "bmc_credential_ref": cred}
    host = inventory.NodeSpec(name=hostname, kind="host", serial=serials["host_serial"], nics=host_nics,
                              arch=arch["host"], bmc_address=form.get("host_bmc", "").strip() or None, **common)
    dpu = inventory.NodeSpec(name=dpu_name, kind="dpu", serial=serials["dpu_serial"], nics=dpu_nics,
                             arch=arch["dpu"], bmc_address=form.get("dpu_bmc", "").strip() or None, host=hostname,
                             **common)
    return r, [host, dpu]


def _check_oob_ip(s: Session, text: str, config: Config, err: dict[str, str], link: dict[str, str]) -> str | None:
    """The DPU OOB port's fixed Zone 0 address (``Nic.ipv4``): bootsvc's DHCP always gives the DPU this
    address, so its agent and BMC-side tooling find it at a known place. Empty = from the pool."""
    if not text:
        return None
    return _fixed_ip(s, "dpu_oob_ip", text, [n for n in config.networks if n.zone == 0], "",
                     where="a Zone 0 (OOB) network", example="10.77.0.5", who="DPU", err=err, link=link)


def evpn_site(config: Config) -> bool:
    """The site runs EVPN (``fabric.asn``, or the older ``orchestration.evpn_asn``; bootsvc/policy.py
    ``evpn_asn``): a host then boots only once its DPU announces the host's reserved /32 (docs/fabric.md,
    the boot gate's ``host_prefix`` check in bootsvc/fabric.py)."""
    f = config.fabric
    return f.evpn and (f.asn is not None or config.orchestration.evpn_asn is not None)


def tenant_networks(config: Config, vrf: str) -> list[NetworkConfig]:
    """The Zone 1 networks of the tenant whose VRF is ``vrf``: where its hosts' addresses live."""
    return [n for n in config.networks if n.zone == 1 and n.vrf == vrf]


def _check_host_ip(s: Session, text: str, tenant: str | None, tenant_row: Tenant | None, config: Config,
                   err: dict[str, str], link: dict[str, str]) -> str | None:
    """The host's fixed address in its tenant's network, reserved on its host-facing NIC (``Nic.ipv4`` of
    the ``host-pf`` NIC, as ``--mac MAC,host-pf,IP`` does on the CLI and ``nics[].ipv4`` in the API):
    bootsvc's DHCP gives the host this address in the tenant VRF (dhcp/clients.py), and with EVPN the DPU
    announces it as the host's /32. Empty = none yet (from the tenant pool, and no boot under EVPN)."""
    if not text:
        return None
    fld = "host_ip"
    if tenant_row is None:
        if not tenant:  # a wrong tenant name already has its own message
            err[fld] = ("A host address lives in its tenant's network: pick the tenant above, or leave the "
                        "address empty.")
        return None
    nets = tenant_networks(config, tenant_row.vrf)
    if not nets:
        err[fld] = (f"Tenant {tenant_row.name} has no network in the site config (a Zone 1 network with vrf "
                    f"{tenant_row.vrf}): leave the address empty and ask an admin to add the network.")
        return None
    return _fixed_ip(s, fld, text, nets, tenant_row.vrf, where=f"tenant {tenant_row.name}'s network",
                     example="10.0.0.11", who="host", scope=f" in tenant {tenant_row.name}", err=err, link=link)


def _fixed_ip(s: Session, fld: str, text: str, nets: list[NetworkConfig], vrf: str, *, where: str, example: str,
              who: str, scope: str = "", err: dict[str, str], link: dict[str, str]) -> str | None:
    """One rule for a fixed address typed into the form: an IPv4 address inside one of ``nets``, not its
    network, broadcast, gateway or boot server address, and not reserved by another node in ``vrf``."""
    try:
        ip = ipaddress.IPv4Address(text)
    except ValueError:
        err[fld] = f"{text!r} is not an IPv4 address: type four numbers, e.g. {example}, or leave it empty."
        return None
    net = next((n for n in nets if ip in n.cidr), None)
    if net is None:
        cidrs = ", ".join(str(n.cidr) for n in nets) or "none is configured"
        err[fld] = f"{ip} is not in {where} ({cidrs}): type an address there, or leave it empty."
        return None
    special = {net.cidr.network_address: "network", net.cidr.broadcast_address: "broadcast"}
    if net.gateway is not None:
        special[net.gateway] = "gateway"
    if net.boot_server is not None:
        special[net.boot_server] = "boot server"
    if ip in special:
        err[fld] = f"{ip} is the {special[ip]} address of {net.name}: pick a free address for the {who}."
        return None
    owner = _holder(s, str(ip), vrf)
    if owner is not None:
        err[fld] = f"{ip} is already reserved for {owner.kind} {owner.name}{scope}: pick another address."
        link[fld] = _link_to(owner)
        return None
    return str(ip)


def _holder(s: Session, address: str, vrf: str) -> Node | None:
    """The node that reserves ``address`` in ``vrf``. A host's reservation lives in its tenant's VRF, every
    other one in the default VRF (the key bootsvc/dhcp/clients.py gives them), so tenants may overlap."""
    for n in s.scalars(select(Node).join(Nic).where(Nic.ipv4 == address)).unique():
        if (n.tenant.vrf if n.kind == "host" and n.tenant is not None else "") == vrf:
            return n
    return None


def enroll_field(error_field: str) -> str:
    """Map an inventory error field ('1.nics.0.mac', '0.serial', 'tenant') to the form field."""
    parts = error_field.split(".")
    who = "host" if parts[0] == "0" else "dpu" if parts[0] == "1" else ""
    rest = parts[1:] if who else parts
    if not rest:
        return "host_serial"
    if rest[0] == "nics":
        if rest[-1] == "ipv4":
            return "dpu_oob_ip" if who == "dpu" else "host_ip"
        return f"{who or 'host'}_mac"
    if rest[0] == "serial":
        return f"{who or 'host'}_serial"
    if rest[0] in ("name", "host"):
        return "hostname"
    if rest[0] in ("tenant", "slot", "rack", "bmc_driver"):
        return rest[0]
    if rest[0] == "arch":
        return f"{who or 'host'}_arch"
    return "host_serial"

"""Read views of inventory records: plain frozen dataclasses, safe to hand to pure code.

Owns: the shapes protocol servers, the boot plan and renderers see (``NodeView`` and friends).
Pure: no database import, so pure modules (bootplan, render, dhcp.decide) can depend on it.
``bootsvc.inventory`` builds these from the database.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class TenantView:
    id: int
    name: str
    vrf: str
    l3vni: int
    table: int | None
    prefixes: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NicView:
    mac: str
    role: str
    ipv4: str | None


@dataclass(frozen=True, slots=True)
class NodeView:
    id: int
    name: str
    kind: str
    serial: str
    state: str
    arch: str
    vendor: str | None
    model: str | None
    rack: str | None
    slot: int | None
    tenant: TenantView | None
    host_id: int | None
    dpu_ids: tuple[int, ...]
    nics: tuple[NicView, ...]
    bmc_address: str | None
    bmc_driver: str
    bmc_credential_ref: str | None
    bmc_verify_tls: bool
    provision_method: str
    image: str | None
    secret_generation: int
    deadline: dt.datetime | None
    attempts: int
    last_error: str | None
    hint: str | None
    version: int
    state_since: dt.datetime | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def mac(self, role: str) -> str | None:
        return next((n.mac for n in self.nics if n.role == role), None)


def iso_utc(t: dt.datetime | None) -> str | None:
    """ISO-8601 in UTC with a ``Z`` (``2026-12-06T04:45:34Z``) for every timestamp a person or a script
    reads; the database stores naive UTC (SQLite keeps no zone), so a naive value is UTC."""
    if t is None:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.astimezone(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")

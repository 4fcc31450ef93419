"""Request, response and query models of ``/api/v1`` (pydantic): what the API validates is exactly what
the OpenAPI document (``bootsvc.web.openapi``) publishes. No routes, no database here."""

from __future__ import annotations

import datetime as dt
import ipaddress
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from bootsvc import inventory
from bootsvc.states import State

_NAME = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
_PRINTABLE = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"  # printable ASCII, no edge spaces, no NUL


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------ schemas
class NicIn(_In):
    mac: str = Field(max_length=32, description="MAC, any common notation")
    role: Literal["oob", "host-pf", "bmc"] = "oob"
    ipv4: str | None = Field(default=None, max_length=15, description="fixed address reservation")

    @field_validator("mac")
    @classmethod
    def _mac(cls, v: str) -> str:
        return inventory.normalize_mac(v)

    @field_validator("ipv4")
    @classmethod
    def _ip(cls, v: str | None) -> str | None:
        return None if v is None else str(ipaddress.IPv4Address(v))


class MachineNodeIn(_In):
    name: str = Field(pattern=_NAME, max_length=63)
    serial: str = Field(min_length=1, max_length=64, pattern=_PRINTABLE)
    nics: list[NicIn] = Field(default_factory=list, max_length=16)
    vendor: str | None = Field(default=None, max_length=64, pattern=_PRINTABLE)
    model: str | None = Field(default=None, max_length=64, pattern=_PRINTABLE)
    rack: str | None = Field(default=None, max_length=32, pattern=_PRINTABLE)
    slot: int | None = Field(default=None, ge=0, le=1000)
    arch: str | None = Field(default=None, max_length=16, pattern=r"^[a-z0-9_]+$")
    bmc_address: str | None = Field(default=None, max_length=255, pattern=_PRINTABLE)
    bmc_driver: Literal["redfish", "fake"] = "redfish"
    bmc_credential_ref: str | None = Field(default=None, max_length=255, pattern=_PRINTABLE)
    bmc_verify_tls: bool = True
    provision_method: Literal["pxe", "redfish"] | None = Field(
        default=None, description="null: the site default (boot.provision_method)")
    image: str | None = Field(default=None, max_length=128, pattern=_PRINTABLE)


class NodeIn(MachineNodeIn):
    kind: Literal["dpu", "host"]
    tenant: str | None = Field(default=None, max_length=63, pattern=_NAME)
    host: str | None = Field(default=None, max_length=64, pattern=_PRINTABLE,
                             description="for a DPU: name or serial of the host it fronts")


class MachineIn(_In):
    host: MachineNodeIn
    dpus: list[MachineNodeIn] = Field(default_factory=list, max_length=4)
    tenant: str | None = Field(default=None, max_length=63, pattern=_NAME)


class NicOut(BaseModel):
    mac: str
    role: str
    ipv4: str | None


class NodeOut(BaseModel):
    id: int
    name: str
    kind: str
    serial: str
    state: str
    allowed_triggers: list[str]
    arch: str
    vendor: str | None
    model: str | None
    rack: str | None
    slot: int | None
    tenant: str | None
    host_id: int | None
    dpu_ids: list[int]
    nics: list[NicOut]
    bmc_address: str | None
    bmc_driver: str
    bmc_credential_ref: str | None
    provision_method: str
    image: str | None
    attempts: int
    deadline: dt.datetime | None
    state_since: dt.datetime | None
    last_error: str | None
    hint: str | None
    version: int


class Page(BaseModel):
    total: int
    limit: int
    offset: int


class NodeList(Page):
    items: list[NodeOut]


class MachineOut(BaseModel):
    host: NodeOut
    dpus: list[NodeOut]


class MachineList(Page):
    items: list[MachineOut]


class TenantIn(_In):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    vrf: str = Field(pattern=r"^[A-Za-z0-9_-]{1,15}$")
    l3vni: int = Field(ge=1, le=16_777_215)
    prefixes: list[str] = Field(default_factory=list, max_length=64)
    table: int | None = Field(default=None, ge=1, le=2**31 - 1)

    @field_validator("prefixes")
    @classmethod
    def _nets(cls, v: list[str]) -> list[str]:
        return [str(ipaddress.IPv4Network(p, strict=True)) for p in v]


class TenantOut(BaseModel):
    id: int
    name: str
    vrf: str
    l3vni: int
    table: int | None
    prefixes: list[str]
    nodes: int


class TenantList(Page):
    items: list[TenantOut]


class TenantAssignIn(_In):
    tenant: str | None = Field(max_length=63, pattern=_NAME, description="tenant name, or null to unassign")


class TransitionIn(_In):
    reason: str | None = Field(default=None, max_length=500)
    manual_power: bool = Field(default=False, description="provision a DPU that has no BMC: someone powers "
                                                           "it on by hand")
    no_dpu: bool = Field(default=False, description="provision a host the site declares DPU-less (no tenant "
                                                     "isolation by a DPU)")


class TransitionOut(BaseModel):
    node: str
    from_state: str
    to_state: str
    event_id: int


class MachineTransitionOut(BaseModel):
    results: list[TransitionOut]


class PowerIn(_In):
    action: Literal["on", "off", "graceful-off", "reset", "cycle"]


class PowerOut(BaseModel):
    node: str
    action: str
    power_state: str


class EventOut(BaseModel):
    id: int
    node_id: int
    at: dt.datetime
    from_state: str | None
    to_state: str | None
    trigger: str
    actor: str
    detail: dict[str, Any]


class EventList(Page):
    items: list[EventOut]


class ImageFileOut(BaseModel):
    role: str
    name: str
    sha256: str
    url: str


class ImageOut(BaseModel):
    name: str
    version: str
    kind: str
    files: list[ImageFileOut]


class ImageList(Page):
    defaults: dict[str, str]
    items: list[ImageOut]


class LeaseOut(BaseModel):
    id: int
    vrf: str
    network: str
    address: str
    mac: str
    client_id: str | None
    hostname: str | None
    node_id: int | None
    state: str
    expires_at: dt.datetime
    updated_at: dt.datetime


class LeaseList(Page):
    items: list[LeaseOut]


class SubscriberIn(_In):
    name: str = Field(pattern=_NAME, max_length=63)
    url: str = Field(max_length=1024, pattern=r"^https?://[\x21-\x7e]+$")
    secret_ref: str = Field(max_length=255, pattern=r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/[\x21-\x7e]+)$")
    active: bool = True


class SubscriberOut(BaseModel):
    id: int
    name: str
    url: str
    secret_ref: str
    active: bool
    pending: int


class SubscriberList(Page):
    items: list[SubscriberOut]


# ------------------------------------------------------------------------------------------ queries
class PageQ(_In):
    limit: int = Field(default=100, ge=1, le=1000)
    offset: int = Field(default=0, ge=0, le=10**9)


class NodeQ(PageQ):
    kind: Literal["dpu", "host"] | None = None
    state: Literal[tuple(s.value for s in State)] | None = None  # type: ignore[valid-type]
    tenant: str | None = Field(default=None, max_length=63, pattern=_NAME)
    rack: str | None = Field(default=None, max_length=32, pattern=_PRINTABLE)


class MachineQ(PageQ):
    tenant: str | None = Field(default=None, max_length=63, pattern=_NAME)
    rack: str | None = Field(default=None, max_length=32, pattern=_PRINTABLE)
    state: Literal[tuple(s.value for s in State)] | None = Field(  # type: ignore[valid-type]
        default=None, description="state of the host")


class EventQ(PageQ):
    node: str | None = Field(default=None, max_length=64, pattern=_PRINTABLE, description="name, serial or id")
    trigger: str | None = Field(default=None, max_length=32, pattern=r"^[a-z_]+$")
    after_id: int | None = Field(default=None, ge=0, le=2**62, description="cursor: only events with a larger id")


class LeaseQ(PageQ):
    vrf: str | None = Field(default=None, max_length=15, pattern=r"^[A-Za-z0-9_-]*$")
    state: Literal["offered", "bound", "declined", "released", "expired"] | None = None
    mac: str | None = Field(default=None, max_length=32)

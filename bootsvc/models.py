"""SQLAlchemy 2 typed models: the columns of bootsvc's database, nothing else.

Owns: table and column definitions and constraints. No behaviour lives here: state changes go
through ``bootsvc.lifecycle``, lease writes through ``bootsvc.dhcp.leases``, reads through
``bootsvc.inventory``. Alembic migrations in ``migrations/`` must match these (``alembic check``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


UTC = DateTime(timezone=True)


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    vrf: Mapped[str] = mapped_column(String(15), unique=True)
    l3vni: Mapped[int] = mapped_column(Integer, unique=True)
    table: Mapped[int | None] = mapped_column(Integer)
    prefixes: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)


# ``nodes.change_seq`` of a node UPDATE: one more than the table's highest (an index lookup).
NEXT_CHANGE_SEQ = text("(SELECT coalesce(max(change_seq), 0) + 1 FROM nodes)")


class Node(Base):
    """A DPU or a host. A DPU's ``host_id`` names the host it fronts."""

    __tablename__ = "nodes"
    __table_args__ = (
        CheckConstraint("kind IN ('dpu', 'host')", name="kind"),
        CheckConstraint("provision_method IN ('pxe', 'redfish')", name="provision_method"),
        Index("ix_nodes_state_deadline", "state", "deadline"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    kind: Mapped[str] = mapped_column(String(8))
    serial: Mapped[str] = mapped_column(String(64), unique=True)
    vendor: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(64))
    rack: Mapped[str | None] = mapped_column(String(32))
    slot: Mapped[int | None] = mapped_column(Integer)
    arch: Mapped[str] = mapped_column(String(16), default="aarch64")
    state: Mapped[str] = mapped_column(String(32), default="registered", index=True)
    tenant_id: Mapped[int | None] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    host_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id", ondelete="SET NULL"), index=True)
    bmc_address: Mapped[str | None] = mapped_column(String(255))
    bmc_driver: Mapped[str] = mapped_column(String(16), default="redfish")
    bmc_credential_ref: Mapped[str | None] = mapped_column(String(255))  # a name in config, never a secret
    bmc_verify_tls: Mapped[bool] = mapped_column(Boolean, default=True)
    provision_method: Mapped[str] = mapped_column(String(8), default="pxe")
    image: Mapped[str | None] = mapped_column(String(128))  # image catalog name[:version] to install
    deadline: Mapped[dt.datetime | None] = mapped_column(UTC)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    hint: Mapped[str | None] = mapped_column(Text)  # what a tech should do next
    secret_generation: Mapped[int] = mapped_column(Integer, default=1)
    # Boot-plane identity (bootsvc/web/agent_api.py, docs/security.md): the generation whose secret
    # the agent received in a check-in response (None: the current one only travelled in a bf.cfg),
    # whether the agent has used it since, and the install attempt (event id) bf.cfg was served for.
    agent_generation: Mapped[int | None] = mapped_column(Integer)
    agent_secret_confirmed: Mapped[bool] = mapped_column(Boolean, default=False)
    bfcfg_attempt: Mapped[int | None] = mapped_column(Integer)
    claimed_by: Mapped[str | None] = mapped_column(String(128))  # conductor claim (lease-style)
    claim_expires: Mapped[dt.datetime | None] = mapped_column(UTC)
    # conductor bookkeeping (bootsvc.conductor): the step already done in this state entry, BMC
    # failures of that step, when to look at the node next (backoff), a BMC task being followed
    action_key: Mapped[str | None] = mapped_column(String(128))
    action_failures: Mapped[int] = mapped_column(Integer, default=0)
    next_check_at: Mapped[dt.datetime | None] = mapped_column(UTC)
    bmc_task: Mapped[str | None] = mapped_column(String(512))
    boot_override_set: Mapped[bool] = mapped_column(Boolean, default=False)  # one-time boot to clear after use
    state_since: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    version: Mapped[int] = mapped_column(Integer, nullable=False)
    # The conductor's change feed (bootsvc.conductor_scan): every UPDATE of a node row - ORM flush or
    # Core update(), any column - sets it above every value in the table, so a pass reads only the
    # rows changed since its last one (``change_seq > mark``, this index). Computed inside the UPDATE:
    # on SQLite, under its one write lock, the values follow commit order. Inserts leave 0: a node is
    # enrolled ``registered``, and only an update moves it into a state the conductor works on.
    change_seq: Mapped[int] = mapped_column(BigInteger, index=True, default=0, server_default=text("0"),
                                            deferred=True, onupdate=NEXT_CHANGE_SEQ)

    __mapper_args__ = {"version_id_col": version}

    tenant: Mapped[Tenant | None] = relationship(lazy="joined")
    nics: Mapped[list[Nic]] = relationship(back_populates="node", cascade="all, delete-orphan",
                                           lazy="selectin")
    dpus: Mapped[list[Node]] = relationship(back_populates="host", foreign_keys=[host_id])
    host: Mapped[Node | None] = relationship(back_populates="dpus", remote_side=[id],
                                             foreign_keys=[host_id])


class Nic(Base):
    __tablename__ = "nics"
    __table_args__ = (CheckConstraint("role IN ('oob', 'host-pf', 'bmc')", name="role"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    mac: Mapped[str] = mapped_column(String(17), unique=True)  # lower-case, colon separated
    role: Mapped[str] = mapped_column(String(8))
    ipv4: Mapped[str | None] = mapped_column(String(15))  # fixed address, if reserved
    node: Mapped[Node] = relationship(back_populates="nics")


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("name", "version", name="name_version"),
        CheckConstraint("kind IN ('bfb', 'kernel-initrd', 'host-os', 'nbp')", name="kind"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1024))
    meta: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)


class Lease(Base):
    """One address in one VRF. Unique per (vrf, address): the database is the arbiter between
    bootsvc instances sharing a PostgreSQL (two can never lease the same address)."""

    __tablename__ = "leases"
    __table_args__ = (
        UniqueConstraint("vrf", "address", name="vrf_address"),
        Index("ix_leases_vrf_mac", "vrf", "mac"),
        CheckConstraint("state IN ('offered', 'bound', 'declined', 'released', 'expired')", name="state"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    vrf: Mapped[str] = mapped_column(String(15), default="")
    network: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(15))
    mac: Mapped[str] = mapped_column(String(17))
    client_id: Mapped[str | None] = mapped_column(String(255))
    hostname: Mapped[str | None] = mapped_column(String(255))
    node_id: Mapped[int | None] = mapped_column(ForeignKey("nodes.id", ondelete="SET NULL"), index=True)
    state: Mapped[str] = mapped_column(String(10))
    expires_at: Mapped[dt.datetime] = mapped_column(UTC)
    updated_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    relay: Mapped[str | None] = mapped_column(String(15))
    circuit_id: Mapped[str | None] = mapped_column(String(255))
    remote_id: Mapped[str | None] = mapped_column(String(255))


class Event(Base):
    """Append-only log of everything that happened to a node (transitions and notes)."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_node_at", "node_id", "at"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    from_state: Mapped[str | None] = mapped_column(String(32))
    to_state: Mapped[str | None] = mapped_column(String(32))
    trigger: Mapped[str] = mapped_column(String(32))
    actor: Mapped[str] = mapped_column(String(128))
    detail: Mapped[dict[str, Any]] = mapped_column(default=dict)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    __table_args__ = (
        CheckConstraint("role IN ('admin', 'tech', 'automation', 'viewer', 'agent')", name="role"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the token
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(UTC)
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTC)  # None: never (only when asked for)


class UiSession(Base):
    """A web UI login (``bootsvc.web.ui``): the cookie carries a random id, the database its hash.
    Logout ends it; revoking or expiring its token ends it too."""

    __tablename__ = "ui_sessions"
    id: Mapped[int] = mapped_column(primary_key=True)
    session_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the cookie's id
    token_id: Mapped[int] = mapped_column(ForeignKey("api_tokens.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(UTC)
    ended_at: Mapped[dt.datetime | None] = mapped_column(UTC)


class Discovered(Base):
    """A MAC that PXE-booted without being enrolled (``dhcp.unknown_clients: discover``): what the
    DHCP server saw, so a tech can enroll it. Written by ``bootsvc.dhcp``."""

    __tablename__ = "discovered"
    id: Mapped[int] = mapped_column(primary_key=True)
    mac: Mapped[str] = mapped_column(String(17), unique=True)
    first_seen: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    last_seen: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    seen_count: Mapped[int] = mapped_column(Integer, default=1)
    vrf: Mapped[str] = mapped_column(String(15), default="")
    network: Mapped[str | None] = mapped_column(String(64))
    address: Mapped[str | None] = mapped_column(String(15))
    arch: Mapped[int | None] = mapped_column(Integer)  # DHCP option 93
    vendor_class: Mapped[str | None] = mapped_column(String(255))  # option 60
    user_class: Mapped[str | None] = mapped_column(String(255))  # option 77
    uuid: Mapped[str | None] = mapped_column(String(36))  # option 97 (SMBIOS UUID as sent)
    relay: Mapped[str | None] = mapped_column(String(15))
    circuit_id: Mapped[str | None] = mapped_column(String(255))
    remote_id: Mapped[str | None] = mapped_column(String(255))


class AgentStatus(Base):
    """Last word from a DPU's policy agent (``bootsvc.web.agent_api``): liveness and last report."""

    __tablename__ = "agent_status"
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)
    agent_version: Mapped[str | None] = mapped_column(String(64))
    last_seen: Mapped[dt.datetime | None] = mapped_column(UTC)
    sent_version: Mapped[str | None] = mapped_column(String(64))  # policy version handed out (POLICY_SENT)
    applied_version: Mapped[str | None] = mapped_column(String(64))  # what the agent says it runs
    report_status: Mapped[str | None] = mapped_column(String(16))  # applied | failed
    report_version: Mapped[str | None] = mapped_column(String(64))
    report_error: Mapped[str | None] = mapped_column(Text)
    reported_at: Mapped[dt.datetime | None] = mapped_column(UTC)
    health: Mapped[dict[str, Any]] = mapped_column(default=dict)


class WebhookDelivery(Base):
    """An inbound webhook delivery already processed (idempotency by the sender's delivery id)."""

    __tablename__ = "webhook_deliveries"
    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[str] = mapped_column(String(128), unique=True)
    hook: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    body_sha256: Mapped[str] = mapped_column(String(64))  # of "<timestamp>.<body>": the signed message
    payload_sha256: Mapped[str] = mapped_column(String(64), default="")  # of the body alone
    status_code: Mapped[int] = mapped_column(Integer)
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Subscriber(Base):
    """Receiver of outgoing state-change events (``bootsvc.events_out``); signed with ``secret_ref``."""

    __tablename__ = "subscribers"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    url: Mapped[str] = mapped_column(String(1024))
    secret_ref: Mapped[str] = mapped_column(String(255))  # "env:NAME" or "file:/path", never the secret
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)


class Outbox(Base):
    """One state-change event for one subscriber, written in the transaction of the transition
    (transactional outbox); delivered at least once, in ``seq`` order per (subscriber, node)."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("subscriber_id", "node_id", "seq", name="sub_node_seq"),
        Index("ix_outbox_pending", "delivered_at", "next_attempt_at"),
    )
    id: Mapped[int] = mapped_column(primary_key=True)
    subscriber_id: Mapped[int] = mapped_column(ForeignKey("subscribers.id", ondelete="CASCADE"))
    node_id: Mapped[int] = mapped_column(ForeignKey("nodes.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)  # per-node event sequence number
    event_id: Mapped[int] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"))
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(UTC, default=utcnow)
    claimed_until: Mapped[dt.datetime | None] = mapped_column(UTC)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(UTC)
    last_error: Mapped[str | None] = mapped_column(Text)


class PowerSlot(Base):
    """One token of a power budget shared by every conductor through the database (``bootsvc.conductor.PowerBudget``).

    ``scope`` "global" rows are the site-wide BMC concurrency cap (one row per concurrent action; held
    until the action ends, ``until`` bounds a holder that died); "rack:<name>" rows are a rack's
    power-on budget (one row per power-on allowed per window; ``until`` = when it may be used again).
    A token is free when ``until`` is NULL or past: taking one is a conditional UPDATE, so exactly
    one conductor wins it, on SQLite and PostgreSQL alike."""

    __tablename__ = "power_slots"
    __table_args__ = (UniqueConstraint("scope", "slot", name="scope_slot"),)
    id: Mapped[int] = mapped_column(primary_key=True)
    scope: Mapped[str] = mapped_column(String(48))
    slot: Mapped[int] = mapped_column(Integer)
    holder: Mapped[str | None] = mapped_column(String(128))
    until: Mapped[dt.datetime | None] = mapped_column(UTC)

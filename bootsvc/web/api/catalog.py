"""``/api/v1`` tenants, images (the catalog, read-only), DHCP leases (read-only) and event subscribers."""

from __future__ import annotations

from typing import Any

from flask import current_app, jsonify
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bootsvc import images as images_mod
from bootsvc import inventory, operations
from bootsvc.models import Lease, Node, Outbox, Subscriber, Tenant
from bootsvc.web import config_of
from bootsvc.web.api.common import bp, page, sessions, utc
from bootsvc.web.api.schemas import (
    ImageList,
    LeaseList,
    LeaseQ,
    PageQ,
    SubscriberIn,
    SubscriberList,
    SubscriberOut,
    TenantIn,
    TenantList,
    TenantOut,
)
from bootsvc.web.auth import ADMIN, READ, ApiError, require
from bootsvc.web.openapi import ErrorOut, operation, params_of, parse_body, query


def _tenant_out(s: Session, t: Tenant) -> dict[str, Any]:
    count = s.scalar(select(func.count()).select_from(Node).where(Node.tenant_id == t.id)) or 0
    return {"id": t.id, "name": t.name, "vrf": t.vrf, "l3vni": t.l3vni, "table": t.table,
            "prefixes": list(t.prefixes or []), "nodes": int(count)}


@bp.get("/tenants")
@operation("GET", "/api/v1/tenants", "List tenants", tag="tenants", params=params_of(PageQ),
           responses={200: ("a page of tenants", TenantList)}, roles=READ)
@require(*READ)
def list_tenants() -> Any:
    q = query(PageQ)
    with sessions() as s:
        total = s.scalar(select(func.count()).select_from(Tenant)) or 0
        rows = s.scalars(select(Tenant).order_by(Tenant.name).limit(q.limit).offset(q.offset))
        return page(TenantList, total, q, [_tenant_out(s, t) for t in rows])


@bp.post("/tenants")
@operation("POST", "/api/v1/tenants", "Create a tenant", tag="tenants", request_model=TenantIn,
           responses={201: ("created", TenantOut), 409: ("name, VRF or L3 VNI taken", ErrorOut)}, roles=ADMIN)
@require(*ADMIN)
def create_tenant() -> Any:
    body = parse_body(TenantIn)
    with sessions() as s:
        t = operations.add_tenant(s, body.name, body.vrf, body.l3vni, body.prefixes, body.table)
        return jsonify(_tenant_out(s, t)), 201


@bp.get("/tenants/<name>")
@operation("GET", "/api/v1/tenants/<name>", "One tenant", tag="tenants",
           responses={200: ("the tenant", TenantOut), 404: ("no such tenant", ErrorOut)}, roles=READ)
@require(*READ)
def get_tenant(name: str) -> Any:
    with sessions() as s:
        t = operations.find_tenant(s, name)
        return jsonify(_tenant_out(s, t))


# ------------------------------------------------------------------------------------------ images, leases
@bp.get("/images")
@operation("GET", "/api/v1/images", "Images of the catalog (read-only)", tag="images", params=params_of(PageQ),
           responses={200: ("a page of images", ImageList)}, roles=READ)
@require(*READ)
def list_images() -> Any:
    q = query(PageQ)
    cfg = config_of(current_app)
    try:
        cat = images_mod.load_catalog(cfg.resolve(cfg.images.catalog))
    except images_mod.CatalogError as e:
        raise ApiError(503, "catalog_unavailable", str(e)) from None
    items = [{"name": i.name, "version": i.version, "kind": i.kind,
              "files": [{"role": f.role, "name": f.name, "sha256": f.sha256,
                         "url": images_mod.url_path(i, f.role) or ""} for f in i.files]}
             for i in sorted(cat.images, key=lambda i: (i.name, i.version))]
    return page(ImageList, len(items), q, items[q.offset:q.offset + q.limit], defaults=dict(cat.defaults))


@bp.get("/leases")
@operation("GET", "/api/v1/leases", "DHCP leases (read-only)", tag="leases", params=params_of(LeaseQ),
           responses={200: ("a page of leases", LeaseList)}, roles=READ)
@require(*READ)
def list_leases() -> Any:
    q = query(LeaseQ)
    with sessions() as s:
        base = select(Lease)
        if q.vrf is not None:
            base = base.where(Lease.vrf == q.vrf)
        if q.state is not None:
            base = base.where(Lease.state == q.state)
        if q.mac is not None:
            try:
                base = base.where(Lease.mac == inventory.normalize_mac(q.mac))
            except ValueError as e:
                raise ApiError(400, "bad_request", str(e), fields=[{"field": "mac", "reason": str(e)}]) from None
        total = s.scalar(select(func.count()).select_from(base.subquery())) or 0
        rows = s.scalars(base.order_by(Lease.vrf, Lease.address).limit(q.limit).offset(q.offset))
        items = [{"id": x.id, "vrf": x.vrf, "network": x.network, "address": x.address, "mac": x.mac,
                  "client_id": x.client_id, "hostname": x.hostname, "node_id": x.node_id, "state": x.state,
                  "expires_at": utc(x.expires_at), "updated_at": utc(x.updated_at)} for x in rows]
        return page(LeaseList, total, q, items)


# ------------------------------------------------------------------------------------------ subscribers
def _sub_out(s: Session, x: Subscriber) -> dict[str, Any]:
    pending = s.scalar(select(func.count()).select_from(Outbox).where(
        Outbox.subscriber_id == x.id, Outbox.delivered_at.is_(None))) or 0
    return {"id": x.id, "name": x.name, "url": x.url, "secret_ref": x.secret_ref, "active": x.active,
            "pending": int(pending)}


@bp.get("/subscribers")
@operation("GET", "/api/v1/subscribers", "Event subscribers", tag="subscribers", params=params_of(PageQ),
           responses={200: ("a page of subscribers", SubscriberList)}, roles=ADMIN)
@require(*ADMIN)
def list_subscribers() -> Any:
    q = query(PageQ)
    with sessions() as s:
        total = s.scalar(select(func.count()).select_from(Subscriber)) or 0
        rows = s.scalars(select(Subscriber).order_by(Subscriber.name).limit(q.limit).offset(q.offset))
        return page(SubscriberList, total, q, [_sub_out(s, x) for x in rows])


@bp.post("/subscribers")
@operation("POST", "/api/v1/subscribers", "Add an event subscriber (signed POST per state change)",
           tag="subscribers", request_model=SubscriberIn,
           responses={201: ("created", SubscriberOut), 409: ("name taken", ErrorOut)}, roles=ADMIN)
@require(*ADMIN)
def create_subscriber() -> Any:
    body = parse_body(SubscriberIn)
    with sessions() as s:
        if s.scalars(select(Subscriber).where(Subscriber.name == body.name)).first() is not None:
            raise ApiError(409, "conflict", f"a subscriber named {body.name!r} exists")
        x = Subscriber(name=body.name, url=body.url, secret_ref=body.secret_ref, active=body.active)
        s.add(x)
        s.commit()
        return jsonify(_sub_out(s, x)), 201


@bp.delete("/subscribers/<name>")
@operation("DELETE", "/api/v1/subscribers/<name>", "Deactivate a subscriber (its queue is kept)",
           tag="subscribers", responses={200: ("deactivated", SubscriberOut), 404: ("no such subscriber", ErrorOut)},
           roles=ADMIN)
@require(*ADMIN)
def delete_subscriber(name: str) -> Any:
    with sessions() as s:
        x = s.scalars(select(Subscriber).where(Subscriber.name == name[:64])).first()
        if x is None:
            raise ApiError(404, "not_found", f"no subscriber named {name[:64]!r}")
        x.active = False
        s.commit()
        return jsonify(_sub_out(s, x))


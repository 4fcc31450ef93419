"""Inbound webhooks: ``POST /webhooks/onboard`` enrolls a racked machine (host + DPUs) in one go.

Owns: checking the sender (HMAC-SHA256 over ``"<timestamp>.<body>"`` with the secret from
``security.webhook_secret_ref``; header ``X-Bootsvc-Signature: sha256=<hex>``, ``X-Bootsvc-Timestamp``:
unix seconds, refused outside ``orchestration.webhook_window_seconds`` — 5 min by default — which
bounds replays), idempotency by the sender's ``X-Bootsvc-Delivery`` id (a redelivery of the same body
changes nothing and answers ``200 {"status": "duplicate"}`` with the original result, also when copies
arrive concurrently: exactly one of them enrolls; the same id with a different body is ``409
delivery_mismatch``; a replay of a signed message under another delivery id is refused), schema errors
answered ``400`` listing EVERY bad field (BMC credentials must be names from the site config, sent only
inside their networks: ``bootsvc.power.credentials``), and enrolling the machine atomically
(``operations.enroll``: a taken serial or MAC is ``409``, anything else it refuses ``400``) in the same
transaction as the delivery record.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from typing import Annotated, Any

from flask import Blueprint, current_app, jsonify, request
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bootsvc import auth_secrets, inventory, operations
from bootsvc.events_out import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from bootsvc.models import Tenant, WebhookDelivery
from bootsvc.power.credentials import enroll_problem
from bootsvc.web import config_of, sessions_of
from bootsvc.web.auth import ApiError, error_response, op_error
from bootsvc.web.openapi import ErrorOut, Param, ValidationErrorOut, operation

log = logging.getLogger("bootsvc.web.webhooks")
bp = Blueprint("webhooks", __name__, url_prefix="/webhooks")
bp.register_error_handler(ApiError, error_response)

DELIVERY_HEADER = "X-Bootsvc-Delivery"
_PRINTABLE = r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$"


def _mac(v: str) -> str:
    return inventory.normalize_mac(v)


Mac = Annotated[str, Field(max_length=32), AfterValidator(_mac)]


class OnboardHost(BaseModel):
    model_config = ConfigDict(extra="ignore")
    bmc_address: str = Field(max_length=255, pattern=_PRINTABLE)
    macs: list[Mac] = Field(default_factory=list, max_length=16, description="host-facing NIC MACs")
    bmc_credential: str | None = Field(default=None, max_length=255, pattern=_PRINTABLE)


class OnboardDpu(BaseModel):
    model_config = ConfigDict(extra="ignore")
    serial: str = Field(min_length=1, max_length=64, pattern=_PRINTABLE)
    bmc_address: str = Field(max_length=255, pattern=_PRINTABLE)
    oob_mac: Mac = Field(description="the DPU's out-of-band (Zone 0) port MAC")
    bmc_credential: str | None = Field(default=None, max_length=255, pattern=_PRINTABLE)
    name: str | None = Field(default=None, pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


class OnboardIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    serial: str = Field(min_length=1, max_length=64, pattern=_PRINTABLE, description="host serial")
    rack: str = Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9._-]+$")
    slot: int = Field(ge=0, le=1000)
    host: OnboardHost
    dpus: list[OnboardDpu] = Field(min_length=1, max_length=4)
    tenant: str | None = Field(default=None, max_length=63, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    name: str | None = Field(default=None, pattern=r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$",
                             description="host name; default <rack>-s<slot>")


class OnboardOut(BaseModel):
    status: str  # created | duplicate
    delivery: str
    result: dict[str, Any]


def _host_name(p: OnboardIn) -> str:
    if p.name:
        return p.name
    rack = "".join(c if c.isalnum() else "-" for c in p.rack.lower()).strip("-") or "rack"
    return f"{rack}-s{p.slot}"[:63].strip("-")


def _check_signature(body: bytes) -> str:
    cfg = config_of(current_app)
    ref = cfg.security.webhook_secret_ref
    if not ref:
        raise ApiError(503, "not_configured", "security.webhook_secret_ref is not set: webhooks are disabled")
    try:
        secret = auth_secrets.read_ref(ref)
    except auth_secrets.SecretError as e:
        raise ApiError(503, "not_configured", f"webhook secret unavailable: {e}") from None
    ts = request.headers.get(TIMESTAMP_HEADER, "").strip()
    sig = request.headers.get(SIGNATURE_HEADER, "").strip()
    if not ts or not sig:
        raise ApiError(401, "unauthenticated", f"send {TIMESTAMP_HEADER} and {SIGNATURE_HEADER}")
    # str.isdigit() is also true for '²' and other non-ASCII digits, on which int() raises
    if not (ts.isascii() and ts.isdigit()) or len(ts) > 12:
        raise ApiError(400, "bad_request", f"{TIMESTAMP_HEADER} must be unix seconds (ASCII digits)",
                       fields=[{"field": f"header {TIMESTAMP_HEADER}", "reason": "not unix seconds"}])
    window = cfg.orchestration.webhook_window_seconds
    skew = abs(time.time() - int(ts))
    if skew > window:
        raise ApiError(401, "stale", f"timestamp is {int(skew)} s away from now (window {window} s): "
                                     "replayed or the sender's clock is wrong")
    if not sig.isascii() or not verify(secret, ts, body, sig):  # compare_digest: ASCII str only
        raise ApiError(401, "bad_signature", "signature does not match (HMAC-SHA256 over '<timestamp>.<body>')")
    return ts


@bp.post("/onboard")
@operation("POST", "/webhooks/onboard", "Onboard a racked machine (signed webhook)", tag="webhooks",
           security="webhook", request_model=OnboardIn,
           params=(Param(TIMESTAMP_HEADER, {"type": "string", "pattern": "^[0-9]{1,12}$"}, "unix seconds", True,
                         "header"),
                   Param(SIGNATURE_HEADER, {"type": "string", "maxLength": 100}, "sha256=<hex>", True, "header"),
                   Param(DELIVERY_HEADER, {"type": "string", "maxLength": 128}, "sender's delivery id", True,
                         "header")),
           responses={201: ("enrolled", OnboardOut), 200: ("duplicate delivery: nothing changed", OnboardOut),
                      400: ("schema errors; every bad field is listed", ValidationErrorOut),
                      401: ("bad signature or stale timestamp", ErrorOut),
                      409: ("replayed message, or already enrolled", ErrorOut),
                      503: ("webhook secret not configured", ErrorOut)})
def onboard() -> Any:
    body = request.get_data(cache=True)
    ts = _check_signature(body)
    delivery = request.headers.get(DELIVERY_HEADER, "").strip()
    if not delivery or len(delivery) > 128 or not delivery.isprintable():
        raise ApiError(400, "bad_request", f"send {DELIVERY_HEADER} (at most 128 printable characters)",
                       fields=[{"field": f"header {DELIVERY_HEADER}", "reason": "required"}])
    signed_hash = hashlib.sha256(ts.encode() + b"." + body).hexdigest()
    payload_hash = hashlib.sha256(body).hexdigest()
    sessions = sessions_of(current_app)
    with sessions() as s:
        seen = _seen(s, delivery, payload_hash, signed_hash)
        if seen is not None:
            return seen

    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object",
                       fields=[{"field": "(body)", "reason": "not a JSON object"}])
    fields: list[dict[str, str]] = []
    p: OnboardIn | None = None
    try:
        p = OnboardIn.model_validate(payload)
    except ValidationError as e:
        fields = [{"field": ".".join(str(x) for x in err["loc"]) or "(body)", "reason": err["msg"]}
                  for err in e.errors()]
    if p is not None:
        creds = config_of(current_app).bmc_credentials
        for where, cred, addr in [("host", p.host.bmc_credential, p.host.bmc_address),
                                  *((f"dpus.{i}", d.bmc_credential, d.bmc_address) for i, d in enumerate(p.dpus))]:
            why = enroll_problem(cred, addr, "redfish", creds)
            if why is not None:
                fields.append({"field": f"{where}.{'bmc_address' if cred in creds else 'bmc_credential'}",
                               "reason": why})
    with sessions() as s:
        tenant = payload.get("tenant")
        if isinstance(tenant, str) and not any(f["field"] == "tenant" for f in fields) and s.scalars(
                select(Tenant).where(Tenant.name == tenant)).first() is None:
            fields.append({"field": "tenant", "reason": f"no tenant named {tenant!r}"})
        if fields or p is None:
            raise ApiError(400, "bad_request", f"{len(fields)} invalid field(s): "
                           + "; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields=fields)
        host = _host_name(p)
        specs = [inventory.NodeSpec(
            name=host, kind="host", serial=p.serial, rack=p.rack, slot=p.slot, tenant=p.tenant,
            nics=[inventory.NicSpec(mac=m, role="host-pf") for m in p.host.macs], bmc_address=p.host.bmc_address,
            bmc_credential_ref=p.host.bmc_credential, provision_method="pxe")]
        method = config_of(current_app).boot.provision_method
        for i, d in enumerate(p.dpus):
            specs.append(inventory.NodeSpec(
                name=d.name or f"{host}-dpu{i}"[:63], kind="dpu", serial=d.serial, rack=p.rack, slot=p.slot,
                tenant=p.tenant, host=host, nics=[inventory.NicSpec(mac=d.oob_mac, role="oob")],
                bmc_address=d.bmc_address, bmc_credential_ref=d.bmc_credential, provision_method=method))
        # Claim the delivery id first, in the enrollment's transaction: its unique key makes exactly one
        # of several concurrent copies the winner. The others wait on the winner's lock (PostgreSQL: the
        # index entry; SQLite: the database write lock), then find its committed row and answer duplicate.
        row = WebhookDelivery(delivery_id=delivery, hook="onboard", body_sha256=signed_hash,
                              payload_sha256=payload_hash, status_code=201, result={})
        s.add(row)
        try:
            s.flush()
        except IntegrityError:
            s.rollback()
            seen = _seen(s, delivery, payload_hash, signed_hash)
            if seen is not None:
                return seen
            log.warning("webhook delivery=%s: lost the claim race but no winning row is visible", delivery[:100])
            raise ApiError(409, "conflict", "another copy of this delivery is being processed: retry it") from None
        try:
            nodes = operations.enroll(s, specs, actor=f"webhook:{delivery[:100]}", commit=False)
        except operations.OpError as e:  # nothing enrolled: the delivery id is not kept either
            s.rollback()
            raise op_error(e) from None
        result: dict[str, Any] = {"host": nodes[0].name, "host_id": nodes[0].id,
                                  "dpus": [{"name": n.name, "id": n.id} for n in nodes[1:]]}
        row.result = result
        s.commit()
    log.info("webhook onboard delivery=%s host=%s dpus=%d", delivery[:100], result["host"], len(result["dpus"]))
    return jsonify(status="created", delivery=delivery, result=result), 201


def _seen(s: Session, delivery: str, payload_hash: str, signed_hash: str) -> Any | None:
    """The answer for a delivery id (or a signed message) already processed; None if it is new."""
    prior = s.scalars(select(WebhookDelivery).where(WebhookDelivery.delivery_id == delivery)).first()
    if prior is not None:
        if prior.payload_sha256 and not hmac.compare_digest(prior.payload_sha256, payload_hash):
            # A sender reusing an id for another machine would otherwise lose that machine silently.
            raise ApiError(409, "delivery_mismatch",
                           f"delivery id {delivery[:128]!r} was already used for a different body: "
                           "send a new message under a new delivery id")
        return jsonify(status="duplicate", delivery=delivery, result=prior.result), 200
    if s.scalars(select(WebhookDelivery).where(WebhookDelivery.body_sha256 == signed_hash)).first():
        raise ApiError(409, "replay", "this signed message was already delivered under another delivery id")
    return None

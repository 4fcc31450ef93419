"""Server side of the DPU policy agent API (``docs/agent-api.md``).

Owns: ``POST /api/v1/agent/checkin`` (liveness; DPU_REBOOTING -> DPU_READY), ``GET
/api/v1/agent/policy`` (the DPU's own desired policy, ETag = policy version, 304 on If-None-Match),
``POST /api/v1/agent/report`` (applied -> POLICY_APPLIED, failed -> POLICY_FAILED; stores health).
Installer callbacks are the boot plane's (``POST /boot/callback/<node>``, ``bootsvc.web.boot``).

Every request authenticates with the node's own secret (``bootsvc.web.auth.node_from_secret``), so an
agent can only ever read or change its own node. Only state changes go through ``lifecycle.apply``;
BMC work is the conductor's.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from flask import Blueprint, current_app, g, jsonify, make_response, request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from bootsvc import lifecycle
from bootsvc.conductor import policy_for
from bootsvc.models import AgentStatus, Node
from bootsvc.states import State, Trigger
from bootsvc.web import config_of, sessions_of
from bootsvc.web.auth import ApiError, error_response, node_from_secret
from bootsvc.web.openapi import ErrorOut, operation, parse_body

bp = Blueprint("agent_api", __name__, url_prefix="/api/v1")
bp.register_error_handler(ApiError, error_response)

_Text = Field(default=None, max_length=4096)


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")  # unknown keys are ignored (forward compatibility)


class CheckinIn(_In):
    node: str | None = Field(default=None, max_length=63)
    agent_version: str | None = Field(default=None, max_length=64)
    health: dict[str, Any] | None = None


class CheckinOut(BaseModel):
    node: str
    policy_version: str | None = Field(description="version the server wants applied; null = none buildable")
    state: str


class ReportIn(_In):
    node: str | None = Field(default=None, max_length=63)
    policy_version: str = Field(min_length=1, max_length=64)
    status: Literal["applied", "failed"]
    error: str | None = _Text
    health: dict[str, Any] | None = None


class ReportOut(BaseModel):
    ok: bool
    state: str
    current: bool = Field(description="the report is about the policy version the server wants now")


class PolicyDoc(BaseModel):
    """Policy document schema 1 (docs/agent-api.md)."""

    model_config = ConfigDict(extra="allow")
    schema_: int = Field(alias="schema")
    version: str
    node: str
    tenant: str | None


_AUTH = {401: ("bad or missing node secret", ErrorOut), 403: ("node is not a DPU", ErrorOut),
         404: ("unknown node", ErrorOut)}


def _cfg() -> Any:
    return config_of(current_app)


def _status(s: Session, node: Node) -> AgentStatus:
    st = s.get(AgentStatus, node.id)
    if st is None:
        st = AgentStatus(node_id=node.id, health={})
        s.add(st)
    return st


def _apply(s: Session, node: Node, trigger: Trigger, **kw: Any) -> None:
    c = _cfg().conductor
    lifecycle.apply(s, node, trigger, actor=g.actor, max_attempts=c.max_attempts, deadlines=c.deadlines, **kw)


def _policy(s: Session, node: Node) -> tuple[dict[str, Any] | None, str | None]:
    return policy_for(s, node, _cfg())


def _retrying(fn: Any) -> Any:
    """Re-run a handler once when another writer changed the node between read and write."""
    try:
        return fn()
    except lifecycle.TransitionConflict:
        return fn()


@bp.post("/agent/checkin")
@operation("POST", "/api/v1/agent/checkin", "Agent check-in (liveness; first check-in marks the DPU ready)",
           tag="agent", security="node", request_model=CheckinIn,
           responses={200: ("the policy version to apply", CheckinOut), **_AUTH})
def checkin() -> Any:
    body = parse_body(CheckinIn)

    def go() -> Any:
        with sessions_of(current_app)() as s:
            node = node_from_secret(s, kinds=("dpu",))
            st = _status(s, node)
            st.last_seen = dt.datetime.now(dt.UTC)
            st.agent_version = body.agent_version
            if body.health is not None:
                st.health = body.health
                av = body.health.get("applied_version")
                if isinstance(av, str | int) and not isinstance(av, bool):
                    st.applied_version = str(av)[:64]
            if node.state == State.DPU_REBOOTING:
                _apply(s, node, Trigger.AGENT_CHECKIN, detail={"agent_version": body.agent_version}, commit=False)
            s.commit()
            doc, _err = _policy(s, node)
            return jsonify(node=node.name, policy_version=doc["version"] if doc else None, state=node.state)

    return _retrying(go)


@bp.get("/agent/policy")
@operation("GET", "/api/v1/agent/policy", "This DPU's desired policy (ETag = policy version)", tag="agent",
           security="node",
           params=(),
           responses={200: ("the policy document", PolicyDoc), 304: ("unchanged (If-None-Match)", None),
                      409: ("no policy can be built for this DPU now", ErrorOut), **_AUTH})
def policy() -> Any:
    with sessions_of(current_app)() as s:
        node = node_from_secret(s, kinds=("dpu",))
        doc, err = _policy(s, node)
        if doc is None:
            raise ApiError(409, "no_policy", f"no policy for {node.name}: {err}")
        etag = f'"{doc["version"]}"'
        inm = request.headers.get("If-None-Match", "")
        if etag in [t.strip() for t in inm.split(",")] or inm.strip() == "*":
            resp = make_response("", 304)
        else:
            resp = jsonify(doc)
        resp.headers["ETag"] = etag
        resp.headers["Cache-Control"] = "no-store"
        return resp


@bp.post("/agent/report")
@operation("POST", "/api/v1/agent/report", "Agent reports a policy applied or failed (with health)",
           tag="agent", security="node", request_model=ReportIn,
           responses={200: ("recorded", ReportOut), **_AUTH})
def report() -> Any:
    body = parse_body(ReportIn)

    def go() -> Any:
        with sessions_of(current_app)() as s:
            node = node_from_secret(s, kinds=("dpu",))
            doc, _err = _policy(s, node)
            current = doc is not None and doc["version"] == body.policy_version
            st = _status(s, node)
            now = dt.datetime.now(dt.UTC)
            st.last_seen = st.reported_at = now
            st.report_status, st.report_version, st.report_error = body.status, body.policy_version, body.error
            if body.health is not None:
                st.health = body.health
            if body.status == "applied":
                st.applied_version = body.policy_version
            elif body.health is not None and body.health.get("applied_version") is not None:
                st.applied_version = str(body.health["applied_version"])[:64]
            if current:
                detail = {"policy_version": body.policy_version}
                if body.status == "applied":
                    if node.state == State.DPU_READY:  # the agent was faster than the conductor
                        _apply(s, node, Trigger.POLICY_SENT, detail={**detail, "reason": "agent pulled it"},
                               commit=False)
                        st.sent_version = body.policy_version
                    if node.state == State.POLICY_PENDING:
                        _apply(s, node, Trigger.POLICY_APPLIED, detail=detail, commit=False)
                elif node.state in (State.DPU_READY, State.POLICY_PENDING, State.POLICY_APPLIED):
                    _apply(s, node, Trigger.POLICY_FAILED, detail=detail,
                           error=f"agent could not apply policy {body.policy_version}: {body.error or 'no reason'}",
                           commit=False)
            else:
                lifecycle.record(s, node, "agent_report_stale", actor=g.actor, commit=False,
                                 detail={"status": body.status, "policy_version": body.policy_version,
                                         "wanted": doc["version"] if doc else None})
            s.commit()
            return jsonify(ok=True, state=node.state, current=current)

    return _retrying(go)

"""Server side of the DPU policy agent API (``docs/agent-api.md``).

Owns: ``POST /api/v1/agent/checkin`` (liveness; DPU_REBOOTING -> DPU_READY), ``GET
/api/v1/agent/policy`` (the DPU's own desired policy, ETag = policy version, 304 on If-None-Match),
``POST /api/v1/agent/report`` (applied -> POLICY_APPLIED, failed -> POLICY_FAILED; stores health).
Installer callbacks are the boot plane's (``POST /boot/callback/<node>``, ``bootsvc.web.boot``).

Identity (docs/security.md): every request carries ``X-Bootsvc-Node`` and ``Authorization: Bearer
<node secret>`` and must come from an address DHCP leased or reserved for that node; an unknown name,
a wrong secret and a wrong address all get the same 401 (no name oracle) and draw on the boot plane's
per-address sweep bucket. The secret bf.cfg carried (it crossed the boot network) is good for one
thing: the first check-in, whose response carries a new secret (the next generation) that the agent
stores; from then on only the new one works - until the agent has used it once, a check-in with the
old one gets the new one again (a lost response must not lock the agent out). That first check-in
is also what ends an install the installer never reported (dpu_booting/dpu_installing -> dpu_ready).
An agent can only ever read or change its own node. State changes go through ``lifecycle.apply``;
BMC work is the conductor's.

Cost (10,000 resting DPUs at the agents' own 30 s would be ~333 check-ins a second; advised, ~33 - ~11 while
the site boots - docs/agent-api.md "Poll interval"): an authenticated request
reads the node (without its NICs) and asks one statement whether the source address holds it; a
check-in that changes nothing - same agent version, same health apart from its counters
(`VOLATILE_HEALTH`), ``last_seen`` younger than `LAST_SEEN_POLLS` of the agent's intervals (`_fresh`) -
writes nothing, and with EVPN is answered from one SELECT without ORM objects (`_quiet`; one whose
``last_seen`` is due adds one UPDATE of its status row; anything else, every refusal included, goes
through the full handler, and the policy is ``policy_for``'s on the row read); so is a policy
fetch after the secret trade (`_quiet_policy`); a fallback reuses the read's address test; policy documents
are memoised per worker (``conductor_policy.PolicyMemo``, keyed by everything the build reads).
A check-in answer may say when to come back (``poll_seconds``, `poll_seconds`): only to a resting agent
(or one told a policy to apply: it rests once applied), and only once the resting fleet at the agents'
interval would exceed the site's check-in rate - a lower one while the site boots (`fleet_pace`: resting
agents are the lowest-priority traffic then); null otherwise (the agent keeps its own ``poll_interval``).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import time
from types import SimpleNamespace
from typing import Any, Literal, cast

from flask import Blueprint, current_app, g, jsonify, make_response, request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import String, Table, bindparam, exists, func, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased, lazyload
from sqlalchemy.orm.exc import StaleDataError

from bootsvc import auth_secrets, fabric, inventory, lifecycle, metrics
from bootsvc.conductor import policy_for
from bootsvc.conductor_policy import PolicyMemo
from bootsvc.config import Config
from bootsvc.models import AgentStatus, Lease, Nic, Node, Tenant
from bootsvc.policy import PolicyBuildError, evpn_asn
from bootsvc.states import ACTIVE_STATES, State, Trigger
from bootsvc.web import boot_guard, config_of, sessions_of
from bootsvc.web.auth import ApiError, bearer, error_response
from bootsvc.web.openapi import ErrorOut, operation, parse_body

log = logging.getLogger("bootsvc.agent_api")

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
    secret: str | None = Field(default=None, description="a new node secret: store it and use it from now on "
                               "(only in the answer to the first check-in after an install)")
    poll_seconds: float | None = Field(description="check in again after this many seconds once "
                                       "policy_version is applied (the agent keeps it within its "
                                       "poll_min..poll_max); null = at the agent's own interval")


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


_AUTH = {401: ("unknown node, bad secret or an address that holds no lease of the node (one answer)", ErrorOut),
         403: ("node is not a DPU", ErrorOut), 429: ("too many refused requests from this address", ErrorOut)}
_DENY = "send 'X-Bootsvc-Node: <name>' and 'Authorization: Bearer <node secret>' from the node's own address"
# how a request authenticated: "current" (the secret the agent got at check-in), "install" (the secret
# bf.cfg carried; only a check-in may use it, once), "previous" (the install secret again while the
# new one is unused: the answer to the rotating check-in was lost)
Auth = Literal["current", "install", "previous"]
# ``last_seen`` is liveness to a resolution of LAST_SEEN_POLLS of the agent's poll intervals (the one
# this answer advises, else orchestration.agent_poll_seconds: bootsvc/agent/main.py poll_interval), at
# least LAST_SEEN_RESOLUTION: a check-in within it that changes nothing else writes nothing, whatever the
# interval (a fixed 60 s made every resting check-in at an advised 60..300 s a write). An agent is
# silent only after missing that many polls, the way BFD declares a session down after Detect Mult
# missed intervals (RFC 5880 section 6.8.4). Nothing in bootsvc acts on last_seen; the machine page
# shows it ("at").
LAST_SEEN_RESOLUTION = dt.timedelta(seconds=60)
LAST_SEEN_POLLS = 3
# Health members that change on every poll (counters, bootsvc/agent/main.py Agent.health): a change in
# them alone is no news; they are stored with the next write (at the latest with the next liveness write).
VOLATILE_HEALTH = frozenset({"uptime_s", "ra_sent", "relay"})
MEMO = "bootsvc_agent_policy_memo"  # the app.extensions key of the worker's PolicyMemo
RESTING = "bootsvc_agent_resting"  # the app.extensions key of the worker's `_Resting` count
# How old the worker's count of resting DPUs may be: one COUNT per worker per this, whatever the fleet.
RESTING_TTL = 30.0
CHECKINS = "bootsvc_agent_checkins_total"
metrics.describe(CHECKINS, "counter", "Agent check-ins by how they were answered (path: quiet = one read, no write; "
                 "touch = one read and a last_seen update; full = the full handler) and why (reason).")


_WORKING = frozenset(x.value for x in ACTIVE_STATES)


class _Resting:
    """This worker's count of resting DPUs (``policy_applied``, a DPU-only state) and of nodes in working
    states (`states.ACTIVE_STATES`: the site is booting), from one GROUP BY over the nodes' state index,
    re-read at most every RESTING_TTL s. Threads may both re-read at the boundary: harmless (one extra
    statement), so no lock is held across the query."""

    def __init__(self) -> None:
        self.count, self.working, self.at = 0, 0, -RESTING_TTL

    def get(self, s: Session) -> tuple[int, int]:
        """(resting DPUs, nodes in working states)."""
        now = time.monotonic()
        if now - self.at >= RESTING_TTL:
            by = {str(st): int(n) for st, n in s.execute(select(Node.state, func.count()).group_by(Node.state))}
            self.count = by.get(State.POLICY_APPLIED.value, 0)
            self.working = sum(n for st, n in by.items() if st in _WORKING)
            self.at = now
        return self.count, self.working


def poll_seconds(resting_dpus: int, *, base: float, rate: float, most: float) -> float:
    """The check-in interval to advise a resting agent (docs/agent-api.md "Poll interval"): the base
    interval until the resting fleet would check in faster than ``rate`` a second, then the interval
    that keeps it at ``rate``, at most ``most``. Consul scales its anti-entropy interval with cluster size
    the same way (https://developer.hashicorp.com/consul/docs/architecture/anti-entropy, "Periodic
    Synchronization"): the cost is that a policy change reaches a resting agent only within one
    advised interval."""
    if rate <= 0:
        return base
    return round(min(max(base, most), max(base, resting_dpus / rate)), 1)


def fleet_pace(o: Any, working: int) -> tuple[float, float]:
    """(check-ins a second, longest interval) to advise resting agents at (docs/agent-api.md "Poll
    interval"): the site's ``agent_checkin_rate`` and ``agent_poll_max_seconds``; while the site boots
    (more than ``agent_booting_nodes`` nodes in working states) resting agents are the lowest-priority
    traffic, shed to ``agent_booting_rate`` with ``agent_booting_poll_max_seconds`` (never faster, never
    a shorter maximum than the site's own)."""
    if o.agent_booting_nodes and working > o.agent_booting_nodes:
        return (min(o.agent_checkin_rate, o.agent_booting_rate),
                max(o.agent_poll_max_seconds, o.agent_booting_poll_max_seconds))
    return o.agent_checkin_rate, o.agent_poll_max_seconds


# A DPU that is told a policy to apply rests once it has applied it: its answer carries the resting
# interval already (the agent follows advice only once the wanted policy is the applied one,
# bootsvc/agent/main.py Agent.next_poll), so its first check-in after the apply is not at its own
# 30-s interval whatever the fleet.
_ABOUT_TO_REST = frozenset({State.DPU_READY.value, State.POLICY_PENDING.value})


def _advice(s: Session, state: str, wanted: str | None, applied: Any) -> float | None:
    """`poll_seconds` for this agent, when it rests with the wanted policy applied (or is told one to
    apply: `_ABOUT_TO_REST`) and the resting fleet asks for more than the base interval; else None: the
    agent polls at its own ``poll_interval`` (one configured faster, a lab's or a test's, stays so; a
    transition to make, a changed policy under a resting agent)."""
    o = _cfg().orchestration
    if wanted is None or o.agent_checkin_rate <= 0:
        return None
    if state not in _ABOUT_TO_REST and (state != State.POLICY_APPLIED or str(applied) != wanted):
        return None
    rest = current_app.extensions.get(RESTING)
    if not isinstance(rest, _Resting):
        rest = current_app.extensions[RESTING] = _Resting()
    resting, working = rest.get(s)
    rate, most = fleet_pace(o, working)
    advice = poll_seconds(resting, base=o.agent_poll_seconds, rate=rate, most=most)
    return advice if advice > o.agent_poll_seconds else None


def _liveness_advice(state: str, advice: float | None) -> float | None:
    """The interval the agent really polls at, for `_fresh`: the advice only once it rests (an agent
    told one for after its apply polls at its own interval until then)."""
    return advice if state == State.POLICY_APPLIED else None


def _applied(health: dict[str, Any] | None) -> Any:
    return health.get("applied_version") if isinstance(health, dict) else None


def _cfg() -> Any:
    return config_of(current_app)


def _agent_node(s: Session, *, checkin: bool = False, held: int | None = None) -> tuple[Node, Auth]:
    """The DPU this request speaks for, and which of its secrets it used (see the module docstring).
    ``held``: the node id this request's source address was already found holding (`_quiet`'s read in
    this request, the same `inventory.holds` test): not asked again."""
    ip = request.remote_addr or ""
    name = request.headers.get("X-Bootsvc-Node", "").strip()
    tok = bearer()

    def deny(why: str) -> ApiError:
        boot_guard.refused("agent")
        log.warning("agent: refused %r from %s on %s: %s", name[:63], ip, request.path, why)
        boot_guard.sweep_or_429(ip)
        return ApiError(401, "unauthenticated", _DENY)

    # the NICs are not needed here (Node.nics is selectin-loaded by default: one more statement)
    node = s.scalars(select(Node).where(Node.name == name).options(lazyload(Node.nics))).first() \
        if name and len(name) <= 63 else None
    if node is None or tok is None:
        raise deny("unknown node" if tok else "no secret")
    key, gen = boot_guard.state().key(), node.secret_generation
    how: Auth
    if auth_secrets.verify_node_secret(key, node.id, gen, tok):
        how = "current" if node.agent_generation == gen else "install"
    elif (checkin and gen > 1 and node.agent_generation == gen and not node.agent_secret_confirmed
          and auth_secrets.verify_node_secret(key, node.id, gen - 1, tok)):
        how = "previous"
    else:
        raise deny("bad secret")
    if _cfg().security.boot_bind_address and held != node.id and not inventory.holds(s, node.id, ip):
        raise deny("address holds no lease of the node")
    if node.kind != "dpu":
        raise ApiError(403, "forbidden", f"node {node.name} is a {node.kind}; this endpoint is for DPUs")
    if how == "install" and not checkin:
        raise ApiError(401, "unauthenticated", "check in first: the install secret is exchanged at check-in")
    g.actor = f"node:{node.name}"
    return node, how


def _fabric_news(s: Session, node: Node, old: Any, new: dict[str, Any]) -> None:
    """A BGP session that was Established and is not any more: an event and a metric (docs/fabric.md)."""
    drops = fabric.session_drops((old or {}).get("fabric") if isinstance(old, dict) else None, new.get("fabric"))
    for uplink, was, now in drops:
        metrics.counters.inc("bootsvc_fabric_session_drops_total", {"uplink": uplink[:16]})
        log.warning("agent: node %s lost BGP on %s (%s -> %s)", node.name, uplink, was, now)
    if drops:
        lifecycle.record(s, node, "fabric_session_down", actor=g.actor, commit=False,
                         detail={"uplinks": {u: n for u, _w, n in drops}})


def _status(s: Session, node: Node) -> AgentStatus:
    st = s.get(AgentStatus, node.id)
    if st is None:
        st = AgentStatus(node_id=node.id, health={})
        s.add(st)
    return st


def _apply(s: Session, node: Node, trigger: Trigger, **kw: Any) -> None:
    c = _cfg().conductor
    lifecycle.apply(s, node, trigger, actor=g.actor, max_attempts=c.max_attempts, deadlines=c.deadlines, **kw)


def _policy(s: Session, node: Node, addresses: dict[int, tuple[str, ...]] | None = None,
            ) -> tuple[dict[str, Any] | None, str | None]:
    memo = current_app.extensions.get(MEMO)
    if not isinstance(memo, PolicyMemo):
        memo = current_app.extensions[MEMO] = PolicyMemo()
    return policy_for(s, node, _cfg(), addresses=addresses, memo=memo)


def _news(health: dict[str, Any] | None) -> dict[str, Any] | None:
    return {k: v for k, v in health.items() if k not in VOLATILE_HEALTH} if health is not None else None


def _idle(st: AgentStatus | None, node: Node, how: Auth, body: CheckinIn) -> bool:
    """A check-in with nothing to record but liveness: the current secret already confirmed, no
    transition due, the same agent version and health news as stored (`_fresh` decides on last_seen)."""
    if st is None or st.last_seen is None or how != "current" or not node.agent_secret_confirmed:
        return False
    if node.state == State.DPU_REBOOTING or st.agent_version != body.agent_version:
        return False
    return body.health is None or _news(body.health) == _news(st.health if isinstance(st.health, dict) else None)


def _resolution(advice: float | None) -> dt.timedelta:
    """How old ``last_seen`` may be before an idle check-in writes it (see LAST_SEEN_POLLS): ``advice``
    is the ``poll_seconds`` of this answer (None: the agent polls at its own interval)."""
    every = advice if advice is not None else float(_cfg().orchestration.agent_poll_seconds)
    return max(LAST_SEEN_RESOLUTION, dt.timedelta(seconds=LAST_SEEN_POLLS * every))


def _fresh(last_seen: dt.datetime, now: dt.datetime, advice: float | None) -> bool:
    """``last_seen`` is within `_resolution` of now (a clock stepped back counts as stale: rewritten)."""
    seen = last_seen if last_seen.tzinfo is not None else last_seen.replace(tzinfo=dt.UTC)
    return dt.timedelta(0) <= now - seen < _resolution(advice)


@functools.cache
def _touch_query() -> Any:
    """`_quiet`'s liveness write: the status row's ``last_seen`` (and ``health``, its counters), nothing
    else; built once per process, the SET columns are the parameters' keys."""
    table = cast(Table, AgentStatus.__table__)
    return update(table).where(table.c.node_id == bindparam("nid"))


@functools.cache
def _idle_query(bind: bool) -> Any:
    """`_idle_row`'s statement, built once per process (``name`` and ``ip`` are bound parameters):
    building it - four aliases, six subqueries - costs far more than running it."""
    host, t, ht, mine = aliased(Node), aliased(Tenant), aliased(Tenant), aliased(Node)
    ip = bindparam("ip", type_=String)
    if bind:
        # correlated to the outer nodes row two levels up (inside EXISTS): explicit, or it is not
        ids = select(mine.id).where(or_(mine.id == Node.id, mine.host_id == Node.id)).correlate(Node) \
            .scalar_subquery()
        macs = select(Nic.mac).where(Nic.node_id.in_(ids)).correlate(Node).scalar_subquery()
        held: Any = or_(exists().where(Nic.ipv4 == ip, Nic.node_id.in_(ids)),
                        exists().where(Lease.vrf == "", Lease.address == ip, Lease.state == "bound",
                                       or_(Lease.mac.in_(macs), Lease.node_id.in_(ids))))
    else:
        held = true()
    own = select(func.aggregate_strings(Nic.ipv4, ",")).where(
        Nic.node_id == Node.host_id, Nic.role == "host-pf", Nic.ipv4.is_not(None)).scalar_subquery()
    return (select(Node.id, Node.version, Node.name, Node.serial, Node.kind, Node.state, Node.secret_generation,
                   Node.agent_generation, Node.agent_secret_confirmed, Node.host_id,
                   AgentStatus.last_seen, AgentStatus.agent_version, AgentStatus.health,
                   t.name, t.vrf, t.l3vni, t.table, ht.name, ht.vrf, ht.l3vni, ht.table,
                   held.label("held"), own.label("own"))
            .outerjoin(AgentStatus, AgentStatus.node_id == Node.id)
            .outerjoin(t, t.id == Node.tenant_id)
            .outerjoin(host, host.id == Node.host_id)
            .outerjoin(ht, ht.id == host.tenant_id)
            .where(Node.name == bindparam("name", type_=String)))


def _idle_row(s: Session, name: str, ip: str, bind: bool) -> Any:
    """Everything an idle check-in needs, in one statement: the node's identity columns, its agent
    status, whether ``ip`` holds it (``inventory.holds``), its tenant and its host's (``tenant_of``) and
    its host's reserved prefixes (``conductor_policy.host_addresses``: the EVPN policy's inputs)."""
    params = {"name": name, "ip": ip} if bind else {"name": name}
    # on the session's Connection, not Session.execute: the row is columns, no entities, and the ORM's
    # execution layer (compile state, loading) is not needed: 0.25 -> 0.16 ms per call, same row
    return s.connection().execute(_idle_query(bind), params).first()


def _row_policy(s: Session, row: Any, cfg: Any) -> tuple[bool, dict[str, Any] | None]:
    """(True, the policy document or None) for `_idle_row`'s row, or (False, None): not answerable from
    the row (no EVPN ASN for it, or the stand-in lacks something) - the full handler's business."""
    try:
        if evpn_asn(cfg, row.id) is None:
            return False, None
    except PolicyBuildError:
        return False, None
    # conductor_policy.policy_for itself, on a stand-in for the node carrying exactly what it reads
    # (tenant_of: own tenant, else the host's; the host's prefixes prefetched as a pass does): no
    # query, and the worker's PolicyMemo answers repeats without a build
    tcols = row[13:17] if row[13] is not None else row[17:21]
    tenant = SimpleNamespace(name=tcols[0], vrf=tcols[1], l3vni=tcols[2], table=tcols[3]) \
        if tcols[0] is not None else None
    standin = SimpleNamespace(id=row.id, name=row.name, serial=row.serial, state=row.state,
                              host_id=row.host_id, tenant=tenant, host=None)
    own = tuple(sorted(f"{a}/32" for a in (row.own or "").split(",") if a))
    try:
        doc, _err = _policy(s, cast(Node, standin), addresses={row.host_id: own} if row.host_id is not None
                            else {})
    except AttributeError:  # policy_for reads more of a node than the stand-in carries: the full way
        log.exception("agent: %s: the fast path's node stand-in is incomplete", row.name)
        return False, None
    return True, doc


def _fast_request() -> tuple[str, str, str, Config] | None:
    """(node name, bearer secret, source address, config) of a request the one-read answers
    (`_quiet`, `_quiet_policy`) may serve, or None: only with EVPN, whose policy is a function of the
    row `_idle_row` reads (static peer lists depend on the whole tenant)."""
    name = request.headers.get("X-Bootsvc-Node", "").strip()
    tok = bearer()
    cfg = _cfg()
    if not name or len(name) > 63 or tok is None or not cfg.fabric.evpn or \
            (cfg.fabric.asn is None and cfg.orchestration.evpn_asn is None):
        return None
    return name, tok, request.remote_addr or "", cfg


def _current_row(s: Session, name: str, tok: str, ip: str, cfg: Config) -> tuple[Any, int | None]:
    """`_idle_row`'s row when the request passes the full handler's identity checks for a DPU whose
    current secret is already confirmed (`_agent_node` without a check-in: the node, from an address it
    holds, with its current, traded secret; nothing to write, `_confirm`), else None; and the id of the
    node the source address was found holding (None: not found, or not asked)."""
    row = _idle_row(s, name, ip, cfg.security.boot_bind_address)
    held = row.id if row is not None and row.held and cfg.security.boot_bind_address else None
    if row is None or not row.held or row.kind != "dpu" or row.agent_generation != row.secret_generation \
            or not row.agent_secret_confirmed:
        return None, held
    if not auth_secrets.verify_node_secret(boot_guard.state().key(), row.id, row.secret_generation, tok):
        return None, held
    return row, held


def _quiet_policy() -> tuple[dict[str, Any] | None, int | None]:
    """GET /agent/policy of a DPU whose current secret is already confirmed (every fetch after the trade)
    from `_idle_row`'s one read instead of three (node, `inventory.holds`, the host's prefixes), or
    (None, held as in `_quiet`): the full handler then runs (every refusal, the secret confirmation's
    write, and 409 when there is no policy)."""
    req = _fast_request()
    if req is None:
        return None, None
    name, tok, ip, cfg = req
    with sessions_of(current_app)() as s:
        row, held = _current_row(s, name, tok, ip, cfg)
        if row is None:
            return None, held
        ok, doc = _row_policy(s, row, cfg)
    if not ok or doc is None:
        return None, held
    g.actor = f"node:{name}"
    return doc, held


def _quiet(body: CheckinIn) -> tuple[Any, int | None, str]:
    """The answer to an idle check-in (`_idle`) from one read and no ORM objects, or None: the full
    handler then runs (every refusal, every write and every transition is its business). Only with EVPN,
    whose policy is a function of the row this reads (static peer lists depend on the whole tenant).
    Second: the id of the node the source address was found holding (None: not found, or not asked), so
    the full handler does not ask `inventory.holds` again (the secret trade falls back here every time).
    Third: why the full handler must run (the `CHECKINS` counter's reason), "" when answered here."""
    req = _fast_request()
    if req is None:
        return None, None, "not_evpn"
    name, tok, ip, cfg = req
    with sessions_of(current_app)() as s:
        row, held = _current_row(s, name, tok, ip, cfg)
        if row is None:
            return None, held, "identity"
        if row.last_seen is None:
            return None, held, "no_status"
        if row.state == State.DPU_REBOOTING:
            return None, held, "rebooting"
        if row.agent_version != body.agent_version:
            return None, held, "agent_version"
        if body.health is not None and _news(body.health) != _news(row.health if isinstance(row.health, dict)
                                                                     else None):
            return None, held, "health"
        ok, doc = _row_policy(s, row, cfg)
        if not ok:
            return None, held, "no_fast_policy"
        wanted = doc["version"] if doc else None
        advice = _advice(s, row.state, wanted, _applied(body.health))
        now = dt.datetime.now(dt.UTC)
        path = "quiet"
        if not _fresh(row.last_seen, now, _liveness_advice(row.state, advice)):
            # only liveness is due (nothing else differs from the row): one UPDATE of the status row,
            # no ORM objects; the counters go with it as the full handler would store them
            params: dict[str, Any] = {"nid": row.id, "last_seen": now}
            if body.health is not None:
                params["health"] = body.health
            s.connection().execute(_touch_query(), params)
            s.commit()
            path = "touch"
    g.actor = f"node:{name}"
    resp = jsonify({"node": row.name, "policy_version": wanted, "state": row.state, "poll_seconds": advice})
    resp.headers["Cache-Control"] = "no-store"
    metrics.counters.inc(CHECKINS, {"path": path, "reason": "idle"})
    return resp, held, ""


def _retrying(fn: Any, attempts: int = 4) -> Any:
    """Re-run a handler when another writer changed the node between read and write (version check),
    or created the node's status row first (two first check-ins at once)."""
    for _ in range(attempts - 1):
        try:
            return fn()
        except (lifecycle.TransitionConflict, StaleDataError, IntegrityError):
            continue
    return fn()


def _confirm(s: Session, node: Node) -> None:
    """The agent used its new secret: the install secret is dead from now on."""
    if not node.agent_secret_confirmed:
        node.agent_secret_confirmed = True
        s.commit()


@bp.post("/agent/checkin")
@operation("POST", "/api/v1/agent/checkin", "Agent check-in (liveness; first check-in marks the DPU ready)",
           tag="agent", security="node", request_model=CheckinIn,
           responses={200: ("the policy version to apply", CheckinOut), **_AUTH})
def checkin() -> Any:
    body = parse_body(CheckinIn)
    fast, held, why = _quiet(body)
    if fast is not None:
        return fast

    def go() -> Any:
        with sessions_of(current_app)() as s:
            node, how = _agent_node(s, checkin=True, held=held)
            now, reason = dt.datetime.now(dt.UTC), why
            st0 = s.get(AgentStatus, node.id)  # held: the identity map is weak, _status must find it there
            if _idle(st0, node, how, body):
                doc, _err = _policy(s, node)
                wanted = doc["version"] if doc else None
                advice = _advice(s, node.state, wanted, _applied(body.health))
                live = _liveness_advice(node.state, advice)
                if st0 is not None and st0.last_seen is not None and _fresh(st0.last_seen, now, live):
                    metrics.counters.inc(CHECKINS, {"path": "full", "reason": f"idle:{why}"})
                    resp = jsonify({"node": node.name, "policy_version": wanted, "state": node.state,
                                    "poll_seconds": advice})
                    resp.headers["Cache-Control"] = "no-store"
                    return resp
                reason = "last_seen"  # only liveness is due: written below
            metrics.counters.inc(CHECKINS, {"path": "full", "reason": how if how != "current" else
                                            "confirm" if not node.agent_secret_confirmed else reason})
            if st0 is None:  # (s.get found none: asking _status would SELECT it again)
                st0 = AgentStatus(node_id=node.id, health={})
                s.add(st0)
            st = st0
            st.last_seen = now
            st.agent_version = body.agent_version
            if body.health is not None:
                _fabric_news(s, node, st.health, body.health)
                st.health = body.health
                av = body.health.get("applied_version")
                if isinstance(av, str | int) and not isinstance(av, bool):
                    st.applied_version = str(av)[:64]
            new_secret: str | None = None
            if how == "install":
                # the first check-in of an agent installed with this bf.cfg: rotate, and finish the install
                # whatever the installer reported (NVIDIA's reports nothing)
                node.secret_generation += 1
                node.agent_generation = node.secret_generation
                node.agent_secret_confirmed = False
                new_secret = auth_secrets.node_secret(boot_guard.state().key(), node.id, node.secret_generation)
                if node.state in (State.DPU_BOOTING, State.DPU_INSTALLING, State.DPU_REBOOTING):
                    _apply(s, node, Trigger.AGENT_CHECKIN, commit=False,
                           detail={"agent_version": body.agent_version, "secret_rotated": True})
                else:
                    lifecycle.record(s, node, "agent_secret_rotated", actor=g.actor, commit=False)
                log.info("agent: node %s checked in with its install secret; secret rotated", node.name)
            elif how == "previous":
                new_secret = auth_secrets.node_secret(boot_guard.state().key(), node.id, node.secret_generation)
                log.info("agent: node %s checked in with its install secret again; new secret re-sent", node.name)
            else:
                if not node.agent_secret_confirmed:
                    node.agent_secret_confirmed = True
                if node.state == State.DPU_REBOOTING:
                    _apply(s, node, Trigger.AGENT_CHECKIN, detail={"agent_version": body.agent_version},
                           commit=False)
            # built before the commit (which expires the node: reading it back would cost a SELECT)
            doc, _err = _policy(s, node)
            name, state = node.name, node.state
            wanted = doc["version"] if doc else None
            advice = _advice(s, state, wanted, None if new_secret else _applied(body.health))
            s.commit()
            out: dict[str, Any] = {"node": name, "policy_version": wanted, "state": state,
                                   "poll_seconds": advice}
            if new_secret is not None:
                out["secret"] = new_secret
            resp = jsonify(out)
            resp.headers["Cache-Control"] = "no-store"
            return resp

    return _retrying(go)


@bp.get("/agent/policy")
@operation("GET", "/api/v1/agent/policy", "This DPU's desired policy (ETag = policy version)", tag="agent",
           security="node",
           params=(),
           responses={200: ("the policy document", PolicyDoc), 304: ("unchanged (If-None-Match)", None),
                      409: ("no policy can be built for this DPU now", ErrorOut), **_AUTH})
def policy() -> Any:
    fast, held = _quiet_policy()
    if fast is not None:
        return _policy_response(fast)

    def go() -> Any:
        # under _retrying: the secret confirmation's commit meets a node row a conductor changed meanwhile
        # (StaleDataError on the version check), as the check-in and the report can
        with sessions_of(current_app)() as s:
            node, _how = _agent_node(s, held=held)
            doc, err = _policy(s, node)
            name = node.name
            _confirm(s, node)
            if doc is None:
                raise ApiError(409, "no_policy", f"no policy for {name}: {err}")
            return _policy_response(doc)

    return _retrying(go)


def _policy_response(doc: dict[str, Any]) -> Any:
    """The document, or 304 when If-None-Match names its version (RFC 9110 section 13.1.2)."""
    etag = f'"{doc["version"]}"'
    inm = request.headers.get("If-None-Match", "")
    same = etag in [t.strip() for t in inm.split(",")] or inm.strip() == "*"
    resp = make_response("", 304) if same else jsonify(doc)
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
            node, _how = _agent_node(s)
            if not node.agent_secret_confirmed:
                node.agent_secret_confirmed = True
            doc, _err = _policy(s, node)
            current = doc is not None and doc["version"] == body.policy_version
            st = _status(s, node)
            now = dt.datetime.now(dt.UTC)
            st.last_seen = st.reported_at = now
            st.report_status, st.report_version, st.report_error = body.status, body.policy_version, body.error
            if body.health is not None:
                _fabric_news(s, node, st.health, body.health)
                st.health = body.health
            if body.status == "applied":
                st.applied_version = body.policy_version
            elif body.health is not None and body.health.get("applied_version") is not None:
                st.applied_version = str(body.health["applied_version"])[:64]
            if current:
                detail = {"policy_version": body.policy_version}
                if body.status == "applied":
                    if node.state == State.DPU_READY:  # the agent was faster than the conductor
                        # set before the transition flushes the status row: one UPDATE of it, not two
                        st.sent_version = body.policy_version
                        _apply(s, node, Trigger.POLICY_SENT, detail={**detail, "reason": "agent pulled it"},
                               commit=False)
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
            state = node.state
            s.commit()
            return jsonify(ok=True, state=state, current=current)

    return _retrying(go)

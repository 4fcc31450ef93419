"""The web UI for datacenter techs: server-rendered pages under ``/ui`` (and ``/`` redirecting there).

Owns: token login and the UI session (a random id in a signed, HttpOnly, SameSite=Strict cookie; the
session itself — its token, CSRF token and end — in the ``ui_sessions`` table, so logout, token revocation
and token expiry end it server-side; CSRF token on every POST form), role checks (admin/tech act;
automation and viewer read; agent tokens are refused), the rack view,
the machine page (host + DPUs, power, timeline, live status JSON polled every 2 s, lease/IP/VRF, last
error and the "what to do next" hint), the enroll form (host + DPU enrolled atomically by
``operations.enroll``), confirmed actions (``operations.power`` and ``operations.transition``: a
refusal becomes a flash message) and search by serial/MAC/IP.

Modules: this one is the UI's request cycle — the authentication, CSRF and headers hooks, and the
routes — kept together (about 500 lines) because every route leans on the same hooks and helpers; the
rest lives beside it: ``session`` (the cookie, the server-side session row, flash, the access policy),
``present`` (health, progress steps, actions, rack slots: pure), ``enroll_form`` (the form's checks and
messages), ``machine_reads`` (the machine page's queries), ``search`` (the search queries). No state
change happens here except through ``bootsvc.operations``; templates are in
``bootsvc/web/templates/ui_*.html``, JS/CSS in ``bootsvc/web/static/`` (no build step, no inline
script: the pages send a strict CSP).

Live progress is polled JSON rather than server-sent events: gunicorn's threaded workers would pin
one thread per open tab for an SSE stream, and a rack of techs each with a few tabs would starve the
boot endpoints sharing those workers. A 2 s poll is one short indexed query.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
import secrets as pysecrets
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    url_for,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response as WzResponse

from bootsvc import operations
from bootsvc.config import Config
from bootsvc.models import Node, Tenant
from bootsvc.states import (
    HINTS,
    State,
)
from bootsvc.views import iso_utc
from bootsvc.web import config_of, sessions_of
from bootsvc.web.auth import find_token
from bootsvc.web.ui import machine_reads as reads
from bootsvc.web.ui.enroll_form import (
    ARCHES,
    DEFAULT_ARCH,
    ENROLL_FIELDS,
    ENROLL_KEEP,
    enroll_field,
    evpn_site,
    tenant_networks,
    validate_enroll,
)
from bootsvc.web.ui.present import (
    ACTIONS,
    HEALTH_FAIL,
    HEALTH_ICON,
    HEALTH_LABEL,
    HEALTH_WAIT,
    NO_RACK,
    actions_for,
    group_slots,
    health,
    natural,
    progress_steps,
    state_text,
    worst,
)
from bootsvc.web.ui.search import search_nodes
from bootsvc.web.ui.session import (
    ACT_ENDPOINTS,
    COOKIE,
    FLASH_COOKIE,
    LOGIN_COOKIE,
    PUBLIC_ENDPOINTS,
    VIEW_ROLES,
    UiUser,
    current_user,
    flash,
    safe_next,
    session_row,
    session_seconds,
    set_cookie,
    start_session,
    take_flash,
)

log = logging.getLogger("bootsvc.web.ui")
# templates and static files live beside the package (bootsvc/web/templates, bootsvc/web/static)
bp = Blueprint("ui", __name__, url_prefix="/ui", template_folder="../templates", static_folder="../static",
               static_url_path="/static")

POLL_MS = 2000
POLL_POWER_WAIT = 0.3  # a poll waits this long for a BMC at most; a slower answer shows at the next poll
RACK_REFRESH_MS = 5000
ALL_RACKS_LIMIT = 400  # above this many nodes the rack view asks which rack to show

Rv = WzResponse | str | tuple[str, int] | tuple[WzResponse, int]

@bp.before_request
def _authenticate() -> Rv | None:
    g.ui_db = sessions_of(current_app)()
    g.ui_user = None
    if request.endpoint in PUBLIC_ENDPOINTS:
        return None
    user = current_user(g.ui_db)
    if user is None:
        if request.path.endswith(".json"):
            return jsonify(error="unauthorized", reason="log in again at /ui/login"), 401
        return redirect(url_for("ui.login", next=request.full_path.rstrip("?")))
    g.ui_user = user
    if (request.method, request.endpoint) in ACT_ENDPOINTS and not user.can_act:
        abort(403, f"Your token's role '{user.role}' is read-only in the UI: ask for a tech token.")
    if request.method == "POST":
        sent = request.form.get("csrf_token", "")
        if not hmac.compare_digest(sent.encode(), user.csrf.encode()):
            abort(400, "This form is out of date (security check failed). Go back, reload the page "
                       "and try again.")
    return None


@bp.teardown_request
def _close_db(_exc: BaseException | None) -> None:
    db = g.pop("ui_db", None)
    if db is not None:
        db.close()


@bp.after_request
def _headers(resp: WzResponse) -> WzResponse:
    # No inline script anywhere: a strict policy stops injected markup from running code, and
    # frame-ancestors stops another page from overlaying our confirm buttons (clickjacking).
    resp.headers.setdefault("Content-Security-Policy",
                            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                            "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
    resp.headers.setdefault("X-Frame-Options", "DENY")
    resp.headers.setdefault("X-Content-Type-Options", "nosniff")
    resp.headers.setdefault("Referrer-Policy", "same-origin")
    if request.endpoint != "ui.static":
        resp.headers.setdefault("Cache-Control", "no-store")
    if request.cookies.get(FLASH_COOKIE) and request.method == "GET" and resp.status_code == 200:
        resp.delete_cookie(FLASH_COOKIE, path="/ui")
    return resp


@bp.errorhandler(HTTPException)
def _error(e: HTTPException) -> Any:
    if request.path.endswith(".json"):
        return jsonify(error=e.name.lower().replace(" ", "_"), reason=e.description), e.code or 500
    return render_template("ui_error.html", code=e.code, title=e.name, reason=e.description), e.code or 500


@bp.record_once
def _setup(state: Any) -> None:
    app: Flask = state.app

    def root() -> WzResponse:
        return redirect("/ui/")

    if not any(r.rule == "/" for r in app.url_map.iter_rules()):
        app.add_url_rule("/", "ui_root", root)


def _db() -> Session:
    s: Session = g.ui_db
    return s


def _user() -> UiUser:
    u: UiUser = g.ui_user
    return u


def _cfg() -> Config:
    return config_of(current_app)


@bp.app_template_global()
def ui_health(state: str) -> str:
    return health(state)


@bp.context_processor
def _globals() -> dict[str, Any]:
    return {"user": g.get("ui_user"), "site": _cfg().site.name, "HEALTH_LABEL": HEALTH_LABEL,
            "HEALTH_ICON": HEALTH_ICON, "health": health, "state_text": state_text,
            "flash": take_flash(), "iso": _iso}


def _iso(t: dt.datetime | None) -> str:
    return iso_utc(t) or ""


# ---------------------------------------------------------------------------- login / logout


@bp.route("/login", methods=["GET", "POST"])
def login() -> Rv:
    nxt = safe_next(request.values.get("next"))
    error = ""
    if request.method == "POST":
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        sent = request.form.get("login_nonce", "")
        if not nonce or not hmac.compare_digest(nonce.encode(), sent.encode()):
            error = "The login form expired. It has been reloaded: paste the token again."
        else:
            t = find_token(_db(), request.form.get("token", ""))
            if t is None:
                error = ("That token is not valid (wrong, revoked, expired or mistyped). Ask an admin for a token: "
                         "`bootsvc token create NAME --role tech`.")
            elif t.role not in VIEW_ROLES:
                error = (f"Tokens with role '{t.role}' are for DPU agents, not people. "
                         "Use an admin or tech token.")
            else:
                resp = redirect(nxt)
                set_cookie(resp, COOKIE, start_session(_db(), t), session_seconds())
                resp.delete_cookie(LOGIN_COOKIE, path="/ui/login")
                return resp
    nonce = pysecrets.token_urlsafe(24)
    resp = current_app.make_response((render_template("ui_login.html", next=nxt, error=error, nonce=nonce),
                                      401 if error else 200))
    set_cookie(resp, LOGIN_COOKIE, nonce, 3600, path="/ui/login")
    return resp


@bp.post("/logout")
def logout() -> Rv:
    row = session_row(_db())
    if row is not None and row.ended_at is None:
        row.ended_at = dt.datetime.now(dt.UTC)  # the cookie, replayed, no longer opens anything
        _db().commit()
    resp = redirect(url_for("ui.login"))
    resp.delete_cookie(COOKIE, path="/ui")
    return resp


# ---------------------------------------------------------------------------- rack view


def _rack_of() -> Any:
    """A node's rack as the rack view draws it: its own, else (a DPU) its host's — so the summary counts
    a DPU enrolled without --rack where its card is drawn, beside its host."""
    host = aliased(Node)
    return func.coalesce(Node.rack, host.rack), host


def _rack_summary(s: Session) -> list[dict[str, Any]]:
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    rack_col, host = _rack_of()
    q = (select(rack_col, Node.state, func.count()).outerjoin(host, Node.host_id == host.id)
         .group_by(rack_col, Node.state))
    for rack, state, n in s.execute(q):
        counts[rack or NO_RACK][health(state)] += n
    return [{"rack": r, "counts": dict(c), "health": worst(h for h, v in c.items() if v),
             "total": sum(c.values())}
            for r, c in sorted(counts.items(), key=lambda kv: (kv[0] == NO_RACK, natural(kv[0])))]


@bp.get("/")
def racks() -> Rv:
    s = _db()
    rack = request.args.get("rack") or None
    problems = request.args.get("problems") == "1"
    summary = _rack_summary(s)
    total = sum(r["total"] for r in summary)
    rack_col, host = _rack_of()
    q = select(Node).outerjoin(host, Node.host_id == host.id)
    if rack:
        q = q.where(rack_col.is_(None)) if rack == NO_RACK else q.where(rack_col == rack)
    show = bool(rack) or total <= ALL_RACKS_LIMIT
    nodes = list(s.scalars(q)) if show else []
    grouped = group_slots(nodes)
    if problems:
        grouped = {r: [sv for sv in svs if sv.health in (HEALTH_FAIL, HEALTH_WAIT)] for r, svs in grouped.items()}
        grouped = {r: svs for r, svs in grouped.items() if svs}
    tmpl = "ui_racks_body.html" if request.args.get("fragment") == "1" else "ui_racks.html"
    return render_template(tmpl, summary=summary, grouped=grouped, rack=rack, problems=problems,
                           show=show, total=total, refresh_ms=RACK_REFRESH_MS)


# ---------------------------------------------------------------------------- machine page


def _node_ctx(s: Session, nodes: Sequence[Node], power_wait: float = operations.POWER_READ_TIMEOUT
              ) -> dict[str, Any]:
    user = _user()
    leases = reads.leases(s, nodes)
    now = dt.datetime.now(dt.UTC)
    # read on demand, cached a few seconds per node, never holding the page longer than power_wait
    power = operations.power_statuses(nodes, config=_cfg(), driver=_driver(), timeout=power_wait)
    cards = []
    for n in nodes:
        since = n.state_since if n.state_since.tzinfo else n.state_since.replace(tzinfo=dt.UTC)
        deadline = None
        if n.deadline is not None:
            deadline = n.deadline if n.deadline.tzinfo else n.deadline.replace(tzinfo=dt.UTC)
        hint = n.hint or (HINTS.get(State(n.state)) if n.state in State.__members__.values() else None)
        cards.append({
            "node": n, "health": health(n.state),
            "steps": progress_steps(n.kind, n.state, reads.install_percent(s, n)),
            "since": since, "since_s": int((now - since).total_seconds()), "deadline": deadline,
            "deadline_s": int((deadline - now).total_seconds()) if deadline else None,
            "hint": hint, "leases": leases.get(n.id, []), "power": power[n.id],
            "actions": actions_for(n.kind, n.state, has_bmc=bool(n.bmc_address), can_act=user.can_act,
                                   role=user.role),
            # a DPU has no tenant of its own: it enforces its host's (that is what its agent's policy holds)
            "tenant": n.tenant or (n.host.tenant if n.kind == "dpu" and n.host is not None else None),
            "tenant_via": n.host.name if n.kind == "dpu" and n.tenant is None and n.host is not None else None,
            "dpu_bmc": reads.dpu_checked(s, n) if n.kind == "dpu" else None,
            "fabric": reads.fabric_panel(s, n) if n.kind == "dpu" else None,
        })
    return {"cards": cards, **reads.event_addresses(nodes, leases)}


def _signature(nodes: Sequence[Node], ctx: dict[str, Any]) -> str:
    parts = [f"{n.id}:{n.version}:{n.state}" for n in nodes]
    for c in ctx["cards"]:
        parts.append(f"{c['power'].state}:{c['power'].reason}")
        parts += [f"{x.id}:{x.state}:{x.address}" for x in c["leases"]]
        if c.get("fabric"):  # sessions or routes changed: re-render the panel
            f = c["fabric"]
            parts.append(repr((f["sessions"], f["l3vni"], f["local"], f["remote"], f["verdict"])))
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _load_machine(node_id: int) -> tuple[Node, list[Node]]:
    node = _db().get(Node, node_id)
    if node is None:
        abort(404, f"No machine with id {node_id}. Search by serial, MAC or IP instead.")
    return node, reads.machine_nodes(_db(), node)


@bp.get("/machines/<int:node_id>")
def machine(node_id: int) -> Rv:
    s = _db()
    node, nodes = _load_machine(node_id)
    ctx = _node_ctx(s, nodes)
    events = reads.events(s, nodes)
    names = {n.id: n.name for n in nodes}
    return render_template("ui_machine.html", node=node, nodes=nodes, events=events, names=names,
                           sig=_signature(nodes, ctx), last_event=max((e.id for e in events), default=0),
                           poll_ms=POLL_MS, machine_health=worst(c["health"] for c in ctx["cards"]), **ctx)


@bp.get("/machines/<int:node_id>/status.json")
def machine_status(node_id: int) -> Any:
    """What the machine page polls: state signature, re-rendered panels when changed, new events."""
    s = _db()
    _node, nodes = _load_machine(node_id)
    after = request.args.get("after", "0")
    after_id = int(after) if after.isdigit() else 0
    ctx = _node_ctx(s, nodes, power_wait=POLL_POWER_WAIT)
    sig = _signature(nodes, ctx)
    events = reads.events(s, nodes, after=after_id)
    names = {n.id: n.name for n in nodes}
    body: dict[str, Any] = {
        "sig": sig,
        "health": (mh := worst(c["health"] for c in ctx["cards"])),
        "health_text": f"{HEALTH_ICON[mh]} {HEALTH_LABEL[mh]}",
        "nodes": [{"id": c["node"].id, "name": c["node"].name, "kind": c["node"].kind, "state": c["node"].state,
                   "health": c["health"], "last_error": c["node"].last_error, "hint": c["hint"],
                   "leases": [{"address": x.address, "vrf": x.vrf, "network": x.network, "state": x.state}
                              for x in c["leases"]]} for c in ctx["cards"]],
        "last_event": max((e.id for e in events), default=after_id),
        "events_html": render_template("ui_events_rows.html", events=events, names=names, via=ctx["via"],
                                       host_ip=ctx["host_ip"]) if events else "",
    }
    if request.args.get("sig") != sig:
        body["panels_html"] = render_template("ui_machine_panels.html", **ctx)
    return jsonify(body)


# ---------------------------------------------------------------------------- actions


def _expected_version(form: Any) -> int | None:
    v = form.get("version", "")
    return int(v) if v.isdigit() else None


@bp.get("/machines/<int:node_id>/confirm")
def confirm(node_id: int) -> Rv:
    _node, nodes = _load_machine(node_id)
    target_id = request.args.get("node", "")
    target = next((n for n in nodes if str(n.id) == target_id), None)
    action = ACTIONS.get(request.args.get("action", ""))
    if target is None or action is None:
        abort(404, "Unknown node or action. Go back to the machine page.")
    view = next((a for a in actions_for(target.kind, target.state, has_bmc=bool(target.bmc_address),
                                        can_act=_user().can_act, role=_user().role) if a.key == action.key), None)
    if view is None or not view.enabled:
        abort(403 if not _user().can_act else 409,
              f"{action.label} is not possible now: {view.why if view else 'not in this state'}.")
    return render_template("ui_confirm.html", machine_id=node_id, target=target, action=action)


def _driver() -> operations.DriverFactory | None:
    # The same seam as the REST API's power action: tests (and the lab) may inject a driver factory.
    factory = current_app.config.get("POWER_DRIVER_FACTORY")
    if factory is None:
        return None
    cfg = _cfg()
    return lambda n: factory(n, cfg)


@bp.post("/machines/<int:node_id>/act")
def act(node_id: int) -> Rv:
    user = _user()
    if not user.can_act:
        abort(403, f"Your token's role '{user.role}' is read-only in the UI: ask for a tech token.")
    s = _db()
    _node, nodes = _load_machine(node_id)
    target = next((n for n in nodes if str(n.id) == request.form.get("node", "")), None)
    action = ACTIONS.get(request.form.get("action", ""))
    if target is None or action is None:
        abort(400, "Unknown node or action. Go back to the machine page.")
    seen = _expected_version(request.form)
    back = redirect(url_for("ui.machine", node_id=node_id))
    if seen is not None and seen != target.version and action.trigger is not None:
        return flash(back, f"Not done: {target.name} changed (now {state_text(target.state)}) after you "
                            f"opened the confirmation. Look at it again before acting.", "error")
    actor = f"ui:{user.name}"
    try:
        if action.power is not None:
            state = operations.power(s, target, action.power, actor=actor, config=_cfg(), via="ui",
                                     driver=_driver())
            return flash(back, f"Power {action.power} done: {target.name}'s BMC now reports power {state}.")
        assert action.trigger is not None
        ev = operations.transition(s, target, action.trigger, actor=actor, config=_cfg(), detail={"via": "ui"})
    except operations.OpError as e:
        return flash(back, f"Not done: {e}.", "error")
    return flash(back, f"{action.label}: {target.name} {state_text(ev.from_state or '')} \u2192 "
                        f"{state_text(ev.to_state or '')}.")


# ---------------------------------------------------------------------------- enroll
def _enroll_options() -> dict[str, Any]:
    s, cfg = _db(), _cfg()
    rows = list(s.scalars(select(Tenant).order_by(Tenant.name)))
    # where each tenant's host addresses live, for the host address field's help
    nets = {t.name: ", ".join(str(n.cidr) for n in tenant_networks(cfg, t.vrf)) for t in rows}
    return {"tenants": [t.name for t in rows], "tenant_nets": {k: v for k, v in nets.items() if v},
            "evpn": evpn_site(cfg), "credentials": sorted(cfg.bmc_credentials), "arches": ARCHES,
            "default_arch": DEFAULT_ARCH}


@bp.route("/enroll", methods=["GET", "POST"])
def enroll() -> Rv:
    user = _user()
    opts = _enroll_options()
    if request.method == "GET":
        values = {k: request.args.get(k, "") for k in ENROLL_KEEP}
        done = request.args.get("done", "")
        done_node = _db().get(Node, int(done)) if done.isdigit() else None
        return render_template("ui_enroll.html", values=values, errors={}, links={}, done=done_node,
                               first_error=None, **opts)
    if not user.can_act:
        abort(403, f"Your token's role '{user.role}' is read-only in the UI: ask for a tech token to enroll.")
    form = {k: str(request.form.get(k, "")) for k in ENROLL_FIELDS}
    s = _db()
    result, specs = validate_enroll(s, form, _cfg())
    if specs:
        try:
            host, dpu = operations.enroll(s, specs, actor=f"ui:{user.name}")
        except operations.OpError as e:
            for f in e.extra.get("fields") or [{"field": "", "reason": str(e)}]:
                result.errors.setdefault(enroll_field(f["field"]),
                                         f"{f['reason']}. Fix this field and press Enroll again.")
        else:
            msg = f"Enrolled host {host.name} and DPU {dpu.name}."
            if opts["evpn"] and host.tenant is not None and not any(n.ipv4 for n in host.nics):
                nics = " ".join(f"--mac {n.mac},{n.role}" + (",ADDRESS" if n.role == "host-pf" else "")
                                for n in host.nics)
                msg += (f" {host.name} has no host address: this site runs EVPN, so it cannot boot until one "
                        f"is reserved in tenant {host.tenant.name}'s network (`bootsvc node set {host.name} "
                        f"{nics}`).")
            if form.get("provision"):
                try:
                    operations.provision(s, host, actor=f"ui:{user.name}", config=_cfg(), detail={"via": "ui"})
                    msg += " Provisioning started."
                except operations.OpError as e:
                    msg += f" Provisioning did not start ({e}): use Provision on its page."
            keep: dict[str, Any] = {k: form[k] for k in ENROLL_KEEP if form.get(k)}
            return flash(redirect(url_for("ui.enroll", done=host.id, **keep)), msg)
    first = next((f for f in ENROLL_FIELDS if f in result.errors), None)
    return render_template("ui_enroll.html", values=result.values, errors=result.errors, links=result.links,
                           done=None, first_error=first, **opts), 422


# ---------------------------------------------------------------------------- search
@bp.get("/search")
def search() -> Rv:
    q = request.args.get("q", "")
    hits, seen = search_nodes(_db(), q)
    if len(hits) == 1 and not seen:
        return redirect(url_for("ui.machine", node_id=hits[0].node.id))
    return render_template("ui_search.html", q=q, hits=hits, seen=seen), 200 if hits or seen or not q else 404

"""HTTP boot endpoints: iPXE scripts, GRUB configs, bf.cfg, install callbacks and image downloads.

Owns (blueprint ``bp``):

* ``GET /boot/ipxe?mac=M`` - the iPXE script for that MAC, chosen by ``bootsvc.render.decide``;
* ``GET /boot/grub?mac=M`` - the same decision as a GRUB config (HTTP-booted GRUB; TFTP has its own);
* ``GET /boot/nbp/<file>`` - network boot programs for UEFI HTTP boot (the TFTP root's files);
* ``GET /boot/bfcfg/<node>?token=T`` / ``GET /boot/bfks/<node>?token=T`` - the DPU's bf.cfg and the
  BlueField kickstart that fetches it; only with the node's boot token, only while it installs;
* ``POST /boot/callback/<node>`` - installer and erase-image events -> ``bootsvc.lifecycle.apply``;
* ``POST /boot/discover`` - the discovery image's report of an unknown machine (logged only);
* ``GET|HEAD /images/<name>/<version>/<file>`` (+ ``.sha256``) and ``/boot/agent.whl`` - catalog files
  with Range, ETag (the catalog sha256), conditional requests and sendfile under gunicorn.

Identity (docs/security.md): boot tokens are compared in constant time and never logged; the node
secret appears only in the bf.cfg body. A script carries a token only for the address DHCP leased (or
reserved) for that MAC's node; bf.cfg, bfks and callbacks need the token *and* that address (403
otherwise); bf.cfg is served once per install attempt (410 after) - except to the address that fetched
it, again, until the agent traded the install secret (a lost answer must not strand the DPU). Requests
naming a MAC or node the source address does not hold draw on a per-address token bucket (429 when empty).
Every refusal is one log line and a count in ``bootsvc_boot_refused_total{reason}``. Those checks and the per-worker
caches live in ``bootsvc.web.boot_guard``; the cached-script fast path in ``bootsvc.web.boot_fastpath``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import socket
import time
from pathlib import Path
from typing import Any, cast

from flask import Blueprint, Flask, Response, abort, current_app, jsonify, request
from sqlalchemy import CursorResult, Integer, Select, bindparam, desc, func, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from bootsvc import images as images_mod
from bootsvc import inventory, lifecycle, render, states
from bootsvc.models import Event, Node
from bootsvc.states import IllegalTransition, State, Trigger
from bootsvc.web import boot_guard as guard
from bootsvc.web import files, sessions_of
from bootsvc.web.boot_fastpath import ScriptFastPath

log = logging.getLogger("bootsvc.boot")

bp = Blueprint("boot", __name__)

EVENTS: dict[str, Trigger] = {
    "started": Trigger.INSTALL_STARTED,
    "progress": Trigger.INSTALL_PROGRESS,
    "done": Trigger.INSTALL_DONE,
    "failed": Trigger.INSTALL_FAILED,
}
# The same events from the erase image (a node in ``wiping``, or a body with ``"mode": "wipe"`` - the
# lab initramfs sends its mode - so a repeated ``done`` after the node reached available is recognised).
WIPE_EVENTS: dict[str, Trigger] = {
    "started": Trigger.WIPE_PROGRESS,
    "progress": Trigger.WIPE_PROGRESS,
    "done": Trigger.WIPE_DONE,
    "failed": Trigger.WIPE_FAILED,
}
_FAILED = (Trigger.INSTALL_FAILED, Trigger.WIPE_FAILED)
_CALLBACK_TRIGGERS = sorted({t.value for t in (*EVENTS.values(), *WIPE_EVENTS.values())})
# (kind, trigger, state) such that the trigger can lead a node of that kind INTO that state: a callback
# can repeat the event that put the node where it is only if its trigger leads there (_duplicate)
_LEADS_TO = frozenset((k, t.trigger, t.dst) for t in states.TABLE for k in t.kinds)
INSTALL_STATES = {State.DPU_BOOTING, State.DPU_INSTALLING, State.HOST_BOOTING, State.HOST_INSTALLING}
MAX_CALLBACK_BYTES = 16 * 1024
# Triggers after which the conductor (re)boots a DPU into its installer: each starts an install attempt,
# and bf.cfg is served once per attempt (bfcfg()).
_ATTEMPT_TRIGGERS = (Trigger.PROVISION.value, Trigger.REPROVISION.value, Trigger.RETRY.value,
                     Trigger.TIMEOUT.value)


# ---------------------------------------------------------------- start-up
@bp.record_once
def _on_register(setup: Any) -> None:
    # verify the catalog when the app is built (start-up), not on the first download
    app: Flask = setup.app
    try:
        guard.state(app).catalog()
    except images_mod.CatalogError as e:
        log.error("image catalog unusable: %s", e)
        raise
    app.wsgi_app = ScriptFastPath(app, app.wsgi_app)  # type: ignore[method-assign]


# ---------------------------------------------------------------- request helpers
def _base_url() -> str:
    """http://host[:port] as this client reached us (relayed clients use another address)."""
    try:
        return "http://" + render.check_host(request.host)
    except render.RenderError:
        abort(400, description="bad Host header")


def _text(body: str, status: int = 200) -> Response:
    return Response(body, status=status, mimetype="text/plain", headers={"Cache-Control": "no-store"})


def _mac_arg() -> str:
    raw = request.args.get("mac", "")
    try:
        return inventory.normalize_mac(raw)
    except ValueError:
        abort(400, description="mac= must be a MAC address")


# ---------------------------------------------------------------- scripts
@bp.get("/boot/ipxe")
def ipxe() -> Response:
    mac = _mac_arg()
    st = guard.state()
    ttl = guard.cache_ttl()
    # raw Host and the source address: the fast path's key
    key = (mac, str(request.environ.get("HTTP_HOST") or request.host), request.remote_addr or "")
    hit = st.scripts.get(key)
    if hit is not None and time.monotonic() - hit[0] < ttl:
        return _text(hit[1])  # same node view, same Host, same source: the same script
    node, held = st.script_node(sessions_of(current_app), mac, key[2], ttl)
    cfg = st.config
    decision = render.decide(node, st.catalog(), discovery=cfg.dhcp.unknown_clients == "discover")
    shown, decision = guard.bound_or_none(mac, node, decision, ttl, held)
    cacheable = shown is node
    node = shown
    ctx = render.BootContext(_base_url(), mac, guard.token_for(node, decision))
    try:
        body = render.ipxe_script(decision, ctx, node)
    except render.RenderError as e:
        log.error("boot: cannot render iPXE script for %s: %s", mac, e)
        body = render.ipxe_script(render.Decision(render.Action.HOLD, "configuration error"), ctx, node)
    log.debug("boot: ipxe mac=%s node=%s action=%s", mac, node.name if node else "-", decision.action.value)
    if ttl > 0 and cacheable:
        st.put_script(key, time.monotonic(), body)
    return _text(body)


@bp.get("/boot/grub")
def grub() -> Response:
    mac = _mac_arg()
    st = guard.state()
    ttl = guard.cache_ttl()
    node, held = st.script_node(sessions_of(current_app), mac, request.remote_addr or "", ttl)
    decision = render.decide(node, st.catalog(), discovery=st.config.dhcp.unknown_clients == "discover")
    node, decision = guard.bound_or_none(mac, node, decision, ttl, held)
    base = _base_url()
    ctx = render.BootContext(base, mac, guard.token_for(node, decision))
    port = int(base.rsplit(":", 1)[1]) if base.count(":") == 2 else 80
    try:
        body = render.grub_config(decision, ctx, node, http_port=port, grub_port=st.config.boot.grub_http_port)
    except render.RenderError as e:
        log.error("boot: cannot render GRUB config for %s: %s", mac, e)
        abort(500, description="cannot render this node's GRUB config")
    return _text(body)


@bp.get("/boot/nbp/<path:fname>")
def nbp(fname: str) -> Any:
    """UEFI HTTP boot: the same NBPs as the TFTP root (a fixed list, no path from the URL)."""
    # Only TFTP's path rules, not its server (tests/unit/test_architecture.py); local: serving NBPs over
    # HTTP is rare and the module's import cost belongs to the first such request.
    from bootsvc.tftp.paths import safe_resolve

    cfg = guard.state().config
    root = cfg.resolve(cfg.boot.tftp_root)
    p = safe_resolve(root, fname)
    if p is None:
        abort(404, description="no such boot program")
    # Same RFC 9110 range/conditional handling as catalog files (bootsvc/web/files.py). The validator is
    # size + mtime in nanoseconds, as nginx's ETag: NBPs are replaced whole, never edited in place, and
    # hashing a 1 MiB NBP per request would cost more than the transfer.
    st = Path(p).stat()
    return files.file_response(p, etag=f"{st.st_size:x}-{st.st_mtime_ns:x}", mimetype="application/efi",
                               max_age=300)


# ---------------------------------------------------------------- bf.cfg
def render_bfcfg(node: Node, cat: images_mod.Catalog, img: images_mod.Image | None) -> str:
    """This DPU's bf.cfg as both install paths hand it out: ``/boot/bfcfg`` (PXE) and the BFB stream a
    BMC pulls (bootsvc/web/bfbpush.py). Raises render.RenderError."""
    cfg = guard.state().config
    return render.bfcfg(inventory.node_view(node), server_url=_base_url(),
                        secret=guard.node_secret(node.id, node.secret_generation),
                        password_hash=cfg.security.dpu_password_hash, agent=_agent_install(cat, img),
                        ssh_root_login=cfg.security.dpu_ssh_root_login, callbacks=cfg.boot.bfcfg_callbacks)


def _agent_install(cat: images_mod.Catalog, node_image: images_mod.Image | None) -> render.AgentInstall:
    meta = dict(node_image.meta.get("agent", {})) if node_image is not None else {}
    host_port, uplink = str(meta.get("host_port", "pf0hpf")), str(meta.get("uplink", "p0"))
    agent = cat.resolve(None, "agent")
    if agent is None or not cat.usable(agent) or agent.file("wheel") is None:
        return render.AgentInstall("", "", host_port, uplink)
    w = agent.file("wheel")
    assert w is not None
    return render.AgentInstall(f"{_base_url()}/images/{agent.name}/{agent.version}/{w.name}", w.sha256,
                               host_port, uplink)


def _installing_node(s: Session, name: str, *, view: bool = False) -> Node:
    node = guard.authorize(s, name, view=view)
    if node.kind != "dpu":
        abort(404, description="bf.cfg exists only for DPUs")
    if node.state not in INSTALL_STATES:
        abort(409, description=f"node is {node.state}, not installing: bf.cfg is served only during an install")
    return node


def _install_attempt(s: Session, node: Node) -> int:
    """The event that started the node's current install attempt (0: none recorded)."""
    eid = s.scalars(_attempt_query(node.id)).first()
    return int(eid or 0)


def _attempt_query(node_id: int) -> Select[Any]:
    return (select(Event.id).where(Event.node_id == node_id, Event.trigger.in_(_ATTEMPT_TRIGGERS))
            .order_by(desc(Event.id)).limit(1))


def _started_by_bfcfg(s: Session, node: Node) -> bool:
    """Move the DPU to dpu_installing in the transaction that marks its bf.cfg served (not committed
    here). False when that transaction is gone (a concurrent change, or a busy database: rolled back);
    the caller then marks bf.cfg served again on its own (`_mark_and_start`)."""
    cfg = guard.state().config
    try:
        lifecycle.apply(s, node, Trigger.INSTALL_STARTED, actor="boot", detail={"phase": "bfcfg_served"},
                        max_attempts=cfg.conductor.max_attempts, deadlines=cfg.conductor.deadlines, commit=False)
    except IllegalTransition as e:  # nothing written by the move: the mark stands
        log.info("boot: node %s not marked installing after bf.cfg: %s", node.name, e)
    except lifecycle.TransitionConflict as e:  # someone else moved it (apply rolled back): theirs stands
        log.info("boot: node %s not marked installing after bf.cfg: %s", node.name, e)
        return False
    except OperationalError as e:
        # The move is only a longer deadline; the agent's first check-in still ends the install. bf.cfg
        # is marked served without it: failing now would answer 500 (and a retry might get 410).
        s.rollback()
        log.warning("boot: node %s not marked installing after bf.cfg (database busy: %s)", node.name,
                    str(e.orig or e).splitlines()[0] if str(e.orig or e) else "no detail")
        return False
    return True


def _mark_and_start(s: Session, node: Node) -> int | None:
    """Mark this install attempt's bf.cfg served and, for a DPU still in dpu_booting, start its install
    (bfks runs inside the installer before it touches the disk: the install has started even if the
    installer never says so - NVIDIA's does not - so the longer dpu_installing deadline runs), in ONE
    write transaction: SQLite's single write lock is taken once per bf.cfg, not twice. If the move
    cannot be written, the mark is written alone, as before. None: refused (`_mark_bfcfg_served`)."""
    won = _mark_bfcfg_served(s, node, commit=False)
    if won is None:
        s.rollback()
        return None
    if node.state != State.DPU_BOOTING:
        s.commit()
        return won
    if _started_by_bfcfg(s, node):
        s.commit()
        guard.state().forget_node(node.id)
        return won
    return _mark_bfcfg_served(s, node)  # a fresh transaction (the last one was rolled back), committed


@bp.get("/boot/bfcfg/<name>")
def bfcfg(name: str) -> Response:
    with sessions_of(current_app)() as s:
        node = _installing_node(s, name, view=True)
        st = guard.state()
        cat = st.catalog()
        img = cat.resolve(node.image, "dpu")
        try:
            body = render_bfcfg(node, cat, img)
        except render.RenderError as e:
            log.error("boot: cannot render bf.cfg for %s: %s", node.name, e)
            abort(500, description="cannot render this node's bf.cfg (see the server log)")
        # Once per install attempt, decided by one conditional UPDATE (two racing fetches: one wins; the
        # same address may fetch it again until the install secret is traded, _refetch).
        # Serving it exposes this generation's secret on the boot network: the agent must trade it for
        # a new one at its first check-in (agent_generation = NULL; bootsvc/web/agent_api.py).
        try:
            won = _mark_and_start(s, node)
        except OperationalError as e:
            s.rollback()  # nothing was marked: the installer's retry gets it
            log.warning("boot: bf.cfg of node %s not served, database busy: %s", node.name,
                        str(e.orig or e).splitlines()[0] if str(e.orig or e) else "no detail")
            resp = _text("database busy: retry in a few seconds\n", 503)
            resp.headers["Retry-After"] = "5"
            return resp
        if won is None:
            guard.refused("once")
            log.warning("boot: bf.cfg of node %s asked for again from %s; refused (served once per install attempt)",
                        node.name, request.remote_addr)
            abort(410, description="this node's bf.cfg was already served for this install attempt (to another "
                                   "address, or its agent already checked in); a retry or re-provision serves "
                                   "it again")
    log.info("boot: bf.cfg served to node %s at %s", node.name, request.remote_addr)
    resp = _text(body)
    resp.headers["Cache-Control"] = "no-store, private"
    return resp


def _mark_bfcfg_served(s: Session, node: Node, *, commit: bool = True) -> int | None:
    """Mark this install attempt's bf.cfg served and record it (committed unless ``commit=False``); None
    if it already was and this is not the same installer fetching it again (`_refetch`)."""
    # the attempt is read by the marking UPDATE itself (one statement; RETURNING hands it back): only a
    # refused or repeated fetch reads it again, for _refetch
    nodes = Node.metadata.tables["nodes"]
    current = func.coalesce(_attempt_query(node.id).scalar_subquery(), 0)
    won = s.execute(update(nodes).where(nodes.c.id == node.id, or_(nodes.c.bfcfg_attempt.is_(None),
                                                                   nodes.c.bfcfg_attempt != current))
                    .values(bfcfg_attempt=current, agent_generation=None, agent_secret_confirmed=False)
                    .returning(nodes.c.bfcfg_attempt)).first()
    if won is not None:
        attempt = int(won[0])
    else:
        attempt = _install_attempt(s, node)
        if not _refetch(s, node, attempt):
            return None
        log.warning("boot: bf.cfg of node %s served again to %s (same address, same install attempt, install "
                    "secret not traded yet: the first answer was lost)", node.name, request.remote_addr)
        lifecycle.record(s, node, "bfcfg_served", actor="boot",
                         detail={"ip": request.remote_addr, "attempt": attempt, "again": True}, commit=commit)
        return attempt
    lifecycle.record(s, node, "bfcfg_served", actor="boot", detail={"ip": request.remote_addr, "attempt": attempt},
                     commit=commit)
    return attempt


def _refetch(s: Session, node: Node, attempt: int) -> bool:
    """The installer that already fetched this attempt's bf.cfg asks again because the first answer never
    arrived: the serving instance died after the mark committed, or the COMMIT succeeded but the
    connection died before its acknowledgement (the client saw a 503). Allowed while (a) the request
    comes from the address the first fetch came from, (b) it is still the same attempt and (c) the agent
    has not traded the install secret yet (``agent_generation`` still NULL, the generation the body was
    rendered with still current): the body carries nothing that address did not already receive. One
    conditional no-op UPDATE decides (c) under the row lock, so a check-in rotating the secret at the
    same moment is ordered before (410) or after (the same exposed secret) this answer."""
    last = s.scalars(select(Event.detail).where(Event.node_id == node.id, Event.trigger == "bfcfg_served")
                     .order_by(desc(Event.id)).limit(1)).first()
    if not isinstance(last, dict) or last.get("ip") != request.remote_addr or last.get("attempt") != attempt:
        return False
    still = cast(CursorResult[Any], s.execute(
        update(Node).where(Node.id == node.id, Node.bfcfg_attempt == attempt, Node.agent_generation.is_(None),
                           Node.secret_generation == node.secret_generation)
        .values(bfcfg_attempt=attempt).execution_options(synchronize_session=False))).rowcount
    return still == 1


@bp.get("/boot/bfks/<name>")
def bfks(name: str) -> Response:
    with sessions_of(current_app)() as s:
        node = _installing_node(s, name)
        tok = render.boot_token(guard.node_secret(node.id, node.secret_generation))
        body = render.bfks(node.name, f"{_base_url()}/boot/bfcfg/{node.name}?token={tok}")
    return _text(body)


# ---------------------------------------------------------------- callbacks
def _detail(body: dict[str, Any]) -> dict[str, Any]:
    """The members of a callback we keep (never the token, which the lab installer also sends)."""
    out: dict[str, Any] = {"event": body["event"], "ip": request.remote_addr}
    pct = body.get("percent")
    if pct is not None:
        if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0 <= pct <= 100:
            abort(400, description="percent must be a number from 0 to 100")
        out["percent"] = pct
    for k in ("phase", "reason", "mode", "arch"):
        v = body.get(k)
        if v is not None:
            if not isinstance(v, str):
                abort(400, description=f"{k} must be a string")
            out[k] = re.sub(r"[^\x20-\x7e]", "?", v)[:500]
    b = body.get("bytes")
    if isinstance(b, int) and not isinstance(b, bool) and b >= 0:
        out["bytes"] = b
    return out


@bp.post("/boot/callback/<name>")
def callback(name: str) -> Any:
    if request.content_length is not None and request.content_length > MAX_CALLBACK_BYTES:
        abort(413, description=f"callback bodies are at most {MAX_CALLBACK_BYTES} bytes")
    raw = request.get_data(cache=False)
    if len(raw) > MAX_CALLBACK_BYTES:
        abort(413, description=f"callback bodies are at most {MAX_CALLBACK_BYTES} bytes")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        abort(400, description="body must be JSON")
    if not isinstance(body, dict) or not isinstance(body.get("event"), str) or body["event"] not in EVENTS:
        abort(400, description="event must be one of started, progress, done, failed")
    with sessions_of(current_app)() as s:
        node = guard.authorize(s, name)
        wipe = node.state == State.WIPING or body.get("mode") == "wipe"
        trigger = (WIPE_EVENTS if wipe else EVENTS)[body["event"]]
        detail = _detail(body)
        who = "erase image" if wipe else "installer"
        error = (detail.get("reason") or f"{who} reported failure") if trigger in _FAILED else None
        for attempt in range(3):
            if _duplicate(s, node, trigger, detail):
                return jsonify(node=node.name, state=node.state, duplicate=True)
            try:
                cfg = guard.state().config
                ev = lifecycle.apply(s, node, trigger, actor="installer", detail=detail,
                                     error=error, max_attempts=cfg.conductor.max_attempts,
                                     deadlines=cfg.conductor.deadlines)
            except IllegalTransition as e:
                return jsonify(error="illegal_transition", reason=str(e), node=node.name, state=node.state), 409
            except lifecycle.TransitionConflict:
                if attempt == 2:
                    return jsonify(error="conflict", reason="the node changed concurrently; retry"), 409
                s.expire_all()
                again = guard.load_node(s, name)
                if again is None:
                    abort(401, description="a valid token for this node is required")
                node = again
                continue
            guard.state().forget_node(node.id)  # no read of its NICs: this worker's caches name them
            return jsonify(node=node.name, state=node.state, from_state=ev.from_state, event=ev.trigger)
    abort(500)  # pragma: no cover - the loop always returns


@functools.cache
def _last_callback_query() -> Select[Any]:
    """The node's newest installer/erase event, the columns `_duplicate` compares only: a Core statement
    built once per process (``node_id`` bound), no ORM entity per row."""
    return (select(Event.trigger, Event.from_state, Event.to_state, Event.detail)
            .where(Event.node_id == bindparam("node_id", type_=Integer), Event.trigger.in_(_CALLBACK_TRIGGERS))
            .order_by(desc(Event.id)).limit(1))


def _duplicate(s: Session, node: Node, trigger: Trigger, detail: dict[str, Any]) -> bool:
    """A repeat of the event that put the node where it is (an installer retrying a lost response): the
    node's newest installer/erase event is this trigger's transition and led to the current state (one
    query: the newest such event is the newest of this trigger exactly when it has this trigger). No
    query when no transition by this trigger ends in the node's state (e.g. ``done`` while installing):
    that event, written by lifecycle.apply with that transition's destination, cannot exist."""
    if (node.kind, trigger, State(node.state)) not in _LEADS_TO:
        return False
    last = s.connection().execute(_last_callback_query(), {"node_id": node.id}).first()
    if last is None or last.trigger != trigger.value or last.from_state is None or last.to_state != node.state:
        return False
    if trigger in (Trigger.INSTALL_PROGRESS, Trigger.WIPE_PROGRESS):
        keep = ("event", "percent", "phase", "bytes")
        return all((last.detail or {}).get(k) == detail.get(k) for k in keep)
    return trigger in (Trigger.INSTALL_STARTED, Trigger.INSTALL_DONE, *_FAILED, Trigger.WIPE_DONE)


@bp.post("/boot/discover")
def discover() -> Any:
    raw = request.get_data(cache=False)
    if len(raw) > MAX_CALLBACK_BYTES:
        abort(413, description="too large")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        abort(400, description="body must be JSON")
    mac = str(body.get("mac", "")) if isinstance(body, dict) else ""
    try:
        mac = inventory.normalize_mac(mac)
    except ValueError:
        abort(400, description="mac must be a MAC address")
    if not guard.state().bound(sessions_of(current_app), mac, request.remote_addr or "", None, guard.cache_ttl()):
        guard.sweep_or_429(request.remote_addr or "")  # a report about a MAC this address does not hold
    log.info("boot: discovered unknown machine mac=%s ip=%s event=%s", mac, request.remote_addr,
             re.sub(r"[^a-z]", "", str(body.get("event", "")))[:16])
    return jsonify(mac=mac, recorded=False), 202


# ---------------------------------------------------------------- images
def _cork_until_sent(resp: Response) -> None:
    """nginx's ``tcp_nopush`` for a whole-file response under gunicorn: TCP_CORK (tcp(7)) while the
    headers and the ``sendfile`` go out, so full segments leave instead of one push per 64 KiB splice
    chunk on gunicorn's TCP_NODELAY socket; removed (which sends the tail) when gunicorn closes the body
    after its sendfile. Measured on loopback, one 256 MiB download: 1.8-1.9 GB/s without, 2.3-2.7 with,
    nginx 2.3-3.0. The uncork must hang on the body gunicorn closes: with ``direct_passthrough`` Werkzeug
    hands gunicorn its FileWrapper itself, so ``Response.call_on_close`` would never run and every
    download would wait out the kernel's 200 ms cork timeout. Range (206) bodies and other servers
    (granian, the test client: no ``gunicorn.socket``) are left alone."""
    sock = request.environ.get("gunicorn.socket")
    body = resp.response
    cork = getattr(socket, "TCP_CORK", None)
    if sock is None or cork is None or not resp.direct_passthrough or not hasattr(body, "filelike"):
        return
    close = getattr(body, "close", None)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    except OSError:
        return

    def close_and_uncork() -> None:
        try:
            if close is not None:
                close()
        finally:
            with contextlib.suppress(OSError):  # the client may be gone already
                sock.setsockopt(socket.IPPROTO_TCP, cork, 0)

    body.close = close_and_uncork  # type: ignore[union-attr]


def _send_catalog_file(f: images_mod.ImageFile) -> Response:
    # Range, If-Range, If-Match, If-None-Match, If-(Un)Modified-Since per RFC 9110 (web/files.py);
    # the ETag is the content hash
    resp = files.file_response(f.path, etag=f.sha256, max_age=3600, download_name=f.name)
    _cork_until_sent(resp)
    return resp


@bp.route("/images/<name>/<version>/<fname>", methods=["GET", "HEAD"])
def image_file(name: str, version: str, fname: str) -> Response:
    cat = guard.state().catalog()
    if fname.endswith(".sha256"):
        f = cat.lookup_file(name, version, fname[: -len(".sha256")])
        if f is None:
            abort(404, description="no such image file")
        return _text(f"{f.sha256}  {f.name}\n")
    f = cat.lookup_file(name, version, fname)
    if f is None:
        abort(404, description="no such image file")
    if not Path(f.path).is_file():
        log.error("image file %s of %s:%s vanished", f.path, name, version)
        abort(404, description="no such image file")
    return _send_catalog_file(f)


@bp.route("/boot/agent.whl", methods=["GET", "HEAD"])
def agent_wheel() -> Response:
    cat = guard.state().catalog()
    img = cat.resolve(None, "agent")
    f = img.file("wheel") if img is not None and cat.usable(img) else None
    if f is None:
        abort(404, description="no agent wheel in the image catalog")
    return _send_catalog_file(f)

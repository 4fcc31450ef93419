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
otherwise); bf.cfg is served once per install attempt (410 after). Requests naming a MAC or node the
source address does not hold draw on a per-address token bucket (429 when empty). Every refusal is
one log line and a count in ``bootsvc_boot_refused_total{reason}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from flask import Blueprint, Flask, Response, abort, current_app, jsonify, request
from sqlalchemy import CursorResult, desc, or_, select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from bootsvc import auth_secrets, inventory, lifecycle, render
from bootsvc import images as images_mod
from bootsvc import metrics as metrics_mod
from bootsvc.config import Config
from bootsvc.inventory import NodeView
from bootsvc.models import Event, Node
from bootsvc.states import IllegalTransition, State, Trigger
from bootsvc.verified_catalog import load_verified_catalog
from bootsvc.web import config_of, files, sessions_of

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
INSTALL_STATES = {State.DPU_BOOTING, State.DPU_INSTALLING, State.HOST_BOOTING, State.HOST_INSTALLING}
MAX_CALLBACK_BYTES = 16 * 1024
# Seconds a MAC -> node view is reused inside one worker: at 5,000 script requests/s the database is not
# asked every time. Callbacks handled by this worker drop the entry at once; another worker's change is
# seen within the TTL - shorter than any firmware's power-on-to-iPXE time, and hold retries are 15 s.
NODE_CACHE_TTL = 2.0
_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_TEXT = "text/plain; charset=utf-8"
REFUSED = "bootsvc_boot_refused_total"
metrics_mod.describe(REFUSED, "counter", "Boot-plane and agent requests refused on identity, by reason "
                     "(token, address, once, rate, agent).")
# Triggers after which the conductor (re)boots a DPU into its installer: each starts an install attempt,
# and bf.cfg is served once per attempt (bfcfg()).
_ATTEMPT_TRIGGERS = (Trigger.PROVISION.value, Trigger.REPROVISION.value, Trigger.RETRY.value,
                     Trigger.TIMEOUT.value)


# ---------------------------------------------------------------- per-app state
class _State:
    """Per-app caches: the verified catalog, the HMAC key, and a short-lived MAC -> node view cache."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._lock = threading.Lock()
        self._catalog: images_mod.Catalog | None = None
        self._key: bytes | None = None
        self._nodes: dict[str, tuple[float, NodeView | None]] = {}
        # (mac, Host, source address) -> (rendered at, iPXE script, its UTF-8 bytes)
        self.scripts: dict[tuple[str, str, str], tuple[float, str, bytes]] = {}
        # (mac, source address) -> (checked at, the address holds that MAC's node)
        self._bound: dict[tuple[str, str], tuple[float, bool]] = {}
        # source address -> (tokens, last refill): requests naming what the address does not hold
        self._sweep: dict[str, tuple[float, float]] = {}

    def catalog(self) -> images_mod.Catalog:
        if self._catalog is None:
            with self._lock:
                if self._catalog is None:
                    self._catalog = load_verified_catalog(self.config)
        return self._catalog

    def key(self) -> bytes:
        if self._key is None:
            self._key = auth_secrets.read_ref(self.config.security.node_key_ref, create=True)
        return self._key

    def node_by_mac(self, session_factory: Callable[[], Session], mac: str, ttl: float) -> NodeView | None:
        now = time.monotonic()
        hit = self._nodes.get(mac)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        with session_factory() as s:
            view = inventory.node_by_mac(s, mac)
        if len(self._nodes) > 50_000:  # bound memory against a MAC-scanning client
            self._nodes.clear()
        self._nodes[mac] = (now, view)
        return view

    def bound(self, session_factory: Callable[[], Session], mac: str, addr: str, node: NodeView | None,
              ttl: float) -> bool:
        """Whether ``addr`` holds a lease (or reservation) of ``mac``'s node (of ``mac`` if unknown)."""
        if not self.config.security.boot_bind_address:
            return True
        now = time.monotonic()
        hit = self._bound.get((mac, addr))
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        with session_factory() as s:
            ok = addr in inventory.node_addresses(s, node.id) if node is not None else inventory.mac_holds(s, mac, addr)
        if len(self._bound) > 50_000:
            self._bound.clear()
        self._bound[(mac, addr)] = (now, ok)
        return ok

    def sweep_take(self, addr: str) -> bool:
        """One token from ``addr``'s bucket (``security.boot_sweep_rate``/``_burst``); False = empty.
        Per worker process: N workers allow N times the rate (docs/security.md)."""
        sec = self.config.security
        now = time.monotonic()
        with self._lock:
            tokens, last = self._sweep.get(addr, (float(sec.boot_sweep_burst), now))
            tokens = min(float(sec.boot_sweep_burst), tokens + (now - last) * sec.boot_sweep_rate)
            if len(self._sweep) > 50_000:  # bound memory against spoofed-looking sources
                self._sweep.clear()
            if tokens < 1.0:
                self._sweep[addr] = (tokens, now)
                return False
            self._sweep[addr] = (tokens - 1.0, now)
            return True

    def forget(self, view: NodeView | None) -> None:
        if view is not None:
            for n in view.nics:
                self._nodes.pop(n.mac, None)
                for k in [k for k in self.scripts if k[0] == n.mac]:
                    self.scripts.pop(k, None)
                for b in [b for b in self._bound if b[0] == n.mac]:
                    self._bound.pop(b, None)


def _state(app: Flask | None = None) -> _State:
    a = app or current_app
    st = a.extensions.get("bootsvc_boot")
    if st is None:
        st = a.extensions["bootsvc_boot"] = _State(config_of(a))
    assert isinstance(st, _State)
    return st


@bp.record_once
def _on_register(setup: Any) -> None:
    # verify the catalog when the app is built (start-up), not on the first download
    app: Flask = setup.app
    try:
        _state(app).catalog()
    except images_mod.CatalogError as e:
        log.error("image catalog unusable: %s", e)
        raise
    app.wsgi_app = _ScriptFastPath(app, app.wsgi_app)  # type: ignore[method-assign]


_FAST_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_FAST_HEADERS = [("Content-Type", "text/plain; charset=utf-8"), ("Cache-Control", "no-store")]


class _FastPathCounts:
    """Fast-path responses, added to the process's metrics registry in batches.

    ``counters.inc`` costs ~6 us per call (label sorting and validation, a lock): two calls were about a
    quarter of a fast-path request under granian. Here a hit is an integer add under an uncontended lock;
    the sums go into the same series as Flask's own counting (``bootsvc_http_requests_total`` /
    ``bootsvc_http_response_bytes_total``, blueprint=boot, GET, 200) every ``FOLD_EVERY`` hits or
    ``FOLD_SECONDS``, and whenever the registry is snapshotted (a registered source that folds and adds
    no samples of its own), so an idle worker's last hits are published by the next flush at the latest."""

    FOLD_EVERY = 64
    FOLD_SECONDS = 1.0
    _REQ = {"blueprint": "boot", "method": "GET", "code": 200}
    _BYTES = {"blueprint": "boot"}

    def __init__(self, counters: Any) -> None:
        self.counters = counters
        self._lock = threading.Lock()
        self._hits = 0
        self._bytes = 0
        self._since = time.monotonic()
        counters.add_source(self._on_snapshot)

    def add(self, nbytes: int, now: float) -> None:
        with self._lock:
            self._hits += 1
            self._bytes += nbytes
            if self._hits < self.FOLD_EVERY and now - self._since < self.FOLD_SECONDS:
                return
        self.fold()

    def fold(self) -> None:
        with self._lock:
            hits, nbytes = self._hits, self._bytes
            self._hits = self._bytes = 0
            self._since = time.monotonic()
        if hits:
            try:
                self.counters.inc("bootsvc_http_requests_total", self._REQ, hits)
                self.counters.inc("bootsvc_http_response_bytes_total", self._BYTES, nbytes)
            except Exception:  # counting must never break a response
                log.exception("metrics: counting fast-path responses failed")

    def _on_snapshot(self) -> list[Any]:
        self.fold()
        return []


class _ScriptFastPath:
    """WSGI middleware: a repeated ``GET /boot/ipxe?mac=<aa:bb:..>`` whose script is in this worker's
    cache (same MAC, same Host, same source address, younger than the TTL) is answered without Flask's
    dispatch. Only scripts rendered for an address that holds the MAC's lease are cached. Flask costs
    ~2x the rest of the request on this path; iPXE retry loops and boot storms make it the hottest URL.
    Everything else - and every miss - goes through Flask unchanged. The response is byte-identical to
    the Flask one, and it is counted in the same metric the metrics blueprint keeps (in batches, see
    :class:`_FastPathCounts`)."""

    def __init__(self, app: Flask, inner: Callable[..., Any]) -> None:
        self.app, self.inner = app, inner
        try:
            from bootsvc import metrics as metrics_mod

            self.counts: _FastPathCounts | None = _FastPathCounts(metrics_mod.counters)
        except ImportError:  # pragma: no cover - metrics is optional
            self.counts = None

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO") == "/boot/ipxe" and environ.get("REQUEST_METHOD") == "GET":
            qs = environ.get("QUERY_STRING", "")
            host = environ.get("HTTP_HOST")
            if host and qs.startswith("mac=") and _FAST_MAC.match(qs[4:]):
                st = self.app.extensions.get("bootsvc_boot")
                key = (qs[4:], host, str(environ.get("REMOTE_ADDR") or ""))
                hit = st.scripts.get(key) if isinstance(st, _State) else None
                ttl = float(self.app.config.get("BOOT_NODE_CACHE_TTL", NODE_CACHE_TTL))
                now = time.monotonic()
                if hit is not None and now - hit[0] < ttl:
                    body = hit[2]
                    start_response("200 OK", [*_FAST_HEADERS, ("Content-Length", str(len(body)))])
                    if self.counts is not None:
                        self.counts.add(len(body), now)
                    return [body]
        return self.inner(environ, start_response)


# ---------------------------------------------------------------- helpers
def _cache_ttl() -> float:
    # app.config["BOOT_NODE_CACHE_TTL"] = 0 disables the cache (tests that change states directly)
    return float(current_app.config.get("BOOT_NODE_CACHE_TTL", NODE_CACHE_TTL))


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


def _presented_token() -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip() or None
    return request.args.get("token") or None


def _node_secret(node_id: int, generation: int) -> str:
    return auth_secrets.node_secret(_state().key(), node_id, generation)


def refused(reason: str) -> None:
    try:
        metrics_mod.counters.inc(REFUSED, {"reason": reason})
    except Exception:  # counting must never break a response
        log.exception("metrics: counting a refusal failed")


def sweep_or_429(addr: str) -> None:
    """Charge a request that names what ``addr`` does not hold; 429 once the bucket is empty."""
    if not _state().sweep_take(addr):
        refused("rate")
        log.warning("boot: rate-limited %s on %s (requests for MACs/nodes it holds no lease of)", addr,
                    request.path)
        abort(429, description="too many requests for MACs or nodes this address holds no lease of")


def _load_node(s: Session, name: str) -> Node | None:
    if not _NODE_NAME.match(name):
        return None
    return s.scalars(select(Node).where(Node.name == name)).first()


def _authorize(s: Session, name: str) -> Node:
    """The named node, if the request carries its boot token (401 otherwise - the same answer for an
    unknown name, so names cannot be probed) and comes from an address DHCP leased or reserved for it
    (403)."""
    node = _load_node(s, name)
    ip = request.remote_addr or ""
    if node is None or not render.token_ok(_node_secret(node.id, node.secret_generation), _presented_token()):
        refused("token")
        log.warning("boot: bad or missing token for node %s from %s on %s", name[:63], ip, request.path)
        sweep_or_429(ip)
        abort(401, description="a valid token for this node is required")
    if _state().config.security.boot_bind_address and ip not in inventory.node_addresses(s, node.id):
        refused("address")
        log.warning("boot: %s holds no lease of node %s; refused %s", ip, node.name, request.path)
        sweep_or_429(ip)
        abort(403, description="this address holds no DHCP lease of this node")
    return node


def _bound_or_none(mac: str, node: NodeView | None, decision: render.Decision, ttl: float,
                   ) -> tuple[NodeView | None, render.Decision]:
    """What a script may say to this source: a request from an address that does not hold the MAC's
    lease is charged to the sweep bucket and never gets a token or the node's name (HOLD)."""
    st = _state()
    ip = request.remote_addr or ""
    if st.bound(sessions_of(current_app), mac, ip, node, ttl):
        return node, decision
    sweep_or_429(ip)
    if node is None and decision.action not in render.TOKEN_ACTIONS:
        return node, decision  # discovery / local for an unknown MAC carries nothing of anyone's
    refused("address")
    log.warning("boot: %s asked for the script of %s, whose node it holds no lease of", ip, mac)
    return None, render.Decision(render.Action.HOLD, "this address holds no DHCP lease of this MAC")


# ---------------------------------------------------------------- scripts
@bp.get("/boot/ipxe")
def ipxe() -> Response:
    mac = _mac_arg()
    st = _state()
    ttl = _cache_ttl()
    # raw Host and the source address: the fast path's key
    key = (mac, str(request.environ.get("HTTP_HOST") or request.host), request.remote_addr or "")
    hit = st.scripts.get(key)
    if hit is not None and time.monotonic() - hit[0] < ttl:
        return _text(hit[1])  # same node view, same Host, same source: the same script
    node = st.node_by_mac(sessions_of(current_app), mac, ttl)
    cfg = st.config
    decision = render.decide(node, st.catalog(), discovery=cfg.dhcp.unknown_clients == "discover")
    shown, decision = _bound_or_none(mac, node, decision, ttl)
    cacheable = shown is node
    node = shown
    ctx = render.BootContext(_base_url(), mac, _token_for(node, decision))
    try:
        body = render.ipxe_script(decision, ctx, node)
    except render.RenderError as e:
        log.error("boot: cannot render iPXE script for %s: %s", mac, e)
        body = render.ipxe_script(render.Decision(render.Action.HOLD, "configuration error"), ctx, node)
    log.debug("boot: ipxe mac=%s node=%s action=%s", mac, node.name if node else "-", decision.action.value)
    if ttl > 0 and cacheable:
        if len(st.scripts) > 50_000:
            st.scripts.clear()
        st.scripts[key] = (time.monotonic(), body, body.encode())
    return _text(body)


@bp.get("/boot/grub")
def grub() -> Response:
    mac = _mac_arg()
    st = _state()
    ttl = _cache_ttl()
    node = st.node_by_mac(sessions_of(current_app), mac, ttl)
    decision = render.decide(node, st.catalog(), discovery=st.config.dhcp.unknown_clients == "discover")
    node, decision = _bound_or_none(mac, node, decision, ttl)
    base = _base_url()
    ctx = render.BootContext(base, mac, _token_for(node, decision))
    port = int(base.rsplit(":", 1)[1]) if base.count(":") == 2 else 80
    try:
        body = render.grub_config(decision, ctx, node, http_port=port, grub_port=st.config.boot.grub_http_port)
    except render.RenderError as e:
        log.error("boot: cannot render GRUB config for %s: %s", mac, e)
        abort(500, description="cannot render this node's GRUB config")
    return _text(body)


def _token_for(node: NodeView | None, decision: render.Decision) -> str | None:
    if node is None or decision.action not in render.TOKEN_ACTIONS:
        return None
    return render.boot_token(_node_secret(node.id, node.secret_generation))


@bp.get("/boot/nbp/<path:fname>")
def nbp(fname: str) -> Any:
    """UEFI HTTP boot: the same NBPs as the TFTP root (a fixed list, no path from the URL)."""
    # Only TFTP's path rules, not its server (tests/unit/test_architecture.py); local: serving NBPs over
    # HTTP is rare and the module's import cost belongs to the first such request.
    from bootsvc.tftp.paths import safe_resolve

    cfg = _state().config
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
    cfg = _state().config
    return render.bfcfg(inventory.node_view(node), server_url=_base_url(),
                        secret=_node_secret(node.id, node.secret_generation),
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


def _installing_node(s: Session, name: str) -> Node:
    node = _authorize(s, name)
    if node.kind != "dpu":
        abort(404, description="bf.cfg exists only for DPUs")
    if node.state not in INSTALL_STATES:
        abort(409, description=f"node is {node.state}, not installing: bf.cfg is served only during an install")
    return node


def _install_attempt(s: Session, node: Node) -> int:
    """The event that started the node's current install attempt (0: none recorded)."""
    eid = s.scalars(select(Event.id).where(Event.node_id == node.id, Event.trigger.in_(_ATTEMPT_TRIGGERS))
                    .order_by(desc(Event.id)).limit(1)).first()
    return int(eid or 0)


def _started_by_bfcfg(s: Session, node: Node) -> None:
    cfg = _state().config
    try:
        lifecycle.apply(s, node, Trigger.INSTALL_STARTED, actor="boot", detail={"phase": "bfcfg_served"},
                        max_attempts=cfg.conductor.max_attempts, deadlines=cfg.conductor.deadlines)
    except (IllegalTransition, lifecycle.TransitionConflict) as e:  # someone else moved it: theirs stands
        log.info("boot: node %s not marked installing after bf.cfg: %s", node.name, e)
    except OperationalError as e:
        # bf.cfg is already marked served (committed): failing now would answer 500 and every retry 410.
        # The move is only a longer deadline; the agent's first check-in still ends the install.
        s.rollback()
        log.warning("boot: node %s not marked installing after bf.cfg (database busy: %s)", node.name,
                    str(e.orig or e).splitlines()[0] if str(e.orig or e) else "no detail")
    _state().forget(inventory.node_view(node))


@bp.get("/boot/bfcfg/<name>")
def bfcfg(name: str) -> Response:
    with sessions_of(current_app)() as s:
        node = _installing_node(s, name)
        st = _state()
        cat = st.catalog()
        img = cat.resolve(node.image, "dpu")
        try:
            body = render_bfcfg(node, cat, img)
        except render.RenderError as e:
            log.error("boot: cannot render bf.cfg for %s: %s", node.name, e)
            abort(500, description="cannot render this node's bf.cfg (see the server log)")
        # Once per install attempt, decided by one conditional UPDATE (two racing fetches: one wins).
        # Serving it exposes this generation's secret on the boot network: the agent must trade it for
        # a new one at its first check-in (agent_generation = NULL; bootsvc/web/agent_api.py).
        try:
            won = _mark_bfcfg_served(s, node)
        except OperationalError as e:
            s.rollback()  # nothing was marked: the installer's retry gets it
            log.warning("boot: bf.cfg of node %s not served, database busy: %s", node.name,
                        str(e.orig or e).splitlines()[0] if str(e.orig or e) else "no detail")
            resp = _text("database busy: retry in a few seconds\n", 503)
            resp.headers["Retry-After"] = "5"
            return resp
        if won is None:
            s.rollback()
            refused("once")
            log.warning("boot: bf.cfg of node %s asked for again from %s; refused (served once per install)",
                        node.name, request.remote_addr)
            abort(410, description="this node's bf.cfg was already served for this install attempt; a retry "
                                   "or re-provision serves it again")
        if node.state == State.DPU_BOOTING:
            # bfks runs inside the installer before it touches the disk: the install has started even if
            # the installer never says so (NVIDIA's does not), so the longer dpu_installing deadline runs
            _started_by_bfcfg(s, node)
    log.info("boot: bf.cfg served to node %s at %s", node.name, request.remote_addr)
    resp = _text(body)
    resp.headers["Cache-Control"] = "no-store, private"
    return resp


def _mark_bfcfg_served(s: Session, node: Node) -> int | None:
    """Mark this install attempt's bf.cfg served and record it, committed; None if it already was."""
    attempt = _install_attempt(s, node)
    won = cast(CursorResult[Any], s.execute(
        update(Node).where(Node.id == node.id, or_(Node.bfcfg_attempt.is_(None), Node.bfcfg_attempt != attempt))
        .values(bfcfg_attempt=attempt, agent_generation=None, agent_secret_confirmed=False)
        .execution_options(synchronize_session=False))).rowcount
    if won != 1:
        return None
    lifecycle.record(s, node, "bfcfg_served", actor="boot", detail={"ip": request.remote_addr, "attempt": attempt})
    return attempt


@bp.get("/boot/bfks/<name>")
def bfks(name: str) -> Response:
    with sessions_of(current_app)() as s:
        node = _installing_node(s, name)
        tok = render.boot_token(_node_secret(node.id, node.secret_generation))
        body = render.bfks(inventory.node_view(node), f"{_base_url()}/boot/bfcfg/{node.name}?token={tok}")
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
        node = _authorize(s, name)
        wipe = node.state == State.WIPING or body.get("mode") == "wipe"
        trigger = (WIPE_EVENTS if wipe else EVENTS)[body["event"]]
        detail = _detail(body)
        who = "erase image" if wipe else "installer"
        error = (detail.get("reason") or f"{who} reported failure") if trigger in _FAILED else None
        for attempt in range(3):
            if _duplicate(s, node, trigger, detail):
                return jsonify(node=node.name, state=node.state, duplicate=True)
            try:
                cfg = _state().config
                ev = lifecycle.apply(s, node, trigger, actor="installer", detail=detail,
                                     error=error, max_attempts=cfg.conductor.max_attempts,
                                     deadlines=cfg.conductor.deadlines)
            except IllegalTransition as e:
                return jsonify(error="illegal_transition", reason=str(e), node=node.name, state=node.state), 409
            except lifecycle.TransitionConflict:
                if attempt == 2:
                    return jsonify(error="conflict", reason="the node changed concurrently; retry"), 409
                s.expire_all()
                again = _load_node(s, name)
                if again is None:
                    abort(401, description="a valid token for this node is required")
                node = again
                continue
            _state().forget(inventory.node_view(node))
            return jsonify(node=node.name, state=node.state, from_state=ev.from_state, event=ev.trigger)
    abort(500)  # pragma: no cover - the loop always returns


def _duplicate(s: Session, node: Node, trigger: Trigger, detail: dict[str, Any]) -> bool:
    """A repeat of the event that put the node where it is (an installer retrying a lost response)."""
    last = s.scalars(select(Event).where(Event.node_id == node.id, Event.from_state.is_not(None),
                                         Event.trigger == trigger.value).order_by(desc(Event.id)).limit(1)).first()
    if last is None or last.to_state != node.state:
        return False
    newest = s.scalars(select(Event.id).where(Event.node_id == node.id, Event.trigger.in_(
        [t.value for t in (*EVENTS.values(), *WIPE_EVENTS.values())])).order_by(desc(Event.id)).limit(1)).first()
    if newest != last.id:
        return False
    if trigger in (Trigger.INSTALL_PROGRESS, Trigger.WIPE_PROGRESS):
        keep = ("event", "percent", "phase", "bytes")
        return all(last.detail.get(k) == detail.get(k) for k in keep)
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
    if not _state().bound(sessions_of(current_app), mac, request.remote_addr or "", None, _cache_ttl()):
        sweep_or_429(request.remote_addr or "")  # a report about a MAC this address does not hold
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
    cat = _state().catalog()
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
    cat = _state().catalog()
    img = cat.resolve(None, "agent")
    f = img.file("wheel") if img is not None and cat.usable(img) else None
    if f is None:
        abort(404, description="no agent wheel in the image catalog")
    return _send_catalog_file(f)

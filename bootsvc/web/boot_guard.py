"""Who may ask the boot plane what: per-worker caches, boot tokens, address binding, the sweep bucket.

Owns (for ``bootsvc.web.boot``, ``bootsvc.web.boot_fastpath``, ``bootsvc.web.agent_api`` and
``bootsvc.web.bfbpush``): the per-app `BootState` (the verified catalog, the node key, a short-lived
MAC -> node view cache, the rendered-script cache, the address-binding cache and the per-address
token bucket), `authorize` (a node's boot token *and* an address DHCP leased or reserved for it),
`bound_or_none` (what a script may tell a source that holds no lease of the MAC), `token_for`,
`refused` (``bootsvc_boot_refused_total{reason}``) and `sweep_or_429`.

Identity rules: docs/security.md. Tokens are compared in constant time (``render.token_ok``) and never
logged; every refusal is one log line and one count.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask, abort, current_app, request
from sqlalchemy import String, bindparam, select
from sqlalchemy.orm import Session, lazyload

from bootsvc import auth_secrets, inventory, render
from bootsvc import images as images_mod
from bootsvc import metrics as metrics_mod
from bootsvc.config import Config
from bootsvc.inventory import NodeView
from bootsvc.models import Nic, Node
from bootsvc.verified_catalog import load_verified_catalog
from bootsvc.web import config_of, sessions_of

log = logging.getLogger("bootsvc.boot")

# Seconds a MAC -> node view is reused inside one worker: at 5,000 script requests/s the database is not
# asked every time. Callbacks handled by this worker drop the entry at once; another worker's change is
# seen within the TTL - shorter than any firmware's power-on-to-iPXE time, and hold retries are 15 s.
NODE_CACHE_TTL = 2.0
PRUNE_SECONDS = 5.0  # how often a worker drops its caches' expired entries (BootState.expire)
_NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
REFUSED = "bootsvc_boot_refused_total"
metrics_mod.describe(REFUSED, "counter", "Boot-plane and agent requests refused on identity, by reason "
                     "(token, address, once, rate, agent).")
EXTENSION = "bootsvc_boot"  # the app.extensions key of the BootState


class BootState:
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
        # MAC -> its keys in ``scripts`` and ``_bound``: `forget` drops a node's entries without scanning
        # the caches (which hold an entry per booting node: O(fleet) per callback otherwise), and never
        # iterates a dict another thread is adding to (that raised "dictionary changed size" -> 500)
        self._script_keys: dict[str, set[tuple[str, str, str]]] = {}
        self._bound_keys: dict[str, set[tuple[str, str]]] = {}
        # node id -> its MACs, from the views this worker cached (node_by_mac): every entry above that
        # belongs to a node was made from its view, so `forget_node` needs no read of the node's NICs
        self._macs_of: dict[int, tuple[str, ...]] = {}
        self._pruned = time.monotonic()

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

    def expire(self, now: float, ttl: float) -> None:
        """Drop the entries older than ``ttl`` (dead: every lookup checks the age), at most once per
        ``PRUNE_SECONDS``. Without it the caches kept an entry per node the worker ever answered until
        the 50,000-entry clear: at 10,000 pairs ~20,000 node views (measured: ~10 GC-tracked objects and
        ~2.4 KB each; every full collection walks them) and ~10,000 iPXE scripts (held twice: text and
        bytes) per worker, where the live ones are those of the last ``ttl`` seconds."""
        if now - self._pruned < PRUNE_SECONDS:
            return
        with self._lock:
            if now - self._pruned < PRUNE_SECONDS:
                return
            self._pruned = now
            for mac, hit in list(self._nodes.items()):  # every writer holds the lock too
                if now - hit[0] >= ttl:
                    self._nodes.pop(mac, None)
            for key, entry in list(self.scripts.items()):
                if now - entry[0] >= ttl:
                    self.scripts.pop(key, None)
                    _discard(self._script_keys, key[0], key)
            for bkey, checked in list(self._bound.items()):
                if now - checked[0] >= ttl:
                    self._bound.pop(bkey, None)
                    _discard(self._bound_keys, bkey[0], bkey)
            # a node's MACs are kept while any entry of theirs lives: forget_node must still find them
            live = self._nodes.keys() | self._script_keys.keys() | self._bound_keys.keys()
            for node_id, macs in list(self._macs_of.items()):
                if not any(m in live for m in macs):
                    self._macs_of.pop(node_id, None)
            rate = max(self.config.security.boot_sweep_rate, 1e-9)
            full = float(self.config.security.boot_sweep_burst)
            for addr, (tokens, last) in list(self._sweep.items()):
                if tokens + (now - last) * rate >= full:  # refilled: the same as no entry
                    self._sweep.pop(addr, None)

    def node_by_mac(self, session_factory: Callable[[], Session], mac: str, ttl: float) -> NodeView | None:
        now = time.monotonic()
        self.expire(now, ttl)
        hit = self._nodes.get(mac)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        with session_factory() as s:
            view = inventory.node_by_mac(s, mac)
        self._keep_view(mac, now, view)
        return view

    def script_node(self, session_factory: Callable[[], Session], mac: str, addr: str,
                    ttl: float) -> tuple[NodeView | None, bool]:
        """`node_by_mac` and `bound` for a script request (iPXE, GRUB): when neither is cached, one
        statement reads the node's view and whether ``addr`` holds it (inventory.holds_column, the same
        rows as inventory.holds) instead of two reads in two sessions. Both answers are cached as the
        two methods cache them. An unknown MAC still asks `inventory.mac_holds` (rare: a stranger)."""
        now = time.monotonic()
        self.expire(now, ttl)
        hit = self._nodes.get(mac)
        if hit is not None and now - hit[0] < ttl:
            return hit[1], self.bound(session_factory, mac, addr, hit[1], ttl)
        if not self.config.security.boot_bind_address:
            return self.node_by_mac(session_factory, mac, ttl), True
        with session_factory() as s:
            row = s.execute(_mac_holding_query(), {"mac": mac, "address": addr}).unique().one_or_none()
            if row is None:
                view, ok = None, inventory.mac_holds(s, mac, addr)
            else:
                view, ok = inventory.node_view(row[0]), bool(row[1])
        self._keep_view(mac, now, view)
        self._keep_bound(mac, addr, now, ok)
        return view, ok

    def _keep_view(self, mac: str, now: float, view: NodeView | None) -> None:
        with self._lock:  # with `expire`'s look at which MACs still have entries
            if len(self._nodes) > 50_000:  # bound memory against a MAC-scanning client
                self._nodes.clear()
            if len(self._macs_of) > 50_000:
                self._macs_of.clear()
            self._nodes[mac] = (now, view)
            if view is not None:
                self._macs_of[view.id] = tuple(n.mac for n in view.nics)

    def _keep_bound(self, mac: str, addr: str, now: float, ok: bool) -> None:
        with self._lock:
            if len(self._bound) > 50_000:
                self._bound.clear()
                self._bound_keys.clear()
            self._bound[(mac, addr)] = (now, ok)
            self._bound_keys.setdefault(mac, set()).add((mac, addr))

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
            ok = inventory.holds(s, node.id, addr) if node is not None else inventory.mac_holds(s, mac, addr)
        self._keep_bound(mac, addr, now, ok)
        return ok

    def put_script(self, key: tuple[str, str, str], rendered_at: float, body: str) -> None:
        """Cache an iPXE script for (MAC, Host, source address); bounded against a MAC-scanning client."""
        with self._lock:
            if len(self.scripts) > 50_000:
                self.scripts.clear()
                self._script_keys.clear()
            self.scripts[key] = (rendered_at, body, body.encode())
            self._script_keys.setdefault(key[0], set()).add(key)

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
            self._forget_macs(n.mac for n in view.nics)

    def forget_node(self, node_id: int) -> None:
        """`forget` for a node by id, with the MACs this worker's cached views named (nothing cached
        here for a node whose view this worker never cached: no read needed)."""
        self._forget_macs(self._macs_of.pop(node_id, ()))

    def _forget_macs(self, macs: Iterable[str]) -> None:
        with self._lock:
            for mac in macs:
                self._nodes.pop(mac, None)
                for k in self._script_keys.pop(mac, ()):
                    self.scripts.pop(k, None)
                for b in self._bound_keys.pop(mac, ()):
                    self._bound.pop(b, None)


def _discard(index: dict[str, set[Any]], mac: str, key: Any) -> None:
    keys = index.get(mac)
    if keys is not None:
        keys.discard(key)
        if not keys:
            index.pop(mac, None)


def state(app: Flask | None = None) -> BootState:
    a = app or current_app
    st = a.extensions.get(EXTENSION)
    if st is None:
        st = a.extensions[EXTENSION] = BootState(config_of(a))
    assert isinstance(st, BootState)
    return st


def cache_ttl() -> float:
    # app.config["BOOT_NODE_CACHE_TTL"] = 0 disables the cache (tests that change states directly)
    return float(current_app.config.get("BOOT_NODE_CACHE_TTL", NODE_CACHE_TTL))


def _presented_token() -> str | None:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer "):
        return auth[7:].strip() or None
    return request.args.get("token") or None


def node_secret(node_id: int, generation: int) -> str:
    return auth_secrets.node_secret(state().key(), node_id, generation)


def refused(reason: str) -> None:
    try:
        metrics_mod.counters.inc(REFUSED, {"reason": reason})
    except Exception:  # counting must never break a response
        log.exception("metrics: counting a refusal failed")


def sweep_or_429(addr: str) -> None:
    """Charge a request that names what ``addr`` does not hold; 429 once the bucket is empty."""
    if not state().sweep_take(addr):
        refused("rate")
        log.warning("boot: rate-limited %s on %s (requests for MACs/nodes it holds no lease of)", addr,
                    request.path)
        abort(429, description="too many requests for MACs or nodes this address holds no lease of")


def load_node(s: Session, name: str, *, view: bool = False) -> Node | None:
    if not _NODE_NAME.match(name):
        return None
    if view:  # the caller builds its view (bf.cfg): the NICs joined into this one read
        return s.scalars(select(Node).where(Node.name == name).options(*inventory.view_load())).unique().one_or_none()
    # otherwise the NICs (selectin-loaded by default: one more statement) only if asked for: bfks, a
    # refusal, a 409 and every callback (BootState.forget_node) never need them
    return s.scalars(select(Node).where(Node.name == name).options(lazyload(Node.nics))).first()


@functools.cache
def _identity_query(view: bool) -> Any:
    """The node by name and whether the request's address holds it (inventory.holds_column), one
    statement built once per process (``name`` and ``address`` bound; building costs more than running)."""
    q = select(Node, inventory.holds_column(bindparam("address", type_=String)).label("holds")).where(
        Node.name == bindparam("name", type_=String))
    return q.options(*inventory.view_load()) if view else q.options(lazyload(Node.nics))


@functools.cache
def _mac_holding_query() -> Any:
    """The view of the node owning a MAC (inventory.node_by_mac's one statement) and whether the request's
    address holds that node (inventory.holds_column), built once per process (``mac``, ``address`` bound)."""
    owner = select(Nic.node_id).where(Nic.mac == bindparam("mac", type_=String)).scalar_subquery()
    return (select(Node, inventory.holds_column(bindparam("address", type_=String)).label("holds"))
            .where(Node.id == owner).options(*inventory.view_load()))


def _load_holding(s: Session, name: str, address: str, *, view: bool) -> tuple[Node | None, bool]:
    """`load_node` and `inventory.holds` for it in one read."""
    if not _NODE_NAME.match(name):
        return None, False
    res = s.execute(_identity_query(view), {"name": name, "address": address})
    row = res.unique().one_or_none() if view else res.first()
    return (row[0], bool(row[1])) if row is not None else (None, False)


def authorize(s: Session, name: str, *, view: bool = False) -> Node:
    """The named node, if the request carries its boot token (401 otherwise - the same answer for an
    unknown name, so names cannot be probed) and comes from an address DHCP leased or reserved for it
    (403). ``view``: the caller will build the node's view (`load_node`)."""
    ip = request.remote_addr or ""
    bind = state().config.security.boot_bind_address
    # one read: the node and (bound addresses) whether ip holds it; the token is judged first all the same
    node, held = _load_holding(s, name, ip, view=view) if bind else (load_node(s, name, view=view), True)
    if node is None or not render.token_ok(node_secret(node.id, node.secret_generation), _presented_token()):
        refused("token")
        log.warning("boot: bad or missing token for node %s from %s on %s", name[:63], ip, request.path)
        sweep_or_429(ip)
        abort(401, description="a valid token for this node is required")
    if not held:
        refused("address")
        log.warning("boot: %s holds no lease of node %s; refused %s", ip, node.name, request.path)
        sweep_or_429(ip)
        abort(403, description="this address holds no DHCP lease of this node")
    return node


def bound_or_none(mac: str, node: NodeView | None, decision: render.Decision, ttl: float,
                  held: bool | None = None) -> tuple[NodeView | None, render.Decision]:
    """What a script may say to this source: a request from an address that does not hold the MAC's
    lease is charged to the sweep bucket and never gets a token or the node's name (HOLD). ``held``:
    the address test already answered (`BootState.script_node`), else it is asked here."""
    st = state()
    ip = request.remote_addr or ""
    if held is None:
        held = st.bound(sessions_of(current_app), mac, ip, node, ttl)
    if held:
        return node, decision
    sweep_or_429(ip)
    if node is None and decision.action not in render.TOKEN_ACTIONS:
        return node, decision  # discovery / local for an unknown MAC carries nothing of anyone's
    refused("address")
    log.warning("boot: %s asked for the script of %s, whose node it holds no lease of", ip, mac)
    return None, render.Decision(render.Action.HOLD, "this address holds no DHCP lease of this MAC")


def token_for(node: NodeView | None, decision: render.Decision) -> str | None:
    if node is None or decision.action not in render.TOKEN_ACTIONS:
        return None
    return render.boot_token(node_secret(node.id, node.secret_generation))

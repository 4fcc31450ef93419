"""Redfish transport for one BMC: logged-in connections, how failures are classed, the per-BMC
session cap, and a pool that keeps a BMC's session across operations.

Owns:
- `open_client`: a python-redfish client on `bootsvc.power.redfish_http.BmcHttp` (urllib3, not
  requests), which ignores the process environment (proxies, CA bundle, netrc; ``power.proxy`` is the
  explicit proxy);
- `Conn`: one client of DMTF's python-redfish-library (PyPI ``redfish``) logged in to one BMC: session
  auth, falling back to HTTP Basic when the service has no SessionService or refuses session creation
  with 404/405/501; one fresh login and one re-send on a 401 (the session expired; a 401 was not
  carried out); If-Match on PATCH with one retry on 412/428; logout that never raises;
- `transport_error`: requests/urllib3 failures classed into retryable/fatal `BmcError`s, saying
  whether the request may have been carried out (only failures before sending are "not sent");
- `bmc_slot`: a process-wide, per-BMC concurrency cap (semaphore keyed by scheme://host:port);
- `SessionPool`: logged-in connections kept between operations, per BMC, so a conductor step (power
  state, boot override, reset) logs in once instead of once per call; and what was learnt about a BMC
  (`Known`: the parts of its service root bootsvc reads and the driver's discovery) for
  ``known_seconds`` across its sessions, so a step on a new session does not read the root and the
  Systems/Managers collections, System and Manager again (sessions rarely outlive ``idle_seconds``
  between two steps of one BMC in a storm: a DPU's or host's install lies between them). A pooled session is only ever
  one that was in use under the per-BMC cap, so open sessions (in use + idle) never exceed the cap
  (BMCs limit concurrent sessions and share them with humans: DMTF DSP0266 Redfish Specification,
  Sessions). Idle sessions are logged out after ``idle_seconds`` (below the 30 s minimum
  SessionService.SessionTimeout DSP0268 allows, so a BMC rarely has to expire them itself), the
  oldest first when more than ``max_idle`` are kept; a session that met a transport error is never
  reused.
  A learnt BMC is learnt again (root read, discovery) after ``known_seconds``, and at once after any
  sign that it changed or restarted: a transport error, a session it forgot (401), a path it no longer
  has (404/405/410), or a firmware update bootsvc started (`Conn.relearn`). A BMC firmware update made
  outside bootsvc is thus seen within ``known_seconds`` (the BMC restarts: the pooled session meets a
  401 or a dropped connection first, in most cases).

Credentials are resolved by the caller at login time and never logged; the library's own logger is
kept at WARNING because it logs X-Auth-Token headers at DEBUG.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import redfish
import requests
import urllib3
from redfish.messages import RedfishPasswordChangeRequiredError
from redfish.rest.v1 import (
    InvalidCredentialsError,
    RetriesExhaustedError,
    RisObject,
    SessionCreationError,
)

from bootsvc.power import quirks as quirkmod
from bootsvc.power.base import (
    BmcError,
    BmcNoAnswer,
    FatalBmcError,
    PowerSettings,
    RetryableBmcError,
    error_for_status,
    strong_etag,
)
from bootsvc.power.redfish_http import BmcHttp

LOG = logging.getLogger("bootsvc.power.redfish")
# The library logs request headers (including X-Auth-Token) at DEBUG and session bodies at INFO.
# Credentials must never reach a log, so keep it at WARNING whatever the root logger says.
logging.getLogger("redfish").setLevel(logging.WARNING)

ROOT = "/redfish/v1/"
# What of a service root a `SessionPool` keeps per BMC (`Known`): the members bootsvc reads
# (``c.root.get(...)``: login, discovery, UpdateService, TaskService) and of its Links only Sessions.
ROOT_KEYS = ("Vendor", "Product", "RedfishVersion", "Systems", "Managers", "SessionService", "UpdateService",
             "Tasks")
KNOWN_ROOT = "root known"  # stands in for the library's root_resp when the root was not read (``Conn.login``)


class BmcOwner(Protocol):
    """What a connection needs from the driver that opened it."""

    address: str
    credential_ref: str | None
    settings: PowerSettings
    quirk_overrides: dict[str, Any]


def blank(v: Any) -> str | None:
    """"" reads as unset (older BlueField firmware; libredfish system_bluefield_boot_bugs.json)."""
    return None if v in (None, "") else str(v)


@dataclass(frozen=True, slots=True)
class Discovery:
    """Who a BMC says it is: its System and Manager, identity, and the quirks that apply (learnt once
    per session by the driver and kept in ``Conn.memo``)."""

    system_path: str
    manager_path: str | None
    vendor: str | None
    model: str | None
    firmware: str | None
    redfish_version: str | None
    quirks: quirkmod.Quirks
    quirk_names: tuple[str, ...]
    evidence: tuple[str, ...] = ()
    kind: str = ""


def odata_id(obj: Any) -> str | None:
    if isinstance(obj, dict):
        v = obj.get("@odata.id")
        return str(v) if v else None
    return None


# ---------------------------------------------------------------------------------------------
# The HTTP client under python-redfish


def open_client(base_url: str, username: str, password: str, *, cafile: str | None, settings: PowerSettings) -> Any:
    """A python-redfish client for one BMC (not logged in yet), on `BmcHttp` instead of requests.

    BMC traffic ignores the process environment: requests would read HTTP(S)_PROXY / NO_PROXY
    (scanning os.environ twice per request), REQUESTS_CA_BUNDLE (which would override
    ``power.ca_file``) and ~/.netrc (credentials bootsvc did not choose) on every request. A site whose
    BMCs are reachable only through an HTTP proxy names it in ``power.proxy``."""
    client = redfish.redfish_client(
        base_url=base_url, username=username, password=password, default_prefix=ROOT, cafile=cafile,
        timeout=(settings.connect_timeout, settings.read_timeout), max_retry=0, check_connectivity=False)
    client._session.close()
    http = BmcHttp(cafile=cafile, proxy=settings.proxy)
    # every request, the library's own login/logout included: no compressed bodies
    http.headers["Accept-Encoding"] = "identity"
    client._session = http
    return client


# ---------------------------------------------------------------------------------------------
# Per-BMC concurrency cap (process-wide). The first driver to touch a BMC fixes its limit. Weak values:
# a BMC's semaphore lives while a driver keeps it or a thread holds or waits on it (both reference it),
# so the cap holds for everyone using that BMC at once; one nobody uses is dropped, not kept for every BMC
# the process ever touched (20,000 at a 10,000-pair site, each ~8 objects every full GC walks).

_SLOTS: weakref.WeakValueDictionary[str, threading.BoundedSemaphore] = weakref.WeakValueDictionary()
_SLOTS_LOCK = threading.Lock()


# When this process last sent a BMC anything but a GET (monotonic time, per BMC base URL): a document
# read before that is never reused, whichever session read it.
_WRITES: dict[str, float] = {}


def bmc_slot(key: str, limit: int) -> threading.BoundedSemaphore:
    with _SLOTS_LOCK:
        sem = _SLOTS.get(key)
        if sem is None:
            sem = _SLOTS[key] = threading.BoundedSemaphore(max(1, limit))
        return sem


# ---------------------------------------------------------------------------------------------
# Transport error classification


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for nxt in (e.__cause__, e.__context__, getattr(e, "reason", None), *getattr(e, "args", ())):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def transport_error(exc: BaseException, *, bmc: str, what: str, method: str,
                    read_timeout: float) -> BmcError:
    """Class a requests/urllib3 failure. Only failures before the request left us are 'not sent'."""
    chain = list(_chain(exc))
    names = {type(e).__name__ for e in chain}
    sent = method.upper() not in ("GET", "HEAD")
    if any(isinstance(e, requests.exceptions.SSLError) for e in chain) or "SSLError" in names:
        return FatalBmcError(f"{what}: TLS verification of the BMC certificate failed", bmc=bmc,
                             hint="put the BMC's CA in power.ca_file (or, lab only, set bmc_verify_tls=false)")
    if names & {"NewConnectionError", "ConnectTimeoutError", "NameResolutionError"} or any(
            isinstance(e, requests.exceptions.ConnectTimeout) for e in chain):
        reason = "connection refused" if any(isinstance(e, ConnectionRefusedError) for e in chain) \
            else "no TCP connection"
        return RetryableBmcError(f"{what}: BMC unreachable ({reason}); nothing was sent", bmc=bmc,
                                 hint="check the BMC is powered, cabled and at this address/port")
    if any(isinstance(e, requests.exceptions.ReadTimeout) for e in chain) or "ReadTimeoutError" in names:
        return BmcNoAnswer(
            f"{what}: BMC gave no answer within {read_timeout:g}s", bmc=bmc, maybe_applied=sent, dropped=False,
            hint=("the request may have been carried out; re-read state before retrying" if sent
                  else "BMC is slow or hung; retry later, reset the BMC if it persists"))
    return BmcNoAnswer(
        f"{what}: connection dropped before an answer ({type(exc).__name__})", bmc=bmc, maybe_applied=sent,
        dropped=True,
        hint=("the request may have been carried out; re-read state before retrying" if sent
              else "flaky link or BMC restarting; retry later"))


def bmc_message(resp: Any) -> str:
    try:
        body = resp.dict
    except Exception:
        body = {}
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        info = err.get("@Message.ExtendedInfo") or []
        if info and isinstance(info[0], dict) and info[0].get("Message"):
            return str(info[0]["Message"])[:200]
        if err.get("message"):
            return str(err["message"])[:200]
    text = (resp.text or "").strip().replace("\n", " ")
    return text[:200]

# ---------------------------------------------------------------------------------------------
# One logged-in connection


class Conn:
    """A redfish client logged in to one BMC. ``memo``: what was learnt about the BMC over this
    session (the driver keeps its discovery there), dropped with it, or kept by a `SessionPool` as
    `Known` for the BMC's next sessions unless ``relearn``: the BMC showed it may have changed or
    restarted (transport error, 401, a 404/405/410 answer, a firmware update sent)."""

    def __init__(self, drv: BmcOwner, client: Any) -> None:
        self.drv = drv
        self.client = client
        self.auth = "none"
        self.root: dict[str, Any] = {}
        self.memo: dict[Any, Any] = {}
        self.idle_since = 0.0
        self.relearn = False
        self.learnt_at: float | None = None  # when its root was read (a `SessionPool`'s clock), if it keeps it
        self._docs: dict[str, tuple[float, dict[str, Any], str | None]] = {}  # path -> (read at, doc, ETag)

    # -- raw requests -----------------------------------------------------------------------------
    def request(self, method: str, path: str, body: Any = None, *, what: str,
                headers: dict[str, str] | None = None, allow: tuple[int, ...] = ()) -> Any:
        fn = {"GET": self.client.get, "POST": self.client.post, "PATCH": self.client.patch,
              "DELETE": self.client.delete}[method]
        # identity: HPE iLO gzips when asked, and the library's gzip path is only for PUT bodies;
        # plain bodies are what every BMC must support (RFC 9110 §12.5.3).
        hdrs = {"Accept-Encoding": "identity", **(headers or {})}
        kw: dict[str, Any] = {"headers": hdrs, "max_retry": 0}
        if body is not None:
            kw["body"] = body
        if method != "GET":
            # whatever this changes, no document read before it is reused (`get_etag` with reuse)
            self._docs.clear()
            _WRITES[self.drv.address] = time.monotonic()
        for attempt in (1, 2):
            try:
                resp = fn(path, **kw)
            except (RetriesExhaustedError, requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
                self.relearn = True  # the BMC may be restarting (a firmware update among the reasons)
                raise transport_error(e, bmc=self.drv.address, what=what, method=method,
                                      read_timeout=self.drv.settings.read_timeout) from e
            if resp.status == 401 and self.auth == "session" and attempt == 1 and 401 not in allow:
                # The session expired mid-operation (SessionService.SessionTimeout, DSP0266 §13.3.4):
                # a 401 was not carried out, so one fresh login and one re-send cannot double-apply.
                LOG.info("BMC %s: session rejected on %s (HTTP 401); logging in again once", self.drv.address, what)
                self.relearn = True  # a BMC that restarted forgets its sessions too
                self.relogin()
                continue
            break
        if 200 <= resp.status < 300 or resp.status in allow:
            return resp
        if resp.status in (404, 405, 410):
            self.relearn = True  # a path learnt from this BMC may have moved
        raise error_for_status(resp.status, bmc=self.drv.address, what=what, detail=bmc_message(resp),
                               retry_after=resp.retry_after, credential_ref=self.drv.credential_ref or "")

    def relogin(self) -> None:
        self.client.set_session_key(None)  # the old key is dead
        self.auth = "none"
        self.login(root_known=True)

    def get(self, path: str, *, what: str = "", reuse: bool = False) -> dict[str, Any]:
        return self.get_etag(path, what=what, reuse=reuse)[0]

    def get_etag(self, path: str, *, what: str = "", reuse: bool = False) -> tuple[dict[str, Any], str | None]:
        """GET a JSON object and its ETag. ``reuse``: a copy this session read less than
        ``settings.doc_reuse_seconds`` ago will do, unless this process sent the BMC anything but a GET
        since. A conductor step reads the System for its power state, its boot override and again
        before the reset, within milliseconds; one read serves them all. A reused ETag that went
        stale is caught by the BMC (412, then one re-read: `patch`); polls and read-backs never reuse."""
        key = path.rstrip("/")
        if reuse:
            hit = self._docs.get(key)
            if hit is not None and time.monotonic() - hit[0] <= self.drv.settings.doc_reuse_seconds \
                    and hit[0] > _WRITES.get(self.drv.address, float("-inf")):
                return hit[1], hit[2]
        started = time.monotonic()  # the document is at least this fresh
        resp = self.request("GET", path, what=what or f"GET {path}")
        try:
            doc = resp.dict
        except Exception as e:
            raise RetryableBmcError(f"GET {path}: BMC sent invalid JSON", bmc=self.drv.address) from e
        if not isinstance(doc, dict):
            raise FatalBmcError(f"GET {path}: expected a JSON object", bmc=self.drv.address)
        etag = resp.getheader("etag") or doc.get("@odata.etag")
        tag = str(etag) if etag else None
        if self.drv.settings.doc_reuse_seconds > 0:
            self._docs[key] = (started, doc, tag)
        return doc, tag

    def patch(self, path: str, body: dict[str, Any], etag: str | None, *, what: str,
              quirks: quirkmod.Quirks) -> None:
        headers: dict[str, str] = {}
        weak = bool(etag and etag.startswith("W/"))
        if etag:
            headers["If-Match"] = strong_etag(etag)
        elif quirks.needs_if_match:
            headers["If-Match"] = "*"  # RFC 9110 §13.1.1: matches any current representation
        resp = self.request("PATCH", path, body, what=what, headers=headers, allow=(412, 428))
        if resp.status not in (412, 428):
            return
        # 412: the resource changed since our GET (or the BMC mangled the ETag); 428: it wants one.
        # The rejected PATCH was not applied, so one more attempt cannot double-apply it.
        first = resp.status
        if first == 412 and weak and not quirks.needs_if_match:
            # A weak tag in its strong form was refused: send without If-Match (a BMC that does not
            # demand one takes it; HPE weak ETags, capture hpe-ilo5-dl385).
            LOG.info("BMC %s: %s got HTTP 412 with the strong form of a weak ETag; retrying once without "
                     "If-Match", self.drv.address, what)
            retry_headers: dict[str, str] = {}
        else:
            _, fresh = self.get_etag(path, what=f"re-read {path} after HTTP {first}")
            if not fresh:
                raise error_for_status(first, bmc=self.drv.address, what=what, detail="no ETag to retry with")
            LOG.info("BMC %s: %s got HTTP %s; retrying once with fresh ETag", self.drv.address, what, first)
            retry_headers = {"If-Match": strong_etag(fresh)}
        resp = self.request("PATCH", path, body, what=what, headers=retry_headers, allow=(412, 428))
        if resp.status in (412, 428):
            raise RetryableBmcError(
                f"{what}: BMC refused the PATCH twice (HTTP {first}, then {resp.status}) despite a fresh ETag",
                bmc=self.drv.address, status=resp.status,
                hint="the resource keeps changing or the BMC mishandles ETags; retry later or check quirks")

    # -- login / logout ---------------------------------------------------------------------------
    def login(self, *, root_known: bool = False, known_root: dict[str, Any] | None = None) -> None:
        """Log in (session, else Basic). ``known_root``: the service root as a `SessionPool` kept it
        (`Known`): not read again."""
        drv = self.drv
        if known_root is not None and not root_known:
            self.root = known_root
            self.client.root = RisObject.parse(known_root)
            self.client.root_resp = KNOWN_ROOT  # the library's login reads the root when this is None
        elif not root_known:
            # Some BMCs wrongly demand auth for the service root; the library tolerates that, so do we.
            resp = self.request("GET", ROOT, what="read service root", allow=(401,))
            self.root = resp.dict if resp.status == 200 else {}
            # Give the library the root we already have so its login() does not GET it again.
            self.client.root = RisObject.parse(self.root)
            self.client.root_resp = resp
        sessions = odata_id((self.root.get("Links") or {}).get("Sessions"))
        has_sessions = bool(sessions) or "SessionService" in self.root
        root_quirks = quirkmod.match_identity(quirkmod.Identity(
            root_vendor=str(self.root.get("Vendor") or ""), root_product=str(self.root.get("Product") or ""))).quirks
        no_ss = drv.quirk_overrides.get("no_session_service", root_quirks.no_session_service)
        if has_sessions and not no_ss:
            self.client.login_url = sessions or "/redfish/v1/SessionService/Sessions"
            try:
                self.client.login(auth=redfish.AuthMethod.SESSION, headers={"Accept-Encoding": "identity"})
            except InvalidCredentialsError:
                raise error_for_status(401, bmc=drv.address, what="session login",
                                       credential_ref=drv.credential_ref or "") from None
            except RedfishPasswordChangeRequiredError:
                raise FatalBmcError("session login: BMC demands a password change for this account",
                                    bmc=drv.address,
                                    hint="set a new password (AccountService) and update the credential") from None
            except SessionCreationError as e:
                m = re.match(r"HTTP (\d+)", str(e))
                status = int(m.group(1)) if m else 0
                if status not in (404, 405, 501):
                    raise error_for_status(status or 500, bmc=drv.address, what="session login") from None
                LOG.info("BMC %s: session login refused (HTTP %s); using HTTP Basic", drv.address, status)
            except (RetriesExhaustedError, requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
                raise transport_error(e, bmc=drv.address, what="session login", method="POST",
                                      read_timeout=drv.settings.read_timeout) from e
            else:
                if self.client.get_session_key():
                    self.auth = "session"
                    return
                LOG.info("BMC %s: session login returned no X-Auth-Token; using HTTP Basic", drv.address)
        # HTTP Basic: validate against the Systems collection, which needs auth (service root does not).
        self.client.login_url = "/redfish/v1/Systems"
        try:
            self.client.login(auth=redfish.AuthMethod.BASIC, headers={"Accept-Encoding": "identity"})
        except InvalidCredentialsError:
            raise error_for_status(401, bmc=drv.address, what="basic-auth login",
                                   credential_ref=drv.credential_ref or "") from None
        except (RetriesExhaustedError, requests.RequestException, urllib3.exceptions.HTTPError, OSError) as e:
            raise transport_error(e, bmc=drv.address, what="basic-auth login", method="GET",
                                  read_timeout=drv.settings.read_timeout) from e
        self.auth = "basic"

    def logout(self) -> None:
        try:
            self.client.logout()  # DELETE <session> when session auth; closes the HTTP pool
        except Exception as e:
            # We tried; the BMC drops it after SessionService.SessionTimeout. Say so loudly.
            LOG.warning("BMC %s: logout failed (%s); the session expires on the BMC's timeout",
                        self.drv.address, type(e).__name__)



# ---------------------------------------------------------------------------------------------
# Sessions kept between operations

PoolKey = tuple[str, str | None, bool, str | None]  # scheme://host:port, credential ref, verify TLS, CA file


@dataclass(frozen=True, slots=True)
class Known:
    """What a BMC told this process, kept across its sessions (`SessionPool.recall`): the members of
    its service root bootsvc reads (ROOT_KEYS, Links.Sessions) and the driver's discovery (``memo``,
    as `Conn.memo` holds it). ``at``: when the root was read (the pool's clock)."""

    at: float
    root: dict[str, Any]
    memo: dict[Any, Any]


def trimmed_root(root: dict[str, Any]) -> dict[str, Any]:
    """The parts of a service root a `Known` keeps (a few hundred bytes instead of the whole root)."""
    out = {k: root[k] for k in ROOT_KEYS if k in root}
    sessions = (root.get("Links") or {}).get("Sessions") if isinstance(root.get("Links"), dict) else None
    if sessions is not None:
        out["Links"] = {"Sessions": sessions}
    return out


class SessionPool:
    """Logged-in `Conn`s kept between operations (the conductor's: one pool per process).

    ``take`` hands out the most recently used idle session of a BMC (or None: log in), ``give`` takes
    one back after a successful operation. Callers hold the BMC's `bmc_slot` while a session is out,
    and only give back sessions they took or created under it, so in use + idle never exceeds the cap.
    Thread-safe; logouts happen outside the lock."""

    def __init__(self, *, idle_seconds: float = 20.0, max_idle: int = 256, known_seconds: float = 0.0,
                 max_known: int = 100_000, clock: Any = time.monotonic) -> None:
        self.idle_seconds, self.max_idle, self.clock = idle_seconds, max(0, max_idle), clock
        self.known_seconds, self.max_known = known_seconds, max(0, max_known)
        self._lock = threading.Lock()
        # BMC -> what it told us, oldest first (``known_seconds`` is one for all: expiry pops the front)
        self._known: OrderedDict[PoolKey, Known] = OrderedDict()
        self._by_key: dict[PoolKey, list[Conn]] = {}
        self._order: OrderedDict[int, tuple[PoolKey, Conn]] = OrderedDict()  # id(conn), oldest idle first
        self.logins = 0  # sessions opened (counted by the driver)
        self.reused = 0  # operations that found a session here
        self.closed = 0  # idle sessions logged out (expired, over max_idle, or at close)
        self.recalled = 0  # new sessions that logged in on a Known root and discovery

    def __len__(self) -> int:
        with self._lock:
            return len(self._order)

    def _drop_locked(self, key: PoolKey, conn: Conn) -> None:
        self._order.pop(id(conn), None)
        lst = self._by_key.get(key)
        if lst is not None:
            if conn in lst:
                lst.remove(conn)
            if not lst:
                del self._by_key[key]

    def _expired_locked(self, now: float) -> list[Conn]:
        out: list[Conn] = []
        while self._order:
            key, conn = next(iter(self._order.values()))
            if now - conn.idle_since < self.idle_seconds and len(self._order) <= self.max_idle:
                break
            self._drop_locked(key, conn)
            out.append(conn)
        return out

    def _close(self, conns: list[Conn]) -> None:
        for c in conns:
            c.logout()
        if conns:
            with self._lock:
                self.closed += len(conns)

    def take(self, key: PoolKey) -> Conn | None:
        with self._lock:
            stale = self._expired_locked(self.clock())
            lst = self._by_key.get(key)
            conn = lst[-1] if lst else None
            if conn is not None:
                self._drop_locked(key, conn)
                self.reused += 1
        self._close(stale)
        return conn

    def give(self, key: PoolKey, conn: Conn) -> None:
        if self.idle_seconds <= 0 or self.max_idle == 0:
            self._close([conn])
            return
        conn.idle_since = self.clock()
        with self._lock:
            self._by_key.setdefault(key, []).append(conn)
            self._order[id(conn)] = (key, conn)
            stale = self._expired_locked(conn.idle_since)
        self._close(stale)

    def sweep(self) -> int:
        """Log out the sessions idle longer than ``idle_seconds``, forget BMCs learnt longer than
        ``known_seconds`` ago; how many sessions were logged out."""
        with self._lock:
            now = self.clock()
            stale = self._expired_locked(now)
            self._forget_expired_locked(now)
        self._close(stale)
        return len(stale)

    # -- what BMCs told us ------------------------------------------------------------------------
    def _forget_expired_locked(self, now: float) -> None:
        while self._known:
            k = next(iter(self._known.values()))
            if now - k.at < self.known_seconds and len(self._known) <= self.max_known:
                break
            self._known.popitem(last=False)

    def recall(self, key: PoolKey) -> Known | None:
        """What the BMC told this process less than ``known_seconds`` ago, or None (read it again)."""
        if self.known_seconds <= 0:
            return None
        with self._lock:
            k = self._known.get(key)
            if k is not None and self.clock() - k.at >= self.known_seconds:
                del self._known[key]
                k = None
            if k is not None:
                self.recalled += 1
            return k

    def learn(self, key: PoolKey, conn: Conn) -> None:
        """Keep what ``conn`` learnt (its root and discovery) for the BMC's next sessions, unless it
        saw signs of change (``conn.relearn``: then forget the BMC). Knowledge already kept is not
        made younger: it is at most ``known_seconds`` old whatever reused it."""
        if conn.relearn:
            self.forget(key)
            return
        at = conn.learnt_at
        if self.known_seconds <= 0 or self.max_known == 0 or not conn.memo or at is None:
            return
        with self._lock:
            now = self.clock()
            if now - at >= self.known_seconds:
                return
            old = self._known.get(key)
            if old is not None and now - old.at < self.known_seconds:
                if conn.memo.keys() <= old.memo.keys():
                    return
                # the same root, a discovery with other settings (quirk overrides) added
                self._known[key] = Known(old.at, old.root, {**old.memo, **conn.memo})
                return
            self._known.pop(key, None)
            self._known[key] = Known(at, trimmed_root(conn.root), dict(conn.memo))
            self._forget_expired_locked(now)

    def forget(self, key: PoolKey) -> None:
        with self._lock:
            self._known.pop(key, None)

    def known(self) -> int:
        with self._lock:
            return len(self._known)

    def close(self) -> None:
        """Log out every idle session (at shutdown)."""
        with self._lock:
            stale = [c for _, c in self._order.values()]
            self._order.clear()
            self._by_key.clear()
            self._known.clear()
        self._close(stale)

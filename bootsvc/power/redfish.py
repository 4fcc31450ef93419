"""Redfish power/boot/firmware driver on DMTF's python-redfish-library (PyPI ``redfish``).

Owns: talking to one BMC over Redfish safely:
- one login per operation (session auth, falling back to HTTP Basic when the service has no
  SessionService or refuses session creation with 404/405/501), and a logout in ``finally`` on every
  path, errors included, so no session is leaked (BMCs cap concurrent sessions: DMTF DSP0266 Redfish
  Specification, Sessions);
- explicit connect/read timeouts and **no automatic retries**: the library retries every method up
  to 10x by default, POST/PATCH included, which can fire a reset twice; we pass ``max_retry=0``
  and never re-send an action whose outcome is unknown (a dropped connection or read timeout after
  sending is reported with ``maybe_applied=True`` after looking for the action's effect);
- If-Match on PATCH from the ETag header / @odata.etag; on 412 (RFC 9110 §13.1.1) one re-read and
  one retry with the fresh ETag; 428 (RFC 6585 §3) handled the same way;
- a read-back of every write, failing loudly (FatalBmcError) when the BMC answered 2xx but ignored it;
- a process-wide, per-BMC concurrency cap (semaphore keyed by scheme://host:port);
- TLS verification on by default (system CA bundle or ``ca_file``); ``verify_tls=False`` is an
  explicit per-node lab opt-out. The library verifies nothing unless given a CA file, so we always
  hand it one when verifying;
- credentials resolved at call time from a reference (`bootsvc.power.credentials`), never logged;
- vendor differences from `bootsvc.power.quirks` (BlueField /Settings, sticky Once, ...).
"""

from __future__ import annotations

import fnmatch
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import certifi
import redfish
import requests
from redfish.messages import RedfishPasswordChangeRequiredError
from redfish.rest.v1 import (
    InvalidCredentialsError,
    RetriesExhaustedError,
    RisObject,
    SessionCreationError,
)

from bootsvc.power import quirks as quirkmod
from bootsvc.power.base import (
    BOOT_FIELDS,
    EXPECTED_STATE,
    BmcAddress,
    BmcError,
    BmcInfo,
    BmcNoAnswer,
    BootOverride,
    BootTarget,
    DpuFacts,
    DpuMode,
    FatalBmcError,
    PowerAction,
    PowerSettings,
    PowerState,
    RetryableBmcError,
    TaskHandle,
    TaskState,
    TaskStatus,
    check_allowed,
    check_boot_readback,
    choose_reset_type,
    error_for_status,
    image_uri_for,
    route_boot_fields,
    strong_etag,
    transfer_protocols,
    update_in_progress,
)
from bootsvc.power.credentials import resolve

LOG = logging.getLogger(__name__)
# The library logs request headers (including X-Auth-Token) at DEBUG and session bodies at INFO.
# Credentials must never reach a log, so keep it at WARNING whatever the root logger says.
logging.getLogger("redfish").setLevel(logging.WARNING)

ROOT = "/redfish/v1/"
_OK = (200, 201, 202, 204)

_ALREADY: dict[PowerAction, frozenset[PowerState]] = {
    PowerAction.ON: frozenset({PowerState.ON, PowerState.POWERING_ON}),
    PowerAction.OFF: frozenset({PowerState.OFF, PowerState.POWERING_OFF}),
    PowerAction.GRACEFUL_OFF: frozenset({PowerState.OFF, PowerState.POWERING_OFF}),
}

# ---------------------------------------------------------------------------------------------
# Per-BMC concurrency cap (process-wide). The first driver to touch a BMC fixes its limit.

_SLOTS: dict[str, threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


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


def _bmc_message(resp: Any) -> str:
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


def _blank(v: Any) -> str | None:
    """"" reads as unset (older BlueField firmware; libredfish system_bluefield_boot_bugs.json)."""
    return None if v in (None, "") else str(v)


def _boot_of(doc: dict[str, Any], *, pending: bool = False) -> BootOverride:
    b = doc.get("Boot") or {}
    uri = b.get("HttpBootUri")
    return BootOverride(target=_blank(b.get("BootSourceOverrideTarget")),
                        enabled=_blank(b.get("BootSourceOverrideEnabled")),
                        mode=_blank(b.get("BootSourceOverrideMode")),
                        uri=None if uri in (None, "", "None") else str(uri),  # sushy renders None as "None"
                        pending=pending)


def _odata_id(obj: Any) -> str | None:
    if isinstance(obj, dict):
        v = obj.get("@odata.id")
        return str(v) if v else None
    return None


@dataclass(frozen=True, slots=True)
class _Discovery:
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


@dataclass(frozen=True, slots=True)
class _BootPlan:
    system_path: str
    system: dict[str, Any]
    system_etag: str | None
    settings_path: str | None  # the System's @Redfish.Settings object, if any
    settings: dict[str, Any] | None
    settings_etag: str | None


# ---------------------------------------------------------------------------------------------
# One logged-in connection (lives inside RedfishDriver._session)


class _Conn:
    def __init__(self, drv: RedfishDriver, client: Any) -> None:
        self.drv = drv
        self.client = client
        self.auth = "none"
        self.root: dict[str, Any] = {}

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
        for attempt in (1, 2):
            try:
                resp = fn(path, **kw)
            except (RetriesExhaustedError, requests.RequestException, OSError) as e:
                raise transport_error(e, bmc=self.drv.address, what=what, method=method,
                                      read_timeout=self.drv.settings.read_timeout) from e
            if resp.status == 401 and self.auth == "session" and attempt == 1 and 401 not in allow:
                # The session expired mid-operation (SessionService.SessionTimeout, DSP0266 §13.3.4):
                # a 401 was not carried out, so one fresh login and one re-send cannot double-apply.
                LOG.info("BMC %s: session rejected on %s (HTTP 401); logging in again once", self.drv.address, what)
                self.relogin()
                continue
            break
        if 200 <= resp.status < 300 or resp.status in allow:
            return resp
        raise error_for_status(resp.status, bmc=self.drv.address, what=what, detail=_bmc_message(resp),
                               retry_after=resp.retry_after, credential_ref=self.drv.credential_ref or "")

    def relogin(self) -> None:
        self.client.set_session_key(None)  # the old key is dead
        self.auth = "none"
        self.login(root_known=True)

    def get(self, path: str, *, what: str = "") -> dict[str, Any]:
        return self.get_etag(path, what=what)[0]

    def get_etag(self, path: str, *, what: str = "") -> tuple[dict[str, Any], str | None]:
        resp = self.request("GET", path, what=what or f"GET {path}")
        try:
            doc = resp.dict
        except Exception as e:
            raise RetryableBmcError(f"GET {path}: BMC sent invalid JSON", bmc=self.drv.address) from e
        if not isinstance(doc, dict):
            raise FatalBmcError(f"GET {path}: expected a JSON object", bmc=self.drv.address)
        etag = resp.getheader("etag") or doc.get("@odata.etag")
        return doc, (str(etag) if etag else None)

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
    def login(self, *, root_known: bool = False) -> None:
        drv = self.drv
        if not root_known:
            # Some BMCs wrongly demand auth for the service root; the library tolerates that, so do we.
            resp = self.request("GET", ROOT, what="read service root", allow=(401,))
            self.root = resp.dict if resp.status == 200 else {}
            # Give the library the root we already have so its login() does not GET it again.
            self.client.root = RisObject.parse(self.root)
            self.client.root_resp = resp
        sessions = _odata_id((self.root.get("Links") or {}).get("Sessions"))
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
            except (RetriesExhaustedError, requests.RequestException, OSError) as e:
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
        except (RetriesExhaustedError, requests.RequestException, OSError) as e:
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


class RedfishDriver:
    """`PowerDriver` for one BMC over Redfish. Thread-safe; each call is one short BMC session."""

    name = "redfish"

    def __init__(self, address: str, credential_ref: str | None, *, verify_tls: bool = True,
                 settings: PowerSettings | None = None,
                 quirk_overrides: dict[str, Any] | None = None) -> None:
        self.addr = BmcAddress.parse(address)
        self.address = self.addr.base_url
        self.credential_ref = credential_ref
        self.verify_tls = verify_tls
        self.settings = settings or PowerSettings()
        self.quirk_overrides = dict(quirk_overrides or {})
        quirkmod.Quirks().with_overrides(self.quirk_overrides)  # validate names early
        self._disc: _Discovery | None = None
        self._disc_lock = threading.Lock()
        if not verify_tls and self.addr.base_url.startswith("https"):
            LOG.warning("BMC %s: TLS verification disabled by explicit opt-out (lab use only)", self.address)

    def __repr__(self) -> str:
        return f"RedfishDriver({self.address!r}, ref={self.credential_ref!r}, verify_tls={self.verify_tls})"

    # -- session handling -----------------------------------------------------------------------
    def _cafile(self) -> str | None:
        if not self.verify_tls:
            return None
        return self.settings.ca_file or certifi.where()

    @contextmanager
    def _session(self) -> Iterator[_Conn]:
        slot = bmc_slot(self.addr.key, self.settings.max_sessions_per_bmc)
        if not slot.acquire(timeout=self.settings.slot_wait):
            raise RetryableBmcError(
                f"no free session slot for this BMC after {self.settings.slot_wait:g}s "
                f"(cap {self.settings.max_sessions_per_bmc})", bmc=self.address,
                hint="other operations hold the BMC; retry later or raise power.max_sessions_per_bmc")
        conn: _Conn | None = None
        try:
            creds = resolve(self.credential_ref, names=self.settings.credentials)
            client = redfish.redfish_client(
                base_url=self.addr.base_url, username=creds.username, password=creds.password,
                default_prefix=ROOT, cafile=self._cafile(),
                timeout=(self.settings.connect_timeout, self.settings.read_timeout),
                max_retry=0, check_connectivity=False)
            del creds
            # every request, the library's own login/logout included: no compressed bodies
            client._session.headers["Accept-Encoding"] = "identity"
            conn = _Conn(self, client)
            conn.login()
            yield conn
        finally:
            try:
                if conn is not None:
                    conn.logout()  # also after a failed login: a session may exist already
            finally:
                slot.release()

    def _discover(self, c: _Conn) -> _Discovery:
        with self._disc_lock:
            if self._disc is not None:
                return self._disc
        root_v = str(c.root.get("Vendor") or "")
        root_p = str(c.root.get("Product") or "")
        coll = c.get(_odata_id(c.root.get("Systems")) or "/redfish/v1/Systems", what="list Systems")
        members = [m.rstrip("/") for m in (_odata_id(x) for x in coll.get("Members") or []) if m]
        mgr_members: list[str] = []
        try:
            mcoll = c.get(_odata_id(c.root.get("Managers")) or "/redfish/v1/Managers", what="list Managers")
            mgr_members = [m.rstrip("/") for m in (_odata_id(x) for x in mcoll.get("Members") or []) if m]
        except FatalBmcError:
            pass  # identity then rests on the root and the System
        first = quirkmod.match_identity(quirkmod.Identity(
            root_vendor=root_v, root_product=root_p, systems=tuple(m.rsplit("/", 1)[-1] for m in members),
            managers=tuple(m.rsplit("/", 1)[-1] for m in mgr_members)))
        system_path = self.addr.system_path
        if system_path is None:
            sid = self.quirk_overrides.get("system_id", first.quirks.system_id)
            wanted = [m for m in members if sid and m.endswith("/" + sid)]
            if wanted:
                system_path = wanted[0]
            elif len(members) == 1:
                system_path = members[0]
            else:
                raise FatalBmcError(
                    f"BMC has {len(members)} Systems {members}; cannot tell which one is this node",
                    bmc=self.address, hint="set bmc_address to https://<bmc>/redfish/v1/Systems/<id>")
        system = c.get(system_path, what="read System")
        manufacturer = str(system.get("Manufacturer") or "")
        model = str(system.get("Model") or "")
        managers = (system.get("Links") or {}).get("ManagedBy") or []
        manager_path = _odata_id(managers[0]) if managers else None
        firmware = None
        if manager_path:
            try:
                firmware = c.get(manager_path, what="read Manager").get("FirmwareVersion")
            except FatalBmcError:
                manager_path = None
        ident = quirkmod.Identity(
            root_vendor=root_v, root_product=root_p, systems=tuple(m.rsplit("/", 1)[-1] for m in members),
            managers=tuple(m.rsplit("/", 1)[-1] for m in mgr_members), manufacturer=manufacturer, model=model,
            firmware=str(firmware or ""))
        m = quirkmod.match_identity(ident)
        q = m.quirks
        if q.update_target_relative and firmware and any(
                fnmatch.fnmatchcase(str(firmware).lower(), g.lower()) for g in self.settings.bfb_uri_scheme_firmware):
            q = replace(q, image_uri_scheme=True)  # site config: this BMC firmware wants http://
        q = q.with_overrides(self.quirk_overrides)
        if q.manager_id and (manager_path is None or not manager_path.endswith("/" + q.manager_id)):
            manager_path = f"/redfish/v1/Managers/{q.manager_id}"
        disc = _Discovery(system_path.rstrip("/"), manager_path, manufacturer or root_v or None,
                          model or root_p or None,
                          str(firmware) if firmware else None, c.root.get("RedfishVersion"), q, m.names,
                          m.evidence, m.kind)
        LOG.info("BMC %s: identified as %s (%s)", self.address, m.kind, " | ".join(m.evidence) or "no rule matched")
        with self._disc_lock:
            self._disc = disc
        return disc

    # -- reads ------------------------------------------------------------------------------------
    def info(self) -> BmcInfo:
        with self._session() as c:
            d = self._discover(c)
            state = PowerState.parse(c.get(d.system_path, what="read PowerState").get("PowerState"))
            dpu = self._dpu_facts(c, d) if d.quirks.is_dpu else None
            return BmcInfo(address=self.address, redfish_version=d.redfish_version, vendor=d.vendor,
                           model=d.model, firmware=d.firmware, system_path=d.system_path,
                           manager_path=d.manager_path, auth=c.auth, quirks=d.quirk_names, power_state=state,
                           quirk_flags=tuple(sorted(d.quirks.active().items())), kind=d.kind,
                           evidence=d.evidence, dpu=dpu)

    def quirks(self) -> quirkmod.Quirks:
        with self._session() as c:
            return self._discover(c).quirks

    def power_state(self) -> PowerState:
        with self._session() as c:
            d = self._discover(c)
            return PowerState.parse(c.get(d.system_path, what="read PowerState").get("PowerState"))

    # -- power ------------------------------------------------------------------------------------
    def power_on(self, *, wait: float = 0) -> None:
        self._power(PowerAction.ON, wait)

    def power_off(self, *, graceful: bool = False, wait: float = 0) -> None:
        self._power(PowerAction.GRACEFUL_OFF if graceful else PowerAction.OFF, wait)

    def reset(self, *, wait: float = 0) -> None:
        self._power(PowerAction.RESET, wait)

    def power_cycle(self, *, wait: float = 0, host_off: bool = False) -> None:
        """On a BlueField DPU a PowerCycle takes effect only when the host asserts PERST (host off or
        resetting; bluefieldbmcv2401/2507 reset control): with the host running it would wait silently.
        So unless the caller knows the host is off, a DPU gets ForceRestart (hard reset of the Arm)."""
        self._power(PowerAction.CYCLE if host_off else PowerAction.DPU_CYCLE, wait)

    def soc_force_reset(self) -> None:
        """OEM ``SOC.ForceReset``: resets the DPU SoC whatever the host does (bluefieldbmcv2401)."""
        with self._session() as c:
            d = self._discover(c)
            if not d.quirks.is_dpu:
                raise FatalBmcError("SOC.ForceReset exists only on BlueField DPU BMCs", bmc=self.address)
            doc = c.get(f"{d.system_path}/Oem/Nvidia", what="read Oem/Nvidia")
            act = ((doc.get("Actions") or {}).get("#SOC.ForceReset") or {}).get("target")
            if not act:
                raise FatalBmcError("this BMC firmware has no SOC.ForceReset action", bmc=self.address,
                                    hint="use ForceRestart (bootsvc power cycle)")
            c.request("POST", str(act), {}, what="SOC.ForceReset")

    def wait_power(self, state: PowerState, timeout: float) -> None:
        with self._session() as c:
            d = self._discover(c)
            self._wait_state(c, d, {state}, timeout, what=f"wait for {state}")

    def _reset_target(self, c: _Conn, d: _Discovery, sysdoc: dict[str, Any],
                      action: PowerAction) -> tuple[str, str]:
        act = (sysdoc.get("Actions") or {}).get("#ComputerSystem.Reset") or {}
        target = act.get("target") or f"{d.system_path}/Actions/ComputerSystem.Reset"
        allowed = act.get("ResetType@Redfish.AllowableValues")
        info_path = act.get("@Redfish.ActionInfo")
        if allowed is None and info_path:
            try:
                info = c.get(info_path, what="read ResetActionInfo")
                for p in info.get("Parameters") or []:
                    if p.get("Name") == "ResetType":
                        allowed = p.get("AllowableValues")
            except FatalBmcError:
                allowed = None
        return target, choose_reset_type(action, allowed, bmc=self.address)

    def _power(self, action: PowerAction, wait: float) -> None:
        with self._session() as c:
            d = self._discover(c)
            if action is PowerAction.DPU_CYCLE:
                if d.quirks.is_dpu:
                    LOG.info("BMC %s: DPU power cycle sent as ForceRestart (a PowerCycle waits for the host's "
                             "PERST while the host runs)", self.address)
                    action = PowerAction.RESET
                else:
                    action = PowerAction.CYCLE
            sysdoc = c.get(d.system_path, what="read System")
            if d.quirks.is_dpu and action in (PowerAction.OFF, PowerAction.GRACEFUL_OFF):
                # "The Arm cannot be fully powered off; Standby is its final state" (bluefieldbmcv2401,
                # reset control): send it, never wait for PowerState Off.
                target, rtype = self._reset_target(c, d, sysdoc, action)
                self._post_reset(c, d, target, rtype, action, PowerState.parse(sysdoc.get("PowerState")))
                LOG.info("BMC %s: %s sent to the DPU; not waiting for Off (the Arm stays in standby)",
                         self.address, rtype)
                return
            before = PowerState.parse(sysdoc.get("PowerState"))
            expected = EXPECTED_STATE[action]
            if before in _ALREADY.get(action, ()):
                # Already there or on the way: sending it again is at best a no-op (idempotent call).
                LOG.info("BMC %s: already %s; no %s sent", self.address, before, action)
                if wait:
                    self._wait_state(c, d, {expected}, wait, what=f"{action} (already {before})")
                return
            if action in (PowerAction.CYCLE, PowerAction.RESET) and before is PowerState.OFF:
                # Restarting an Off node = switching it on (a fresh boot either way); some BMCs
                # refuse ForceRestart/PowerCycle on an Off system.
                action = PowerAction.ON
            target, rtype = self._reset_target(c, d, sysdoc, action)
            self._post_reset(c, d, target, rtype, action, before)
            if action is PowerAction.GRACEFUL_OFF:
                grace = min(self.settings.graceful_timeout, wait) if wait else self.settings.graceful_timeout
                try:
                    self._wait_state(c, d, {PowerState.OFF}, grace, what="GracefulShutdown")
                    return
                except RetryableBmcError:
                    # GracefulShutdown is ignored when no OS runs (DMTF Redfish-Tacklebox
                    # docs/rf_power_reset.md): force it.
                    LOG.warning("BMC %s: not Off %.0fs after GracefulShutdown; sending ForceOff",
                                self.address, grace)
                target, rtype = self._reset_target(c, d, sysdoc, PowerAction.OFF)
                self._post_reset(c, d, target, rtype, PowerAction.OFF, PowerState.ON)
            if wait:
                self._wait_state(c, d, {expected}, wait, what=f"{rtype}")

    def _post_reset(self, c: _Conn, d: _Discovery, target: str, rtype: str, action: PowerAction,
                    before: PowerState) -> None:
        what = f"ComputerSystem.Reset {rtype}"
        try:
            c.request("POST", target, {"ResetType": rtype}, what=what)
            return
        except BmcNoAnswer as e:
            if not e.maybe_applied:
                raise
            lost = e
        # We sent the POST and got no answer. Never send it again; look for its effect instead.
        if lost.dropped and d.quirks.reset_drops_connection:
            LOG.warning("BMC %s: connection dropped on %s (expected for this BMC); treating as accepted",
                        self.address, what)
            return
        if action in (PowerAction.ON,):
            effect = {PowerState.ON, PowerState.POWERING_ON}
        elif action in (PowerAction.OFF, PowerAction.GRACEFUL_OFF):
            effect = {PowerState.OFF, PowerState.POWERING_OFF}
        else:  # a restart shows as a dip through Off/PoweringOff/PoweringOn, if at all
            effect = {PowerState.OFF, PowerState.POWERING_OFF, PowerState.POWERING_ON} - {before}
        try:
            seen = self._wait_state(c, d, effect, self.settings.drop_grace, what=what)
        except RetryableBmcError:
            raise BmcNoAnswer(
                f"{what}: {'connection dropped' if lost.dropped else 'no answer'} and no effect was visible "
                f"within {self.settings.drop_grace:g}s (PowerState still {before})", bmc=self.address,
                maybe_applied=True, dropped=lost.dropped,
                hint="the reset may or may not have happened; check the node before sending it again") from lost
        LOG.warning("BMC %s: connection dropped on %s but PowerState is now %s; accepted", self.address,
                    what, seen)

    def _wait_state(self, c: _Conn, d: _Discovery, states: set[PowerState], timeout: float, *,
                    what: str) -> PowerState:
        deadline = time.monotonic() + timeout
        last: PowerState | None = None
        last_err: BmcError | None = None
        while True:
            try:
                last = PowerState.parse(c.get(d.system_path, what="poll PowerState").get("PowerState"))
                if last in states:
                    return last
            except RetryableBmcError as e:  # BMC busy while the host transitions: keep polling
                last_err = e
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            time.sleep(min(self.settings.poll_interval, remaining))
        detail = f"; last error: {last_err}" if last is None and last_err else ""
        raise RetryableBmcError(
            f"{what}: PowerState is {last or 'unknown'}, not {'/'.join(sorted(states))}, "
            f"after {timeout:g}s{detail}", bmc=self.address,
            hint="BMC accepted the request but the node did not get there; check the node and its PSU")

    # -- boot -------------------------------------------------------------------------------------
    def _boot_plan(self, c: _Conn, d: _Discovery) -> _BootPlan:
        """Read the System and, when it has one, its Settings object (``@Redfish.Settings``, detected
        for every vendor like sushy does; or forced by the ``settings_resource`` quirk)."""
        sysdoc, sys_etag = c.get_etag(d.system_path, what="read System")
        settings = _odata_id((sysdoc.get("@Redfish.Settings") or {}).get("SettingsObject"))
        if not settings and d.quirks.settings_resource:
            settings = f"{d.system_path}/Settings"
        setdoc: dict[str, Any] | None = None
        set_etag = None
        if settings:
            try:
                setdoc, set_etag = c.get_etag(settings, what="read pending Settings")
            except FatalBmcError as e:
                if e.status != 404:
                    raise
                LOG.info("BMC %s: advertised Settings object %s is missing; writing the System", self.address,
                         settings)
                settings, setdoc = None, None
        return _BootPlan(d.system_path, sysdoc, sys_etag, settings, setdoc, set_etag)

    def _boot_view(self, plan: _BootPlan) -> BootOverride:
        """The override as it will act: each field from the object that owns it (Settings when its Boot
        carries the field, else the System)."""
        live = dict(plan.system.get("Boot") or {})
        sboot = (plan.settings or {}).get("Boot") or {}
        merged = {**live, **{k: v for k, v in sboot.items() if k in BOOT_FIELDS}}
        pending = bool(plan.settings_path and any(k in sboot for k in BOOT_FIELDS))
        return _boot_of({"Boot": merged}, pending=pending)

    def _write_boot(self, c: _Conn, d: _Discovery, plan: _BootPlan, boot: dict[str, Any], *, what: str) -> None:
        sboot = (plan.settings or {}).get("Boot") if plan.settings_path else None
        live, pending = route_boot_fields(boot, sboot if isinstance(sboot, dict) else None)
        # Check before anything is sent, against the object that receives the field.
        for part, doc, where in ((live, plan.system, plan.system_path),
                                 (pending, plan.settings or {}, plan.settings_path or "")):
            for f in ("BootSourceOverrideTarget", "BootSourceOverrideEnabled", "BootSourceOverrideMode"):
                if f in part and part[f] is not None:
                    check_allowed(f, str(part[f]), doc.get("Boot") or {}, where, bmc=self.address)
        if pending:
            assert plan.settings_path is not None
            c.patch(plan.settings_path, {"Boot": pending}, plan.settings_etag, what=what + " (pending Settings)",
                    quirks=d.quirks)
        if live:
            c.patch(plan.system_path, {"Boot": live}, plan.system_etag, what=what, quirks=d.quirks)

    def boot_once(self, target: BootTarget, *, uri: str | None = None,
                  mode: str | None = None) -> BootOverride:
        if target is BootTarget.HTTP and not uri:
            raise FatalBmcError("UEFI HTTP boot needs a URI", hint="pass the http(s):// URL of the boot file")
        if target is not BootTarget.HTTP and uri:
            raise FatalBmcError(f"a boot URI only applies to UEFI HTTP boot, not {target}")
        if target is BootTarget.NONE:
            return self.clear_boot_override()
        with self._session() as c:
            d = self._discover(c)
            if mode is None and d.quirks.boot_mode_uefi:
                mode = "UEFI"  # the DPU's UEFI boots only UEFI targets (libredfish nvidia_dpu.rs)
            asked = BootOverride(target=target.value, enabled="Once", mode=mode, uri=uri)
            plan = self._boot_plan(c, d)
            boot: dict[str, Any] = {"BootSourceOverrideTarget": asked.target,
                                    "BootSourceOverrideEnabled": asked.enabled}
            if mode:
                boot["BootSourceOverrideMode"] = mode
            if uri:
                boot["HttpBootUri"] = uri
            if d.quirks.sends_boot_object_whole:
                now = self._boot_view(plan)
                whole = {"BootSourceOverrideMode": now.mode, "HttpBootUri": now.uri}
                boot = {**{k: v for k, v in whole.items() if v is not None}, **boot}
            self._write_boot(c, d, plan, boot, what=f"set one-time boot {asked.target}")
            seen = self._boot_view(self._boot_plan(c, d))
            equiv = frozenset({"UefiBootNext"}) if (d.quirks.bootnext_for_uefi_pxe and target is BootTarget.PXE) \
                else frozenset()
            problem = check_boot_readback(asked, seen, target_equivalents=equiv)
            if problem:
                raise FatalBmcError(
                    f"BMC answered the boot override PATCH with success but ignored it: {problem}",
                    bmc=self.address, hint="the node would not boot as intended; check BMC firmware/quirks")
            # Continuous when Once was asked, or a BMC known to keep Once overrides: clear after use.
            sticky = seen.enabled == "Continuous" or (d.quirks.ignores_once and seen.enabled == "Once")
            if seen.enabled == "Continuous" and not d.quirks.ignores_once:
                LOG.warning("BMC %s keeps the %s override as Continuous; it will be cleared after use "
                            "(consider an ignores_once quirk)", self.address, asked.target)
            return replace(seen, sticky=sticky)

    def boot_override(self) -> BootOverride:
        with self._session() as c:
            d = self._discover(c)
            return self._boot_view(self._boot_plan(c, d))

    def clear_boot_override(self) -> BootOverride:
        """Remove a boot override the BMC kept after it was used (Once reported/kept as Continuous)."""
        with self._session() as c:
            d = self._discover(c)
            plan = self._boot_plan(c, d)
            cur = self._boot_view(plan)
            clear = d.quirks.clear_target
            if not cur.active or cur.target == clear:
                return cur
            body: dict[str, Any] = {"BootSourceOverrideEnabled": "Disabled"}
            if not d.quirks.clear_without_target:
                body["BootSourceOverrideTarget"] = clear
            self._write_boot(c, d, plan, body, what="clear boot override")
            seen = self._boot_view(self._boot_plan(c, d))
            if seen.active and seen.target != clear:
                raise FatalBmcError(
                    f"BMC answered the clear-override PATCH with success but still reads "
                    f"{seen.target}/{seen.enabled}", bmc=self.address,
                    hint=f"next boot would still go to {seen.target}; clear it by hand on the BMC")
            return seen

    # -- firmware ---------------------------------------------------------------------------------
    def _simple_update(self, c: _Conn, d: _Discovery, image_uri: str, target: str) -> TaskHandle:
        scheme = urlsplit(image_uri).scheme.upper()
        if scheme not in ("HTTP", "HTTPS"):
            raise FatalBmcError(f"image URI {image_uri!r} must be http:// or https://")
        svc_path = _odata_id(c.root.get("UpdateService")) or "/redfish/v1/UpdateService"
        svc = c.get(svc_path, what="read UpdateService")
        act = (svc.get("Actions") or {}).get("#UpdateService.SimpleUpdate") or {}
        action = act.get("target") or f"{svc_path}/Actions/UpdateService.SimpleUpdate"
        raw = act.get("TransferProtocol@Redfish.AllowableValues")
        protos = transfer_protocols(raw)
        if raw is not None and scheme not in protos:
            fw = d.firmware or "unknown firmware"
            raise FatalBmcError(
                f"BMC firmware {fw} takes SimpleUpdate images only by {'/'.join(protos) or 'nothing'} "
                f"(TransferProtocol@Redfish.AllowableValues {raw}); bootsvc serves BFBs over {scheme}",
                bmc=self.address, hint="update the BMC firmware (BF-24.04 or later takes HTTP), or provision "
                                       "this DPU with provision_method pxe")
        inv = f"{svc_path.rstrip('/')}/FirmwareInventory/{target}"
        inv_doc = c.get(inv, what=f"read FirmwareInventory/{target}")
        if inv_doc.get("Updateable") is False:
            raise FatalBmcError(f"FirmwareInventory/{target} is not Updateable on this BMC", bmc=self.address)
        tref = inv.lstrip("/") if d.quirks.update_target_relative else inv
        body = {"ImageURI": image_uri_for(image_uri, with_scheme=d.quirks.image_uri_scheme),
                "TransferProtocol": scheme, "Targets": [tref]}
        deadline = time.monotonic() + self.settings.update_wait
        while True:
            resp = c.request("POST", action, body, what=f"UpdateService.SimpleUpdate {target}",
                             allow=(400, 409, 503))
            if resp.status < 300:
                break
            msg = _bmc_message(resp)
            if not update_in_progress(resp.status, msg):
                raise error_for_status(resp.status, bmc=self.address, what=f"UpdateService.SimpleUpdate {target}",
                                       detail=msg, retry_after=resp.retry_after)
            if time.monotonic() >= deadline:
                raise RetryableBmcError(
                    f"UpdateService.SimpleUpdate {target}: another update still runs after "
                    f"{self.settings.update_wait:g}s (HTTP {resp.status}: {msg})", bmc=self.address,
                    status=resp.status, hint="nothing was started; bootsvc tries again later")
            LOG.info("BMC %s: SimpleUpdate refused (HTTP %s, %s); another update runs, retrying", self.address,
                     resp.status, msg)
            time.sleep(self.settings.poll_interval)
        try:
            doc = resp.dict
        except Exception:
            doc = {}
        # Prefer the Task resource from the body: Location may be a task *monitor*, which stops
        # showing the task once it ends (DSP0266 §13.2 "Asynchronous operations").
        task = None
        if isinstance(doc, dict) and "Task" in str(doc.get("@odata.type", "")):
            task = doc.get("@odata.id")
        if not task:
            loc = resp.getheader("location")
            task = re.sub(r"/Monitor/?$", "", urlsplit(loc).path) if loc else None
        if not task:
            raise FatalBmcError(f"BMC accepted SimpleUpdate (HTTP {resp.status}) but returned no task to follow",
                                bmc=self.address, hint="check the BMC's TaskService by hand")
        task = urlsplit(str(task)).path or str(task)
        handle = TaskHandle(task, self.address, f"SimpleUpdate {target}")
        self._task_status(c, handle)  # read-back: the task exists
        return handle

    def firmware_install(self, image_uri: str, *, target: str = "DPU_OS") -> TaskHandle:
        with self._session() as c:
            return self._simple_update(c, self._discover(c), image_uri, target)

    def _task_status(self, c: _Conn, handle: TaskHandle) -> TaskStatus:
        resp = c.request("GET", handle.uri, what="poll task")
        doc = resp.dict if resp.text else {}
        msgs = tuple(str(m.get("Message", "")) for m in doc.get("Messages") or [] if isinstance(m, dict))
        pct = doc.get("PercentComplete")
        return TaskStatus(uri=handle.uri, state=TaskState.parse(doc.get("TaskState")),
                          percent=int(pct) if isinstance(pct, int | float) else None,
                          messages=msgs, task_status=doc.get("TaskStatus"))

    def task_status(self, handle: TaskHandle) -> TaskStatus:
        with self._session() as c:
            return self._task_status(c, handle)

    def wait_task(self, handle: TaskHandle, timeout: float, *,
                  on_progress: Callable[[TaskStatus], None] | None = None) -> TaskStatus:
        deadline = time.monotonic() + timeout
        last: TaskStatus | None = None
        with self._session() as c:
            while True:
                st: TaskStatus | None
                try:
                    st = self._task_status(c, handle)
                except RetryableBmcError:
                    st = last  # transient while the BMC is busy writing flash: keep polling
                if st is not None:
                    if on_progress and st != last:
                        on_progress(st)
                    last = st
                    if st.done:
                        if st.ok:
                            return st
                        raise FatalBmcError(
                            f"task {handle.description or handle.uri} ended {st.state}"
                            f"{' (' + st.task_status + ')' if st.task_status else ''}: "
                            f"{'; '.join(st.messages[-3:]) or 'no message'}", bmc=self.address,
                            hint="fix the cause named by the BMC (image URL reachable from the BMC? "
                                 "right image?) and start the update again")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                time.sleep(min(self.settings.poll_interval, remaining))
        where = f"{last.state} at {last.percent}%" if last else "unreadable"
        raise RetryableBmcError(f"task {handle.uri} still {where} after {timeout:g}s", bmc=self.address,
                                maybe_applied=True, hint="keep polling the task; do not start another update")

    def firmware_version(self, target: str = "DPU_OS") -> str | None:
        with self._session() as c:
            svc_path = _odata_id(c.root.get("UpdateService")) or "/redfish/v1/UpdateService"
            v = c.get(f"{svc_path.rstrip('/')}/FirmwareInventory/{target}", what="read firmware").get("Version")
            return str(v) if v is not None else None

    # -- BlueField-3 DPU BMC ----------------------------------------------------------------------
    def _need_dpu(self, d: _Discovery, what: str) -> None:
        if not d.quirks.is_dpu:
            raise FatalBmcError(f"{what}: this BMC ({d.kind}) is not a BlueField DPU BMC", bmc=self.address,
                                status=404, hint="bootsvc bmc check shows what the BMC was identified as and why")

    def _nvidia_oem(self, c: _Conn, base: str | None, what: str) -> tuple[str, dict[str, Any], str | None]:
        if not base:
            raise FatalBmcError(f"{what}: BMC has no Manager", bmc=self.address)
        path = f"{base}/Oem/Nvidia"
        try:
            doc, etag = c.get_etag(path, what=what)
        except FatalBmcError as e:
            if e.status == 404:
                raise FatalBmcError(f"{what}: {path} not found; is this a BlueField DPU BMC?",
                                    bmc=self.address, status=404) from None
            raise
        return path, doc, etag

    def _dpu_facts(self, c: _Conn, d: _Discovery) -> DpuFacts:
        sysdoc = c.get(d.system_path, what="read System")
        _, oem, _ = self._nvidia_oem(c, d.system_path, "read DPU mode")
        mode_raw = oem.get("Mode")
        mode = DpuMode(mode_raw) if mode_raw in (DpuMode.DPU.value, DpuMode.NIC.value) else DpuMode.UNKNOWN
        sb_enable: bool | None = None
        sb_current: str | None = None
        sb_path = _odata_id(sysdoc.get("SecureBoot"))
        if sb_path:
            try:
                sb = c.get(sb_path, what="read SecureBoot")
                v = sb.get("SecureBootEnable")
                sb_enable = v if isinstance(v, bool) else None
                sb_current = _blank(sb.get("SecureBootCurrentBoot"))
            except FatalBmcError:
                pass
        rshim: bool | None = None
        try:
            _, mdoc, _ = self._nvidia_oem(c, d.manager_path, "read BMC RShim")
            r = (mdoc.get("BmcRShim") or {}).get("BmcRShimEnabled")
            rshim = r if isinstance(r, bool) else None
        except FatalBmcError:
            pass
        svc_path = _odata_id(c.root.get("UpdateService")) or "/redfish/v1/UpdateService"
        os_version = None
        protos: tuple[str, ...] = ()
        try:
            svc = c.get(svc_path, what="read UpdateService")
            raw = ((svc.get("Actions") or {}).get("#UpdateService.SimpleUpdate") or {}).get(
                "TransferProtocol@Redfish.AllowableValues")
            protos = transfer_protocols(raw) if raw is not None else ("HTTP", "HTTPS")
            os_version = c.get(f"{svc_path.rstrip('/')}/FirmwareInventory/DPU_OS", what="read DPU_OS").get("Version")
        except FatalBmcError:
            pass
        return DpuFacts(mode=mode, secure_boot=sb_enable, secure_boot_current=sb_current,
                        os_state=_blank((sysdoc.get("BootProgress") or {}).get("OemLastState")),
                        host_rshim=_blank(oem.get("HostRshim")), bmc_rshim=rshim, firmware=d.firmware,
                        os_version=str(os_version) if os_version else None, http_push="HTTP" in protos,
                        update_protocols=protos)

    def dpu_facts(self) -> DpuFacts:
        with self._session() as c:
            d = self._discover(c)
            self._need_dpu(d, "read DPU facts")
            return self._dpu_facts(c, d)

    def dpu_os_state(self) -> str | None:
        """``BootProgress.OemLastState`` of the DPU's System: "OsIsRunning" once the installed OS
        booted (bluefieldbmcv2501, BlueField Arm state; refreshed about every 30 s)."""
        with self._session() as c:
            d = self._discover(c)
            doc = c.get(d.system_path, what="read BootProgress")
            return _blank((doc.get("BootProgress") or {}).get("OemLastState"))

    def dpu_mode(self) -> DpuMode:
        with self._session() as c:
            d = self._discover(c)
            _, doc, _ = self._nvidia_oem(c, d.system_path, "read DPU mode")
            mode = doc.get("Mode")
            return DpuMode(mode) if mode in (DpuMode.DPU.value, DpuMode.NIC.value) else DpuMode.UNKNOWN

    def _oem_action(self, c: _Conn, d: _Discovery, name: str, body: dict[str, Any]) -> None:
        path, doc, _ = self._nvidia_oem(c, d.system_path, f"read Oem/Nvidia for {name}")
        act = (doc.get("Actions") or {}).get(f"#{name}") or {}
        target = act.get("target") or f"{path}/Actions/{name}"
        for p in act.get("Parameters") or []:
            if isinstance(p, dict) and p.get("Name") in body and p.get("AllowableValues") and \
                    body[p["Name"]] not in p["AllowableValues"]:
                raise FatalBmcError(f"{name}: {p['Name']} {body[p['Name']]!r} not allowed "
                                    f"(BMC allows {p['AllowableValues']})", bmc=self.address)
        c.request("POST", str(target), body, what=name)

    def set_dpu_mode(self, mode: DpuMode) -> None:
        """``Mode.Set``; takes effect after two Arm reboots and a power cycle (bluefieldbmcv2510ltsu1,
        modes of operation): the caller schedules those."""
        with self._session() as c:
            d = self._discover(c)
            self._need_dpu(d, "set DPU mode")
            self._oem_action(c, d, "Mode.Set", {"Mode": mode.value})

    def set_secure_boot(self, enabled: bool) -> None:
        """PATCH ``SecureBoot.SecureBootEnable`` (DSP0268 SecureBoot; NICo disables it before an HTTP
        boot of its own image, bluefield-real.md §2). Applies at the next Arm reset."""
        with self._session() as c:
            d = self._discover(c)
            sysdoc = c.get(d.system_path, what="read System")
            sb_path = _odata_id(sysdoc.get("SecureBoot")) or f"{d.system_path}/SecureBoot"
            _, etag = c.get_etag(sb_path, what="read SecureBoot")
            LOG.info("BMC %s: setting SecureBootEnable=%s", self.address, enabled)
            c.patch(sb_path, {"SecureBootEnable": enabled}, etag, what="set SecureBootEnable", quirks=d.quirks)

    def bmc_rshim(self) -> bool:
        with self._session() as c:
            d = self._discover(c)
            _, doc, _ = self._nvidia_oem(c, d.manager_path, "read BMC RShim")
            return bool((doc.get("BmcRShim") or {}).get("BmcRShimEnabled"))

    def _rshim_now(self, c: _Conn, path: str) -> bool:
        return bool((c.get(path, what="read back BMC RShim").get("BmcRShim") or {}).get("BmcRShimEnabled"))

    def _set_rshim(self, c: _Conn, d: _Discovery, enabled: bool, *, toggle: bool = False) -> None:
        path, doc, etag = self._nvidia_oem(c, d.manager_path, "read BMC RShim")
        if bool((doc.get("BmcRShim") or {}).get("BmcRShimEnabled")) == enabled:
            return
        c.patch(path, {"BmcRShim": {"BmcRShimEnabled": enabled}}, etag,
                what=f"{'enable' if enabled else 'disable'} BMC RShim", quirks=d.quirks)
        # The BMC starts/stops its rshim daemon asynchronously; give it a bounded time. If it does not
        # come up, toggle it off and on once (dpu-update try_enable_rshim_on_bmc).
        wait = self.settings.rshim_wait
        for attempt in (1, 2):
            deadline = time.monotonic() + wait
            while True:
                now = self._rshim_now(c, path)
                if now == enabled:
                    return
                if time.monotonic() >= deadline:
                    break
                time.sleep(self.settings.poll_interval)
            if not (toggle and enabled) or attempt == 2:
                break
            LOG.warning("BMC %s: BMC RShim still off %.0fs after enabling; toggling it off and on", self.address,
                        wait)
            _, etag = c.get_etag(path, what="read BMC RShim")
            c.patch(path, {"BmcRShim": {"BmcRShimEnabled": False}}, etag, what="disable BMC RShim (toggle)",
                    quirks=d.quirks)
            _, etag = c.get_etag(path, what="read BMC RShim")
            c.patch(path, {"BmcRShim": {"BmcRShimEnabled": True}}, etag, what="enable BMC RShim (toggle)",
                    quirks=d.quirks)
        raise FatalBmcError(f"BMC accepted the RShim PATCH but BmcRShimEnabled does not read {enabled}",
                            bmc=self.address, hint="restart the BMC's rshim service or reboot the BMC")

    def set_bmc_rshim(self, enabled: bool) -> None:
        with self._session() as c:
            self._set_rshim(c, self._discover(c), enabled)

    def _wait_update_service(self, c: _Conn) -> None:
        """Wait until ``UpdateService.Status.State`` is Enabled and no update task runs (dpu-update
        ``bf_dpu_update.py``; DPF redfish client)."""
        svc_path = _odata_id(c.root.get("UpdateService")) or "/redfish/v1/UpdateService"
        tasks_path = _odata_id(c.root.get("Tasks"))
        tasks_path = f"{tasks_path.rstrip('/')}/Tasks" if tasks_path else "/redfish/v1/TaskService/Tasks"
        deadline = time.monotonic() + self.settings.update_wait
        while True:
            state = ((c.get(svc_path, what="read UpdateService").get("Status") or {}).get("State")) or "Enabled"
            running: list[str] = []
            if state == "Enabled":
                try:
                    coll = c.get(tasks_path, what="list tasks")
                except FatalBmcError:
                    coll = {}
                for m in (_odata_id(x) for x in coll.get("Members") or []):
                    if not m:
                        continue
                    try:
                        st = self._task_status(c, TaskHandle(m, self.address))
                    except FatalBmcError:
                        continue  # a listed task that no longer reads (BF-24.10 lists Tasks/0 that 404s)
                    if st.state in (TaskState.NEW, TaskState.STARTING, TaskState.RUNNING, TaskState.PENDING):
                        running.append(m)
                if not running:
                    return
            if time.monotonic() >= deadline:
                raise RetryableBmcError(
                    f"UpdateService is {state}" + (f", update task(s) {running} still running" if running else "")
                    + f" after {self.settings.update_wait:g}s", bmc=self.address,
                    hint="another update runs on this DPU; bootsvc retries later")
            time.sleep(self.settings.poll_interval)

    def install_bfb(self, image_uri: str) -> TaskHandle:
        """Push a BFB through the DPU BMC in NVIDIA's order (bluefield-real.md §3; dpu-update
        ``bf_dpu_update.py``, DPF redfish client, NICo ``handler.rs``): wait for the update service, host
        RShim off, BMC RShim on (toggle once if it does not come up), then SimpleUpdate to DPU_OS. The
        returned task covers only the transfer; `dpu_os_state` tells when the DPU OS runs."""
        with self._session() as c:
            d = self._discover(c)
            self._need_dpu(d, "BFB push")
            svc_path = _odata_id(c.root.get("UpdateService")) or "/redfish/v1/UpdateService"
            raw = ((c.get(svc_path, what="read UpdateService").get("Actions") or {}).get(
                "#UpdateService.SimpleUpdate") or {}).get("TransferProtocol@Redfish.AllowableValues")
            scheme = urlsplit(image_uri).scheme.upper()
            if raw is not None and scheme not in transfer_protocols(raw):
                # refuse before touching RShim (SCP-only firmware such as BF-23.10)
                return self._simple_update(c, d, image_uri, "DPU_OS")
            self._wait_update_service(c)
            _, oem, _ = self._nvidia_oem(c, d.system_path, "read Oem/Nvidia")
            if "#HostRshim.Set" in (oem.get("Actions") or {}):
                # the host's rshim driver would hold the DPU's rshim the BMC pushes the BFB into
                self._oem_action(c, d, "HostRshim.Set", {"HostRshim": "Disabled"})
            else:
                LOG.info("BMC %s: firmware %s has no HostRshim.Set; host RShim left as it is", self.address,
                         d.firmware or "?")
            self._set_rshim(c, d, True, toggle=True)
            return self._simple_update(c, d, image_uri, "DPU_OS")

"""Redfish power/boot/firmware driver on DMTF's python-redfish-library (PyPI ``redfish``).

Owns: talking to one BMC over Redfish safely:
- one login per operation (session auth, falling back to HTTP Basic when the service has no
  SessionService or refuses session creation with 404/405/501), and a logout in ``finally`` on every
  path, errors included, so no session is leaked (BMCs cap concurrent sessions, brief §5.2);
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
    EXPECTED_STATE,
    BmcAddress,
    BmcError,
    BmcInfo,
    BmcNoAnswer,
    BootOverride,
    BootTarget,
    DpuMode,
    FatalBmcError,
    PowerAction,
    PowerSettings,
    PowerState,
    RetryableBmcError,
    TaskHandle,
    TaskState,
    TaskStatus,
    check_boot_readback,
    choose_reset_type,
    error_for_status,
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


def _boot_of(doc: dict[str, Any], *, pending: bool = False) -> BootOverride:
    b = doc.get("Boot") or {}
    uri = b.get("HttpBootUri")
    return BootOverride(target=b.get("BootSourceOverrideTarget"), enabled=b.get("BootSourceOverrideEnabled"),
                        mode=b.get("BootSourceOverrideMode"),
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
        kw: dict[str, Any] = {"headers": headers, "max_retry": 0}
        if body is not None:
            kw["body"] = body
        try:
            resp = fn(path, **kw)
        except (RetriesExhaustedError, requests.RequestException, OSError) as e:
            raise transport_error(e, bmc=self.drv.address, what=what, method=method,
                                  read_timeout=self.drv.settings.read_timeout) from e
        if 200 <= resp.status < 300 or resp.status in allow:
            return resp
        raise error_for_status(resp.status, bmc=self.drv.address, what=what, detail=_bmc_message(resp),
                               retry_after=resp.retry_after, credential_ref=self.drv.credential_ref or "")

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
        if etag:
            headers["If-Match"] = etag
        elif quirks.needs_if_match:
            headers["If-Match"] = "*"  # RFC 9110 §13.1.1: matches any current representation
        resp = self.request("PATCH", path, body, what=what, headers=headers, allow=(412, 428))
        if resp.status not in (412, 428):
            return
        # 412: the resource changed since our GET (or the BMC mangled the ETag); 428: it wants one.
        # The rejected PATCH was not applied, so one re-read and one retry cannot double-apply it.
        first = resp.status
        _, fresh = self.get_etag(path, what=f"re-read {path} after HTTP {first}")
        if not fresh:
            raise error_for_status(first, bmc=self.drv.address, what=what, detail="no ETag to retry with")
        LOG.info("BMC %s: %s got HTTP %s; retrying once with fresh ETag", self.drv.address, what, first)
        resp = self.request("PATCH", path, body, what=what, headers={"If-Match": fresh}, allow=(412, 428))
        if resp.status in (412, 428):
            raise RetryableBmcError(
                f"{what}: BMC refused the PATCH twice (HTTP {first}, then {resp.status}) despite a fresh ETag",
                bmc=self.drv.address, status=resp.status,
                hint="the resource keeps changing or the BMC mishandles ETags; retry later or check quirks")

    # -- login / logout ---------------------------------------------------------------------------
    def login(self) -> None:
        drv = self.drv
        # Some BMCs wrongly demand auth for the service root; the library tolerates that, so do we.
        resp = self.request("GET", ROOT, what="read service root", allow=(401,))
        self.root = resp.dict if resp.status == 200 else {}
        # Give the library the root we already have so its login() does not GET it again.
        self.client.root = RisObject.parse(self.root)
        self.client.root_resp = resp
        sessions = _odata_id((self.root.get("Links") or {}).get("Sessions"))
        has_sessions = bool(sessions) or "SessionService" in self.root
        root_quirks, _ = quirkmod.match(self.root.get("Vendor"), self.root.get("Product"), None)
        no_ss = drv.quirk_overrides.get("no_session_service", root_quirks.no_session_service)
        if has_sessions and not no_ss:
            self.client.login_url = sessions or "/redfish/v1/SessionService/Sessions"
            try:
                self.client.login(auth=redfish.AuthMethod.SESSION)
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
            self.client.login(auth=redfish.AuthMethod.BASIC)
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
        root_q, _ = quirkmod.match(c.root.get("Vendor"), c.root.get("Product"), None)
        system_path = self.addr.system_path
        if system_path is None:
            coll = c.get("/redfish/v1/Systems", what="list Systems")
            members = [m for m in (_odata_id(x) for x in coll.get("Members") or []) if m]
            sid = self.quirk_overrides.get("system_id", root_q.system_id)
            wanted = [m for m in members if sid and m.rstrip("/").endswith("/" + sid)]
            if wanted:
                system_path = wanted[0]
            elif len(members) == 1:
                system_path = members[0]
            else:
                raise FatalBmcError(
                    f"BMC has {len(members)} Systems {members}; cannot tell which one is this node",
                    bmc=self.address, hint="set bmc_address to https://<bmc>/redfish/v1/Systems/<id>")
        system = c.get(system_path, what="read System")
        vendor = system.get("Manufacturer") or c.root.get("Vendor")
        model = system.get("Model")
        managers = (system.get("Links") or {}).get("ManagedBy") or []
        manager_path = _odata_id(managers[0]) if managers else None
        firmware = None
        if manager_path:
            try:
                firmware = c.get(manager_path, what="read Manager").get("FirmwareVersion")
            except FatalBmcError:
                manager_path = None
        q, names = quirkmod.match(vendor, model, firmware)
        q = q.with_overrides(self.quirk_overrides)
        if q.manager_id and (manager_path is None or not manager_path.endswith("/" + q.manager_id)):
            manager_path = f"/redfish/v1/Managers/{q.manager_id}"
        disc = _Discovery(system_path.rstrip("/"), manager_path, vendor, model, firmware,
                          c.root.get("RedfishVersion"), q, names)
        with self._disc_lock:
            self._disc = disc
        return disc

    # -- reads ------------------------------------------------------------------------------------
    def info(self) -> BmcInfo:
        with self._session() as c:
            d = self._discover(c)
            state = PowerState.parse(c.get(d.system_path, what="read PowerState").get("PowerState"))
            return BmcInfo(address=self.address, redfish_version=d.redfish_version, vendor=d.vendor,
                           model=d.model, firmware=d.firmware, system_path=d.system_path,
                           manager_path=d.manager_path, auth=c.auth, quirks=d.quirk_names, power_state=state,
                           quirk_flags=tuple(sorted(d.quirks.active().items())))

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

    def power_cycle(self, *, wait: float = 0) -> None:
        self._power(PowerAction.CYCLE, wait)

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
            sysdoc = c.get(d.system_path, what="read System")
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
                    # GracefulShutdown is ignored when no OS runs (brief §5.1): force it.
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
    def _boot_path(self, c: _Conn, d: _Discovery) -> tuple[str, bool]:
        if not d.quirks.settings_resource:
            return d.system_path, False
        sysdoc = c.get(d.system_path, what="read System")
        settings = _odata_id((sysdoc.get("@Redfish.Settings") or {}).get("SettingsObject"))
        return settings or f"{d.system_path}/Settings", True

    def boot_once(self, target: BootTarget, *, uri: str | None = None,
                  mode: str | None = None) -> BootOverride:
        if target is BootTarget.HTTP and not uri:
            raise FatalBmcError("UEFI HTTP boot needs a URI", hint="pass the http(s):// URL of the boot file")
        if target is not BootTarget.HTTP and uri:
            raise FatalBmcError(f"a boot URI only applies to UEFI HTTP boot, not {target}")
        if target is BootTarget.NONE:
            return self.clear_boot_override()
        asked = BootOverride(target=target.value, enabled="Once", mode=mode, uri=uri)
        with self._session() as c:
            d = self._discover(c)
            path, pending = self._boot_path(c, d)
            cur, etag = c.get_etag(path, what="read Boot")
            boot: dict[str, Any] = {"BootSourceOverrideTarget": asked.target,
                                    "BootSourceOverrideEnabled": asked.enabled}
            if mode:
                boot["BootSourceOverrideMode"] = mode
            if uri:
                boot["HttpBootUri"] = uri
            if d.quirks.sends_boot_object_whole:
                now = _boot_of(cur)
                whole = {"BootSourceOverrideMode": now.mode, "HttpBootUri": now.uri}
                boot = {**{k: v for k, v in whole.items() if v is not None}, **boot}
            c.patch(path, {"Boot": boot}, etag, what=f"set one-time boot {asked.target}", quirks=d.quirks)
            seen = _boot_of(c.get(path, what="read back Boot"), pending=pending)
            problem = check_boot_readback(asked, seen)
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
            return _boot_of(c.get(d.system_path, what="read Boot"))

    def clear_boot_override(self) -> BootOverride:
        """Remove a boot override the BMC kept after it was used (Once reported/kept as Continuous)."""
        with self._session() as c:
            d = self._discover(c)
            path, pending = self._boot_path(c, d)
            cur_doc, etag = c.get_etag(path, what="read Boot")
            cur = _boot_of(cur_doc, pending=pending)
            clear = d.quirks.clear_target
            if not cur.active or cur.target == clear:
                return cur
            c.patch(path, {"Boot": {"BootSourceOverrideEnabled": "Disabled",
                                    "BootSourceOverrideTarget": clear}}, etag,
                    what="clear boot override", quirks=d.quirks)
            seen = _boot_of(c.get(path, what="read back Boot"), pending=pending)
            if seen.enabled != "Disabled" and seen.target != clear:
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
        protos = act.get("TransferProtocol@Redfish.AllowableValues")
        if protos and scheme not in protos:
            raise FatalBmcError(f"BMC does not take {scheme} images (allows {protos})", bmc=self.address)
        inv = f"{svc_path.rstrip('/')}/FirmwareInventory/{target}"
        fw = c.get(inv, what=f"read FirmwareInventory/{target}")
        if fw.get("Updateable") is False:
            raise FatalBmcError(f"FirmwareInventory/{target} is not Updateable on this BMC", bmc=self.address)
        tref = inv.lstrip("/") if d.quirks.update_target_relative else inv
        body = {"ImageURI": image_uri, "TransferProtocol": scheme, "Targets": [tref]}
        resp = c.request("POST", action, body, what=f"UpdateService.SimpleUpdate {target}")
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
        handle = TaskHandle(task, self.address, f"SimpleUpdate {target} from {image_uri}")
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

    def dpu_mode(self) -> DpuMode:
        with self._session() as c:
            d = self._discover(c)
            _, doc, _ = self._nvidia_oem(c, d.system_path, "read DPU mode")
            mode = doc.get("Mode")
            return DpuMode(mode) if mode in (DpuMode.DPU.value, DpuMode.NIC.value) else DpuMode.UNKNOWN

    def bmc_rshim(self) -> bool:
        with self._session() as c:
            d = self._discover(c)
            _, doc, _ = self._nvidia_oem(c, d.manager_path, "read BMC RShim")
            return bool((doc.get("BmcRShim") or {}).get("BmcRShimEnabled"))

    def _set_rshim(self, c: _Conn, d: _Discovery, enabled: bool) -> None:
        path, doc, etag = self._nvidia_oem(c, d.manager_path, "read BMC RShim")
        if bool((doc.get("BmcRShim") or {}).get("BmcRShimEnabled")) == enabled:
            return
        c.patch(path, {"BmcRShim": {"BmcRShimEnabled": enabled}}, etag,
                what=f"{'enable' if enabled else 'disable'} BMC RShim", quirks=d.quirks)
        # The BMC starts/stops its rshim daemon asynchronously; give it a short bounded time.
        deadline = time.monotonic() + min(10.0, self.settings.read_timeout)
        while True:
            now = bool((c.get(path, what="read back BMC RShim").get("BmcRShim") or {}).get("BmcRShimEnabled"))
            if now == enabled:
                return
            if time.monotonic() >= deadline:
                raise FatalBmcError(f"BMC accepted the RShim PATCH but BmcRShimEnabled still reads {now}",
                                    bmc=self.address, hint="restart the BMC's rshim service or reboot the BMC")
            time.sleep(self.settings.poll_interval)

    def set_bmc_rshim(self, enabled: bool) -> None:
        with self._session() as c:
            self._set_rshim(c, self._discover(c), enabled)

    def install_bfb(self, image_uri: str) -> TaskHandle:
        """Push a BFB through the DPU BMC: enable BMC RShim, then SimpleUpdate to DPU_OS (brief §4.6)."""
        with self._session() as c:
            d = self._discover(c)
            self._set_rshim(c, d, True)
            return self._simple_update(c, d, image_uri, "DPU_OS")

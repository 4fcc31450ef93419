"""Redfish power and boot driver for one BMC (`RedfishDriver`), on DMTF's python-redfish-library.

Owns: what bootsvc asks of a BMC over Redfish, safely:
- discovery: which System/Manager is this node's and which vendor quirks apply (`bootsvc.power.quirks`),
  learnt once per session and kept with it;
- power: state, on/off/graceful off/reset/cycle with the ResetType the BMC advertises; **no automatic
  retries** (the library retries every method up to 10x by default, POST included, which can fire a
  reset twice): an action whose outcome is unknown (dropped connection, read timeout after sending) is
  never re-sent; its effect is looked for and reported with ``maybe_applied=True``;
- boot: one-time overrides, written to the System or its ``@Redfish.Settings`` object per field (sushy's
  rule), checked against the allowable values before sending, and read back after every write,
  failing loudly (FatalBmcError) when the BMC answered 2xx but ignored it;
- TLS verification on by default (system CA bundle or ``ca_file``); ``verify_tls=False`` is an explicit
  per-node lab opt-out. The library verifies nothing unless given a CA file, so we always hand it one;
- credentials resolved at login from a reference (`bootsvc.power.credentials`), never logged.

Sessions (login, 401 re-login, If-Match, the per-BMC cap, transport errors) live in
`bootsvc.power.redfish_session`: without a `SessionPool` every call logs in and out (the CLI: nothing
is left open); with one (the conductor) a BMC's session is kept across the calls of a step. Firmware
updates and the BlueField DPU extras (mode, Secure Boot, RShim, BFB push) are `redfish_bluefield`.
Why what is left stays one module (~550 lines): discovery, power and boot each read the System and
its quirks in the same session, and a power-on step uses all three.
"""

from __future__ import annotations

import fnmatch
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import certifi

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
    FatalBmcError,
    PowerAction,
    PowerSettings,
    PowerState,
    RetryableBmcError,
    check_allowed,
    check_boot_readback,
    choose_reset_type,
    route_boot_fields,
)
from bootsvc.power.credentials import resolve
from bootsvc.power.redfish_bluefield import BlueFieldOps
from bootsvc.power.redfish_session import (
    Conn,
    Discovery,
    PoolKey,
    SessionPool,
    blank,
    bmc_slot,
    odata_id,
    open_client,
    transport_error,
)

__all__ = ["RedfishDriver", "SessionPool", "bmc_slot", "transport_error"]

LOG = logging.getLogger(__name__)

_ALREADY: dict[PowerAction, frozenset[PowerState]] = {
    PowerAction.ON: frozenset({PowerState.ON, PowerState.POWERING_ON}),
    PowerAction.OFF: frozenset({PowerState.OFF, PowerState.POWERING_OFF}),
    PowerAction.GRACEFUL_OFF: frozenset({PowerState.OFF, PowerState.POWERING_OFF}),
}





def _boot_of(doc: dict[str, Any], *, pending: bool = False) -> BootOverride:
    b = doc.get("Boot") or {}
    uri = b.get("HttpBootUri")
    return BootOverride(target=blank(b.get("BootSourceOverrideTarget")),
                        enabled=blank(b.get("BootSourceOverrideEnabled")),
                        mode=blank(b.get("BootSourceOverrideMode")),
                        uri=None if uri in (None, "", "None") else str(uri),  # sushy renders None as "None"
                        pending=pending)



@dataclass(frozen=True, slots=True)
class _BootPlan:
    system_path: str
    system: dict[str, Any]
    system_etag: str | None
    settings_path: str | None  # the System's @Redfish.Settings object, if any
    settings: dict[str, Any] | None
    settings_etag: str | None



# ---------------------------------------------------------------------------------------------


class RedfishDriver(BlueFieldOps):
    """`PowerDriver` for one BMC over Redfish. Thread-safe; each call runs in one BMC session, its own
    (logged out at the end) or, with ``pool``, one kept for the next call."""

    name = "redfish"

    def __init__(self, address: str, credential_ref: str | None, *, verify_tls: bool = True,
                 settings: PowerSettings | None = None,
                 quirk_overrides: dict[str, Any] | None = None, pool: SessionPool | None = None) -> None:
        self.addr = BmcAddress.parse(address)
        self.address = self.addr.base_url
        self.credential_ref = credential_ref
        self.verify_tls = verify_tls
        self.settings = settings or PowerSettings()
        self.quirk_overrides = dict(quirk_overrides or {})
        quirkmod.Quirks().with_overrides(self.quirk_overrides)  # validate names early
        self._disc: Discovery | None = None
        self._disc_lock = threading.Lock()
        self.pool = pool
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
    def _session(self) -> Iterator[Conn]:
        slot = bmc_slot(self.addr.key, self.settings.max_sessions_per_bmc)
        if not slot.acquire(timeout=self.settings.slot_wait):
            raise RetryableBmcError(
                f"no free session slot for this BMC after {self.settings.slot_wait:g}s "
                f"(cap {self.settings.max_sessions_per_bmc})", bmc=self.address,
                hint="other operations hold the BMC; retry later or raise power.max_sessions_per_bmc")
        conn: Conn | None = None
        keep = False
        key: PoolKey = (self.addr.key, self.credential_ref, self.verify_tls, self._cafile())
        try:
            if self.pool is not None:
                conn = self.pool.take(key)
            if conn is not None:
                conn.drv = self  # same BMC, credential and TLS settings (the pool key)
            else:
                creds = resolve(self.credential_ref, names=self.settings.credentials)
                client = open_client(self.addr.base_url, creds.username, creds.password,
                                     cafile=self._cafile(), settings=self.settings)
                del creds
                conn = Conn(self, client)
                known = self.pool.recall(key) if self.pool is not None else None
                if known is not None:
                    # what this BMC said less than power.discovery_seconds ago: its root and our
                    # discovery are not read again (SessionPool, Known)
                    conn.memo.update(known.memo)
                    conn.learnt_at = known.at
                    conn.login(known_root=known.root)
                else:
                    conn.learnt_at = self.pool.clock() if self.pool is not None else None
                    conn.login()
                if self.pool is not None:
                    self.pool.logins += 1
            try:
                yield conn
            except BmcError as e:
                # the BMC answered over this session (an HTTP error status): it is as good as before;
                # after a transport error or an unread answer it is not reused
                keep = e.status is not None and e.status != 401 and not isinstance(e, BmcNoAnswer)
                raise
            keep = True
        finally:
            try:
                if conn is not None and self.pool is not None:
                    self.pool.learn(key, conn)  # or forgets the BMC when it showed signs of change
                if conn is not None:
                    if keep and self.pool is not None:
                        self.pool.give(key, conn)
                    else:
                        conn.logout()  # also after a failed login: a session may exist already
            finally:
                slot.release()

    def _discover(self, c: Conn) -> Discovery:
        # what this driver's settings learn from a BMC: kept on the session, so the next driver of the
        # same BMC (a later step) reuses it while the session lives
        memo_key = ("discovery", self.addr.system_path, repr(sorted(self.quirk_overrides.items())),
                    self.settings.bfb_uri_scheme_firmware)
        with self._disc_lock:
            if self._disc is not None:
                return self._disc
            known = c.memo.get(memo_key)
            if isinstance(known, Discovery):
                self._disc = known
                return known
        root_v = str(c.root.get("Vendor") or "")
        root_p = str(c.root.get("Product") or "")
        coll = c.get(odata_id(c.root.get("Systems")) or "/redfish/v1/Systems", what="list Systems")
        members = [m.rstrip("/") for m in (odata_id(x) for x in coll.get("Members") or []) if m]
        mgr_members: list[str] = []
        try:
            mcoll = c.get(odata_id(c.root.get("Managers")) or "/redfish/v1/Managers", what="list Managers")
            mgr_members = [m.rstrip("/") for m in (odata_id(x) for x in mcoll.get("Members") or []) if m]
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
        manager_path = odata_id(managers[0]) if managers else None
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
        disc = Discovery(system_path.rstrip("/"), manager_path, manufacturer or root_v or None,
                          model or root_p or None,
                          str(firmware) if firmware else None, c.root.get("RedfishVersion"), q, m.names,
                          m.evidence, m.kind)
        LOG.info("BMC %s: identified as %s (%s)", self.address, m.kind, " | ".join(m.evidence) or "no rule matched")
        with self._disc_lock:
            self._disc = disc
        c.memo[memo_key] = disc
        return disc

    # -- reads ------------------------------------------------------------------------------------
    def info(self) -> BmcInfo:
        with self._session() as c:
            d = self._discover(c)
            state = PowerState.parse(c.get(d.system_path, what="read PowerState", reuse=True).get("PowerState"))
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
            return PowerState.parse(c.get(d.system_path, what="read PowerState", reuse=True).get("PowerState"))

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

    def _reset_target(self, c: Conn, d: Discovery, sysdoc: dict[str, Any],
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
            sysdoc = c.get(d.system_path, what="read System", reuse=True)
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

    def _post_reset(self, c: Conn, d: Discovery, target: str, rtype: str, action: PowerAction,
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

    def _wait_state(self, c: Conn, d: Discovery, states: set[PowerState], timeout: float, *,
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
    def _boot_plan(self, c: Conn, d: Discovery, *, reuse: bool = True) -> _BootPlan:
        """Read the System and, when it has one, its Settings object (``@Redfish.Settings``, detected
        for every vendor like sushy does; or forced by the ``settings_resource`` quirk). ``reuse``:
        documents this session has just read will do (`Conn.get_etag`); a read-back never reuses."""
        sysdoc, sys_etag = c.get_etag(d.system_path, what="read System", reuse=reuse)
        settings = odata_id((sysdoc.get("@Redfish.Settings") or {}).get("SettingsObject"))
        if not settings and d.quirks.settings_resource:
            settings = f"{d.system_path}/Settings"
        setdoc: dict[str, Any] | None = None
        set_etag = None
        if settings:
            try:
                setdoc, set_etag = c.get_etag(settings, what="read pending Settings", reuse=reuse)
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

    def _write_boot(self, c: Conn, d: Discovery, plan: _BootPlan, boot: dict[str, Any], *, what: str) -> None:
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
            seen = self._boot_view(self._boot_plan(c, d, reuse=False))
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
            seen = self._boot_view(self._boot_plan(c, d, reuse=False))
            if seen.active and seen.target != clear:
                raise FatalBmcError(
                    f"BMC answered the clear-override PATCH with success but still reads "
                    f"{seen.target}/{seen.enabled}", bmc=self.address,
                    hint=f"next boot would still go to {seen.target}; clear it by hand on the BMC")
            return seen

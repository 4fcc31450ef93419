"""Firmware updates and the BlueField-3 DPU BMC extras of the Redfish driver (a mixin of
`bootsvc.power.redfish.RedfishDriver`, kept apart because it is half of the driver's size and read
on its own: NVIDIA's BMC documents, not DSP0268's ComputerSystem, are its reference).

Owns: ``UpdateService.SimpleUpdate`` and its Task (DSP0268 UpdateService, Task; DSP0266 §13.2
asynchronous operations), and on a BlueField BMC the DPU's facts (mode, Secure Boot, RShim, OS state),
``Mode.Set``, ``SecureBootEnable``, BMC RShim, and the BFB push in NVIDIA's order (bluefield-real.md §3).
Every method runs in one session of the driver (`_session`), whose discovery says whether the BMC is
a BlueField's.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import urlsplit

from bootsvc.power.base import (
    DpuFacts,
    DpuMode,
    FatalBmcError,
    PowerSettings,
    RetryableBmcError,
    TaskHandle,
    TaskState,
    TaskStatus,
    error_for_status,
    image_uri_for,
    transfer_protocols,
    update_in_progress,
)
from bootsvc.power.redfish_session import Conn, Discovery, blank, bmc_message, odata_id

LOG = logging.getLogger("bootsvc.power.redfish")


class BlueFieldOps:
    """Firmware and BlueField operations; the driver supplies sessions and discovery."""

    address: str
    settings: PowerSettings

    def _session(self) -> AbstractContextManager[Conn]:  # pragma: no cover - RedfishDriver's
        raise NotImplementedError

    def _discover(self, c: Conn) -> Discovery:  # pragma: no cover - RedfishDriver's
        raise NotImplementedError

    # -- firmware ---------------------------------------------------------------------------------
    def _simple_update(self, c: Conn, d: Discovery, image_uri: str, target: str) -> TaskHandle:
        scheme = urlsplit(image_uri).scheme.upper()
        if scheme not in ("HTTP", "HTTPS"):
            raise FatalBmcError(f"image URI {image_uri!r} must be http:// or https://")
        svc_path = odata_id(c.root.get("UpdateService")) or "/redfish/v1/UpdateService"
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
        # an update may change what the BMC says of itself (its firmware, and with it the quirks):
        # the next sessions read the root and discover again (SessionPool, Known)
        c.relearn = True
        while True:
            resp = c.request("POST", action, body, what=f"UpdateService.SimpleUpdate {target}",
                             allow=(400, 409, 503))
            if resp.status < 300:
                break
            msg = bmc_message(resp)
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

    def _task_status(self, c: Conn, handle: TaskHandle) -> TaskStatus:
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
            svc_path = odata_id(c.root.get("UpdateService")) or "/redfish/v1/UpdateService"
            v = c.get(f"{svc_path.rstrip('/')}/FirmwareInventory/{target}", what="read firmware").get("Version")
            return str(v) if v is not None else None

    # -- BlueField-3 DPU BMC ----------------------------------------------------------------------
    def _need_dpu(self, d: Discovery, what: str) -> None:
        if not d.quirks.is_dpu:
            raise FatalBmcError(f"{what}: this BMC ({d.kind}) is not a BlueField DPU BMC", bmc=self.address,
                                status=404, hint="bootsvc bmc check shows what the BMC was identified as and why")

    def _nvidia_oem(self, c: Conn, base: str | None, what: str) -> tuple[str, dict[str, Any], str | None]:
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

    def _dpu_facts(self, c: Conn, d: Discovery) -> DpuFacts:
        sysdoc = c.get(d.system_path, what="read System", reuse=True)
        _, oem, _ = self._nvidia_oem(c, d.system_path, "read DPU mode")
        mode_raw = oem.get("Mode")
        mode = DpuMode(mode_raw) if mode_raw in (DpuMode.DPU.value, DpuMode.NIC.value) else DpuMode.UNKNOWN
        sb_enable: bool | None = None
        sb_current: str | None = None
        sb_path = odata_id(sysdoc.get("SecureBoot"))
        if sb_path:
            try:
                sb = c.get(sb_path, what="read SecureBoot")
                v = sb.get("SecureBootEnable")
                sb_enable = v if isinstance(v, bool) else None
                sb_current = blank(sb.get("SecureBootCurrentBoot"))
            except FatalBmcError:
                pass
        rshim: bool | None = None
        try:
            _, mdoc, _ = self._nvidia_oem(c, d.manager_path, "read BMC RShim")
            r = (mdoc.get("BmcRShim") or {}).get("BmcRShimEnabled")
            rshim = r if isinstance(r, bool) else None
        except FatalBmcError:
            pass
        svc_path = odata_id(c.root.get("UpdateService")) or "/redfish/v1/UpdateService"
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
                        os_state=blank((sysdoc.get("BootProgress") or {}).get("OemLastState")),
                        host_rshim=blank(oem.get("HostRshim")), bmc_rshim=rshim, firmware=d.firmware,
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
            return blank((doc.get("BootProgress") or {}).get("OemLastState"))

    def dpu_mode(self) -> DpuMode:
        with self._session() as c:
            d = self._discover(c)
            _, doc, _ = self._nvidia_oem(c, d.system_path, "read DPU mode")
            mode = doc.get("Mode")
            return DpuMode(mode) if mode in (DpuMode.DPU.value, DpuMode.NIC.value) else DpuMode.UNKNOWN

    def _oem_action(self, c: Conn, d: Discovery, name: str, body: dict[str, Any]) -> None:
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
            sb_path = odata_id(sysdoc.get("SecureBoot")) or f"{d.system_path}/SecureBoot"
            _, etag = c.get_etag(sb_path, what="read SecureBoot")
            LOG.info("BMC %s: setting SecureBootEnable=%s", self.address, enabled)
            c.patch(sb_path, {"SecureBootEnable": enabled}, etag, what="set SecureBootEnable", quirks=d.quirks)

    def bmc_rshim(self) -> bool:
        with self._session() as c:
            d = self._discover(c)
            _, doc, _ = self._nvidia_oem(c, d.manager_path, "read BMC RShim")
            return bool((doc.get("BmcRShim") or {}).get("BmcRShimEnabled"))

    def _rshim_now(self, c: Conn, path: str) -> bool:
        return bool((c.get(path, what="read back BMC RShim").get("BmcRShim") or {}).get("BmcRShimEnabled"))

    def _set_rshim(self, c: Conn, d: Discovery, enabled: bool, *, toggle: bool = False) -> None:
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

    def _wait_update_service(self, c: Conn) -> None:
        """Wait until ``UpdateService.Status.State`` is Enabled and no update task runs (dpu-update
        ``bf_dpu_update.py``; DPF redfish client)."""
        svc_path = odata_id(c.root.get("UpdateService")) or "/redfish/v1/UpdateService"
        tasks_path = odata_id(c.root.get("Tasks"))
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
                for m in (odata_id(x) for x in coll.get("Members") or []):
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
            svc_path = odata_id(c.root.get("UpdateService")) or "/redfish/v1/UpdateService"
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

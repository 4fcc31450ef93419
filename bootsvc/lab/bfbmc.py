"""BlueField-3 DPU BMC emulator built on a real capture (lab and test code; bootsvc runtime never imports it).

Owns: a WSGI app that replays the BF-24.10 BMC capture (``../shared/redfish-captures/nvidia-bf3-bmc-24.10``,
DMTF Mockup Creator tree; ``--capture`` / ``$BOOTSVC_BF3_CAPTURE``): every GET answers the captured
document, with the emulator's state laid over the few resources that change. The only things added
are behaviours over time, each from a cited source (bluefield-real.md):

- ``UpdateService.SimpleUpdate`` to ``DPU_OS`` really downloads ``ImageURI`` (scheme-less as NVIDIA
  sends it, loopback hosts only) into the state dir; the task's ``PercentComplete`` moves in the BMC's
  steps 0/20/50/80/100 ("Transfer is x%") and covers only the transfer (§3.6); a second update while
  one runs answers 400 "An update is in progress" (§3.5, dpu-update);
- after the transfer the Arm boots the BFB and installs it, then reboots: ``BootProgress.OemLastState``
  walks BootRom, BL2, BL31, UEFI, OsStarting, OsIsRunning (UEFI is the last state in NIC mode;
  bluefieldbmcv2501 "BlueField Arm State"); ``FirmwareInventory/DPU_OS`` shows the new version
  only once the new OS runs (§3.6). `BfBmc.bfb_fetched` is the hook the lab overrides to boot the
  DPU VM from the fetched image;
- ``PowerCycle`` is deferred while the host runs and happens when the host resets or is off
  (``/_lab/state {"host_power": "Off"}`` / ``{"host_reset": true}``; bluefieldbmcv2401 reset control);
  ``SOC.ForceReset`` and ForceRestart/GracefulRestart reset the Arm at once;
- pending ``/Settings`` boot fields apply at the next Arm reset (bluefieldbmcv2510 boot-configuration),
  Secure Boot changes likewise (DSP0268 SecureBoot); ``Mode.Set`` takes effect after two Arm reboots
  and a power cycle (bluefieldbmcv2510ltsu1, modes of operation);
- ``HostRshim.Set``, BMC RShim (PATCH ``Managers/Bluefield_BMC/Oem/Nvidia``), sessions (counted:
  tests assert none is left open) and HTTP Basic.

Test knobs (``POST /_lab/faults``): 401 for everything, 405 on session login, 412 on the next N
PATCHes, 428 without If-Match, 500 on path globs, slow answers, dropping the TCP connection on a reset,
ignoring boot overrides, power delay, boot/install durations. ``GET /_lab/stats``: sessions, requests,
resets, patches, OEM actions, updates, the fetched BFB. Power state comes from sushy-tools' fake driver
(``bootsvc.lab.rack`` hooks QEMU into it and overrides `BfBmc._set_power`).

Assumptions not confirmed on real hardware are marked [verify]. Listens on loopback only. Run:
``python -m bootsvc.lab.bfbmc --port 18050`` with BFBMC_USER / BFBMC_PASSWORD in the environment.

One module (~980 lines) on purpose: it is one emulated BMC - the WSGI routing, the capture replay and
the state machine over time (update, boot progress, resets, settings) share one lock and one state, and
splitting them would spread one device's behaviour over files without a seam between them.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import hashlib
import ipaddress
import itertools
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self
from urllib.parse import urlsplit

import flask

SYSTEM = "/redfish/v1/Systems/Bluefield"
MANAGER = "/redfish/v1/Managers/Bluefield_BMC"
SESSIONS = "/redfish/v1/SessionService/Sessions"
TASKS = "/redfish/v1/TaskService/Tasks"
DPU_OS_TARGET = "redfish/v1/UpdateService/FirmwareInventory/DPU_OS"
DPU_OS_INV = "/" + DPU_OS_TARGET
BOOT_KEYS = ("BootSourceOverrideEnabled", "BootSourceOverrideTarget", "BootSourceOverrideMode", "HttpBootUri")
TASK_STEPS = (0, 20, 50, 80, 100)  # the BF BMC's transfer progress steps (dpu-update; bluefield-real.md §3.6)
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


@dataclass
class Faults:
    auth_401: bool = False  # every authenticated request (and session login) answers 401
    patch_412: int = 0  # the next N PATCHes answer 412 Precondition Failed
    require_if_match: bool = False  # PATCH without If-Match answers 428
    error_500: list[str] = field(default_factory=list)  # path globs answering 500
    slow_seconds: float = 0.0  # delay before answering paths matching slow_paths
    slow_paths: list[str] = field(default_factory=lambda: ["*"])
    drop_on_reset: bool = False  # close the TCP connection instead of answering ComputerSystem.Reset
    drop_applies: bool = True  # ... and still carry the reset out (BlueField behaviour)
    ignore_boot_override: bool = False  # answer 204 to Boot PATCHes but change nothing
    no_sessions: bool = False  # session creation answers 405 (service root still advertises it)
    power_delay: float | None = None  # seconds for power transitions; None = sushy's random 1-11 s
    require_rshim_for_update: bool = True  # [verify] SimpleUpdate to DPU_OS refused while BMC RShim is off
    download_chunk_delay: float = 0.0  # slow the BMC's image download (to watch PercentComplete)
    arm_boot_seconds: float = 2.0  # BootRom -> ... -> OsIsRunning after an Arm reset (real: minutes)
    install_seconds: float = 2.0  # the BFB installer's run after the transfer (real: 10-30 min)
    arm_refresh: float = 0.0  # OemLastState sampling period (real BMC: about 30 s, bluefieldbmcv2501)
    expect_size: int | None = None  # verify the downloaded image against these, if set
    expect_sha256: str | None = None


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> flask.Response:
    resp = flask.Response(json.dumps(doc, indent=1), status=status, mimetype="application/json")
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def _error(status: int, message: str, msg_id: str = "Base.1.8.GeneralError") -> flask.Response:
    return _json({"error": {"code": msg_id, "message": message,
                            "@Message.ExtendedInfo": [{"MessageId": msg_id, "Message": message}]}}, status)


def _etag(doc: Any) -> str:
    return '"' + hashlib.sha1(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16] + '"'


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


def default_capture() -> Path:
    """The BF-24.10 capture next to the repository (``../shared/redfish-captures``), or
    ``$BOOTSVC_BF3_CAPTURE``."""
    env = os.environ.get("BOOTSVC_BF3_CAPTURE")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "redfish-captures" / "nvidia-bf3-bmc-24.10"


class CaptureTree:
    """The captured resource tree (DMTF Mockup Creator layout: ``redfish/v1/<path>/index.json``),
    loaded once, handed out as deep copies; writes go to the emulator's state, not here."""

    def __init__(self, folder: Path) -> None:
        base = folder / "redfish" / "v1"
        if not (base / "index.json").is_file():
            raise SystemExit(f"bfbmc: no Redfish capture at {folder} (expected redfish/v1/index.json); "
                             "pass --capture or set BOOTSVC_BF3_CAPTURE")
        self.folder = folder
        self.docs: dict[str, dict[str, Any]] = {}
        for f in base.rglob("index.json"):
            rel = f.parent.relative_to(base).as_posix()
            path = "/redfish/v1" + ("" if rel == "." else "/" + rel)
            try:
                doc = json.loads(f.read_text())
            except ValueError:
                continue  # a damaged file answers 404 like a missing one
            if isinstance(doc, dict):
                self.docs[path] = doc

    def get(self, path: str) -> dict[str, Any] | None:
        doc = self.docs.get("/" + path.strip("/"))
        return copy.deepcopy(doc) if doc is not None else None


# OemLastState values and their order (bluefieldbmcv2501 "BlueField Arm State"); the BMC samples the
# state about every 30 s over NC-SI, so stages may be skipped (arm_refresh).
ARM_STAGES = ("BootRom", "BL2", "BL31", "UEFI", "OsStarting", "OsIsRunning")


class BfBmc:
    """The emulator state and its WSGI entry point (one per process: sushy's app is a singleton)."""

    def __init__(self, *, user: str = "root", password: str = "bfbmc-lab", state_dir: str | None = None,
                 mode: str = "DpuMode", power_state: str = "On", dpu_os_version: str | None = None,
                 capture: Path | None = None) -> None:
        from sushy_tools.emulator import main as sushy_main

        self.tree = CaptureTree(capture or default_capture())
        self.user, self.password = user, password
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="bfbmc-")
        self.sushy = sushy_main.app
        # sushy-tools' fake driver keeps the power state (and the lab's QEMU backend hooks into it,
        # bootsvc/lab/rack.py); every resource document comes from the capture.
        self.sushy.configure(extra_config={
            "SUSHY_EMULATOR_FAKE_DRIVER": True,
            "SUSHY_EMULATOR_STATE_DIR": self.state_dir,  # never the shared /tmp/sushy-emulator default
            "SUSHY_EMULATOR_FEATURE_SET": "full",
            "SUSHY_EMULATOR_FAKE_SYSTEMS": [{
                "uuid": "Bluefield", "name": "Bluefield", "power_state": power_state,
                "external_notifier": False, "nics": [{"mac": "58:a2:e1:00:00:01", "ip": "127.0.0.1"}]}],
        })
        self.lock = threading.RLock()
        self.faults = Faults()
        self.sessions: dict[str, dict[str, str]] = {}  # token -> {id, user}
        self.session_ids = itertools.count(1)
        self.created = 0
        self.deleted = 0
        self.requests: Counter[str] = Counter()
        self.inflight = 0
        self.max_inflight = 0
        self.resets: list[str] = []
        self.patches: list[tuple[str, Any]] = []
        self.updates: list[dict[str, Any]] = []
        self.actions: list[tuple[str, Any]] = []
        os_doc = self.tree.get(DPU_OS_INV) or {}
        self._initial = {"mode": mode, "power_state": power_state,
                         "dpu_os_version": dpu_os_version or str(os_doc.get("Version") or "unknown")}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.task_ids = itertools.count(1)
        self.reset_state()
        self.app = self._build()
        self.sushy_client = self.sushy.test_client()

    def reset_state(self) -> None:
        """Back to the captured state (faults cleared except power_delay, counters zeroed)."""
        with self.lock:
            self.faults = Faults(power_delay=self.faults.power_delay)
            cap_live = (self.tree.get(SYSTEM) or {}).get("Boot") or {}
            cap_pending = (self.tree.get(SYSTEM + "/Settings") or {}).get("Boot") or {}
            self.live_boot: dict[str, Any] = {k: cap_live.get(k) for k in BOOT_KEYS if k in cap_live}
            self.settings_boot: dict[str, Any] = {k: cap_pending.get(k) for k in BOOT_KEYS if k in cap_pending}
            oem = self.tree.get(SYSTEM + "/Oem/Nvidia") or {}
            self.mode = self._initial["mode"]
            self.pending_mode: str | None = None
            self.mode_arm_resets = 0  # Arm resets since Mode.Set (two needed, then a power cycle)
            self.host_rshim = str(oem.get("HostRshim") or "Disabled")
            mgr_oem = self.tree.get(MANAGER + "/Oem/Nvidia") or {}
            self.rshim = bool((mgr_oem.get("BmcRShim") or {}).get("BmcRShimEnabled"))
            sb = self.tree.get(SYSTEM + "/SecureBoot") or {}
            self.secure_boot = bool(sb.get("SecureBootEnable"))
            self.secure_boot_current = self.secure_boot
            self.host_power = "On"  # the server the DPU sits in; PowerCycle waits for its reset
            self.pending_power_cycle = False
            self.arm_boot_at = time.monotonic() - 3600.0  # booted long ago: OemLastState OsIsRunning
            self.installing = False  # the Arm runs the BFB installer (between transfer and OS)
            self.os_state_override: str | None = None
            self.dpu_os_version = self._initial["dpu_os_version"]
            self._pending_os_version = self.dpu_os_version
            self.bfb: dict[str, Any] | None = None
            self.tasks = {k: v for k, v in self.tasks.items() if v["TaskState"] in ("New", "Running")}
            self.requests.clear()
            self.created = self.deleted = 0
            self.max_inflight = 0
            self.resets.clear()
            self.patches.clear()
            self.updates.clear()
            self.actions.clear()
            self.sushy.systems._update("Bluefield", power_state=self._initial["power_state"], pending_power=None)

    # -- behaviour over time ----------------------------------------------------------------------
    def os_state(self) -> str:
        """BootProgress.OemLastState now. Arm boot stages from the last Arm reset (bluefieldbmcv2501:
        OsIsRunning in DPU mode, UEFI in NIC mode); while the BFB installs the Arm runs the installer,
        shown as OsStarting [verify: what real firmware reports during the install]."""
        with self.lock:
            if self.os_state_override:
                return self.os_state_override
            if self.sushy.systems.get_power_state("Bluefield") != "On":
                return "LowPowerStandby"
            f = self.faults
            t = time.monotonic() - self.arm_boot_at
            if f.arm_refresh > 0:  # the BMC samples about every 30 s: stages in between are missed
                t = t // f.arm_refresh * f.arm_refresh
            final = "UEFI" if self.mode == "NicMode" else "OsIsRunning"
            stages = ARM_STAGES[:ARM_STAGES.index(final) + 1]
            if self.installing:
                if t < f.install_seconds:
                    i = min(int(t / max(f.install_seconds, 1e-9) * 5), 4)
                    return ARM_STAGES[i]
                # the installer ends by rebooting into the new OS (bfb-build install.sh)
                self.installing = False
                self.arm_boot_at += f.install_seconds
                self.dpu_os_version = self._pending_os_version
                t -= f.install_seconds
            step = f.arm_boot_seconds / len(stages)
            return stages[min(int(t / step) if step > 0 else len(stages) - 1, len(stages) - 1)]

    def _arm_reset(self, why: str) -> None:
        """The Arm boots again: pending Settings apply (bluefieldbmcv2510 boot-configuration: "applied
        at the next reset"), Secure Boot changes take effect, Mode.Set counts the reboot."""
        with self.lock:
            self.arm_boot_at = time.monotonic()
            self.live_boot = {**self.live_boot, **self.settings_boot}
            self.secure_boot_current = self.secure_boot
            if self.pending_mode:
                self.mode_arm_resets += 1

    def _power_cycle_now(self) -> None:
        """Arm and NIC reset (PowerCycle once the host lets it happen). A pending Mode.Set takes
        effect here after its two Arm reboots (bluefieldbmcv2510ltsu1, modes of operation)."""
        with self.lock:
            self.pending_power_cycle = False
            if self.pending_mode and self.mode_arm_resets >= 2:
                self.mode, self.pending_mode, self.mode_arm_resets = self.pending_mode, None, 0
        self._set_power("PowerCycle")

    def _set_power(self, reset_type: str) -> None:
        """Every power change and Arm reset goes through here (the lab's QEMU backend overrides it)."""
        sushy_type = "ForceRestart" if reset_type in ("PowerCycle", "SOC.ForceReset") else reset_type
        systems = self.sushy.systems
        systems.set_power_state("Bluefield", sushy_type)
        delay = self.faults.power_delay
        if delay is not None:
            # sushy's fake driver picks a random 1-11 s; tests want it short and known.
            sysd = systems._get("Bluefield")
            pending = sysd.get("pending_power")
            if pending:
                systems._update(sysd, pending_power={**pending, "apply_time": time.time() + delay})
        with self.lock:
            self.resets.append(reset_type)
        if reset_type not in ("ForceOff", "GracefulShutdown"):
            self._arm_reset(reset_type)

    def host_event(self, host_power: str | None = None, host_reset: bool = False) -> None:
        """The server around the DPU changed: a pending PowerCycle takes effect when the host resets or
        is off (bluefieldbmcv2401/2507 reset control: needs the host's PERST / All_STANDBY)."""
        with self.lock:
            if host_power:
                self.host_power = host_power
            go = self.pending_power_cycle and (host_reset or self.host_power == "Off")
        if go:
            self._power_cycle_now()

    def bfb_fetched(self, path: Path, size: int, sha256: str) -> None:
        """Hook: the BMC has the whole BFB (with its appended bf.cfg) in ``path``; right after it returns
        the Arm is reset (``_set_power("ForceRestart")``) to boot that image. The lab overrides it to
        boot the DPU VM from the image; the default only records it (``/_lab/stats`` ``bfb``)."""

    # -- WSGI -------------------------------------------------------------------------------------
    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "") or "/"
        method = environ.get("REQUEST_METHOD", "GET")
        if path.startswith("/_lab/"):
            return self.app(environ, start_response)
        with self.lock:
            self.requests[f"{method} {path}"] += 1
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
            f = copy.deepcopy(self.faults)
        try:
            if f.slow_seconds and any(fnmatch.fnmatchcase(path, p) for p in f.slow_paths):
                time.sleep(f.slow_seconds)
            if any(fnmatch.fnmatchcase(path, p) for p in f.error_500):
                return _error(500, "Internal error (injected)")(environ, start_response)
            public = path.rstrip("/") in ("", "/redfish", "/redfish/v1") or (
                method == "POST" and path.rstrip("/") == SESSIONS)
            if not public and not self._authorized(environ, f):
                resp = _error(401, "Authentication required", "Base.1.8.InsufficientPrivilege")
                resp.headers["WWW-Authenticate"] = 'Basic realm="bfbmc"'
                return resp(environ, start_response)
            return self.app(environ, start_response)
        finally:
            with self.lock:
                self.inflight -= 1

    def _authorized(self, environ: dict[str, Any], f: Faults) -> bool:
        if f.auth_401:
            return False
        token = environ.get("HTTP_X_AUTH_TOKEN")
        if token:
            with self.lock:
                return token in self.sessions
        auth = environ.get("HTTP_AUTHORIZATION", "")
        if auth.startswith("Basic "):
            import base64

            try:
                user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                return False
            return secrets.compare_digest(user, self.user) and secrets.compare_digest(pw, self.password)
        return False

    # -- helpers ----------------------------------------------------------------------------------
    def _precondition(self, current: Any) -> flask.Response | None:
        """If-Match handling for PATCH (RFC 9110 §13.1.1) plus the injected 412/428 faults."""
        req = flask.request
        with self.lock:
            if self.faults.patch_412 > 0:
                self.faults.patch_412 -= 1
                return _error(412, "ETag does not match (injected)", "Base.1.8.PreconditionFailed")
            need = self.faults.require_if_match
        im = req.headers.get("If-Match")
        if im is None:
            return _error(428, "If-Match required", "Base.1.8.PreconditionRequired") if need else None
        if im.strip() != "*" and _etag(current) not in [t.strip() for t in im.split(",")]:
            return _error(412, "ETag does not match", "Base.1.8.PreconditionFailed")
        return None

    def _reset_types(self) -> list[str]:
        info = self.tree.get(SYSTEM + "/ResetActionInfo") or {}
        for p in info.get("Parameters") or []:
            if isinstance(p, dict) and p.get("Name") == "ResetType":
                return [str(v) for v in p.get("AllowableValues") or []]
        return []

    def _doc(self, path: str) -> dict[str, Any] | None:
        """The captured document with the emulator's state laid over it."""
        p = "/" + path.strip("/")
        doc = self.tree.get(p)
        with self.lock:
            if p == SYSTEM and doc is not None:
                doc["PowerState"] = self.sushy.systems.get_power_state("Bluefield")
                doc["Boot"] = {**(doc.get("Boot") or {}), **self.live_boot}
                doc.setdefault("BootProgress", {})["OemLastState"] = self.os_state()
            elif p == SYSTEM + "/Settings" and doc is not None:
                doc["Boot"] = {**(doc.get("Boot") or {}), **self.settings_boot}
            elif p == SYSTEM + "/Oem/Nvidia" and doc is not None:
                doc.update(Mode=self.mode, HostRshim=self.host_rshim)
            elif p == SYSTEM + "/SecureBoot" and doc is not None:
                doc.update(SecureBootEnable=self.secure_boot,
                           SecureBootCurrentBoot="Enabled" if self.secure_boot_current else "Disabled")
            elif p == MANAGER + "/Oem/Nvidia" and doc is not None:
                doc["BmcRShim"] = {**(doc.get("BmcRShim") or {}), "BmcRShimEnabled": self.rshim}
            elif p == DPU_OS_INV and doc is not None:
                doc["Version"] = self.dpu_os_version  # the new version shows once the new OS booted
            elif p == SESSIONS:
                ids = [s["id"] for s in self.sessions.values()]
                doc = {"@odata.id": SESSIONS, "@odata.type": "#SessionCollection.SessionCollection",
                       "Members@odata.count": len(ids), "Members": [{"@odata.id": f"{SESSIONS}/{i}"} for i in ids]}
            elif p == TASKS:
                doc = {"@odata.id": TASKS, "@odata.type": "#TaskCollection.TaskCollection",
                       "Members@odata.count": len(self.tasks),
                       "Members": [{"@odata.id": f"{TASKS}/{i}"} for i in self.tasks]}
        return doc

    def _task_doc(self, tid: str) -> dict[str, Any]:
        with self.lock:
            t = dict(self.tasks[tid])
        return {"@odata.id": f"{TASKS}/{tid}", "@odata.type": "#Task.v1_4_3.Task",
                "Id": tid, "Name": f"Task {tid}", "TaskState": t["TaskState"], "TaskStatus": t["TaskStatus"],
                "PercentComplete": t["PercentComplete"], "StartTime": t["StartTime"],
                "Messages": [{"MessageId": "TaskEvent.1.0.TaskProgressChanged", "Message": m}
                             for m in t["Messages"]],
                "Payload": {"TargetUri": "/redfish/v1/UpdateService/Actions/UpdateService.SimpleUpdate",
                            "HttpOperation": "POST"}}

    def _download(self, tid: str, uri: str, version: str) -> None:
        """The BMC pulls the image itself and pushes it into the DPU's rshim boot device; the task's
        progress covers only that transfer and moves in NVIDIA's steps 0/20/50/80/100 with "Transfer
        is x%" (bluefield-real.md §3.6; dpu-update). Then the Arm boots the BFB and installs it."""
        def upd(**kw: Any) -> None:
            with self.lock:
                t = self.tasks[tid]
                msg = kw.pop("message", None)
                t.update(kw)
                if msg:
                    t["Messages"].append(msg)

        h = hashlib.sha256()
        got = 0
        out = Path(self.state_dir) / f"bfb-task-{tid}.bfb"
        try:
            with urllib.request.urlopen(uri, timeout=10) as r, open(out, "wb") as sink:
                total = int(r.headers.get("Content-Length") or 0)
                upd(TaskState="Running", message="Transfer is 0%")
                step = 0
                while True:
                    chunk = r.read(256 * 1024)
                    if not chunk:
                        break
                    h.update(chunk)
                    sink.write(chunk)
                    got += len(chunk)
                    frac = got * 100 // total if total else 0
                    reached = max((s for s in TASK_STEPS if s <= frac and s < 100), default=0)
                    if reached > step:
                        step = reached
                        upd(PercentComplete=step, message=f"Transfer is {step}%")
                    if self.faults.download_chunk_delay:
                        time.sleep(self.faults.download_chunk_delay)
        except (urllib.error.URLError, OSError, ValueError) as e:
            upd(TaskState="Exception", TaskStatus="Critical", message=f"Image download failed: {e}")
            return
        f = self.faults
        problem = None
        if total and got != total:
            problem = f"Image truncated: got {got} of {total} bytes"
        elif f.expect_size is not None and got != f.expect_size:
            problem = f"Image size {got} does not match expected {f.expect_size}"
        elif f.expect_sha256 and h.hexdigest() != f.expect_sha256.lower():
            problem = f"Image sha256 {h.hexdigest()} does not match expected {f.expect_sha256}"
        if problem:
            upd(TaskState="Exception", TaskStatus="Critical", message=problem)
            return
        with self.lock:
            self.bfb = {"path": str(out), "size": got, "sha256": h.hexdigest(), "task": tid}
            self._pending_os_version = version
            self.installing = True
        upd(TaskState="Completed", TaskStatus="OK", PercentComplete=100, message="Transfer is 100%")
        self.bfb_fetched(out, got, h.hexdigest())  # the lab stages the image for the Arm's next boot
        self._set_power("ForceRestart")  # the Arm boots the pushed BFB from its rshim boot device
        with self.lock:
            self.installing = True
            self.arm_boot_at = time.monotonic()

    # -- routes -----------------------------------------------------------------------------------
    def _build(self) -> flask.Flask:
        app = flask.Flask("bfbmc")
        app.url_map.strict_slashes = False

        @app.route(SESSIONS, methods=["POST"])
        def login() -> flask.Response:
            if self.faults.no_sessions:
                return _error(405, "Session creation is not supported", "Base.1.8.OperationNotAllowed")
            body = flask.request.get_json(silent=True) or {}
            ok = (not self.faults.auth_401 and secrets.compare_digest(str(body.get("UserName", "")), self.user)
                  and secrets.compare_digest(str(body.get("Password", "")), self.password))
            if not ok:
                return _error(401, "Invalid username or password", "Base.1.8.NoValidSession")
            token = secrets.token_hex(16)
            with self.lock:
                sid = secrets.token_urlsafe(8)[:10]  # bmcweb ids look like HZy91uU3NK (capture)
                self.sessions[token] = {"id": sid, "user": self.user}
                self.created += 1
            loc = f"{SESSIONS}/{sid}"
            return _json({"@odata.id": loc, "Id": sid, "UserName": self.user}, 201,
                         {"X-Auth-Token": token, "Location": loc})

        @app.route(SESSIONS + "/<sid>", methods=["GET", "DELETE"])
        def session(sid: str) -> flask.Response:
            with self.lock:
                token = next((t for t, s in self.sessions.items() if s["id"] == sid), None)
                if token is None:
                    return _error(404, f"No session {sid}", "Base.1.8.ResourceMissingAtURI")
                if flask.request.method == "DELETE":
                    del self.sessions[token]
                    self.deleted += 1
                    return flask.Response(status=204)
            return _json({"@odata.id": f"{SESSIONS}/{sid}", "Id": sid, "UserName": self.user})

        @app.route(f"{TASKS}/<tid>", methods=["GET"])
        def task(tid: str) -> flask.Response:
            if tid not in self.tasks:
                return _error(404, f"No task {tid}", "Base.1.8.ResourceMissingAtURI")
            return _json(self._task_doc(tid))

        @app.route(SYSTEM + "/Settings", methods=["PATCH"])
        def settings() -> flask.Response:
            doc = self._doc(SYSTEM + "/Settings") or {}
            bad = self._precondition(doc)
            if bad is not None:
                return bad
            body = flask.request.get_json(silent=True) or {}
            boot = body.get("Boot")
            if not isinstance(boot, dict) or not boot:
                return _error(400, "PATCH needs a Boot object", "Base.1.8.PropertyMissing")
            allowed = (doc.get("Boot") or {}).get("BootSourceOverrideTarget@Redfish.AllowableValues") or []
            target = boot.get("BootSourceOverrideTarget")
            if target is not None and target not in allowed:
                return _error(400, f"The value {target} for the property BootSourceOverrideTarget is not in the "
                                   "list of acceptable values", "Base.1.8.PropertyValueNotInList")
            if boot.get("BootSourceOverrideEnabled") not in (None, "Disabled", "Once", "Continuous"):
                return _error(400, "bad BootSourceOverrideEnabled", "Base.1.8.PropertyValueNotInList")
            if boot.get("BootSourceOverrideMode") not in (None, "UEFI", "Legacy"):
                return _error(400, "bad BootSourceOverrideMode", "Base.1.8.PropertyValueNotInList")
            with self.lock:
                self.patches.append((SYSTEM + "/Settings", body))
                if not self.faults.ignore_boot_override:
                    self.settings_boot.update({k: v for k, v in boot.items() if k in BOOT_KEYS})
            return flask.Response(status=204)

        @app.route(SYSTEM, methods=["PATCH"])
        def system_patch() -> flask.Response:
            # [verify] the BF3 documents boot changes on /Settings (bluefieldbmcv2510 boot-configuration);
            # what it answers to a Boot PATCH of the live System is not documented: refuse it plainly.
            return _error(400, "Boot properties are applied through " + SYSTEM + "/Settings",
                          "Base.1.8.PropertyNotWritable")

        @app.route(SYSTEM + "/SecureBoot", methods=["PATCH"])
        def secure_boot() -> flask.Response:
            body = flask.request.get_json(silent=True) or {}
            val = body.get("SecureBootEnable")
            if not isinstance(val, bool):
                return _error(400, "SecureBootEnable must be a boolean", "Base.1.8.PropertyValueTypeError")
            with self.lock:
                self.patches.append((SYSTEM + "/SecureBoot", body))
                self.secure_boot = val  # SecureBootCurrentBoot follows at the next Arm boot (DSP0268)
            return flask.Response(status=204)

        @app.route(SYSTEM + "/Actions/ComputerSystem.Reset", methods=["POST"])
        def reset() -> flask.Response:
            rtype = (flask.request.get_json(silent=True) or {}).get("ResetType")
            if rtype not in self._reset_types():
                return _error(400, f"ResetType {rtype} not supported", "Base.1.8.ActionParameterNotSupported")
            if self.faults.drop_on_reset:
                if self.faults.drop_applies:
                    self._reset(str(rtype))
                else:
                    with self.lock:
                        self.resets.append(f"dropped:{rtype}")
                sock = flask.request.environ.get("werkzeug.socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                return flask.Response(status=204)
            self._reset(str(rtype))
            return flask.Response(status=204)

        @app.route(SYSTEM + "/Oem/Nvidia/Actions/Mode.Set", methods=["POST"])
        def mode_set() -> flask.Response:
            mode = (flask.request.get_json(silent=True) or {}).get("Mode")
            if mode not in ("DpuMode", "NicMode"):
                return _error(400, f"Mode {mode} not supported", "Base.1.8.ActionParameterNotSupported")
            with self.lock:
                self.actions.append(("Mode.Set", mode))
                self.pending_mode = mode if mode != self.mode else None
                self.mode_arm_resets = 0
            return flask.Response(status=204)

        @app.route(SYSTEM + "/Oem/Nvidia/Actions/HostRshim.Set", methods=["POST"])
        def host_rshim() -> flask.Response:
            val = (flask.request.get_json(silent=True) or {}).get("HostRshim")
            if val not in ("Enabled", "Disabled"):
                return _error(400, f"HostRshim {val} not supported", "Base.1.8.ActionParameterNotSupported")
            with self.lock:
                self.actions.append(("HostRshim.Set", val))
                self.host_rshim = str(val)
            return flask.Response(status=204)

        @app.route(SYSTEM + "/Oem/Nvidia/SOC.ForceReset", methods=["POST"])
        def soc_force_reset() -> flask.Response:
            # the capture's target has no /Actions/ segment; resets the SoC whatever the host does
            with self.lock:
                self.actions.append(("SOC.ForceReset", None))
            self._set_power("SOC.ForceReset")
            return flask.Response(status=204)

        @app.route(MANAGER + "/Oem/Nvidia", methods=["PATCH"])
        def manager_oem() -> flask.Response:
            doc = self._doc(MANAGER + "/Oem/Nvidia") or {}
            bad = self._precondition(doc)
            if bad is not None:
                return bad
            body = flask.request.get_json(silent=True) or {}
            val = (body.get("BmcRShim") or {}).get("BmcRShimEnabled")
            if not isinstance(val, bool):
                return _error(400, "BmcRShim.BmcRShimEnabled must be a boolean", "Base.1.8.PropertyValueTypeError")
            with self.lock:
                self.patches.append((MANAGER + "/Oem/Nvidia", body))
                self.rshim = val
            return flask.Response(status=204)

        @app.route("/redfish/v1/UpdateService/Actions/UpdateService.SimpleUpdate", methods=["POST"])
        def simple_update() -> flask.Response:
            body = flask.request.get_json(silent=True) or {}
            targets = body.get("Targets")
            proto = str(body.get("TransferProtocol") or "HTTP").upper()
            uri = str(body.get("ImageURI") or "")
            svc = self.tree.get("/redfish/v1/UpdateService") or {}
            allowed = ((svc.get("Actions") or {}).get("#UpdateService.SimpleUpdate") or {}).get(
                "TransferProtocol@Redfish.AllowableValues") or []
            if not isinstance(targets, list) or len(targets) != 1:
                return _error(400, "Exactly one target per request", "Base.1.8.PropertyValueIncorrect")
            if str(targets[0]).lstrip("/") != DPU_OS_TARGET:
                return _error(400, f"Target {targets[0]} not updatable through SimpleUpdate",
                              "Base.1.8.PropertyValueNotInList")
            if proto not in allowed or proto not in ("HTTP", "HTTPS"):
                return _error(400, f"TransferProtocol {proto} not supported", "Base.1.8.PropertyValueNotInList")
            if "://" not in uri:  # NVIDIA: the scheme is implied by TransferProtocol (bluefield-real.md §3.3)
                uri = f"{proto.lower()}://{uri}"
            host = urlsplit(uri).hostname
            if not _is_loopback(host):
                # Network safety: this emulator never fetches from anything but loopback.
                return _error(400, f"ImageURI host {host} is not loopback (emulator refuses)",
                              "Base.1.8.PropertyValueIncorrect")
            with self.lock:
                if self.faults.require_rshim_for_update and not self.rshim:
                    return _error(400, "BMC RShim is disabled; enable Managers/Bluefield_BMC/Oem/Nvidia BmcRShim",
                                  "Base.1.8.ActionNotSupported")
                if any(t["TaskState"] in ("New", "Running") for t in self.tasks.values()) or self.installing:
                    # real firmware: 400 with this text (dpu-update _update_in_progress_err_handler)
                    return _error(400, "An update is in progress. Please wait until it completes.",
                                  "Base.1.8.ResourceInUse")
                tid = str(next(self.task_ids))
                self.tasks[tid] = {"TaskState": "New", "TaskStatus": "OK", "PercentComplete": 0,
                                   "StartTime": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                                   "Messages": ["Task created"]}
                self.updates.append(dict(body))
            version = Path(urlsplit(uri).path).name.removesuffix(".bfb") or "unknown"
            threading.Thread(target=self._download, args=(tid, uri, version), daemon=True,
                             name=f"bfbmc-dl-{tid}").start()
            return _json(self._task_doc(tid), 202, {"Location": f"{TASKS}/{tid}"})

        @app.route("/redfish/v1", methods=["GET"])
        @app.route("/redfish/v1/<path:rest>", methods=["GET"])
        def get_any(rest: str = "") -> flask.Response:
            path = "/redfish/v1" + (f"/{rest}" if rest else "")
            doc = self._doc(path)
            if doc is None:
                return _error(404, f"The resource at the URI {path} was not found.", "Base.1.8.ResourceMissingAtURI")
            return _json(doc, headers={"ETag": _etag(doc)})

        # -- lab control (no auth; loopback only) ------------------------------------------------
        @app.route("/_lab/faults", methods=["GET", "POST"])
        def lab_faults() -> flask.Response:
            if flask.request.method == "POST":
                body = flask.request.get_json(silent=True) or {}
                with self.lock:
                    if body.pop("_reset", False):
                        self.faults = Faults(power_delay=self.faults.power_delay)
                    for k, v in body.items():
                        if not hasattr(self.faults, k):
                            return _error(400, f"unknown fault {k}")
                        setattr(self.faults, k, v)
            with self.lock:
                return _json(asdict(self.faults))

        @app.route("/_lab/state", methods=["POST"])
        def lab_state() -> flask.Response:
            body = flask.request.get_json(silent=True) or {}
            with self.lock:
                if "mode" in body:
                    self.mode = body["mode"]
                if "rshim" in body:
                    self.rshim = bool(body["rshim"])
                if "secure_boot" in body:
                    self.secure_boot = self.secure_boot_current = bool(body["secure_boot"])
                if "os_state" in body:
                    self.os_state_override = body["os_state"] or None
                if "power_state" in body:
                    self.sushy.systems._update("Bluefield", power_state=body["power_state"], pending_power=None)
                if "boot" in body:
                    self.live_boot.update(body["boot"])
                    self.settings_boot.update(body["boot"])
            if "host_power" in body or body.get("host_reset"):
                self.host_event(body.get("host_power"), bool(body.get("host_reset")))
            return _json({"ok": True})

        @app.route("/_lab/stats", methods=["GET"])
        def lab_stats() -> flask.Response:
            with self.lock:
                return _json({
                    "sessions_open": len(self.sessions), "sessions_created": self.created,
                    "sessions_deleted": self.deleted, "requests": dict(self.requests),
                    "max_inflight": self.max_inflight, "resets": list(self.resets),
                    "patches": list(self.patches), "updates": list(self.updates), "actions": list(self.actions),
                    "live_boot": dict(self.live_boot), "settings_boot": dict(self.settings_boot),
                    "mode": self.mode, "pending_mode": self.pending_mode, "rshim": self.rshim,
                    "host_rshim": self.host_rshim, "host_power": self.host_power,
                    "pending_power_cycle": self.pending_power_cycle, "secure_boot": self.secure_boot,
                    "os_state": self.os_state(), "dpu_os_version": self.dpu_os_version, "bfb": self.bfb,
                    "power_state": self.sushy.systems.get_power_state("Bluefield")})

        @app.route("/_lab/reset", methods=["POST"])
        def lab_reset() -> flask.Response:
            self.reset_state()
            return _json({"ok": True})

        @app.route("/_lab/clear-stats", methods=["POST"])
        def lab_clear() -> flask.Response:
            with self.lock:
                self.requests.clear()
                self.max_inflight = 0
                self.resets.clear()
                self.patches.clear()
                self.updates.clear()
                self.actions.clear()
            return _json({"ok": True})

        return app

    def _reset(self, rtype: str) -> None:
        """ComputerSystem.Reset on the DPU (bluefieldbmcv2401/2507 reset control): PowerCycle resets Arm
        and NIC only when the host asserts PERST/All_STANDBY, so with the host running it waits."""
        if rtype == "PowerCycle":
            with self.lock:
                deferred = self.host_power == "On"
                if deferred:
                    self.pending_power_cycle = True
                    self.resets.append("PowerCycle:deferred")
            if not deferred:
                self._power_cycle_now()
            return
        self._set_power(rtype)


def serve(bmc: BfBmc, host: str = "127.0.0.1", port: int = 18050,
          tls: tuple[str, str] | None = None) -> Any:
    """A threaded werkzeug server for ``bmc`` on loopback (refuses other addresses); HTTPS with
    ``tls=(certfile, keyfile)``, like a real BMC."""
    from werkzeug.serving import make_server

    if not _is_loopback(host):
        raise SystemExit(f"bfbmc: refusing to listen on {host}: loopback only")
    return make_server(host, port, bmc, threaded=True, ssl_context=tls)


# ---------------------------------------------------------------------------------------------
# Launchers used by tests and lab scripts


def self_signed_cert(directory: Path, name: str = "bmc") -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (SAN IP), made with the openssl CLI."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=30)
    return cert, key


def free_port(lo: int, hi: int) -> int:
    """A free TCP port on 127.0.0.1 in [lo, hi] (the helper's assigned range)."""
    for port in range(lo, hi + 1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {lo}-{hi}")


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            # Readiness probe only: lab servers use self-signed certificates.
            ctx = ssl._create_unverified_context() if url.startswith("https") else None
            with urllib.request.urlopen(url, timeout=1, context=ctx):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{url}: server exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} not answering after {timeout}s")
        time.sleep(0.05)


class _Proc:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class BfBmcProcess(_Proc):
    """``python -m bootsvc.lab.bfbmc`` in a child process, with helpers for the /_lab API."""

    def __init__(self, workdir: Path, *, port: int | None = None, user: str = "root",
                 password: str = "bfbmc-lab", power_delay: float | None = 0.3,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.port = port or free_port(18050, 18089)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self.log = workdir / f"bfbmc-{self.port}.log"
        env = {**os.environ, "BFBMC_USER": user, "BFBMC_PASSWORD": password}
        args = [sys.executable, "-m", "bootsvc.lab.bfbmc", "--port", str(self.port),
                "--state-dir", str(workdir / f"bfbmc-state-{self.port}")]
        if power_delay is not None:
            args += ["--power-delay", str(power_delay)]
        if tls:
            args += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen(args, env=env, stdout=logf, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url + "/redfish/v1/", 30, self.proc)
        except Exception:
            self.stop()
            raise

    def _call(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET",
                                     headers={"Content-Type": "application/json"})
        ctx = ssl._create_unverified_context() if self.url.startswith("https") else None  # lab control only
        with urllib.request.urlopen(req, timeout=10, context=ctx) as r:
            return json.loads(r.read())

    def faults(self, **kw: Any) -> dict[str, Any]:
        result: dict[str, Any] = self._call("/_lab/faults", kw)
        return result

    def clear_faults(self) -> None:
        self._call("/_lab/faults", {"_reset": True})

    def state(self, **kw: Any) -> None:
        self._call("/_lab/state", kw)

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self._call("/_lab/stats")
        return result

    def reset(self) -> None:
        self._call("/_lab/reset", {})

    def clear_stats(self) -> None:
        self._call("/_lab/clear-stats", {})


class SushyProcess(_Proc):
    """The real ``sushy-emulator`` (fake driver, HTTP Basic via a bcrypt htpasswd) on loopback."""

    def __init__(self, workdir: Path, systems: list[dict[str, Any]], *, user: str, password: str,
                 port: int | None = None) -> None:
        import bcrypt

        self.port = port or free_port(18000, 18049)
        self.url = f"http://127.0.0.1:{self.port}"
        htpasswd = workdir / f"sushy-{self.port}.htpasswd"
        htpasswd.write_text(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
        conf = workdir / f"sushy-{self.port}.conf"
        conf.write_text(
            f"SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n"
            f"SUSHY_EMULATOR_LISTEN_PORT = {self.port}\n"
            f"SUSHY_EMULATOR_FAKE_DRIVER = True\n"
            f"SUSHY_EMULATOR_STATE_DIR = {str(workdir / f'sushy-state-{self.port}')!r}\n"
            f"SUSHY_EMULATOR_AUTH_FILE = {str(htpasswd)!r}\n"
            f"SUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}\n")
        self.log = workdir / f"sushy-{self.port}.log"
        exe = Path(sys.executable).with_name("sushy-emulator")
        cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "sushy_tools.emulator.main"]
        with open(self.log, "wb") as logf:
            self.proc = subprocess.Popen([*cmd, "--config", str(conf)], stdout=logf, stderr=subprocess.STDOUT)
        try:
            wait_http(self.url + "/redfish/v1/", 30, self.proc)
        except Exception:
            self.stop()
            raise


@contextlib.contextmanager
def http_file_server(directory: Path, port: int | None = None) -> Iterator[str]:
    """A loopback HTTP server for ``directory`` (stand-in for bootsvc's own HTTP in tests)."""
    import functools
    import http.server

    port = port or free_port(18090, 18099)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", port), functools.partial(Quiet, directory=str(directory)))
    t = threading.Thread(target=srv.serve_forever, daemon=True, name="bfbmc-http")
    t.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser("bfbmc", description="BlueField-3 BMC emulator (loopback only)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=18050)
    p.add_argument("--state-dir", default=None)
    p.add_argument("--power-delay", type=float, default=None, help="seconds per power transition")
    p.add_argument("--mode", default="DpuMode", choices=["DpuMode", "NicMode"])
    p.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate")
    p.add_argument("--tls-key", help="... and this PEM key")
    p.add_argument("--capture", type=Path, default=None, help="BF3 BMC capture folder (default: "
                   "../shared/redfish-captures/nvidia-bf3-bmc-24.10 or $BOOTSVC_BF3_CAPTURE)")
    a = p.parse_args(argv)
    bmc = BfBmc(user=os.environ.get("BFBMC_USER", "root"),
                password=os.environ.get("BFBMC_PASSWORD", "bfbmc-lab"), state_dir=a.state_dir, mode=a.mode,
                capture=a.capture)
    bmc.faults.power_delay = a.power_delay
    srv = serve(bmc, a.host, a.port, (a.tls_cert, a.tls_key) if a.tls_cert and a.tls_key else None)
    print(f"bfbmc listening on {'https' if a.tls_cert else 'http'}://{a.host}:{a.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""BlueField-3 DPU BMC emulator on top of sushy-tools (lab and test code; bootsvc runtime never imports it).

Owns: a WSGI app that wraps sushy-tools' own Flask app (``sushy_tools.emulator.main.app``, fake driver,
one system with id ``Bluefield``) and adds what an NVIDIA BF3 BMC (OpenBMC) has and sushy lacks
(domain brief §4.5-§4.7):

- ``SessionService`` with session counting (tests assert no session is left open) and HTTP Basic;
- ``/redfish/v1/Systems/Bluefield`` (power state from sushy's fake driver, Boot from our state, Nvidia
  identity, ``@Redfish.Settings``) and ``/Systems/Bluefield/Settings`` (pending Boot, applied at the
  next reset, kept afterwards: "persists until reset or next BFB update");
- ``/Systems/Bluefield/Oem/Nvidia`` (``Mode`` DpuMode/NicMode, ``Mode.Set`` pending until reset);
- ``/Managers/Bluefield_BMC`` and its ``Oem/Nvidia`` ``BmcRShim.BmcRShimEnabled`` (PATCH, ETag);
- ``UpdateService.SimpleUpdate`` for ``FirmwareInventory/DPU_OS`` that really downloads ``ImageURI``
  over HTTP (loopback hosts only), checks Content-Length and, if configured, size/sha256, and runs a
  ``TaskService`` task whose ``PercentComplete`` follows the transfer;
- fault knobs (``POST /_lab/faults``): 401 for everything, 405 on session login, 412 on the next N
  PATCHes, 428 without If-Match, 500 on path globs, slow answers on path globs, dropping the TCP connection on a reset
  (with or without carrying the reset out), ignoring boot overrides, and the power delay;
- ``GET /_lab/stats``: open/created/deleted sessions, request counts, max concurrent requests, resets.

Emulator assumptions that are not confirmed on real hardware are marked [verify]. Listens on loopback
only (refuses anything else). Run: ``python -m bootsvc.lab.bfbmc --port 18050`` with BFBMC_USER /
BFBMC_PASSWORD in the environment (defaults root / bfbmc-lab).
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
from werkzeug.exceptions import MethodNotAllowed, NotFound

SYSTEM = "/redfish/v1/Systems/Bluefield"
MANAGER = "/redfish/v1/Managers/Bluefield_BMC"
SESSIONS = "/redfish/v1/SessionService/Sessions"
DPU_OS_TARGET = "redfish/v1/UpdateService/FirmwareInventory/DPU_OS"
RESET_TYPES = ["On", "ForceOff", "GracefulShutdown", "GracefulRestart", "ForceRestart", "PowerCycle"]
BOOT_TARGETS = ["None", "Pxe", "Hdd", "UefiHttp", "UefiShell", "UefiTarget", "UefiBootNext"]
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


class BfBmc:
    """The emulator state and its WSGI entry point (one per process: sushy's app is a singleton)."""

    def __init__(self, *, user: str = "root", password: str = "bfbmc-lab", state_dir: str | None = None,
                 mode: str = "DpuMode", power_state: str = "On", dpu_os_version: str = "DOCA_2.9.0_BSP_4.9.0") -> None:
        from sushy_tools.emulator import main as sushy_main

        self.user, self.password = user, password
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="bfbmc-")
        self.sushy = sushy_main.app
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
        self._initial = {"mode": mode, "power_state": power_state, "dpu_os_version": dpu_os_version}
        self.tasks: dict[str, dict[str, Any]] = {}
        self.task_ids = itertools.count(1)
        self.reset_state()
        self.app = self._build()
        self.sushy_client = self.sushy.test_client()

    def reset_state(self) -> None:
        """Back to the initial state (faults cleared except power_delay, counters zeroed)."""
        with self.lock:
            default_boot = {"BootSourceOverrideEnabled": "Disabled", "BootSourceOverrideTarget": "None",
                            "BootSourceOverrideMode": "UEFI"}
            self.faults = Faults(power_delay=self.faults.power_delay)
            self.live_boot: dict[str, Any] = dict(default_boot)
            self.settings_boot: dict[str, Any] = dict(default_boot)
            self.mode = self._initial["mode"]
            self.pending_mode: str | None = None
            self.rshim = False
            self.firmware: dict[str, dict[str, Any]] = {
                "BMC_Firmware": {"Version": "BF-24.10-5", "Updateable": True},
                "DPU_NIC": {"Version": "32.43.1014", "Updateable": False},
                "DPU_OS": {"Version": self._initial["dpu_os_version"], "Updateable": True},
                "DPU_BSP": {"Version": "4.9.0.13521", "Updateable": False},
                "DPU_UEFI": {"Version": "4.9.0-43-g4cb7e1b", "Updateable": False},
            }
            self.tasks = {k: v for k, v in self.tasks.items() if v["TaskState"] in ("New", "Running")}
            self.requests.clear()
            self.created = self.deleted = 0
            self.max_inflight = 0
            self.resets.clear()
            self.patches.clear()
            self.updates.clear()
            self.sushy.systems._update("Bluefield", power_state=self._initial["power_state"], pending_power=None)

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
            adapter = self.app.url_map.bind_to_environ(environ)
            try:
                adapter.match()
            except (NotFound, MethodNotAllowed):
                out: Iterable[bytes] = self.sushy(environ, start_response)  # the rest: sushy-tools as is
                return out
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

    def _sushy_get(self, path: str) -> dict[str, Any]:
        r = self.sushy_client.get(path)
        data: dict[str, Any] = r.get_json() or {}
        return data

    def _set_power(self, reset_type: str) -> None:
        sushy_type = "ForceRestart" if reset_type == "PowerCycle" else reset_type
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
                # The DPU boots: pending settings apply now and stay (override persists, brief §4.7).
                self.live_boot = dict(self.settings_boot)
                if self.pending_mode:
                    self.mode, self.pending_mode = self.pending_mode, None

    def _system_doc(self) -> dict[str, Any]:
        doc = self._sushy_get(SYSTEM)
        with self.lock:
            doc.update({
                "@odata.id": SYSTEM, "Id": "Bluefield", "Name": "Bluefield", "Manufacturer": "Nvidia",
                "Model": "BlueField-3 DPU", "SerialNumber": "MT2334XZ0000",  # [verify] real Model string
                "Boot": {**self.live_boot,
                         "BootSourceOverrideTarget@Redfish.AllowableValues": BOOT_TARGETS},
                "@Redfish.Settings": {"@odata.type": "#Settings.v1_3_5.Settings",
                                      "SettingsObject": {"@odata.id": SYSTEM + "/Settings"}},
                "Links": {"ManagedBy": [{"@odata.id": MANAGER}], "Chassis": doc.get("Links", {}).get("Chassis", [])},
                "Oem": {"Nvidia": {"@odata.id": SYSTEM + "/Oem/Nvidia"}},
                "Actions": {"#ComputerSystem.Reset": {
                    "target": SYSTEM + "/Actions/ComputerSystem.Reset",
                    "ResetType@Redfish.AllowableValues": RESET_TYPES}},
            })
        return doc

    def _task_doc(self, tid: str) -> dict[str, Any]:
        with self.lock:
            t = dict(self.tasks[tid])
        return {"@odata.id": f"/redfish/v1/TaskService/Tasks/{tid}", "@odata.type": "#Task.v1_4_3.Task",
                "Id": tid, "Name": f"Task {tid}", "TaskState": t["TaskState"], "TaskStatus": t["TaskStatus"],
                "PercentComplete": t["PercentComplete"], "StartTime": t["StartTime"],
                "Messages": [{"MessageId": "TaskEvent.1.0.TaskProgressChanged", "Message": m}
                             for m in t["Messages"]],
                "Payload": {"TargetUri": "/redfish/v1/UpdateService/Actions/UpdateService.SimpleUpdate",
                            "HttpOperation": "POST"}}

    def _download(self, tid: str, uri: str, version: str) -> None:
        """The BMC pulls the image itself (brief §4.6); progress is the fraction of bytes received."""
        def upd(**kw: Any) -> None:
            with self.lock:
                t = self.tasks[tid]
                msg = kw.pop("message", None)
                t.update(kw)
                if msg:
                    t["Messages"].append(msg)

        h = hashlib.sha256()
        got = 0
        try:
            with urllib.request.urlopen(uri, timeout=10) as r:
                total = int(r.headers.get("Content-Length") or 0)
                upd(TaskState="Running", message=f"Transfer of {uri} started ({total} bytes)")
                last = -1
                while True:
                    chunk = r.read(64 * 1024)
                    if not chunk:
                        break
                    h.update(chunk)
                    got += len(chunk)
                    pct = min(99, got * 100 // total) if total else 0
                    if pct != last:
                        upd(PercentComplete=pct, message=f"Transfer is {pct}%" if pct // 10 != last // 10 else None)
                        last = pct
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
            self.firmware["DPU_OS"].update(Version=version, Oem={"Nvidia": {"Sha256": h.hexdigest(), "Size": got}})
        upd(TaskState="Completed", TaskStatus="OK", PercentComplete=100,
            message=f"Task completed: {got} bytes, sha256 {h.hexdigest()}")

    # -- routes -----------------------------------------------------------------------------------
    def _build(self) -> flask.Flask:
        app = flask.Flask("bfbmc")
        app.url_map.strict_slashes = False

        @app.route("/redfish/v1/", methods=["GET"])
        def root() -> flask.Response:
            doc = self._sushy_get("/redfish/v1/")
            doc.update({"Vendor": "Nvidia", "Product": "BlueField-3 DPU BMC", "RedfishVersion": "1.17.0",
                        "SessionService": {"@odata.id": "/redfish/v1/SessionService"},
                        "TaskService": {"@odata.id": "/redfish/v1/TaskService"},
                        "UpdateService": {"@odata.id": "/redfish/v1/UpdateService"},
                        "Links": {"Sessions": {"@odata.id": SESSIONS}}})
            return _json(doc)

        @app.route("/redfish/v1/SessionService", methods=["GET"])
        def session_service() -> flask.Response:
            return _json({"@odata.id": "/redfish/v1/SessionService", "ServiceEnabled": True,
                          "SessionTimeout": 1800, "Sessions": {"@odata.id": SESSIONS}})

        @app.route(SESSIONS, methods=["GET", "POST"])
        def sessions() -> flask.Response:
            if flask.request.method == "GET":
                with self.lock:
                    ids = [s["id"] for s in self.sessions.values()]
                return _json({"@odata.id": SESSIONS, "Members@odata.count": len(ids),
                              "Members": [{"@odata.id": f"{SESSIONS}/{i}"} for i in ids]})
            if self.faults.no_sessions:
                return _error(405, "Session creation is not supported", "Base.1.8.OperationNotAllowed")
            body = flask.request.get_json(silent=True) or {}
            ok = (not self.faults.auth_401 and secrets.compare_digest(str(body.get("UserName", "")), self.user)
                  and secrets.compare_digest(str(body.get("Password", "")), self.password))
            if not ok:
                return _error(401, "Invalid username or password", "Base.1.8.NoValidSession")
            token = secrets.token_hex(16)
            with self.lock:
                sid = str(next(self.session_ids))
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
                    return _error(404, f"No session {sid}")
                if flask.request.method == "DELETE":
                    del self.sessions[token]
                    self.deleted += 1
                    return flask.Response(status=204)
            return _json({"@odata.id": f"{SESSIONS}/{sid}", "Id": sid, "UserName": self.user})

        @app.route(SYSTEM, methods=["GET", "PATCH"])
        def system() -> flask.Response:
            if flask.request.method == "PATCH":
                body = flask.request.get_json(silent=True) or {}
                if "Boot" in body:
                    # [verify] we model the documented path: boot changes go to /Settings (brief §4.7).
                    return _error(400, "Boot properties are applied through " + SYSTEM + "/Settings",
                                  "Base.1.8.PropertyNotWritable")
                return _error(400, "Nothing writable in this request")
            doc = self._system_doc()
            return _json(doc, headers={"ETag": _etag(doc)})

        @app.route(SYSTEM + "/Settings", methods=["GET", "PATCH"])
        def settings() -> flask.Response:
            with self.lock:
                doc = {"@odata.id": SYSTEM + "/Settings", "Id": "Settings", "Boot": dict(self.settings_boot)}
            if flask.request.method == "GET":
                return _json(doc, headers={"ETag": _etag(doc)})
            bad = self._precondition(doc)
            if bad is not None:
                return bad
            body = flask.request.get_json(silent=True) or {}
            boot = body.get("Boot")
            if not isinstance(boot, dict) or not boot:
                return _error(400, "PATCH needs a Boot object", "Base.1.8.PropertyMissing")
            target = boot.get("BootSourceOverrideTarget")
            if target is not None and target not in BOOT_TARGETS:
                return _error(400, f"BootSourceOverrideTarget {target} not allowed", "Base.1.8.PropertyValueNotInList")
            if boot.get("BootSourceOverrideEnabled") not in (None, "Disabled", "Once", "Continuous"):
                return _error(400, "bad BootSourceOverrideEnabled", "Base.1.8.PropertyValueNotInList")
            with self.lock:
                self.patches.append((SYSTEM + "/Settings", body))
                if not self.faults.ignore_boot_override:
                    self.settings_boot.update({k: v for k, v in boot.items() if k in (
                        "BootSourceOverrideEnabled", "BootSourceOverrideTarget", "BootSourceOverrideMode",
                        "HttpBootUri")})
            return flask.Response(status=204)

        @app.route(SYSTEM + "/Actions/ComputerSystem.Reset", methods=["POST"])
        def reset() -> flask.Response:
            rtype = (flask.request.get_json(silent=True) or {}).get("ResetType")
            if rtype not in RESET_TYPES:
                return _error(400, f"ResetType {rtype} not supported", "Base.1.8.ActionParameterNotSupported")
            if self.faults.drop_on_reset:
                if self.faults.drop_applies:
                    self._set_power(rtype)
                else:
                    with self.lock:
                        self.resets.append(f"dropped:{rtype}")
                sock = flask.request.environ.get("werkzeug.socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                return flask.Response(status=204)
            self._set_power(rtype)
            return flask.Response(status=204)

        @app.route(SYSTEM + "/Oem/Nvidia", methods=["GET"])
        def system_oem() -> flask.Response:
            with self.lock:
                return _json({"@odata.id": SYSTEM + "/Oem/Nvidia", "Mode": self.mode,
                              "HostRshim": "Enabled",
                              "Actions": {"#Mode.Set": {"target": SYSTEM + "/Oem/Nvidia/Actions/Mode.Set"}}})

        @app.route(SYSTEM + "/Oem/Nvidia/Actions/Mode.Set", methods=["POST"])
        def mode_set() -> flask.Response:
            mode = (flask.request.get_json(silent=True) or {}).get("Mode")
            if mode not in ("DpuMode", "NicMode"):
                return _error(400, f"Mode {mode} not supported", "Base.1.8.ActionParameterNotSupported")
            with self.lock:
                self.pending_mode = mode  # takes effect after the next reset (brief §4.5)
            return flask.Response(status=204)

        @app.route("/redfish/v1/Managers", methods=["GET"])
        def managers() -> flask.Response:
            return _json({"@odata.id": "/redfish/v1/Managers", "Members@odata.count": 1,
                          "Members": [{"@odata.id": MANAGER}]})

        @app.route(MANAGER, methods=["GET"])
        def manager() -> flask.Response:
            with self.lock:
                fw = self.firmware["BMC_Firmware"]["Version"]
            return _json({"@odata.id": MANAGER, "Id": "Bluefield_BMC", "Name": "OpenBmc Manager",
                          "ManagerType": "BMC", "FirmwareVersion": fw, "Model": "OpenBmc",
                          "Oem": {"Nvidia": {"@odata.id": MANAGER + "/Oem/Nvidia"}},
                          "Links": {"ManagerForServers": [{"@odata.id": SYSTEM}]}})

        @app.route(MANAGER + "/Oem/Nvidia", methods=["GET", "PATCH"])
        def manager_oem() -> flask.Response:
            with self.lock:
                doc = {"@odata.id": MANAGER + "/Oem/Nvidia", "BmcRShim": {"BmcRShimEnabled": self.rshim}}
            if flask.request.method == "GET":
                return _json(doc, headers={"ETag": _etag(doc)})
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

        @app.route("/redfish/v1/UpdateService", methods=["GET"])
        def update_service() -> flask.Response:
            return _json({"@odata.id": "/redfish/v1/UpdateService", "Id": "UpdateService", "ServiceEnabled": True,
                          "MultipartHttpPushUri": "/redfish/v1/UpdateService/update-multipart",
                          "FirmwareInventory": {"@odata.id": "/redfish/v1/UpdateService/FirmwareInventory"},
                          "Actions": {"#UpdateService.SimpleUpdate": {
                              "target": "/redfish/v1/UpdateService/Actions/UpdateService.SimpleUpdate",
                              "TransferProtocol@Redfish.AllowableValues": ["HTTP", "HTTPS", "SCP"]}}})

        @app.route("/redfish/v1/UpdateService/FirmwareInventory", methods=["GET"])
        def inventory() -> flask.Response:
            return _json({"@odata.id": "/redfish/v1/UpdateService/FirmwareInventory",
                          "Members@odata.count": len(self.firmware),
                          "Members": [{"@odata.id": f"/redfish/v1/UpdateService/FirmwareInventory/{k}"}
                                      for k in self.firmware]})

        @app.route("/redfish/v1/UpdateService/FirmwareInventory/<fid>", methods=["GET"])
        def inventory_item(fid: str) -> flask.Response:
            with self.lock:
                item = copy.deepcopy(self.firmware.get(fid))
            if item is None:
                return _error(404, f"No firmware {fid}", "Base.1.8.ResourceMissingAtURI")
            return _json({"@odata.id": f"/redfish/v1/UpdateService/FirmwareInventory/{fid}", "Id": fid, **item})

        @app.route("/redfish/v1/UpdateService/Actions/UpdateService.SimpleUpdate", methods=["POST"])
        def simple_update() -> flask.Response:
            body = flask.request.get_json(silent=True) or {}
            targets = body.get("Targets")
            proto = str(body.get("TransferProtocol") or "HTTP").upper()
            uri = str(body.get("ImageURI") or "")
            if not isinstance(targets, list) or len(targets) != 1:
                return _error(400, "Exactly one target per request", "Base.1.8.PropertyValueIncorrect")
            if str(targets[0]).lstrip("/") != DPU_OS_TARGET:
                return _error(400, f"Target {targets[0]} not updatable through SimpleUpdate",
                              "Base.1.8.PropertyValueNotInList")
            if proto not in ("HTTP", "HTTPS"):
                return _error(400, f"TransferProtocol {proto} not emulated", "Base.1.8.PropertyValueNotInList")
            if "://" not in uri:  # NVIDIA's design note: scheme implied by TransferProtocol (brief §4.6)
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
                if any(t["TaskState"] in ("New", "Running") for t in self.tasks.values()):
                    return _error(409, "Another update is in progress", "Base.1.8.ResourceInUse")
                tid = str(next(self.task_ids))
                self.tasks[tid] = {"TaskState": "New", "TaskStatus": "OK", "PercentComplete": 0,
                                   "StartTime": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                                   "Messages": ["Task created"]}
                self.updates.append(dict(body))
            version = Path(urlsplit(uri).path).name.removesuffix(".bfb") or "unknown"
            threading.Thread(target=self._download, args=(tid, uri, version), daemon=True,
                             name=f"bfbmc-dl-{tid}").start()
            loc = f"/redfish/v1/TaskService/Tasks/{tid}"
            return _json(self._task_doc(tid), 202, {"Location": loc})

        @app.route("/redfish/v1/TaskService", methods=["GET"])
        def task_service() -> flask.Response:
            return _json({"@odata.id": "/redfish/v1/TaskService", "ServiceEnabled": True,
                          "Tasks": {"@odata.id": "/redfish/v1/TaskService/Tasks"}})

        @app.route("/redfish/v1/TaskService/Tasks", methods=["GET"])
        def tasks() -> flask.Response:
            with self.lock:
                ids = list(self.tasks)
            return _json({"@odata.id": "/redfish/v1/TaskService/Tasks", "Members@odata.count": len(ids),
                          "Members": [{"@odata.id": f"/redfish/v1/TaskService/Tasks/{i}"} for i in ids]})

        @app.route("/redfish/v1/TaskService/Tasks/<tid>", methods=["GET"])
        def task(tid: str) -> flask.Response:
            if tid not in self.tasks:
                return _error(404, f"No task {tid}", "Base.1.8.ResourceMissingAtURI")
            return _json(self._task_doc(tid))

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
                if "power_state" in body:
                    self.sushy.systems._update("Bluefield", power_state=body["power_state"], pending_power=None)
                if "boot" in body:
                    self.live_boot.update(body["boot"])
                    self.settings_boot.update(body["boot"])
            return _json({"ok": True})

        @app.route("/_lab/stats", methods=["GET"])
        def lab_stats() -> flask.Response:
            with self.lock:
                return _json({
                    "sessions_open": len(self.sessions), "sessions_created": self.created,
                    "sessions_deleted": self.deleted, "requests": dict(self.requests),
                    "max_inflight": self.max_inflight, "resets": list(self.resets),
                    "patches": list(self.patches), "updates": list(self.updates),
                    "live_boot": dict(self.live_boot), "settings_boot": dict(self.settings_boot),
                    "mode": self.mode, "pending_mode": self.pending_mode, "rshim": self.rshim,
                    "firmware": copy.deepcopy(self.firmware),
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
            return _json({"ok": True})

        return app


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
    a = p.parse_args(argv)
    bmc = BfBmc(user=os.environ.get("BFBMC_USER", "root"),
                password=os.environ.get("BFBMC_PASSWORD", "bfbmc-lab"), state_dir=a.state_dir, mode=a.mode)
    bmc.faults.power_delay = a.power_delay
    srv = serve(bmc, a.host, a.port, (a.tls_cert, a.tls_key) if a.tls_cert and a.tls_key else None)
    print(f"bfbmc listening on {'https' if a.tls_cert else 'http'}://{a.host}:{a.port}", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        srv.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())

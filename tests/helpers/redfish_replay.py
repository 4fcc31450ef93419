"""Replay a real BMC capture (DMTF Redfish Mockup Creator tree) over HTTP on 127.0.0.1, for tests.

Owns: a small WSGI server over one folder of ``../shared/redfish-captures`` (never copied into the
repository): GET returns the captured file; PATCH merges into an in-memory copy; POST to a session
collection logs in (X-Auth-Token + Location), DELETE logs out; POST to an action records the call and
answers as the vendor documents it (ComputerSystem.Reset 204 and PowerState follows; BlueField
SimpleUpdate 202 + a Task whose PercentComplete steps 0/20/50/80/100, "Transfer is x%",
bluefield-real.md §3.6; HostRshim.Set / Mode.Set update ``Oem/Nvidia``). Every request is recorded
(method, path, the headers that matter, JSON body) so tests assert exactly what the driver sent.

Vendor behaviour the captures show or the vendors document, switchable per test:
- ETags: HPE iLO answers weak ``W/"..."`` (capture hpe-ilo5-dl385 ``@odata.etag``);
  ``refuse_strong_etag`` makes the server answer 412 to the strong form (the fallback path).
- ``hpe_refuses_none``: a PATCH setting BootSourceOverrideTarget "None" answers 400 [verify].
- ``busy_updates``: the next N SimpleUpdates answer 400 "An update is in progress" (dpu-update
  ``_update_in_progress_err_handler``).
- ``expire_sessions()``: every current token stops working (401), like SessionTimeout.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server
from werkzeug.wrappers import Request, Response

CAPTURES = Path(os.environ.get("BOOTSVC_REDFISH_CAPTURES",
                               Path(__file__).resolve().parents[2].parent / "shared" / "redfish-captures"))
VENDORS = ("nvidia-bf3-bmc-24.10", "dell-idrac9-r750", "hpe-ilo5-dl385", "dmtf-public-rackmount1")
KEY_HEADERS = ("If-Match", "Accept-Encoding", "Content-Type", "X-Auth-Token", "Authorization")


def capture_dir(name: str) -> Path:
    return CAPTURES / name


def captures_present() -> bool:
    return all((CAPTURES / v).is_dir() for v in VENDORS)


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]
    body: Any

    def brief(self) -> tuple[str, str, Any]:
        return (self.method, self.path, self.body)


def merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


@dataclass
class Knobs:
    refuse_strong_etag: bool = False
    hpe_refuses_none: bool = False
    busy_updates: int = 0
    task_steps: tuple[int, ...] = (0, 20, 50, 80, 100)
    pxe_reads_back_as: str | None = None  # Supermicro: a UEFI Pxe override reads back as UefiBootNext


@dataclass
class Replay:
    """One capture served on 127.0.0.1:<port>. Use as a context manager."""

    name: str
    user: str = "root"
    password: str = "replay-pass"
    knobs: Knobs = field(default_factory=Knobs)

    def __post_init__(self) -> None:
        self.root_dir = capture_dir(self.name)
        if (self.root_dir / "redfish" / "v1").is_dir():
            self.root_dir = self.root_dir / "redfish" / "v1"
        self.docs: dict[str, dict[str, Any]] = {}
        self.calls: list[Call] = []
        self.tokens: dict[str, str] = {}  # token -> session path
        self.tasks: dict[str, int] = {}  # task path -> GET count
        self.lock = threading.RLock()
        self.weak = self.name.startswith("hpe")
        self._srv: BaseWSGIServer | None = None

    # -- tree -----------------------------------------------------------------------------------
    @staticmethod
    def norm(path: str) -> str:
        p = "/" + path.strip("/")
        return p

    def doc(self, path: str) -> dict[str, Any] | None:
        p = self.norm(path)
        if p in self.docs:
            return self.docs[p]
        if not (p == "/redfish/v1" or p.startswith("/redfish/v1/")):
            return None
        rel = p[len("/redfish/v1"):].strip("/")
        f = self.root_dir / rel / "index.json" if rel else self.root_dir / "index.json"
        if ".." in rel or not f.is_file():
            return None
        d = json.loads(f.read_text())
        self.docs[p] = d
        return d

    def etag(self, path: str) -> str:
        d = self.doc(path) or {}
        tag = f'"{abs(hash(json.dumps(d, sort_keys=True))) % (1 << 32):08X}"'
        return "W/" + tag if self.weak else tag

    # -- server ---------------------------------------------------------------------------------
    def __enter__(self) -> Replay:
        self._srv = make_server("127.0.0.1", 0, self.wsgi, threaded=True)
        threading.Thread(target=self._srv.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()

    @property
    def url(self) -> str:
        assert self._srv is not None
        return f"http://127.0.0.1:{self._srv.server_port}"

    def expire_sessions(self) -> None:
        with self.lock:
            self.tokens.clear()

    def sent(self, *methods: str) -> list[tuple[str, str, Any]]:
        """(method, path, body) of recorded non-session calls, in order (GETs only if asked)."""
        want = set(methods or ("PATCH", "POST", "DELETE"))
        return [c.brief() for c in self.calls if c.method in want and "/SessionService/Sessions" not in c.path]

    # -- WSGI -----------------------------------------------------------------------------------
    def wsgi(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        req = Request(environ)
        with self.lock:
            resp = self.handle(req)
        return resp(environ, start_response)

    def _json(self, doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return Response(json.dumps(doc), status=status, mimetype="application/json", headers=headers or {})

    def _error(self, status: int, msg: str) -> Response:
        return self._json({"error": {"code": "Base.1.8.GeneralError", "message": msg,
                                     "@Message.ExtendedInfo": [{"Message": msg}]}}, status)

    def _authorized(self, req: Request) -> bool:
        tok = req.headers.get("X-Auth-Token")
        if tok:
            return tok in self.tokens
        auth = req.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            want = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
            return auth[6:] == want
        return False

    def handle(self, req: Request) -> Response:
        path = self.norm(req.path)
        body: Any = None
        if req.data:
            try:
                body = json.loads(req.data)
            except ValueError:
                return self._error(400, "malformed JSON")
        self.calls.append(Call(req.method, path, {k: v for k in KEY_HEADERS if (v := req.headers.get(k))}, body))
        sessions = "/redfish/v1/SessionService/Sessions"
        if req.method == "POST" and path == sessions:
            if not isinstance(body, dict) or (body.get("UserName"), body.get("Password")) != (self.user, self.password):
                return self._error(401, "bad credentials")
            tok = secrets.token_hex(16)
            sid = f"{sessions}/{tok[:10]}"
            self.tokens[tok] = sid
            return self._json({"@odata.id": sid, "Id": tok[:10], "UserName": self.user}, 201,
                              {"X-Auth-Token": tok, "Location": sid})
        if req.method == "DELETE" and path.startswith(sessions + "/"):
            for t, s in list(self.tokens.items()):
                if s == path:
                    del self.tokens[t]
            return Response(status=204)
        if path != "/redfish/v1" and not self._authorized(req):
            return self._error(401, "authentication required")
        if req.method == "GET":
            if path in self.tasks:
                return self._json(self._task_tick(path))
            d = self.doc(path)
            if d is None:
                return self._error(404, f"{path} not found")
            return self._json(d, headers={"ETag": self.etag(path)})
        if req.method == "PATCH":
            return self._patch(req, path, body)
        if req.method == "POST":
            return self._post(path, body)
        return self._error(405, "method not allowed")

    def _patch(self, req: Request, path: str, body: Any) -> Response:
        d = self.doc(path)
        if d is None:
            return self._error(404, f"{path} not found")
        if not isinstance(body, dict):
            return self._error(400, "PATCH body must be an object")
        im = req.headers.get("If-Match")
        if im is not None and im != "*":
            cur = self.etag(path)
            ok = im == cur or (self.weak and im == cur[2:] and not self.knobs.refuse_strong_etag)
            if not ok:
                return self._error(412, "ETag does not match")
        boot = body.get("Boot") if isinstance(body.get("Boot"), dict) else {}
        if self.knobs.hpe_refuses_none and boot.get("BootSourceOverrideTarget") == "None":
            return self._error(400, "The value None for the property BootSourceOverrideTarget is not valid")
        merge(d, body)
        if self.knobs.pxe_reads_back_as and (d.get("Boot") or {}).get("BootSourceOverrideTarget") == "Pxe":
            d["Boot"]["BootSourceOverrideTarget"] = self.knobs.pxe_reads_back_as
        return Response(status=204)

    def _post(self, path: str, body: Any) -> Response:
        b = body if isinstance(body, dict) else {}
        if path.endswith("/Actions/ComputerSystem.Reset"):
            sysdoc = self.doc(path.rsplit("/Actions/", 1)[0])
            rt = b.get("ResetType")
            if sysdoc is None or not isinstance(rt, str):
                return self._error(400, "ResetType missing")
            if rt in ("On", "ForceOn", "PushPowerButton", "ForceRestart", "GracefulRestart", "PowerCycle"):
                sysdoc["PowerState"] = "On"
            elif rt in ("ForceOff", "GracefulShutdown"):
                sysdoc["PowerState"] = "Off"
            return Response(status=204)
        if path == "/redfish/v1/UpdateService/Actions/UpdateService.SimpleUpdate":
            if self.knobs.busy_updates > 0:
                self.knobs.busy_updates -= 1
                return self._error(400, "An update is in progress. Please wait.")  # dpu-update's matcher
            tid = f"/redfish/v1/TaskService/Tasks/{len(self.tasks) + 1}"
            self.tasks[tid] = 0
            return self._json({"@odata.id": tid, "@odata.type": "#Task.v1_4_3.Task", "Id": tid.rsplit("/", 1)[-1],
                               "TaskState": "Running", "TaskStatus": "OK"}, 202, {"Location": tid + "/Monitor"})
        if path.endswith("/Oem/Nvidia/Actions/HostRshim.Set"):
            oem = self.doc(path.split("/Actions/")[0])
            if oem is not None:
                oem["HostRshim"] = b.get("HostRshim")
            return Response(status=204)
        if path.endswith("/Oem/Nvidia/Actions/Mode.Set") or path.endswith("SOC.ForceReset"):
            return Response(status=204)
        return self._error(404, f"no action {path}")

    def _task_tick(self, path: str) -> dict[str, Any]:
        n = self.tasks[path]
        self.tasks[path] = n + 1
        steps = self.knobs.task_steps
        pct = steps[min(n, len(steps) - 1)]
        done = pct >= 100
        return {"@odata.id": path, "@odata.type": "#Task.v1_4_3.Task", "Id": path.rsplit("/", 1)[-1],
                "TaskState": "Completed" if done else "Running", "TaskStatus": "OK", "PercentComplete": pct,
                "Messages": [{"Message": f"Transfer is {pct}%"}] if not done else
                [{"Message": "Task completed"}]}

    def reads_of(self, path: str) -> Iterator[Call]:
        return (c for c in self.calls if c.method == "GET" and c.path == path)

"""HTTP client for the agent API (``docs/agent-api.md``), stdlib ``urllib`` only.

Owns: request/response shapes on the agent side, the auth headers, ETag handling, taking the new
secret a check-in answer may carry (the first check-in after an install trades bf.cfg's secret for one
the boot network never saw; ``on_new_secret`` must store it durably before it is used), and mapping
every transport failure to :class:`Unreachable` (retry later) vs :class:`ApiError` (the server said no),
and keeping the check-in interval the last answer advised (``advised_poll``; ``bootsvc.agent.main``
decides how far to follow it).
"""

from __future__ import annotations

import json
import logging
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bootsvc.agent import AGENT_VERSION

log = logging.getLogger("bootsvc.agent")
_SECRET = re.compile(r"^[0-9a-f]{32,128}$")


class ApiError(RuntimeError):
    """The server answered with an error status (4xx/5xx)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


class Unreachable(RuntimeError):
    """No answer (connection refused, timeout, DNS...): keep the applied policy and retry."""


@dataclass(frozen=True)
class Fetched:
    status: int  # 200 or 304
    etag: str | None
    doc: dict[str, Any] | None


class AgentApi:
    def __init__(self, base_url: str, node: str, secret: str, *, timeout: float = 10.0,
                 on_new_secret: Callable[[str], bool] | None = None) -> None:
        self.base = base_url.rstrip("/") + "/api/v1/agent"
        self.node = node
        self.secret = secret
        self.timeout = timeout
        self.on_new_secret = on_new_secret
        # seconds until the next check-in, as the last check-in answer advised (None: no advice - a
        # server older than the field, or a value that is not a positive finite number)
        self.advised_poll: float | None = None

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None,
                 headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        h = {"Authorization": f"Bearer {self.secret}", "X-Bootsvc-Node": self.node,
             "Accept": "application/json", "User-Agent": f"bootsvc-agent/{AGENT_VERSION}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            h["Content-Type"] = "application/json"
        h.update(headers or {})
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, dict(resp.headers.items()), resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 304:
                return 304, dict(e.headers.items()), b""
            raw = e.read()[:500]
            try:
                detail = str(json.loads(raw).get("error", raw.decode(errors="replace")))
            except (ValueError, AttributeError):
                detail = raw.decode(errors="replace")
            raise ApiError(e.code, detail) from None
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            raise Unreachable(str(e)) from None

    @staticmethod
    def _json(raw: bytes) -> dict[str, Any]:
        try:
            doc = json.loads(raw)
        except ValueError as e:
            raise ApiError(200, f"response is not JSON: {e}") from None
        if not isinstance(doc, dict):
            raise ApiError(200, "response is not a JSON object")
        return doc

    def checkin(self, health: dict[str, Any]) -> str | None:
        """Returns the policy version bootsvc wants on this DPU (None if it has none yet)."""
        _, _, raw = self._request("POST", "/checkin", {"node": self.node, "agent_version": AGENT_VERSION,
                                                        "health": health})
        doc = self._json(raw)
        new = doc.get("secret")
        if isinstance(new, str) and new != self.secret:
            if not _SECRET.match(new):
                log.error("check-in answer carries a malformed secret; keeping the current one")
            elif self.on_new_secret is None or self.on_new_secret(new):
                # stored (or nobody to store it): use it from now on. Not stored: keep the old one - the
                # server re-sends the new secret to the old one until the new one has been used.
                self.secret = new
                log.info("node secret rotated at check-in")
        p = doc.get("poll_seconds")
        ok = isinstance(p, int | float) and not isinstance(p, bool) and 0 < p < float("inf")
        self.advised_poll = float(p) if ok and isinstance(p, int | float) else None
        v = doc.get("policy_version")
        return None if v is None else str(v)

    def policy(self, etag: str | None = None) -> Fetched:
        headers = {"If-None-Match": f'"{etag}"'} if etag else {}
        status, hdrs, raw = self._request("GET", "/policy", headers=headers)
        tag = next((v for k, v in hdrs.items() if k.lower() == "etag"), None)
        tag = tag.strip('"') if tag else None
        if status == 304:
            return Fetched(304, tag or etag, None)
        return Fetched(status, tag, self._json(raw))

    def report(self, version: str, status: str, error: str | None, health: dict[str, Any]) -> None:
        self._request("POST", "/report", {"node": self.node, "policy_version": version, "status": status,
                                          "error": error, "health": health})

"""The UI's login session: who is asking, from the signed cookie and the ``ui_sessions`` row.

Owns: the session cookie (a random id in a signed, HttpOnly, SameSite=Strict cookie whose key derives
from the site key, so every worker and a restart accept it), the server-side session row (its token,
CSRF token and end: logout, token revocation and expiry end it at once), `current_user` (the token is
re-read on every request), the signed one-shot flash cookie, the login redirect's `safe_next`, and the
UI's access policy (`VIEW_ROLES`, `ACT_ROLES`, `PUBLIC_ENDPOINTS`, `ACT_ENDPOINTS`, read back into
docs/roles.md by ``bootsvc.web.auth.route_matrix``). The hooks that apply it to each request are the
blueprint's (``bootsvc/web/ui/__init__.py``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import secrets as pysecrets
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, current_app, request, url_for
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import delete, select
from sqlalchemy.orm import Session
from werkzeug.wrappers import Response as WzResponse

from bootsvc import auth_secrets
from bootsvc.models import ApiToken, UiSession
from bootsvc.web import config_of
from bootsvc.web.auth import token_problem

COOKIE = "bootsvc_ui"
LOGIN_COOKIE = "bootsvc_ui_login"
FLASH_COOKIE = "bootsvc_ui_flash"
ACT_ROLES = frozenset({"admin", "tech"})
VIEW_ROLES = frozenset({"admin", "tech", "automation", "viewer"})
PUBLIC_ENDPOINTS = frozenset({"ui.login", "ui.static"})
# What only ACT_ROLES may reach (every other UI route: VIEW_ROLES); read back into docs/roles.md.
ACT_ENDPOINTS = frozenset({("GET", "ui.confirm"), ("POST", "ui.act"), ("POST", "ui.enroll")})


@dataclass(frozen=True)
class UiUser:
    token_id: int
    name: str
    role: str
    csrf: str

    @property
    def can_act(self) -> bool:
        return self.role in ACT_ROLES


def serializer(app: Flask) -> URLSafeTimedSerializer:
    ext: dict[str, Any] = app.extensions.setdefault("bootsvc_ui", {})
    if "ser" not in ext:
        cfg = config_of(app)
        # Derived from the site key so every gunicorn worker (and a restart) accepts the same cookie.
        base = auth_secrets.read_ref(cfg.security.node_key_ref, create=True)
        key = hmac.new(base, b"bootsvc-ui-session-v1", hashlib.sha256).hexdigest()
        ext["ser"] = URLSafeTimedSerializer(key, salt="bootsvc-ui")
    ser: URLSafeTimedSerializer = ext["ser"]
    return ser


def session_seconds() -> int:
    return int(config_of(current_app).security.ui_session_hours * 3600)


def start_session(s: Session, t: ApiToken) -> str:
    """A new server-side session for token ``t``; returns the cookie value (the id is only in the cookie)."""
    sid = pysecrets.token_urlsafe(32)
    now = dt.datetime.now(dt.UTC)
    s.execute(delete(UiSession).where(UiSession.expires_at < now))  # past their end: nothing to keep
    s.add(UiSession(session_hash=auth_secrets.hash_token(sid), token_id=t.id, csrf=pysecrets.token_urlsafe(24),
                    created_at=now, expires_at=now + dt.timedelta(seconds=session_seconds())))
    s.commit()
    return serializer(current_app).dumps({"s": sid})


def session_row(s: Session) -> UiSession | None:
    raw = request.cookies.get(COOKIE)
    if not raw:
        return None
    try:
        sid = str(serializer(current_app).loads(raw, max_age=session_seconds())["s"])
    except (BadSignature, KeyError, TypeError, ValueError):
        return None
    return s.scalars(select(UiSession).where(UiSession.session_hash == auth_secrets.hash_token(sid))).first()


def current_user(s: Session) -> UiUser | None:
    row = session_row(s)
    if row is None or row.ended_at is not None or aware(row.expires_at) <= dt.datetime.now(dt.UTC):
        return None
    t = s.get(ApiToken, row.token_id)
    # Re-read the token on every request: a revoked or expired token or a changed role applies at once.
    if t is None or token_problem(t) is not None or t.role not in VIEW_ROLES:
        return None
    return UiUser(t.id, t.name, t.role, row.csrf)


def aware(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t  # SQLite hands back naive UTC


def safe_next(target: str | None) -> str:
    if not target:
        return url_for("ui.racks")
    u = urlsplit(target)
    if u.scheme or u.netloc or not target.startswith("/ui") or target.startswith("//"):
        return url_for("ui.racks")
    return target


def set_cookie(resp: WzResponse, name: str, value: str, max_age: int | None, path: str = "/ui") -> None:
    resp.set_cookie(name, value, max_age=max_age, path=path, httponly=True, samesite="Strict",
                    secure=request.is_secure)


def flash(resp: WzResponse, text: str, kind: str = "ok") -> WzResponse:
    set_cookie(resp, FLASH_COOKIE, serializer(current_app).dumps({"m": text, "k": kind}), 60)
    return resp


def take_flash() -> tuple[str, str] | None:
    raw = request.cookies.get(FLASH_COOKIE)
    if not raw:
        return None
    try:
        d = serializer(current_app).loads(raw, max_age=120)
        return str(d["m"]), str(d["k"])
    except (BadSignature, KeyError, TypeError):
        return None

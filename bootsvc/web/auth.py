"""Authentication for the JSON APIs: bearer API tokens with roles, and per-node secrets.

Owns: ``ApiError`` (every API failure as JSON ``{error, reason, ...}`` with its status), the role
check for ``/api/v1`` and the read routes (``require(role...)``; tokens are looked up by SHA-256 hash
in ``api_tokens``, revoked and expired ones refused), the role sets below (the one source of
docs/roles.md: ``route_matrix`` reads them back from the registered routes), and node-secret
authentication for agents and installers (``Authorization: Bearer <node secret>`` + ``X-Bootsvc-Node:
<name>``, compared in constant time).

Roles (docs/roles.md is generated from the routes, ``make docs``):
``admin`` everything; ``tech`` read, enroll (a new machine may name its tenant), provision/release/
retry, re-provision, maintenance, abort and power; ``automation`` read, enroll, tenant assignment,
provision/release/retry — never power, maintenance, abort or re-provision (they cut a running
machine); ``viewer`` read only (dashboards, monitoring); ``agent`` nothing on the REST API (agents
authenticate with their node secret on the agent API).
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from flask import Flask, Response, current_app, g, jsonify, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from bootsvc import auth_secrets
from bootsvc.models import ApiToken, Node
from bootsvc.operations import OpError
from bootsvc.web import config_of, sessions_of

F = TypeVar("F", bound=Callable[..., Any])

ROLES = ("admin", "tech", "automation", "viewer", "agent")
READ = ("admin", "tech", "automation", "viewer")
ENROLL = ("admin", "tech", "automation")
LIFECYCLE = ("admin", "tech", "automation")  # provision, release, retry: the normal flow
OPERATE = ("admin", "tech")  # power, maintenance, abort, re-provision: hands on a running machine
TENANT = ("admin", "automation")  # move an enrolled node between tenants (its VRF)
ADMIN = ("admin",)


class ApiError(Exception):
    """Raised anywhere in a view; rendered as JSON by ``error_response``."""

    def __init__(self, status: int, error: str, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason, self.extra = status, error, reason, extra


# An operations refusal as HTTP: the code decides the status, never the message text. `failed` is an
# outside system (the BMC) failing: 502 Bad Gateway (RFC 9110 §15.6.3).
HTTP_STATUS: dict[str, int] = {"invalid": 400, "forbidden": 403, "not_found": 404, "conflict": 409, "failed": 502}
_ERROR_NAME = {"invalid": "bad_request"}


def op_error(e: OpError) -> ApiError:
    """The JSON answer for an `operations.OpError`."""
    name = e.kind if e.kind != e.code else _ERROR_NAME.get(e.code, e.code)
    extra = {"fields": [], **e.extra} if e.code == "invalid" else e.extra  # a 400 always lists its fields
    return ApiError(HTTP_STATUS[e.code], name, str(e), **extra)


def op_error_response(e: OpError) -> Response:
    """Error handler for blueprints whose views let OpError through."""
    return error_response(op_error(e))


def error_response(e: ApiError) -> Response:
    resp = jsonify(error=e.error, reason=e.reason, **e.extra)
    resp.status_code = e.status
    if e.status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="bootsvc"'
    return resp


def bearer() -> str | None:
    h = request.headers.get("Authorization", "")
    scheme, _, value = h.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def _utc(t: dt.datetime) -> dt.datetime:
    return t.replace(tzinfo=dt.UTC) if t.tzinfo is None else t  # SQLite hands back naive UTC


def token_problem(row: ApiToken | None, now: dt.datetime | None = None) -> str | None:
    """Why this token row may not be used (None: it may). Shared by the API and the UI login."""
    if row is None or row.revoked:
        return "unknown or revoked API token"
    if row.expires_at is not None and _utc(row.expires_at) <= (now or dt.datetime.now(dt.UTC)):
        return "expired API token: ask an admin for a new one ('bootsvc token create')"
    return None


def find_token(session: Session, value: str) -> ApiToken | None:
    """The usable (known, unrevoked, unexpired) token whose value is ``value``."""
    value = value.strip()
    if not value:
        return None
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == auth_secrets.hash_token(value))).first()
    return row if token_problem(row) is None else None


def token_role(session: Session) -> tuple[str, str]:
    """(token name, role) of the request's bearer token; ApiError 401 if none, unknown, revoked or expired."""
    tok = bearer()
    if tok is None:
        raise ApiError(401, "unauthenticated", "send 'Authorization: Bearer <api token>'")
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == auth_secrets.hash_token(tok))).first()
    why = token_problem(row)
    if why is not None or row is None:
        raise ApiError(401, "unauthenticated", why or "unknown or revoked API token")
    return row.name, row.role


def require(*roles: str) -> Callable[[F], F]:
    """Route decorator: a valid API token whose role is one of ``roles``; sets ``g.actor``/``g.role``."""

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            with sessions_of(current_app)() as s:
                name, role = token_role(s)
            if role not in roles:
                raise ApiError(403, "forbidden", f"role {role!r} may not do this (needs one of: {', '.join(roles)})")
            g.actor, g.role = f"token:{name}", role
            return fn(*a, **kw)

        wrapper.bootsvc_roles = roles  # type: ignore[attr-defined]  # read back by route_matrix
        return cast(F, wrapper)

    return deco


def roles_of(view: Callable[..., Any]) -> tuple[str, ...] | None:
    """The roles ``require`` lets through this view (None: not a token route)."""
    roles = getattr(view, "bootsvc_roles", None)
    return tuple(roles) if roles is not None else None


def node_key() -> bytes:
    return auth_secrets.read_ref(config_of(current_app).security.node_key_ref, create=True)


def node_from_secret(session: Session, *, kinds: tuple[str, ...] = ("dpu", "host")) -> Node:
    """The node whose secret authenticates this request (agent API contract, docs/agent-api.md)."""
    tok = bearer()
    name = request.headers.get("X-Bootsvc-Node", "").strip()
    if tok is None or not name:
        raise ApiError(401, "unauthenticated", "send 'Authorization: Bearer <node secret>' and 'X-Bootsvc-Node'")
    node = session.scalars(select(Node).where(Node.name == name)).first() if len(name) <= 63 else None
    # One answer for an unknown name and a bad secret: a different one would tell a scanner which
    # node names exist.
    if node is None or not auth_secrets.verify_node_secret(node_key(), node.id, node.secret_generation, tok):
        raise ApiError(401, "unauthenticated", "unknown node or bad node secret (re-installed or rotated?)")
    if node.kind not in kinds:
        raise ApiError(403, "forbidden", f"node {node.name} is a {node.kind}; this endpoint is for {'/'.join(kinds)}")
    g.actor = f"node:{node.name}"
    return node


# ------------------------------------------------------------------------------ the role x route matrix
# How the routes outside /api/v1 authenticate, by blueprint (each blueprint's module says why).
AUTH_BY_BLUEPRINT = {
    "boot": "boot plane (the node's leased address, boot token)",
    "agent_api": "node secret (DPU agent)",
    "webhooks": "webhook HMAC signature",
    "bfbpush": "one-time URL token, from the node's BMC address only",
}


@dataclass(frozen=True)
class RouteRoles:
    method: str
    path: str
    auth: str  # "API token", "UI session", a blueprint's scheme from AUTH_BY_BLUEPRINT, or "none"
    roles: tuple[str, ...]  # the roles that pass (API token and UI session routes)


def route_matrix(app: Flask) -> list[RouteRoles]:
    """Every route of ``app`` with who may call it, read from the code: ``require``'s roles on API
    routes, the UI's VIEW_ROLES/ACT_ENDPOINTS, each blueprint's own scheme for the rest."""
    # Local import: bootsvc.web.ui (and its session module) import this module for token checks.
    from bootsvc.web.ui import session as ui

    out: list[RouteRoles] = []
    for rule in app.url_map.iter_rules():
        view = app.view_functions[rule.endpoint]
        blueprint = rule.endpoint.rsplit(".", 1)[0] if "." in rule.endpoint else ""
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            roles = roles_of(view)
            if roles is not None:
                auth = "API token"
            elif blueprint == "ui" and rule.endpoint not in ui.PUBLIC_ENDPOINTS:
                auth = "UI session"
                roles = tuple(r for r in ROLES if r in (
                    ui.ACT_ROLES if (method, rule.endpoint) in ui.ACT_ENDPOINTS else ui.VIEW_ROLES))
            else:
                auth, roles = AUTH_BY_BLUEPRINT.get(blueprint, "none"), ()
            out.append(RouteRoles(method, rule.rule, auth, roles))
    return sorted(out, key=lambda r: (r.path, r.method))


def roles_markdown(app: Flask) -> str:
    """docs/roles.md: the matrix as a table (``make docs``; a unit test fails when it drifts)."""
    lines = ["# Who may call what: roles x routes", "",
             "<!-- generated by `make docs` from bootsvc/web/auth.py route_matrix(); do not edit -->", "",
             "Roles (`bootsvc token create NAME --role ROLE`): **admin** everything; **tech** read, enroll, "
             "provision/release/retry, re-provision, maintenance, abort, power (a machine enrolled by a tech "
             "may name its tenant; moving an enrolled node to another tenant is for automation and admin); "
             "**automation** read, enroll, tenant assignment, provision/release/retry — never power, "
             "maintenance, abort or re-provision; **viewer** read only; **agent** nothing here (DPU agents "
             "use their node secret on the agent API). Tokens expire after `security.token_ttl_days` "
             "(default 90) and end at once with `bootsvc token revoke NAME`, which also ends their UI "
             "sessions.", "",
             "Routes whose auth is not a role (boot plane, agent API, webhook) are listed for completeness; "
             "`none` means no credential at all.", "",
             "| method | route | auth | " + " | ".join(ROLES) + " |",
             "|---|---|---|" + "---|" * len(ROLES)]
    for r in route_matrix(app):
        cells = ["yes" if role in r.roles else "" for role in ROLES]
        lines.append(f"| {r.method} | `{r.path}` | {r.auth} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

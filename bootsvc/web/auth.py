"""Authentication for the JSON APIs: bearer API tokens with roles, and per-node secrets.

Owns: ``ApiError`` (every API failure as JSON ``{error, reason, ...}`` with its status), the role
check for ``/api/v1`` (``require(role...)``; tokens are looked up by SHA-256 hash in ``api_tokens``,
revoked ones refused), and node-secret authentication for agents and installers (``Authorization:
Bearer <node secret>`` + ``X-Bootsvc-Node: <name>``, compared in constant time).

Roles: ``admin`` (everything), ``tech`` (read, node operations, power, enroll), ``automation``
(read, enroll, tenant assignment, provision/release/retry), ``agent`` (nothing on the REST API: agents
authenticate with their node secret on the agent API).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Response, current_app, g, jsonify, request
from sqlalchemy import select
from sqlalchemy.orm import Session

from bootsvc import secrets
from bootsvc.models import ApiToken, Node
from bootsvc.web import config_of, sessions_of

F = TypeVar("F", bound=Callable[..., Any])

READ = ("admin", "tech", "automation")
OPERATE = ("admin", "tech", "automation")
ENROLL = ("admin", "tech", "automation")
ADMIN = ("admin",)


class ApiError(Exception):
    """Raised anywhere in a view; rendered as JSON by ``error_response``."""

    def __init__(self, status: int, error: str, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.status, self.error, self.reason, self.extra = status, error, reason, extra


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


def token_role(session: Session) -> tuple[str, str]:
    """(token name, role) of the request's bearer token; ApiError 401 if none or unknown."""
    tok = bearer()
    if tok is None:
        raise ApiError(401, "unauthenticated", "send 'Authorization: Bearer <api token>'")
    row = session.scalars(select(ApiToken).where(ApiToken.token_hash == secrets.hash_token(tok))).first()
    if row is None or row.revoked:
        raise ApiError(401, "unauthenticated", "unknown or revoked API token")
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

        return cast(F, wrapper)

    return deco


def node_key() -> bytes:
    return secrets.read_ref(config_of(current_app).security.node_key_ref, create=True)


def node_from_secret(session: Session, *, kinds: tuple[str, ...] = ("dpu", "host")) -> Node:
    """The node whose secret authenticates this request (agent API contract, docs/agent-api.md)."""
    tok = bearer()
    name = request.headers.get("X-Bootsvc-Node", "").strip()
    if tok is None or not name:
        raise ApiError(401, "unauthenticated", "send 'Authorization: Bearer <node secret>' and 'X-Bootsvc-Node'")
    node = session.scalars(select(Node).where(Node.name == name)).first()
    if node is None:
        raise ApiError(404, "unknown_node", f"no node named {name[:64]!r}")
    if not secrets.verify_node_secret(node_key(), node.id, node.secret_generation, tok):
        raise ApiError(401, "unauthenticated", "bad node secret (re-installed or rotated?)")
    if node.kind not in kinds:
        raise ApiError(403, "forbidden", f"node {node.name} is a {node.kind}; this endpoint is for {'/'.join(kinds)}")
    g.actor = f"node:{node.name}"
    return node

"""Flask application factory: builds the WSGI app and registers the blueprints.

Owns: wiring config, the session factory and blueprints into one Flask app; which blueprints a
listener gets (its roles, ``Config.http_roles``: the others' routes do not exist there, 404); the
request-body guard every route shares (a body that cannot be read - broken chunked framing, a client
that stopped sending - is a 400/408, and JSON nested deeper than ``MAX_JSON_DEPTH`` is a 400 before
any route parses it: Python's json module recurses once per level and dies past ~1000 of them); and
JSON errors with a reason for every failure (no HTML error pages for API clients, no tracebacks to
clients; a database that cannot be reached, e.g. PostgreSQL restarting, is a 503 with Retry-After that
firmware, installers and agents retry, not a 500). Each blueprint owns its routes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection
from typing import Any, cast

from flask import Flask, Response, abort, jsonify, request
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import ClientDisconnected, HTTPException

from bootsvc.config import HTTP_ROLES, Config
from bootsvc.db import make_engine, session_factory
from bootsvc.web.files import Preconditions

log = logging.getLogger("bootsvc.web")

MAX_BODY = 1 << 20  # no request body we accept is larger than 1 MiB (413 past it)
MAX_JSON_DEPTH = 32  # the deepest document any route takes is 4 levels (agent reports)

# The role each blueprint module serves (docs/operations-listeners.md).
ROLE_OF = {"boot": "boot", "agent_api": "boot", "api": "api", "webhooks": "webhook", "ui": "ui",
           "metrics": "metrics"}
# Blueprints whose hooks every listener needs - the metrics blueprint counts every request and starts
# each worker's metrics publisher, so boot-plane traffic shows in /metrics wherever /metrics is
# served - registered everywhere, their routes answering 404 where the listener lacks the role.
HOOKS_EVERYWHERE = {"metrics"}


class _App(Flask):
    """Flask, with RFC 9110 If-Match handling (bootsvc.web.files.Preconditions) around everything
    ``wsgi_app`` holds - including middleware that blueprints install there, like the boot
    blueprint's script fast path, which answers without Flask's dispatch."""

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        return Preconditions(self.wsgi_app)(environ, start_response)


def create_app(config: Config, sessions: sessionmaker[Session] | None = None,
               roles: Collection[str] | None = None) -> Flask:
    """The app for one listener: ``roles`` (default: all) picks the blueprints it registers."""
    app = _App(__name__)
    app.config["BOOTSVC"] = config
    app.config["SESSIONS"] = sessions or session_factory(make_engine(config.database.url))
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.config["BOOTSVC_ROLES"] = frozenset(HTTP_ROLES if roles is None else roles)
    app.json.sort_keys = False  # type: ignore[attr-defined]

    # Inside the function: health imports this package (config_of, sessions_of), as the blueprints do.
    from bootsvc.web import health

    app.register_blueprint(health.bp)
    if "api" in app.config["BOOTSVC_ROLES"]:
        app.register_blueprint(health.nodes_bp)
    hidden: set[str] = set()
    for role, mod in _optional_blueprints():
        if role in app.config["BOOTSVC_ROLES"]:
            app.register_blueprint(mod)
        elif mod.name in HOOKS_EVERYWHERE:
            app.register_blueprint(mod)
            hidden.add(mod.name)
    if hidden:

        @app.before_request
        def _not_this_listener() -> None:
            if request.blueprint in hidden:
                abort(404)

    app.before_request(_guard_body)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Any:
        if request.path.startswith("/ui") and request.accept_mimetypes.accept_html:
            return e
        resp = jsonify(error=e.name.lower().replace(" ", "_"), reason=e.description or e.name)
        resp.status_code = e.code or 500
        for k, v in e.get_headers():  # e.g. Content-Range on 416 (RFC 9110 §15.5.17), Allow on 405
            if k.lower() not in ("content-type", "content-length"):
                resp.headers[k] = v
        return resp

    @app.errorhandler(OperationalError)
    def _db_unavailable(e: OperationalError) -> Any:
        # The database is down, restarting or busy (PostgreSQL stopped, connections cut, SQLite locked):
        # not a bug, so no traceback; the pool reconnects on a later request (pool_pre_ping).
        log.warning("database unavailable on %s %s: %s", request.method, request.path,
                    str(e.orig or e).splitlines()[0][:200])
        resp = jsonify(error="database_unavailable",
                       reason="the database is unreachable or restarting; retry in a few seconds")
        resp.status_code = 503
        resp.headers["Retry-After"] = "5"  # RFC 9110 §10.2.3
        return resp

    @app.errorhandler(Exception)
    def _crash(e: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        resp = jsonify(error="internal_error", reason="the server hit an unexpected error; it is logged")
        resp.status_code = 500
        return resp

    return app


def _optional_blueprints() -> list[tuple[str, Any]]:
    """Every area's blueprint with the role it serves. Plain imports (a renamed module fails here, not
    silently); inside the function because each blueprint module imports helpers from this package."""
    from bootsvc.web import agent_api, api, bfbpush, boot, metrics, ui, webhooks

    return [(ROLE_OF["boot"], boot.bp), (ROLE_OF["api"], api.bp), (ROLE_OF["agent_api"], agent_api.bp),
            (ROLE_OF["webhooks"], webhooks.bp), (ROLE_OF["ui"], ui.bp), (ROLE_OF["metrics"], metrics.bp),
            (bfbpush.ROLE, bfbpush.bp)]


# ---------------------------------------------------------------- the body guard
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth(raw: bytes, limit: int) -> int:
    """How deep the arrays/objects of ``raw`` nest, counting at most to ``limit + 1`` (strings, which
    may hold brackets, are skipped; the text need not be valid JSON - the route still parses it)."""
    if raw.count(b"[") + raw.count(b"{") <= limit:
        return 0  # cannot be deeper than the number of openers
    depth = deepest = 0
    for b in _JSON_STRING.sub(b'""', raw).translate(None, _NOT_BRACKET):
        if b in b"[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def _refuse(status: int, error: str, reason: str) -> Response:
    log.warning("http: refused %s %s from %s: %s (%s)", request.method, request.path, request.remote_addr,
                error, reason)
    resp = jsonify(error=error, reason=reason)
    resp.status_code = status
    if status == 408:
        resp.headers["Connection"] = "close"
    return resp


def _guard_body() -> Response | None:
    """Every request with a body: read it (bounded by MAX_CONTENT_LENGTH: 413) and refuse JSON nested
    deeper than MAX_JSON_DEPTH, before any route sees it. Routes then read the cached bytes."""
    env = request.environ
    if not request.content_length and "chunked" not in env.get("HTTP_TRANSFER_ENCODING", "").lower():
        return None
    try:
        raw = request.get_data(cache=True)
    except ClientDisconnected as e:  # Werkzeug's wrapper of a failed read of the body
        if isinstance(e.__cause__ or e.__context__, (TimeoutError, ConnectionResetError)):
            return _refuse(408, "request_timeout", "the request body did not arrive in time")
        return _refuse(400, "bad_body", "the request body ended before its declared length")
    except HTTPException:  # 413 past MAX_CONTENT_LENGTH
        raise
    except (TimeoutError, ConnectionResetError):  # bootsvc.web.serve: the client stopped sending
        return _refuse(408, "request_timeout", "the request body did not arrive in time")
    except Exception as e:  # the server's body reader: broken chunked framing, a body cut short
        return _refuse(400, "bad_body", f"the request body could not be read: {type(e).__name__}")
    looks_json = request.is_json or raw.lstrip()[:1] in (b"{", b"[")
    if looks_json and json_depth(raw, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        return _refuse(400, "json_too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return None


def config_of(app: Flask) -> Config:
    return cast(Config, app.config["BOOTSVC"])


def sessions_of(app: Flask) -> sessionmaker[Session]:
    return cast("sessionmaker[Session]", app.config["SESSIONS"])

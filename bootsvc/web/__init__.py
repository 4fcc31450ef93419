"""Flask application factory: builds the WSGI app and registers the blueprints.

Owns: wiring config, the session factory and blueprints into one Flask app, and JSON errors with a
reason for every failure (no HTML error pages for API clients). Each blueprint owns its routes.
"""

from __future__ import annotations

import logging
from typing import Any, cast

from flask import Flask, jsonify, request
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.exceptions import HTTPException

from bootsvc.config import Config
from bootsvc.db import make_engine, session_factory

log = logging.getLogger("bootsvc.web")


def create_app(config: Config, sessions: sessionmaker[Session] | None = None) -> Flask:
    app = Flask(__name__)
    app.config["BOOTSVC"] = config
    app.config["SESSIONS"] = sessions or session_factory(make_engine(config.database.url))
    app.config["MAX_CONTENT_LENGTH"] = 1 << 20  # no request body we accept is larger than 1 MiB
    app.json.sort_keys = False  # type: ignore[attr-defined]

    from bootsvc.web import health

    app.register_blueprint(health.bp)
    for mod in _optional_blueprints():
        app.register_blueprint(mod)

    @app.errorhandler(HTTPException)
    def _http_error(e: HTTPException) -> Any:
        if request.path.startswith("/ui") and request.accept_mimetypes.accept_html:
            return e
        resp = jsonify(error=e.name.lower().replace(" ", "_"), reason=e.description or e.name)
        resp.status_code = e.code or 500
        return resp

    @app.errorhandler(Exception)
    def _crash(e: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        resp = jsonify(error="internal_error", reason="the server hit an unexpected error; it is logged")
        resp.status_code = 500
        return resp

    return app


def _optional_blueprints() -> list[Any]:
    """Blueprints of the other areas, registered when their module is present."""
    import importlib

    bps = []
    for name in ("boot", "api", "agent_api", "webhooks", "ui", "metrics"):
        try:
            mod = importlib.import_module(f"bootsvc.web.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"bootsvc.web.{name}":
                raise
            continue
        bps.append(mod.bp)
    return bps


def config_of(app: Flask) -> Config:
    return cast(Config, app.config["BOOTSVC"])


def sessions_of(app: Flask) -> sessionmaker[Session]:
    return cast("sessionmaker[Session]", app.config["SESSIONS"])

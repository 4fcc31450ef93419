"""What every ``bootsvc`` command shares: the context object (config and database, loaded on first use),
``fail`` (one line on stderr, exit code) and ``pass_ctx``.

Owns: nothing but these three, so that command groups in other packages (the lab's, in a source tree)
can use them without importing ``bootsvc.cli``, which imports them (no import cycle).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import NoReturn

import click
from sqlalchemy import exc as sa_exc
from sqlalchemy import inspect
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import config as config_mod
from bootsvc import db
from bootsvc.config import Config, ConfigError


@dataclass
class Ctx:
    config_path: str | None
    db_url: str | None
    _config: Config | None = None
    _sessions: sessionmaker[Session] | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = config_mod.load(self.config_path)
            except ConfigError as e:
                fail(f"bad config: {e}", 2)
        return self._config

    @property
    def url(self) -> str:
        return self.db_url or self.config.database.url

    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            engine = db.make_engine(self.url)
            # One clear line instead of a SQLAlchemy traceback ("no such table: tenants") when a command
            # runs against a database that `db upgrade` never touched (a fresh file, another config).
            try:
                initialised = inspect(engine).has_table("nodes")
            except sa_exc.OperationalError as e:
                reason = str(e.orig or e).strip().splitlines()[0] if str(e.orig or e).strip() else "no answer"
                fail(f"cannot reach the database {db.redacted(self.url)}: {reason} "
                     "(is it running? is database.url / --db right?)")
            if not initialised:
                fail(f"the database {db.redacted(self.url)} has no bootsvc schema yet: "
                     f"run `bootsvc{self._config_flag()} db upgrade` first", 2)
            self._sessions = db.session_factory(engine)
        return self._sessions

    def _config_flag(self) -> str:
        return f" --config {self.config_path}" if self.config_path else ""


def fail(msg: str, code: int = 1) -> NoReturn:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


pass_ctx = click.make_pass_decorator(Ctx)

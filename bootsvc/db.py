"""Database engine and sessions, and running Alembic migrations.

Owns: how bootsvc connects (SQLite with WAL + foreign keys + busy timeout by default; PostgreSQL by
URL), the queue SQLite's writers wait in (``WriterGate``), the session factory everybody uses, and
`db upgrade/downgrade/check` (Alembic, `migrations/`).
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import metrics, resources

log = logging.getLogger("bootsvc.db")

MIGRATIONS_DIR = resources.migrations_dir()


def normalize_url(url: str) -> str:
    """Accept plain ``postgresql://`` URLs and use the psycopg 3 driver for them."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def redacted(url: str) -> str:
    """The URL for a message or a log line: the password, if any, replaced by ***."""
    try:
        return make_url(normalize_url(url)).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL is reported elsewhere; never echo what might hold a secret
        return "<database url>"


BUSY_TIMEOUT = 30  # seconds a SQLite writer waits for the write lock before "database is locked"


class WriterGate:
    """Where this process's connections to one SQLite file wait for its write lock: a thread lock, then
    an exclusive ``flock`` on ``<database>-writer`` held from a transaction's first write to its end.

    Why: SQLite has one writer, and a connection that finds the write lock taken does not wait for it
    to be released; its busy handler sleeps and retries, 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50 and
    then 100 ms apart (``sqliteDefaultBusyCallback``, sqlite3 src/main.c). Measured in a 1000-pair storm on a
    busy box (conductor + http workers on one file): the lock was held 61 % of the time, yet a write transaction
    waited 182 ms on average for it (35 % over 50 ms, the worst 13 s) - the lock stood free while its
    waiters slept. A waiter here sleeps in the kernel and is woken when the holder ends its
    transaction. The gate only orders who asks SQLite next: SQLite's lock stays the arbiter, so a
    writer that does not pass through it (the sqlite3 shell, Alembic) is still safe, it merely waits
    the old way (busy timeout). A thread that already holds the gate through one connection and writes
    through another does not wait for itself; SQLite's busy timeout answers that case as before.
    """

    def __init__(self, database: str) -> None:
        self.path = database + "-writer"
        self._threads = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._fd: int | None = None
        self._pid = 0

    def _forked(self) -> None:
        """In a forked child (gunicorn workers): nothing held, and an open file of its own."""
        self._threads = threading.Lock()
        self._owner, self._depth, self._fd = None, 0, None

    def _file(self) -> int | None:
        if self._pid == -1:
            return None
        if self._fd is None or self._pid != os.getpid():  # a forked child needs its own open file
            try:
                # owner-only: another local user must not be able to hold our writers back
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as e:  # e.g. made by another user: wait the old way (busy timeout), as before
                if self._pid != -1:
                    log.warning("sqlite_writer_gate path=%s error=%r: writers wait in SQLite's busy handler",
                                self.path, e)
                self._pid = -1
                return None
            self._pid = os.getpid()
        return self._fd

    def acquire(self) -> bool:
        """Wait for the gate; False if a thread of this process held it for ``BUSY_TIMEOUT`` seconds
        (then the write goes on to SQLite's own busy timeout, as it did without a gate: a thread that
        waits for another while holding the gate is an error after a bounded wait, never a hang)."""
        me = threading.get_ident()
        if self._owner == me:
            self._depth += 1
            return True
        if not self._threads.acquire(timeout=BUSY_TIMEOUT):  # blocks without the GIL
            log.warning("sqlite_writer_gate path=%s waited=%ss: held by another thread; "
                        "going on to SQLite's busy timeout", self.path, BUSY_TIMEOUT)
            return False
        try:
            fd = self._file()
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)  # idem, across processes
        except BaseException:
            self._threads.release()
            raise
        self._owner, self._depth = me, 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth > 0:
            return
        self._owner = None
        try:
            if self._fd is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()


_GATES: dict[str, WriterGate] = {}
_GATES_LOCK = threading.Lock()
# A statement that starts a write transaction when none is open (pysqlite opens a deferred transaction
# just before the first INSERT/UPDATE/DELETE/REPLACE; dhcp.leasedb says BEGIN IMMEDIATE itself).
_WRITES = ("INSERT", "UPDATE", "DELETE", "REPLACE", "BEGIN IMMEDIATE", "BEGIN EXCLUSIVE")


def _after_fork() -> None:
    for gate in _GATES.values():
        gate._forked()


os.register_at_fork(after_in_child=_after_fork)


def _gate_for(database: str) -> WriterGate:
    key = os.path.realpath(database)
    with _GATES_LOCK:
        gate = _GATES.get(key)
        if gate is None:
            gate = _GATES[key] = WriterGate(key)
        return gate


def _starts_write(sql: str) -> bool:
    return sql.lstrip()[:15].upper().startswith(_WRITES)


class _GatedCursor(sqlite3.Cursor):
    def execute(self, sql: str, parameters: Any = (), /) -> _GatedCursor:
        conn: GatedConnection = self.connection  # type: ignore[assignment]
        if not conn.in_transaction and not conn.gate_held and _starts_write(sql):
            conn.gate_enter()
        return super().execute(sql, parameters)

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> _GatedCursor:
        conn: GatedConnection = self.connection  # type: ignore[assignment]
        if not conn.in_transaction and not conn.gate_held and _starts_write(sql):
            conn.gate_enter()
        return super().executemany(sql, seq_of_parameters)


class GatedConnection(sqlite3.Connection):
    """A sqlite3 connection whose writes queue in the file's ``WriterGate`` (``make_engine`` uses it for
    every file database); the gate is left when the transaction ends: commit, rollback or close."""

    gate: WriterGate | None = None
    gate_held = False

    def gate_enter(self) -> None:
        if self.gate is not None:
            self.gate_held = self.gate.acquire()

    def _gate_leave(self) -> None:
        if self.gate_held and self.gate is not None:
            self.gate_held = False
            self.gate.release()

    def cursor(self, factory: Any = _GatedCursor) -> Any:
        return super().cursor(factory)

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            if not self.in_transaction:
                self._gate_leave()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._gate_leave()

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._gate_leave()


def make_engine(url: str, **kw: Any) -> Engine:
    url = normalize_url(url)
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        connect_args: dict[str, Any] = {"timeout": BUSY_TIMEOUT, "check_same_thread": False}
        gate: WriterGate | None = None
        if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
            gate = _gate_for(u.database)
            connect_args["factory"] = GatedConnection
        engine = create_engine(url, connect_args=connect_args, **kw)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            if isinstance(dbapi_conn, GatedConnection):
                dbapi_conn.gate = gate
            cur = dbapi_conn.cursor()
            # WAL: readers never block the writer; synchronous=NORMAL is still durable across a
            # process kill (only an OS crash can lose the last commits), which is what we promise.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT * 1000}")
            cur.close()

        metrics.count_db_statements(engine)
        return engine
    kw.setdefault("pool_pre_ping", True)
    engine = create_engine(url, **kw)
    metrics.count_db_statements(engine)
    return engine


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(url: str) -> Any:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(_alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(_alembic_config(url), revision)


def check(url: str) -> None:
    """Raise if the models and the migrations disagree (``alembic check``)."""
    from alembic import command

    command.check(_alembic_config(url))


def current(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with make_engine(url).connect() as conn:
        rev = MigrationContext.configure(conn).get_current_revision()
        return str(rev) if rev is not None else None

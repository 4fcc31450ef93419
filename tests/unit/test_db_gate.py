"""db.WriterGate: SQLite writers wait for the write lock in a queue (thread lock + flock), not in the
busy handler's sleeps; held from a transaction's first write to its end, never for reads."""

from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.waits import wait_for
from sqlalchemy import Engine, text

from bootsvc import db


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = db.make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    with eng.begin() as c:
        c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, v INTEGER)"))
        c.execute(text("INSERT INTO t (id, v) VALUES (1, 0)"))
    yield eng
    eng.dispose()


def held_elsewhere(path: Path) -> bool:
    """Whether some other open file holds the gate's flock (what another process would wait on)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_held_from_first_write_to_commit_and_not_for_reads(engine: Engine, tmp_path: Path) -> None:
    gate = Path(str(tmp_path / "g.db") + "-writer")
    with engine.connect() as c:
        c.execute(text("SELECT v FROM t")).all()
        assert not held_elsewhere(gate)  # a read takes nothing
        c.execute(text("UPDATE t SET v = v + 1"))
        assert held_elsewhere(gate)
        c.execute(text("SELECT v FROM t")).all()
        assert held_elsewhere(gate)  # still in the write transaction
        c.commit()
        assert not held_elsewhere(gate)
        c.execute(text("INSERT INTO t (v) VALUES (5)"))
        assert held_elsewhere(gate)
        c.rollback()
        assert not held_elsewhere(gate)
    with engine.connect() as c:  # a connection returned to the pool mid-transaction is rolled back: released
        c.execute(text("DELETE FROM t WHERE id = 1"))
        assert held_elsewhere(gate)
    assert not held_elsewhere(gate)
    with engine.connect() as c:
        assert c.execute(text("SELECT count(*) FROM t WHERE id = 1")).scalar() == 1


def test_begin_immediate_takes_the_gate(engine: Engine, tmp_path: Path) -> None:
    """dhcp.leasedb's group commit says BEGIN IMMEDIATE itself on a raw connection."""
    gate = Path(str(tmp_path / "g.db") + "-writer")
    raw = engine.raw_connection()
    try:
        cur = raw.cursor()
        cur.execute("BEGIN IMMEDIATE")
        assert held_elsewhere(gate)
        cur.executemany("UPDATE t SET v = ? WHERE id = 1", [(1,), (2,)])
        raw.commit()
        assert not held_elsewhere(gate)
    finally:
        raw.close()


def test_a_second_writer_waits_in_the_gate_then_goes(engine: Engine) -> None:
    """Thread B's write queues in the gate (not in SQLite's busy handler) while A holds it, and runs
    as soon as A commits."""
    done = threading.Event()
    started = threading.Event()

    def b() -> None:
        with engine.connect() as c:
            started.set()
            c.execute(text("UPDATE t SET v = 20 WHERE id = 1"))
            c.commit()
        done.set()

    with engine.connect() as a:
        a.execute(text("UPDATE t SET v = 10 WHERE id = 1"))
        gate = a.connection.dbapi_connection.gate  # type: ignore[union-attr]
        assert gate is not None
        t = threading.Thread(target=b)
        t.start()
        wait_for(started.is_set, 5, what="B started")
        wait_for(lambda: gate._threads.locked() and gate._owner is not None, 5, what="A holds the gate")
        assert not done.wait(0.3)  # B is queued behind A
        a.commit()
    wait_for(done.is_set, 5, what="B wrote after A committed")
    t.join(5)
    with engine.connect() as c:
        assert c.execute(text("SELECT v FROM t WHERE id = 1")).scalar() == 20


def test_other_process_waits_for_the_gate(engine: Engine, tmp_path: Path) -> None:
    """Across processes: a writer in another process holds the flock while it is in its transaction."""
    gate = Path(str(tmp_path / "g.db") + "-writer")
    code = (
        "import sys, time\n"
        "from sqlalchemy import text\n"
        "from bootsvc import db\n"
        f"eng = db.make_engine('sqlite:///{tmp_path / 'g.db'}')\n"
        "with eng.connect() as c:\n"
        "    c.execute(text('UPDATE t SET v = 7 WHERE id = 1'))\n"
        "    print('in', flush=True)\n"
        "    sys.stdin.readline()\n"
        "    c.commit()\n"
        "print('out', flush=True)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "in"
        assert held_elsewhere(gate)
        p.stdin.write("\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == "out"
        assert not held_elsewhere(gate)
    finally:
        p.kill()
        p.wait(10)


def test_one_thread_writing_through_two_connections_does_not_wait_for_itself(engine: Engine) -> None:
    """The gate is re-entrant per thread: the second connection meets SQLite's own lock and its busy
    timeout (an error, as without the gate), never a wait on a gate its own thread holds."""
    with engine.connect() as a, engine.connect() as b:
        a.execute(text("UPDATE t SET v = 1 WHERE id = 1"))
        raw = b.connection.dbapi_connection
        assert raw is not None
        raw.execute("PRAGMA busy_timeout=50")
        with pytest.raises(Exception, match="locked"):
            b.execute(text("UPDATE t SET v = 2 WHERE id = 1"))
        b.rollback()
        a.commit()
    with engine.connect() as c:
        c.execute(text("UPDATE t SET v = 3 WHERE id = 1"))  # the gate is free again
        c.commit()


def test_memory_databases_have_no_gate() -> None:
    eng = db.make_engine("sqlite://")
    with eng.connect() as c:
        assert not isinstance(c.connection.dbapi_connection, db.GatedConnection)
        assert isinstance(c.connection.dbapi_connection, sqlite3.Connection)


def test_a_gate_file_it_cannot_open_means_the_old_wait_not_a_failed_write(tmp_path: Path) -> None:
    (tmp_path / "g.db-writer").mkdir()  # opening it fails (a directory), as another user's file would
    eng = db.make_engine(f"sqlite:///{tmp_path / 'g.db'}")
    with eng.begin() as c:
        c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        c.execute(text("INSERT INTO t (id) VALUES (1)"))
    with eng.begin() as c:
        c.execute(text("INSERT INTO t (id) VALUES (2)"))
    with eng.connect() as c:
        assert c.execute(text("SELECT count(*) FROM t")).scalar() == 2
    eng.dispose()


def test_a_thread_waits_for_the_gate_no_longer_than_the_busy_timeout(engine: Engine,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A holder that never commits (a thread waiting for another while holding the gate) costs the
    waiter a bounded wait and then SQLite's own "database is locked", as without the gate."""
    monkeypatch.setattr(db, "BUSY_TIMEOUT", 0.2)
    outcome: list[str] = []

    def b() -> None:
        with engine.connect() as c:
            raw = c.connection.dbapi_connection
            assert raw is not None
            raw.execute("PRAGMA busy_timeout=50")
            try:
                c.execute(text("UPDATE t SET v = 2 WHERE id = 1"))
                outcome.append("wrote")
            except Exception as e:  # the error is the outcome under test
                outcome.append(str(e))

    with engine.connect() as a:
        a.execute(text("UPDATE t SET v = 1 WHERE id = 1"))
        t = threading.Thread(target=b)
        t.start()
        wait_for(lambda: outcome, 10, what="B gave up")
        t.join(5)
        a.commit()
    assert "locked" in outcome[0]

#!/usr/bin/env python3
"""SQLite's write lock handed from writer to writer, in seconds on a scratch database (WAL, as bootsvc).

``late``: one thread holds the write lock H ms and commits; another waits for it in SQLite's default busy
handler (``timeout=30``, as bootsvc/db.py): how long after the release the waiter has it (the handler
polls: it sleeps 1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, then 100 ms between tries).
``share``: P writer processes loop over a write transaction of H ms and T ms outside it; the share of wall
time the lock is held and commits/s, with the busy handler alone (``busy``) and with every writer first
queued on a blocking fcntl lock (``flock``: the kernel wakes the next writer at the release).

    .venv/bin/python bench/storm/lock_handoff.py late
    .venv/bin/python bench/storm/lock_handoff.py share --writers 6 --hold-ms 1 --think-ms 5 --seconds 4
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing as mp
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any


def _db(d: Path) -> str:
    p = str(d / "h.db")
    c = sqlite3.connect(p)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("create table if not exists t(x)")
    c.close()
    return p


def late(db: str) -> None:
    for hold in (2, 10, 50, 200):
        lat = []
        for _ in range(15):
            a = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
            b = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
            a.execute("BEGIN IMMEDIATE")
            a.execute("insert into t values (1)")
            got = [0.0]

            def wait(b: sqlite3.Connection = b, got: list[float] = got) -> None:
                b.execute("BEGIN IMMEDIATE")
                got[0] = time.monotonic()
                b.execute("COMMIT")

            th = threading.Thread(target=wait)
            th.start()
            time.sleep(hold / 1000)
            released = time.monotonic()
            a.execute("COMMIT")
            th.join()
            lat.append((got[0] - released) * 1000)
            a.close()
            b.close()
        print(f"lock held {hold:4d} ms: the waiter has it {statistics.median(lat):6.1f} ms (median), "
              f"{max(lat):6.1f} ms (max) after the release; SQLite {sqlite3.sqlite_version}", flush=True)


def _writer(db: str, mode: str, hold: float, think: float, seconds: float, q: Any) -> None:
    c = sqlite3.connect(db, timeout=30, isolation_level=None)
    with open(db + ".lock", "w") as lf:
        held, n, end = 0.0, 0, time.monotonic() + seconds
        while time.monotonic() < end:
            if mode == "flock":
                fcntl.flock(lf, fcntl.LOCK_EX)
            c.execute("BEGIN IMMEDIATE")
            t0 = time.perf_counter()
            c.execute("insert into t values (?)", (n,))
            while time.perf_counter() < t0 + hold / 1000:  # work inside the transaction
                pass
            c.execute("COMMIT")
            held += time.perf_counter() - t0
            n += 1
            if mode == "flock":
                fcntl.flock(lf, fcntl.LOCK_UN)
            time.sleep(think / 1000)
    q.put((held, n))


def share(db: str, a: argparse.Namespace) -> None:
    for mode in ("busy", "flock") * a.rounds:
        q: Any = mp.Queue()
        ps = [mp.Process(target=_writer, args=(db, mode, a.hold_ms, a.think_ms, a.seconds, q))
              for _ in range(a.writers)]
        t = time.monotonic()
        for p in ps:
            p.start()
        for p in ps:
            p.join()
        wall = time.monotonic() - t
        r = [q.get() for _ in ps]
        print(f"{mode:5s} {a.writers} writers, {a.hold_ms:g} ms in / {a.think_ms:g} ms out: lock held "
              f"{sum(x[0] for x in r) / wall:.2f} of wall, {sum(x[1] for x in r) / wall:.0f} commits/s", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("late", "share"))
    ap.add_argument("--writers", type=int, default=6)
    ap.add_argument("--hold-ms", type=float, default=1.0)
    ap.add_argument("--think-ms", type=float, default=5.0)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        db = _db(Path(d))
        late(db) if a.what == "late" else share(db, a)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

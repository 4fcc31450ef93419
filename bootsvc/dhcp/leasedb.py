"""Durable lease writes: the ``leases`` table as the DHCP server writes it, and who a client is.

Owns: the client identity rule (RFC 2131 §2: the client identifier, option 61, when the client
sends a usable one, else its chaddr) in Python (:func:`client_key`) and, beside it, the same rule in
SQL (``_KEY_SQL``) that the durable guard compares, so the two cannot drift apart; and
:class:`LeaseWriter`, the group commit of a batch of bindings, releases and declines in ONE
transaction (RFC 2131 §3.1 step 4: the binding is committed before the DHCPACK leaves).

The guarded upsert (``ON CONFLICT (vrf, address) DO UPDATE ... WHERE`` the row is free or already this
client's) makes the database the arbiter between instances sharing one PostgreSQL: a row the guard
refused comes back as lost, and the caller NAKs that client. The writes use the DBAPI connection
directly (one prepared statement per batch) because the ORM costs ~100 µs per row, more than the
whole DORA budget (bench/dhcp/README.md). The in-memory index that decides which address to offer
is ``bootsvc.dhcp.leases``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from itertools import chain
from typing import Any

from sqlalchemy import Engine

from bootsvc.dhcp.decide import LeaseIntent
from bootsvc.dhcp.packet import ip_str

__all__ = ["LeaseWriter", "client_key", "opaque_text", "valid_client_id"]

_UTC = dt.UTC


def valid_client_id(cid: bytes | None) -> bytes | None:
    """Option 61 if it can identify a client (RFC 2132 §9.14: length >= 2), else None."""
    return cid if cid is not None and len(cid) >= 2 else None


def client_key(mac: str, cid: bytes | None, match_client_id: bool = True) -> str:
    """Who a client is: ``id:<hex>`` of its client identifier when it sends a valid one that is not
    just 01 + its chaddr and ``match_client_id`` is on (RFC 2131 §2), else its MAC. The same rule as
    ``_KEY_SQL`` (client_id is stored as hex, mac as aa:bb:...)."""
    if match_client_id and cid is not None and len(cid) >= 2 and not (cid[0] == 1 and cid[1:].hex(":") == mac):
        return "id:" + cid.hex()
    return mac


# client_key() in SQL, for the table alias {t} (leases / excluded)
_KEY_SQL = ("(CASE WHEN {t}.client_id IS NULL OR {t}.client_id = '01' || replace({t}.mac, ':', '') "
            "THEN {t}.mac ELSE 'id:' || {t}.client_id END)")


def _ts(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, _UTC)


_TS_CACHE: dict[int, str] = {}


def _sqlite_ts(t: float) -> str:
    """The format SQLAlchemy's SQLite DateTime type stores (tz dropped, UTC by convention), to the
    second: strftime per row was ~2 % of a DORA, so whole seconds are memoised."""
    k = int(t)
    v = _TS_CACHE.get(k)
    if v is None:
        if len(_TS_CACHE) > 4096:
            _TS_CACHE.clear()
        v = dt.datetime.fromtimestamp(k, _UTC).strftime("%Y-%m-%d %H:%M:%S.000000")
        _TS_CACHE[k] = v
    return v


def _cid_text(c: bytes | None) -> str | None:
    return c.hex() if c is not None and len(c) >= 2 else None


def opaque_text(b: bytes | None) -> str | None:
    if b is None:
        return None
    try:
        s = b.decode("ascii")
        if s.isprintable():
            return s[:255]
    except UnicodeDecodeError:
        pass
    return ("0x" + b.hex())[:255]


class LeaseWriter:
    """Group commits to the ``leases`` table over one DBAPI connection (used by one thread at a
    time: the server's loop, or its committer thread on PostgreSQL)."""

    def __init__(self, engine: Engine | None, *, quarantine: float, match_client_id: bool = True) -> None:
        self.engine = engine
        self.quarantine = quarantine
        self.match_client_id = match_client_id
        self.dialect = engine.dialect.name if engine is not None else "none"
        # the durable guard's notion of "the same client" (client_key in SQL)
        self._same = (_KEY_SQL.format(t="leases") + " = " + _KEY_SQL.format(t="excluded")) if match_client_id \
            else "leases.mac = excluded.mac"
        self._guard = self._GUARD.replace("leases.mac = excluded.mac", self._same)
        self._release_sql = self._RELEASE.replace(
            "mac = %s", _KEY_SQL.format(t="leases") + " = %s" if match_client_id else "mac = %s")
        self._upserts: dict[int, str] = {}
        self._raw: Any = None

    def _conn(self) -> Any:
        if self._raw is None:
            assert self.engine is not None
            raw = self.engine.raw_connection()
            if self.dialect == "sqlite":
                # SQLite runs a WAL checkpoint (copy + fsync) inside whichever commit crosses
                # wal_autocheckpoint pages: on the packet thread that is a stall of tens of ms
                # while packets pile up in the socket. checkpoint() does it from the maintenance
                # thread instead; this high limit is only a backstop if that thread is not running.
                cur = raw.cursor()
                cur.execute("PRAGMA wal_autocheckpoint=20000")
                cur.close()
            self._raw = raw
        return self._raw

    def checkpoint(self) -> None:
        """SQLite: copy the WAL back into the database file (PASSIVE: never waits for, or blocks,
        the writer). Called off the packet path, with its own connection; sqlite3 releases the GIL
        while it works, so the packet thread keeps running."""
        if self.engine is None or self.dialect != "sqlite":
            return
        raw = self.engine.raw_connection()
        try:
            cur = raw.cursor()
            cur.execute("PRAGMA wal_checkpoint(PASSIVE)")
            cur.fetchall()
            cur.close()
        finally:
            raw.close()

    def close(self) -> None:
        if self._raw is not None:
            try:
                self._raw.close()
            finally:
                self._raw = None

    def commit(self, batch: Sequence[tuple[LeaseIntent, int | None]], now: float) -> list[bool]:
        """Write a batch in ONE transaction; returns per-item success (False = lost to a conflict).
        Raises on database errors (the caller must then not send the ACKs)."""
        if self.engine is None or not batch:
            return [True] * len(batch)
        try:
            if self.dialect == "postgresql":
                return self._commit_pg(batch, now)
            return self._commit_sqlite(batch, now)
        except Exception:
            try:
                if self._raw is not None:
                    self._raw.rollback()
            except Exception:
                pass
            self.close()
            raise

    _COLS = ("vrf, network, address, mac, client_id, hostname, node_id, state, expires_at, "
             "updated_at, relay, circuit_id, remote_id")
    _SET = ("network = excluded.network, mac = excluded.mac, client_id = excluded.client_id, "
            "hostname = excluded.hostname, node_id = excluded.node_id, state = excluded.state, "
            "expires_at = excluded.expires_at, updated_at = excluded.updated_at, relay = excluded.relay, "
            "circuit_id = excluded.circuit_id, remote_id = excluded.remote_id")

    def _row(self, it: LeaseIntent, state: str, expires: Any, updated: Any) -> tuple[Any, ...]:
        return (it.vrf, it.network, ip_str(it.address), it.mac, _cid_text(it.client_id), it.hostname,
                it.node_id, state, expires, updated, ip_str(it.relay) if it.relay else None,
                opaque_text(it.circuit_id), opaque_text(it.remote_id))

    def _dedupe(self, batch: Sequence[tuple[LeaseIntent, int | None]], now: float,
                ts: Callable[[float], Any]) -> list[tuple[Any, ...]]:
        """Rows to upsert, one per (vrf, address): the last intent wins (a statement must not
        touch one row twice)."""
        last: dict[tuple[str, bytes], int] = {}
        for i, (it, _prev) in enumerate(batch):
            if it.action in ("bind", "decline"):
                last[(it.vrf, it.address)] = i
        nowts = ts(now)
        rows = []
        for i in sorted(last.values()):
            it = batch[i][0]
            if it.action == "bind":
                rows.append(self._row(it, "bound", ts(it.expires_at), nowts))
            else:
                rows.append(self._row(it, "declined", ts(now + self.quarantine), nowts))
        return rows

    @staticmethod
    def _lost(batch: Sequence[tuple[LeaseIntent, int | None]], won: set[tuple[str, str]],
              nrows: int) -> list[bool]:
        if len(won) == nrows:  # every (deduplicated) row was written: nothing lost (the usual case)
            return [True] * len(batch)
        return [not (it.action in ("bind", "decline") and (it.vrf, ip_str(it.address)) not in won)
                for it, _p in batch]

    def _commit_sqlite(self, batch: Sequence[tuple[LeaseIntent, int | None]], now: float) -> list[bool]:
        conn = self._conn()
        cur = conn.cursor()
        nowts = _sqlite_ts(now)
        rows = self._dedupe(batch, now, _sqlite_ts)
        won: set[tuple[str, str]] = set()
        cur.execute("BEGIN IMMEDIATE")
        try:
            # Fixed statement sizes so sqlite3's statement cache reuses the prepared statements
            # (preparing an 800-parameter INSERT costs more than running it).
            k = 0
            while k < len(rows):
                size = next(z for z in (128, 32, 8, 1) if z <= len(rows) - k)
                chunk = rows[k : k + size]
                k += size
                params = list(chain.from_iterable(chunk))  # flattened in C
                params.append(nowts)
                cur.execute(self._sqlite_upsert(size), params)
                won.update(cur.fetchall())
            ok = self._lost(batch, won, len(rows))
            rel = self._releases(batch, ok, nowts)
            if rel:
                cur.executemany(self._release_sql.replace("%s", "?"), rel)
            conn.commit()
        except Exception:
            conn.rollback()
            raise
        finally:
            cur.close()
        return ok

    def _sqlite_upsert(self, n: int) -> str:
        sql = self._upserts.get(n)
        if sql is None:
            sql = (f"INSERT INTO leases ({self._COLS}) VALUES "
                   + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?,?)"] * n)
                   + f" ON CONFLICT (vrf, address) DO UPDATE SET {self._SET} "
                   f"WHERE {self._guard.replace('%s', '?')} RETURNING vrf, address")
            self._upserts[n] = sql
        return sql

    _GUARD = ("leases.mac = excluded.mac OR leases.state IN ('released', 'expired', 'offered') "
              "OR leases.expires_at < %s")
    _RELEASE = ("UPDATE leases SET state = 'released', expires_at = %s, updated_at = %s "
                "WHERE vrf = %s AND address = %s AND mac = %s AND state = 'bound'")

    def _releases(self, batch: Sequence[tuple[LeaseIntent, int | None]], ok: list[bool],
                  nowts: Any) -> list[tuple[Any, ...]]:
        """RELEASEs, and the previous address of a client that was bound elsewhere in the VRF (the
        row must still be this client's: ``_release_sql`` compares its identity)."""
        m = self.match_client_id
        rel: list[tuple[Any, ...]] = [(nowts, nowts, it.vrf, ip_str(it.address), client_key(it.mac, it.client_id, m))
                                      for it, _p in batch if it.action == "release"]
        rel += [(nowts, nowts, it.vrf, ip_str(p.to_bytes(4, "big")), client_key(it.mac, it.client_id, m))
                for (it, p), good in zip(batch, ok, strict=True)
                if it.action == "bind" and p is not None and good]
        return rel

    def _commit_pg(self, batch: Sequence[tuple[LeaseIntent, int | None]], now: float) -> list[bool]:
        conn = self._conn()
        cur = conn.cursor()
        nowts = _ts(now)
        rows = self._dedupe(batch, now, _ts)
        won: set[tuple[str, str]] = set()
        try:
            if rows:
                cols = list(zip(*rows, strict=True))
                # one statement for the whole batch (one round trip): unnest the column arrays
                cur.execute(
                    f"INSERT INTO leases ({self._COLS}) SELECT * FROM unnest("
                    "%s::varchar[], %s::varchar[], %s::varchar[], %s::varchar[], %s::varchar[], "
                    "%s::varchar[], %s::int[], %s::varchar[], %s::timestamptz[], %s::timestamptz[], "
                    "%s::varchar[], %s::varchar[], %s::varchar[]) "
                    f"ON CONFLICT (vrf, address) DO UPDATE SET {self._SET} WHERE {self._guard} "
                    "RETURNING vrf, address",
                    [list(c) for c in cols] + [nowts],
                )
                won.update(cur.fetchall())
            ok = self._lost(batch, won, len(rows))
            rel = self._releases(batch, ok, nowts)
            if rel:
                cur.executemany(self._release_sql, rel)
            conn.commit()
        except Exception:
            conn.rollback()
            raise
        finally:
            cur.close()
        return ok

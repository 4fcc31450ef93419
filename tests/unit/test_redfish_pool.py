"""SessionPool (bootsvc.power.redfish_session): which kept session an operation gets, and when kept
sessions are logged out. Connections are stand-ins that count their logouts; the pool never looks
inside them beyond ``idle_since`` and ``logout``."""

from __future__ import annotations

from typing import Any

from bootsvc.power.redfish_session import Conn, PoolKey, SessionPool

A: PoolKey = ("http://10.0.0.1:8000", "ref", True, None)
B: PoolKey = ("http://10.0.0.2:8000", "ref", True, None)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class FakeConn(Conn):
    def __init__(self, name: str) -> None:  # no driver, no client: the pool needs neither
        self.name, self.logouts, self.idle_since, self.memo = name, 0, 0.0, {}

    def logout(self) -> None:
        self.logouts += 1

    def __repr__(self) -> str:
        return self.name


def pool(clock: Clock, **kw: Any) -> SessionPool:
    return SessionPool(idle_seconds=20, clock=clock, **kw)


def test_a_session_given_back_is_taken_again_for_the_same_bmc_only() -> None:
    c = Clock()
    p = pool(c)
    a = FakeConn("a")
    p.give(A, a)
    assert p.take(B) is None  # another BMC never gets it
    assert p.take(A) is a
    assert p.take(A) is None  # taken: not handed out twice
    assert a.logouts == 0 and p.reused == 1


def test_most_recently_used_first() -> None:
    c = Clock()
    p = pool(c)
    old, new = FakeConn("old"), FakeConn("new")
    p.give(A, old)
    c.t += 5
    p.give(A, new)
    assert p.take(A) is new


def test_idle_sessions_are_logged_out_after_idle_seconds() -> None:
    c = Clock()
    p = pool(c)
    a, b = FakeConn("a"), FakeConn("b")
    p.give(A, a)
    c.t += 15
    p.give(B, b)
    c.t += 6  # a idle 21 s, b 6 s
    assert p.sweep() == 1
    assert a.logouts == 1 and b.logouts == 0
    assert p.take(A) is None  # an expired session is never handed out
    assert p.take(B) is b


def test_take_drops_expired_sessions_of_every_bmc() -> None:
    c = Clock()
    p = pool(c)
    a = FakeConn("a")
    p.give(A, a)
    c.t += 20
    assert p.take(B) is None
    assert a.logouts == 1 and len(p) == 0


def test_at_most_max_idle_kept_oldest_out_first() -> None:
    c = Clock()
    p = pool(c, max_idle=2)
    conns = [FakeConn(f"c{i}") for i in range(3)]
    for i, x in enumerate(conns):
        c.t += 1
        p.give(A if i % 2 == 0 else B, x)
    assert [x.logouts for x in conns] == [1, 0, 0] and len(p) == 2


def test_close_logs_out_everything() -> None:
    c = Clock()
    p = pool(c)
    conns = [FakeConn("a"), FakeConn("b")]
    p.give(A, conns[0])
    p.give(B, conns[1])
    p.close()
    assert [x.logouts for x in conns] == [1, 1] and len(p) == 0 and p.closed == 2


def test_idle_zero_keeps_nothing() -> None:
    p = SessionPool(idle_seconds=0)
    a = FakeConn("a")
    p.give(A, a)
    assert a.logouts == 1 and p.take(A) is None

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
        self.relearn, self.learnt_at, self.root = False, None, {}

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


# -- what a BMC told us (Known), kept across its sessions ----------------------------------------------
ROOT = {"Vendor": "Nvidia", "Product": "BlueField", "RedfishVersion": "1.17.0", "Systems": {"@odata.id": "/S"},
        "Managers": {"@odata.id": "/M"}, "UpdateService": {"@odata.id": "/U"}, "Tasks": {"@odata.id": "/T"},
        "SessionService": {"@odata.id": "/SS"}, "Links": {"Sessions": {"@odata.id": "/SS/S"}, "Other": 1},
        "Chassis": {"@odata.id": "/C"}, "Oem": {"big": "x" * 1000}}


def learnt(name: str, at: float, memo: dict[Any, Any] | None = None, relearn: bool = False) -> FakeConn:
    x = FakeConn(name)
    x.root, x.learnt_at, x.relearn = ROOT, at, relearn
    x.memo = {"discovery": "d"} if memo is None else memo
    return x


def test_what_a_bmc_said_is_recalled_for_its_next_sessions_trimmed_and_not_made_younger() -> None:
    c = Clock()
    p = pool(c, known_seconds=600)
    p.learn(A, learnt("a", c.t))
    assert p.recall(B) is None
    k = p.recall(A)
    assert k is not None and k.memo == {"discovery": "d"} and k.at == c.t
    # only what bootsvc reads of the root is kept; of its Links only Sessions
    assert set(k.root) == {"Vendor", "Product", "RedfishVersion", "Systems", "Managers", "UpdateService", "Tasks",
                           "SessionService", "Links"} and k.root["Links"] == {"Sessions": {"@odata.id": "/SS/S"}}
    c.t += 500
    p.learn(A, learnt("a2", k.at))  # a session that started on that knowledge: the knowledge keeps its age
    c.t += 100
    assert p.recall(A) is None and p.known() == 0  # 600 s after the root was read: read it again


def test_a_session_on_old_knowledge_does_not_bring_it_back() -> None:
    c = Clock()
    p = pool(c, known_seconds=600)
    p.learn(A, learnt("a", c.t - 600))
    assert p.recall(A) is None and p.known() == 0


def test_signs_of_change_make_the_next_session_learn_again() -> None:
    c = Clock()
    p = pool(c, known_seconds=600)
    p.learn(A, learnt("a", c.t))
    p.learn(B, learnt("b", c.t))
    p.learn(A, learnt("a2", c.t, relearn=True))  # e.g. a transport error, a 401, a 404 in that session
    assert p.recall(A) is None and p.recall(B) is not None


def test_expired_knowledge_is_swept_oldest_first_and_capped() -> None:
    c = Clock()
    p = pool(c, known_seconds=600, max_known=2)
    p.learn(A, learnt("a", c.t))
    c.t += 300
    p.learn(B, learnt("b", c.t))
    c.t += 301
    p.sweep()
    assert p.known() == 1 and p.recall(B) is not None
    C: PoolKey = ("http://10.0.0.3:8000", "ref", True, None)
    D: PoolKey = ("http://10.0.0.4:8000", "ref", True, None)
    p.learn(C, learnt("c", c.t))
    p.learn(D, learnt("d", c.t))
    assert p.known() == 2 and p.recall(B) is None  # over max_known: the oldest out


def test_a_discovery_with_other_settings_is_added_to_what_is_known() -> None:
    c = Clock()
    p = pool(c, known_seconds=600)
    p.learn(A, learnt("a", c.t, {"d1": 1}))
    c.t += 10
    p.learn(A, learnt("a", c.t, {"d2": 2}))
    k = p.recall(A)
    assert k is not None and k.memo == {"d1": 1, "d2": 2} and k.at == c.t - 10


def test_known_seconds_zero_or_nothing_discovered_keeps_nothing() -> None:
    c = Clock()
    p = pool(c)  # known_seconds 0: the CLI's and a conductor's with power.discovery_seconds 0
    p.learn(A, learnt("a", c.t))
    assert p.recall(A) is None
    p = pool(c, known_seconds=600)
    p.learn(A, learnt("a", c.t, {}))  # a session that discovered nothing (a failed login)
    assert p.recall(A) is None and p.known() == 0


def test_close_forgets_every_bmc() -> None:
    c = Clock()
    p = pool(c, known_seconds=600)
    p.learn(A, learnt("a", c.t))
    p.close()
    assert p.recall(A) is None

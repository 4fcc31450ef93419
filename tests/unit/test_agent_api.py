"""Server side of docs/agent-api.md: per-node secret auth, a DPU only ever sees its own policy,
versioned policy (ETag), check-in and reports driving the lifecycle."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers.conductor import (
    Agent,
    app_for,
    apply_triggers,
    enroll_machine,
    make_db,
    node,
    node_secret,
    site_config,
    state,
)
from helpers.sql import statements
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from bootsvc.config import Config
from bootsvc.models import AgentStatus
from bootsvc.states import Trigger


@pytest.fixture
def env(tmp_path: Path) -> tuple[Config, sessionmaker[Session], int, int, int]:
    cfg = site_config(f"sqlite:///{tmp_path}/db.sqlite", tmp_path)
    sessions = make_db(cfg)
    host, dpu = enroll_machine(sessions, "m1", host_bmc="fake://a", dpu_bmc="fake://b", index=1)
    _host2, dpu2 = enroll_machine(sessions, "m2", host_bmc="fake://c", dpu_bmc="fake://d", index=2)
    return cfg, sessions, host, dpu, dpu2


BOOTED = (Trigger.PROVISION, Trigger.INSTALL_STARTED, Trigger.INSTALL_DONE)


def test_auth_errors(env: tuple[Config, sessionmaker[Session], int, int, int]) -> None:
    cfg, sessions, host, dpu, dpu2 = env
    c = app_for(cfg, sessions).test_client()
    c.environ_base["REMOTE_ADDR"] = Agent(c, cfg, sessions, dpu).addr  # dpu's own address
    assert c.post("/api/v1/agent/checkin", json={}).status_code == 401
    name, sec = node_secret(cfg, sessions, dpu)
    # an unknown name gets exactly the answer a bad secret gets: no node-name oracle
    unknown = c.post("/api/v1/agent/checkin", json={}, headers={"Authorization": f"Bearer {sec}",
                                                                "X-Bootsvc-Node": "nope"})
    # another DPU's secret does not open this DPU
    _n2, sec2 = node_secret(cfg, sessions, dpu2)
    bad = c.post("/api/v1/agent/checkin", json={}, headers={"Authorization": f"Bearer {sec2}", "X-Bootsvc-Node": name})
    assert unknown.status_code == bad.status_code == 401 and unknown.get_json() == bad.get_json()
    hname, hsec = node_secret(cfg, sessions, host)
    # the host's own secret from the address of the DPU in front of it: authenticated, but not a DPU
    r = c.post("/api/v1/agent/checkin", json={}, headers={"Authorization": f"Bearer {hsec}", "X-Bootsvc-Node": hname})
    assert r.status_code == 403


def test_checkin_moves_rebooting_dpu_to_ready_and_is_liveness(
        env: tuple[Config, sessionmaker[Session], int, int, int]) -> None:
    cfg, sessions, _host, dpu, _dpu2 = env
    c = app_for(cfg, sessions).test_client()
    agent = Agent(c, cfg, sessions, dpu)
    out = agent.checkin()
    assert out["state"] == "registered"  # nothing to do before the install
    assert out["policy_version"]  # the isolation policy (tenant null) is always available
    assert agent.policy()["tenant"] is None
    apply_triggers(sessions, dpu, *BOOTED)
    out = agent.checkin()
    assert out["state"] == "dpu_ready" and state(sessions, dpu) == "dpu_ready"
    doc = agent.policy()
    assert doc["tenant"] == "acme" and doc["version"] == out["policy_version"] and doc["node"] == "m1-dpu"
    with sessions() as s:
        st = s.get(AgentStatus, dpu)
        assert st is not None and st.last_seen is not None and st.agent_version == "0.1.0"


def test_each_dpu_gets_its_own_policy(env: tuple[Config, sessionmaker[Session], int, int, int]) -> None:
    cfg, sessions, _host, dpu, dpu2 = env
    c = app_for(cfg, sessions).test_client()
    apply_triggers(sessions, dpu, *BOOTED, Trigger.AGENT_CHECKIN)
    apply_triggers(sessions, dpu2, *BOOTED, Trigger.AGENT_CHECKIN)
    p1, p2 = Agent(c, cfg, sessions, dpu).policy(), Agent(c, cfg, sessions, dpu2).policy()
    assert (p1["node"], p2["node"]) == ("m1-dpu", "m2-dpu")
    assert p1["vtep"] != p2["vtep"] and p1["relay"]["remote_id"] == "MT-m1"
    # the other DPU of the tenant is a peer, with the host address behind it
    assert p1["peers"] == [{"vtep": p2["vtep"], "prefixes": ["10.0.0.12/32"]}]


def test_report_applied_and_failed(env: tuple[Config, sessionmaker[Session], int, int, int]) -> None:
    cfg, sessions, _host, dpu, _dpu2 = env
    c = app_for(cfg, sessions).test_client()
    agent = Agent(c, cfg, sessions, dpu)
    apply_triggers(sessions, dpu, *BOOTED, Trigger.AGENT_CHECKIN)
    v = agent.checkin()["policy_version"]
    # the agent was faster than the conductor: applied in dpu_ready still counts
    out = agent.report(v)
    assert out["current"] and out["state"] == "policy_applied"
    # a stale version changes nothing
    out = agent.report("0000", "failed", "old")
    assert not out["current"] and out["state"] == "policy_applied"
    # a failure of the current version fails the policy with the agent's reason
    out = agent.report(v, "failed", "nft: syntax error")
    assert out["state"] == "policy_failed"
    n = node(sessions, dpu)
    assert n.last_error and "nft: syntax error" in n.last_error and n.hint


def test_bad_report_lists_fields(env: tuple[Config, sessionmaker[Session], int, int, int]) -> None:
    cfg, sessions, _host, dpu, _dpu2 = env
    c = app_for(cfg, sessions).test_client()
    agent = Agent(c, cfg, sessions, dpu)
    r = c.post("/api/v1/agent/report", headers=agent.headers(), json={"status": "maybe"})
    assert r.status_code == 400
    assert {f["field"] for f in r.get_json()["fields"]} == {"policy_version", "status"}


def _checkin(c: Any, agent: Agent, health: dict[str, Any], version: str = "0.1.0") -> Any:
    r = c.post("/api/v1/agent/checkin", headers=agent.headers(), environ_base={"REMOTE_ADDR": agent.addr},
               json={"agent_version": version, "health": health})
    assert r.status_code == 200, r.get_data(as_text=True)
    return r.get_json()


def _two_machines(tmp_path: Path, fabric: dict[str, Any], orchestration: dict[str, Any]) -> tuple[
        Any, sessionmaker[Session], Any, Any, Agent, tuple[int, int, int, int]]:
    """The advice tests' site: two machines under ``orchestration``, the first DPU booted and checked
    in (dpu_ready) with its agent. (cfg, sessions, app, test client, that agent, (host, dpu, host2, dpu2))."""
    cfg = site_config(f"sqlite:///{tmp_path}/db.sqlite", tmp_path, fabric=fabric, orchestration=orchestration)
    sessions = make_db(cfg)
    host, dpu = enroll_machine(sessions, "m1", host_bmc="fake://a", dpu_bmc="fake://b", index=1)
    host2, dpu2 = enroll_machine(sessions, "m2", host_bmc="fake://c", dpu_bmc="fake://d", index=2)
    app = app_for(cfg, sessions)
    c = app.test_client()
    agent = Agent(c, cfg, sessions, dpu)
    apply_triggers(sessions, dpu, *BOOTED, Trigger.AGENT_CHECKIN)
    return cfg, sessions, app, c, agent, (host, dpu, host2, dpu2)


def _seen(sessions: sessionmaker[Session], dpu: int) -> tuple[Any, Any, Any]:
    with sessions() as s:
        st = s.get(AgentStatus, dpu)
        assert st is not None
        return st.last_seen, dict(st.health), st.agent_version


def test_an_idle_checkin_writes_nothing_until_something_changes(
        env: tuple[Config, sessionmaker[Session], int, int, int]) -> None:
    """~333 idle check-ins a second at 10,000 DPUs: one with nothing new (same version, same health but
    for its counters, last_seen within LAST_SEEN_POLLS x the agents' interval, at least
    LAST_SEEN_RESOLUTION) is answered without a write; news is written at once, and last_seen at least
    every such resolution."""
    import datetime as dt

    from sqlalchemy import update

    from bootsvc.web import agent_api

    cfg, sessions, _host, dpu, _dpu2 = env
    c = app_for(cfg, sessions).test_client()
    agent = Agent(c, cfg, sessions, dpu)
    apply_triggers(sessions, dpu, *BOOTED, Trigger.AGENT_CHECKIN)
    first = _checkin(c, agent, {"applied_version": None, "uptime_s": 1})
    _checkin(c, agent, {"applied_version": None, "uptime_s": 2})  # confirms the new secret: a write
    seen, health, _v = _seen(sessions, dpu)
    writes: list[str] = []
    engine = sessions.kw["bind"]

    def count(_c: Any, _cur: Any, stmt: str, *_a: Any) -> None:
        if not stmt.lstrip().upper().startswith("SELECT"):
            writes.append(stmt)

    event.listen(engine, "before_cursor_execute", count)
    try:
        out = _checkin(c, agent, {"applied_version": None, "uptime_s": 3})
        assert out == {"node": "m1-dpu", "policy_version": first["policy_version"], "state": "dpu_ready",
                       "poll_seconds": None}
        assert writes == [] and _seen(sessions, dpu) == (seen, health, "0.1.0")
        # news: health (the applied version) changes -> written at once
        _checkin(c, agent, {"applied_version": "v1", "uptime_s": 4})
        assert writes and _seen(sessions, dpu)[1] == {"applied_version": "v1", "uptime_s": 4}
        writes.clear()
        _checkin(c, agent, {"applied_version": "v1", "uptime_s": 5}, version="0.2.0")  # a new agent version
        assert writes and _seen(sessions, dpu)[2] == "0.2.0"
        writes.clear()
        _checkin(c, agent, {"applied_version": "v1", "uptime_s": 6}, version="0.2.0")
        assert writes == []
        # no advice (a small site): the resolution is 3 x the agents' 30 s, not a fixed 60 s
        res = max(agent_api.LAST_SEEN_RESOLUTION, dt.timedelta(
            seconds=agent_api.LAST_SEEN_POLLS * cfg.orchestration.agent_poll_seconds))
        assert res == dt.timedelta(seconds=90)
        within = dt.datetime.now(dt.UTC) - res + dt.timedelta(seconds=5)
        with sessions() as s:
            s.execute(update(AgentStatus).where(AgentStatus.node_id == dpu).values(last_seen=within))
            s.commit()
        writes.clear()
        _checkin(c, agent, {"applied_version": "v1", "uptime_s": 7}, version="0.2.0")
        assert writes == []
        # last_seen older than the resolution: written (liveness), counters with it
        old = dt.datetime.now(dt.UTC) - res - dt.timedelta(seconds=1)
        with sessions() as s:
            s.execute(update(AgentStatus).where(AgentStatus.node_id == dpu).values(last_seen=old))
            s.commit()
        writes.clear()
        _checkin(c, agent, {"applied_version": "v1", "uptime_s": 8}, version="0.2.0")
        seen2, health2, _v = _seen(sessions, dpu)
        assert writes and seen2 is not None and health2["uptime_s"] == 8
        assert seen2.replace(tzinfo=dt.UTC) > old
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_lost_bgp_session_is_news_even_between_idle_checkins(
        env: tuple[Config, sessionmaker[Session], int, int, int]) -> None:
    from sqlalchemy import select

    from bootsvc.models import Event

    cfg, sessions, _host, dpu, _dpu2 = env
    c = app_for(cfg, sessions).test_client()
    agent = Agent(c, cfg, sessions, dpu)
    apply_triggers(sessions, dpu, *BOOTED, Trigger.AGENT_CHECKIN)
    up = {"applied_version": None, "fabric": {"uplinks": {"p0": {"state": "Established"}}}}
    for k in range(3):
        _checkin(c, agent, {**up, "uptime_s": k})
    _checkin(c, agent, {"applied_version": None, "uptime_s": 9, "fabric": {"uplinks": {"p0": {"state": "Idle"}}}})
    with sessions() as s:
        ev = list(s.scalars(select(Event).where(Event.node_id == dpu, Event.trigger == "fabric_session_down")))
    assert len(ev) == 1 and ev[0].detail == {"uplinks": {"p0": "Idle"}}


@pytest.fixture
def evpn(tmp_path: Path, any_db_url: str) -> tuple[Config, sessionmaker[Session], int, int, int]:
    cfg = site_config(any_db_url, tmp_path, fabric={"asn": 4200000000})
    sessions = make_db(cfg)
    host, dpu = enroll_machine(sessions, "m1", host_bmc="fake://a", dpu_bmc="fake://b", index=1)
    _host2, dpu2 = enroll_machine(sessions, "m2", host_bmc="fake://c", dpu_bmc="fake://d", index=2)
    return cfg, sessions, host, dpu, dpu2


def test_the_idle_fast_path_answers_what_the_full_handler_answers(
        evpn: tuple[Config, sessionmaker[Session], int, int, int]) -> None:
    """EVPN: an idle check-in is answered from one read (agent_api._quiet). Its answers equal the full
    handler's, it never answers a request the full handler refuses, and a change of anything the policy
    is built from (the host's reserved addresses) shows in the next idle answer."""
    from sqlalchemy import update

    from bootsvc.models import Nic

    cfg, sessions, host, dpu, dpu2 = evpn
    app = app_for(cfg, sessions)
    c = app.test_client()
    agent = Agent(c, cfg, sessions, dpu)
    apply_triggers(sessions, dpu, *BOOTED, Trigger.AGENT_CHECKIN)
    _checkin(c, agent, {"applied_version": None})
    full = _checkin(c, agent, {"applied_version": None})  # confirms the secret: the full handler
    with statements(sessions) as stmts:
        _checkin(c, agent, {"applied_version": None, "uptime_s": 5})  # fills the worker's version cache
        hdr = agent.headers()
        stmts.clear()
        r = c.post("/api/v1/agent/checkin", headers=hdr, environ_base={"REMOTE_ADDR": agent.addr},
                   json={"agent_version": "0.1.0", "health": {"applied_version": None, "uptime_s": 6}})
        assert r.status_code == 200 and r.get_json() == full
        assert len(stmts) == 1 and stmts[0].lstrip().upper().startswith("SELECT"), [x[:80] + x[-200:] for x in stmts]
    assert full["policy_version"] == agent.policy()["version"]
    # refusals stay the full handler's: another DPU's address, a wrong secret, an unknown name
    other = Agent(c, cfg, sessions, dpu2).addr
    h = agent.headers()
    body = {"agent_version": "0.1.0", "health": {"applied_version": None}}
    assert c.post("/api/v1/agent/checkin", headers=h, json=body, environ_base={"REMOTE_ADDR": other}).status_code == 401
    bad = {**h, "Authorization": "Bearer " + "0" * 64}
    assert c.post("/api/v1/agent/checkin", headers=bad, json=body,
                  environ_base={"REMOTE_ADDR": agent.addr}).status_code == 401
    ghost = {**h, "X-Bootsvc-Node": "ghost"}
    assert c.post("/api/v1/agent/checkin", headers=ghost, json=body,
                  environ_base={"REMOTE_ADDR": agent.addr}).status_code == 401
    # the host's reserved address changes: its DPU's policy (its Type-5 exports) changes with it
    with sessions() as s:
        s.execute(update(Nic).where(Nic.node_id == host, Nic.role == "host-pf").values(ipv4="10.0.0.99"))
        s.commit()
    moved = _checkin(c, agent, {"applied_version": None, "uptime_s": 7})
    assert moved["policy_version"] != full["policy_version"] and moved["policy_version"] == agent.policy()["version"]
    # a DPU without a tenant of its own serves its host's (conductor_policy.tenant_of), either way
    from bootsvc.models import Node as NodeRow

    with sessions() as s:
        s.execute(update(NodeRow).where(NodeRow.id == dpu).values(tenant_id=None))
        s.commit()
    via_host = _checkin(c, agent, {"applied_version": None, "uptime_s": 8})
    assert via_host["policy_version"] == agent.policy()["version"] == moved["policy_version"]
    with sessions() as s:
        s.execute(update(NodeRow).where(NodeRow.id == host).values(tenant_id=None))
        s.commit()
    alone = _checkin(c, agent, {"applied_version": None, "uptime_s": 9})
    assert alone["policy_version"] == agent.policy()["version"] != moved["policy_version"]
    # a transition by someone else (the conductor sent the policy) shows at once
    apply_triggers(sessions, dpu, Trigger.POLICY_SENT)
    assert _checkin(c, agent, {"applied_version": None, "uptime_s": 8})["state"] == "policy_pending"


def test_the_secret_trade_checks_the_address_once_and_still_refuses_another(
        evpn: tuple[Config, sessionmaker[Session], int, int, int]) -> None:
    """EVPN: the secret trade falls back from the idle fast path (agent_api._quiet) to the full handler,
    which does not ask inventory.holds again when the fast path's read found the address holding this
    node - and still refuses the same request from another DPU's address, without trading the secret."""

    from bootsvc.models import Node as NodeRow

    cfg, sessions, _host, dpu, dpu2 = evpn
    app = app_for(cfg, sessions)
    c = app.test_client()
    agent = Agent(c, cfg, sessions, dpu)
    other = Agent(c, cfg, sessions, dpu2).addr
    apply_triggers(sessions, dpu, *BOOTED)
    body = {"agent_version": "0.1.0", "health": {"applied_version": None}}
    with sessions() as s:
        gen = s.get(NodeRow, dpu).secret_generation  # type: ignore[union-attr]
    r = c.post("/api/v1/agent/checkin", headers=agent.headers(), json=body, environ_base={"REMOTE_ADDR": other})
    assert r.status_code == 401 and "secret" not in r.get_json()
    with sessions() as s:
        assert s.get(NodeRow, dpu).secret_generation == gen  # type: ignore[union-attr]
    with statements(sessions) as stmts:
        r = c.post("/api/v1/agent/checkin", headers=agent.headers(), json=body,
                   environ_base={"REMOTE_ADDR": agent.addr})
    assert r.status_code == 200 and r.get_json()["secret"], r.get_data(as_text=True)
    # the one address test is the fast path's read (its EXISTS over leases); the full handler's node read
    # and writes name no lease table
    assert sum("leases" in st for st in stmts) == 1, stmts


def test_a_policy_fetch_after_the_trade_is_one_read_and_refuses_what_the_full_handler_refuses(
        evpn: tuple[Config, sessionmaker[Session], int, int, int]) -> None:
    """EVPN: GET /agent/policy of a DPU whose traded secret is confirmed is answered from one read
    (agent_api._quiet_policy) with the full handler's document and ETag; the first fetch (it confirms the
    secret) is the full handler's; another DPU's address, the install secret and a wrong one get 401."""

    from bootsvc.models import Node as NodeRow

    cfg, sessions, _host, dpu, dpu2 = evpn
    app = app_for(cfg, sessions)
    c = app.test_client()
    agent = Agent(c, cfg, sessions, dpu)
    other = Agent(c, cfg, sessions, dpu2).addr
    apply_triggers(sessions, dpu, *BOOTED)
    old = agent.headers()
    agent.checkin()  # the trade: the install secret is dead from the first fetch with the new one

    def get(h: dict[str, str], addr: str = agent.addr) -> Any:
        return c.get("/api/v1/agent/policy", headers=h, environ_base={"REMOTE_ADDR": addr})

    h = agent.headers()  # (reads the database itself)
    with statements(sessions) as stmts:
        first = get(h)
        # the full handler: it confirms the secret
        assert first.status_code == 200 and any(x.lstrip().upper().startswith("UPDATE") for x in stmts), stmts
        stmts.clear()
        again = get(h)
        assert len(stmts) == 1 and stmts[0].lstrip().upper().startswith("SELECT"), stmts
    with sessions() as s:
        assert s.get(NodeRow, dpu).agent_secret_confirmed  # type: ignore[union-attr]
    assert again.status_code == 200 and again.get_json() == first.get_json()
    assert again.headers["ETag"] == first.headers["ETag"] and again.headers["Cache-Control"] == "no-store"
    assert get({**agent.headers(), "If-None-Match": first.headers["ETag"]}).status_code == 304
    assert get(agent.headers(), other).status_code == 401
    assert get(old).status_code == 401
    assert get({**agent.headers(), "Authorization": "Bearer " + "0" * 64}).status_code == 401
    assert get({**agent.headers(), "X-Bootsvc-Node": "ghost"}).status_code == 401


def test_poll_seconds_scales_with_the_resting_fleet_within_bounds() -> None:
    """docs/agent-api.md "Poll interval": the base interval until the resting fleet would check in
    faster than the rate, then fleet/rate, never above the maximum; rate 0 = no scaling."""
    from bootsvc.web.agent_api import poll_seconds

    kw = {"base": 30.0, "rate": 100.0, "most": 300.0}
    assert poll_seconds(0, **kw) == poll_seconds(3000, **kw) == 30.0
    assert poll_seconds(10_000, **kw) == 100.0
    assert poll_seconds(10_000_000, **kw) == 300.0
    assert poll_seconds(10_000, base=30.0, rate=0.0, most=300.0) == 30.0
    assert poll_seconds(10_000, base=30.0, rate=100.0, most=10.0) == 30.0  # a maximum below base: base



def test_the_default_fleet_rate_is_consuls_pace() -> None:
    """The defaults (orchestration: 30 s, 25/s, 300 s): a small site is not slowed (null below 750
    resting DPUs), 3,000 resting come back every 120 s, 10,000 at the 300-s maximum (33/s)."""
    from bootsvc.config import OrchestrationConfig
    from bootsvc.web.agent_api import poll_seconds

    o = OrchestrationConfig()
    kw = {"base": o.agent_poll_seconds, "rate": o.agent_checkin_rate, "most": o.agent_poll_max_seconds}
    assert poll_seconds(750, **kw) == 30.0
    assert poll_seconds(3000, **kw) == 120.0
    assert poll_seconds(10_000, **kw) == 300.0


@pytest.mark.parametrize("fabric", [{}, {"asn": 4200000000}], ids=["static", "evpn"])
def test_only_a_resting_agent_is_told_to_come_back_later(
        tmp_path: Path, fabric: dict[str, Any]) -> None:
    """The scaled interval goes only to an agent in policy_applied whose applied version is the wanted
    one, or to a DPU told a policy to apply (dpu_ready, policy_pending: it rests once applied; the agent
    follows advice only then) (EVPN: from the fast path, which answers what the full handler answers);
    an agent in policy_applied with another policy to pull is told nothing (null: its own poll_interval)."""
    from sqlalchemy import update

    from bootsvc.models import Nic
    from bootsvc.web.agent_api import RESTING

    # rate 0.01/s: the 1 resting DPU of this site alone asks for 100 s
    cfg, sessions, app, c, agent, (host, _dpu, _h2, dpu2) = _two_machines(
        tmp_path, fabric, {"agent_checkin_rate": 0.01, "agent_poll_max_seconds": 250, "agent_booting_nodes": 0})
    v = _checkin(c, agent, {"applied_version": None})["policy_version"]
    # dpu_ready with 0 DPUs resting: the base interval is enough, no advice
    assert _checkin(c, agent, {"applied_version": None})["poll_seconds"] is None
    assert agent.report(v)["state"] == "policy_applied"
    app.extensions.pop(RESTING)  # the worker's count is RESTING_TTL old: re-read from here on
    out = _checkin(c, agent, {"applied_version": v})
    assert out["state"] == "policy_applied" and out["poll_seconds"] == 100.0
    hdr = agent.headers()  # (reads the node: before the count)
    with statements(sessions) as stmts:
        r = c.post("/api/v1/agent/checkin", headers=hdr, environ_base={"REMOTE_ADDR": agent.addr},
                   json={"agent_version": "0.1.0", "health": {"applied_version": v, "uptime_s": 9}})
    assert r.status_code == 200 and r.get_json() == out  # idle: under EVPN the fast path
    if fabric:
        assert len(stmts) == 1, stmts  # the worker's resting count is cached (RESTING_TTL)
    # an agent that has not applied the wanted version: no advice, so it pulls and reports at its pace
    assert _checkin(c, agent, {"applied_version": "old", "uptime_s": 10})["poll_seconds"] is None
    # the wanted policy changes under a resting agent (its host's address): no advice until applied
    with sessions() as s:
        s.execute(update(Nic).where(Nic.node_id == host, Nic.role == "host-pf").values(ipv4="10.0.0.99"))
        s.commit()
    out = _checkin(c, agent, {"applied_version": v, "uptime_s": 11})
    assert out["policy_version"] != v and out["poll_seconds"] is None
    # another DPU told its policy (dpu_ready) gets the interval to rest at once applied: its first
    # check-in after the apply is not at its own 30 s
    other = Agent(c, cfg, sessions, dpu2)
    apply_triggers(sessions, dpu2, *BOOTED, Trigger.AGENT_CHECKIN)
    out = _checkin(c, other, {"applied_version": None})
    assert out["state"] == "dpu_ready" and out["policy_version"] and out["poll_seconds"] == 100.0


@pytest.mark.parametrize("fabric", [{}, {"asn": 4200000000}], ids=["static", "evpn"])
def test_resting_agents_are_shed_while_the_site_boots_and_not_after(
        tmp_path: Path, fabric: dict[str, Any]) -> None:
    """docs/agent-api.md "Poll interval": while more than agent_booting_nodes nodes are in working
    states, resting agents are advised at agent_booting_rate up to agent_booting_poll_max_seconds; once
    the storm is over (the worker's next count), at the site's own pace again."""
    from sqlalchemy import update

    from bootsvc.models import Node as NodeRow
    from bootsvc.web.agent_api import RESTING

    # the site's pace would never advise 1 resting DPU (1000/s); booting: 0.01/s = 100 s, at most 250 s
    _cfg, sessions, app, c, agent, (_host, _dpu, host2, dpu2) = _two_machines(
        tmp_path, fabric, {"agent_checkin_rate": 1000.0, "agent_booting_nodes": 1, "agent_booting_rate": 0.01,
                           "agent_booting_poll_max_seconds": 250})
    v = _checkin(c, agent, {"applied_version": None})["policy_version"]
    assert agent.report(v)["state"] == "policy_applied"
    apply_triggers(sessions, dpu2, Trigger.PROVISION)  # dpu_booting
    app.extensions.pop(RESTING)
    _checkin(c, agent, {"applied_version": v})  # (the first idle one may write liveness: not the point)
    # one working node is not a booting site (more than agent_booting_nodes)
    assert _checkin(c, agent, {"applied_version": v, "uptime_s": 1})["poll_seconds"] is None
    apply_triggers(sessions, host2, Trigger.PROVISION)  # host_waiting_dpu: 2 working nodes
    app.extensions.pop(RESTING)
    assert _checkin(c, agent, {"applied_version": v, "uptime_s": 2})["poll_seconds"] == 100.0
    with sessions() as s:  # the storm is over: nothing in a working state any more
        s.execute(update(NodeRow).where(NodeRow.id.in_([dpu2, host2])).values(state="available"))
        s.commit()
    assert _checkin(c, agent, {"applied_version": v, "uptime_s": 3})["poll_seconds"] == 100.0  # cached
    app.extensions.pop(RESTING)
    assert _checkin(c, agent, {"applied_version": v, "uptime_s": 4})["poll_seconds"] is None


def test_the_booting_pace_never_advises_faster_or_a_shorter_maximum() -> None:
    """``fleet_pace``: the site's own pace until more than agent_booting_nodes nodes work; then the
    booting rate and maximum, but never a faster rate nor a shorter maximum than the site's. Defaults:
    3,000 resting DPUs during a storm come back every 600 s, 10,000 at the 900-s maximum (11/s), 100
    are not advised at all; after the storm 3,000 at 120 s as before."""
    from bootsvc.config import OrchestrationConfig
    from bootsvc.web.agent_api import fleet_pace, poll_seconds

    o = OrchestrationConfig()
    assert (o.agent_booting_nodes, o.agent_booting_rate, o.agent_booting_poll_max_seconds) == (100, 5.0, 900.0)
    assert fleet_pace(o, 100) == (25.0, 300.0) and fleet_pace(o, 101) == (5.0, 900.0)

    def at(resting: int, working: int) -> float:
        rate, most = fleet_pace(o, working)
        return poll_seconds(resting, base=o.agent_poll_seconds, rate=rate, most=most)

    assert (at(100, 5000), at(3000, 5000), at(10_000, 5000)) == (30.0, 600.0, 900.0)
    assert (at(3000, 0), at(10_000, 0)) == (120.0, 300.0)
    slow = o.model_copy(update={"agent_checkin_rate": 1.0, "agent_poll_max_seconds": 1200.0})
    assert fleet_pace(slow, 5000) == (1.0, 1200.0)
    assert fleet_pace(o.model_copy(update={"agent_booting_nodes": 0}), 10**6) == (25.0, 300.0)


def test_a_small_site_advises_nothing(env: tuple[Config, sessionmaker[Session], int, int, int]) -> None:
    """Defaults (25 check-ins/s): below 750 resting DPUs even a resting agent gets null, so an agent
    configured to poll faster than 30 s (labs, tests/integration/test_agent_netns.py) keeps its pace."""
    cfg, sessions, _host, dpu, _dpu2 = env
    c = app_for(cfg, sessions).test_client()
    agent = Agent(c, cfg, sessions, dpu)
    apply_triggers(sessions, dpu, *BOOTED, Trigger.AGENT_CHECKIN)
    v = _checkin(c, agent, {"applied_version": None})["policy_version"]
    assert agent.report(v)["state"] == "policy_applied"
    out = _checkin(c, agent, {"applied_version": v})
    assert out["state"] == "policy_applied" and out["poll_seconds"] is None


@pytest.mark.parametrize("fabric", [{}, {"asn": 4200000000}], ids=["static", "evpn"])
def test_a_resting_agent_writes_liveness_once_per_three_advised_intervals(
        tmp_path: Path, any_db_url: str, fabric: dict[str, Any]) -> None:
    """A resting agent told to come back in 100 s checks in every ~100 s: those check-ins write nothing
    while last_seen is younger than LAST_SEEN_POLLS x 100 s (a fixed 60 s made every one of them a write);
    the first one after that writes last_seen and the counters only (EVPN: one SELECT and one UPDATE of
    agent_status, the same answer); news (the applied version, a BGP session) is written whatever the age."""
    import datetime as dt

    from sqlalchemy import update

    from bootsvc import metrics
    from bootsvc.web import agent_api

    # rate 0.01/s: the 1 resting DPU of this site alone asks for 100 s
    cfg = site_config(any_db_url, tmp_path, fabric=fabric,
                      orchestration={"agent_checkin_rate": 0.01, "agent_poll_max_seconds": 250})
    sessions = make_db(cfg)
    _host, dpu = enroll_machine(sessions, "m1", host_bmc="fake://a", dpu_bmc="fake://b", index=1)
    app = app_for(cfg, sessions)
    c = app.test_client()
    agent = Agent(c, cfg, sessions, dpu)
    apply_triggers(sessions, dpu, *BOOTED, Trigger.AGENT_CHECKIN)
    v = _checkin(c, agent, {"applied_version": None})["policy_version"]
    _checkin(c, agent, {"applied_version": None})  # confirms the traded secret
    assert agent.report(v)["state"] == "policy_applied"
    app.extensions.pop(agent_api.RESTING)  # the worker's count (0 resting) is RESTING_TTL old
    rest = _checkin(c, agent, {"applied_version": v, "uptime_s": 1})
    assert rest["poll_seconds"] == 100.0
    assert agent_api.LAST_SEEN_POLLS == 3

    def age(seconds: float) -> dt.datetime:
        at = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=seconds)
        with sessions() as s:
            s.execute(update(AgentStatus).where(AgentStatus.node_id == dpu).values(last_seen=at))
            s.commit()
        return at

    def writes(stmts: list[str]) -> list[str]:
        return [x for x in stmts if not x.lstrip().upper().startswith(("SELECT", "BEGIN", "COMMIT"))]

    def count(path: str) -> float:
        return metrics.counters.get(agent_api.CHECKINS, {"path": path, "reason": "idle"})

    hdr = agent.headers()  # (reads the node: before the counts)
    body = {"agent_version": "0.1.0", "health": {"applied_version": v, "uptime_s": 2}}
    quiet0, touch0 = count("quiet"), count("touch")
    for seconds in (100, 200, 290):  # the 1st, 2nd and 3rd advised interval after the last write
        at = age(seconds)
        with statements(sessions) as stmts:
            r = c.post("/api/v1/agent/checkin", headers=hdr, environ_base={"REMOTE_ADDR": agent.addr}, json=body)
        assert r.status_code == 200 and r.get_json() == rest
        assert writes(stmts) == [], stmts
        assert _seen(sessions, dpu)[0].replace(tzinfo=dt.UTC) == at
        if fabric:
            assert len(stmts) == 1  # one read: agent_api._quiet
    if fabric:
        assert count("quiet") == quiet0 + 3
    # past 3 x 100 s: liveness is written, with the counters, and nothing else
    old = age(301)
    body = {"agent_version": "0.1.0", "health": {"applied_version": v, "uptime_s": 3}}
    with statements(sessions) as stmts:
        r = c.post("/api/v1/agent/checkin", headers=hdr, environ_base={"REMOTE_ADDR": agent.addr}, json=body)
    assert r.status_code == 200 and r.get_json() == rest
    seen, health, _v = _seen(sessions, dpu)
    assert seen.replace(tzinfo=dt.UTC) > old + dt.timedelta(seconds=300) and health["uptime_s"] == 3
    assert len(writes(stmts)) == 1 and "agent_status" in writes(stmts)[0], stmts
    if fabric:
        assert len(stmts) == 2 and count("touch") == touch0 + 1  # one read, one UPDATE
    # ... and the next check-in, an advised interval later, writes nothing again
    with statements(sessions) as stmts:
        _checkin(c, agent, {"applied_version": v, "uptime_s": 4})
    assert writes(stmts) == []
    # news is written at once however young last_seen is: a lost BGP session, an applied version
    _checkin(c, agent, {"applied_version": v, "uptime_s": 5, "fabric": {"uplinks": {"p0": {"state": "Idle"}}}})
    assert _seen(sessions, dpu)[1]["fabric"] == {"uplinks": {"p0": {"state": "Idle"}}}
    with statements(sessions) as stmts:
        out = _checkin(c, agent, {"applied_version": "other", "uptime_s": 6})
    assert writes(stmts) and _seen(sessions, dpu)[1]["applied_version"] == "other" and out["poll_seconds"] is None


def test_a_policy_fetch_survives_a_conductor_writing_the_node_meanwhile(
        env: tuple[Config, sessionmaker[Session], int, int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """GET /agent/policy confirms the traded secret (a write); a conductor step changing the same node between
    the handler's read and that commit must cost a re-read, not a 500 (StaleDataError on the version check)."""
    from sqlalchemy import update

    from bootsvc.models import Node
    from bootsvc.web import agent_api

    cfg, sessions, _host, dpu, _dpu2 = env
    c = app_for(cfg, sessions).test_client()
    apply_triggers(sessions, dpu, *BOOTED, Trigger.AGENT_CHECKIN)
    with sessions() as s:  # the secret is traded but not yet used: the policy fetch confirms it
        s.execute(update(Node).where(Node.id == dpu).values(agent_secret_confirmed=False))
        s.commit()
    real, raced = agent_api._confirm, []

    def racing_confirm(s: Session, n: Any) -> None:
        if not raced:  # another writer (a conductor step) bumps the node's version first
            raced.append(True)
            with sessions() as other:
                other.execute(update(Node).where(Node.id == n.id).values(version=Node.version + 1))
                other.commit()
        real(s, n)

    monkeypatch.setattr(agent_api, "_confirm", racing_confirm)
    doc = Agent(c, cfg, sessions, dpu).policy()
    assert raced and doc["node"] == "m1-dpu"
    with sessions() as s:
        n = s.get(Node, dpu)
        assert n is not None and n.agent_secret_confirmed

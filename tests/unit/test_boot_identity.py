"""Node identity on the boot plane (docs/security.md), each test written as the attack it stops.

The attacker sits on Zone 0 at an address DHCP never leased to the victim DPU; it knows the DPU's MAC
and name (printed on the card, visible in DHCP). The victim ``dpu-1`` holds 10.77.0.11 (a reservation)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from helpers.boot import DPU2_IP, DPU2_MAC, DPU_IP, DPU_MAC, Env, make_env

from bootsvc import auth_secrets, metrics, render
from bootsvc.web.boot_guard import REFUSED

ATTACKER = "10.77.0.66"


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, f"sqlite:///{tmp_path}/db.sqlite")


@pytest.fixture
def any_env(tmp_path: Path, any_db_url: str) -> Iterator[Env]:
    """The boot plane's environment on SQLite and on PostgreSQL (tests/conftest.py any_db_url)."""
    yield from make_env(tmp_path, any_db_url)
EVIL = {"REMOTE_ADDR": ATTACKER}


def _refused(reason: str) -> float:
    return metrics.counters.get(REFUSED, {"reason": reason})


def _agent(env: Env, secret: str, *, node: str = "dpu-1", addr: str = DPU_IP, path: str = "checkin") -> Any:
    c: FlaskClient = env.client
    h = {"Authorization": f"Bearer {secret}", "X-Bootsvc-Node": node}
    if path == "checkin":
        return c.post("/api/v1/agent/checkin", json={"agent_version": "t"}, headers=h,
                      environ_base={"REMOTE_ADDR": addr})
    return c.get(f"/api/v1/agent/{path}", headers=h, environ_base={"REMOTE_ADDR": addr})


# ---------------------------------------------------------------- scripts
def test_unleased_address_with_only_the_mac_gets_no_token_from_the_ipxe_script(env: Env) -> None:
    env.trigger("dpu-1", "provision")
    tok = env.token("dpu-1")
    before = _refused("address")
    r = env.client.get(f"/boot/ipxe?mac={DPU_MAC}", environ_base=EVIL)
    body = r.get_data(as_text=True)
    assert r.status_code == 200 and tok not in body and "token" not in body
    assert "dpu-1" not in body and "hold" in body  # not even the node's name
    assert _refused("address") == before + 1
    # the DPU itself, from its leased address, gets its install script
    assert tok in env.client.get(f"/boot/ipxe?mac={DPU_MAC}").get_data(as_text=True)


def test_unleased_address_gets_no_token_from_the_grub_config(env: Env) -> None:
    env.trigger("dpu-1", "provision")
    body = env.client.get(f"/boot/grub?mac={DPU_MAC}", environ_base=EVIL).get_data(as_text=True)
    assert env.token("dpu-1") not in body and "dpu-1" not in body


def test_a_script_cached_for_the_dpu_is_not_replayed_to_another_address(env: Env) -> None:
    env.app.config["BOOT_NODE_CACHE_TTL"] = 60.0  # the fast path on
    env.trigger("dpu-1", "provision")
    tok = env.token("dpu-1")
    assert tok in env.client.get(f"/boot/ipxe?mac={DPU_MAC}", headers={"Host": "h"}).get_data(as_text=True)
    stolen = env.client.get(f"/boot/ipxe?mac={DPU_MAC}", headers={"Host": "h"}, environ_base=EVIL)
    assert tok not in stolen.get_data(as_text=True)


def test_another_nodes_address_gets_no_token_either(env: Env) -> None:
    env.trigger("dpu-1", "provision")
    body = env.client.get(f"/boot/ipxe?mac={DPU_MAC}", environ_base={"REMOTE_ADDR": DPU2_IP}).get_data(True)
    assert env.token("dpu-1") not in body


# ---------------------------------------------------------------- bf.cfg, bfks, callbacks
def test_bfcfg_with_a_stolen_token_from_another_address_is_refused(env: Env) -> None:
    env.trigger("dpu-1", "provision")
    tok = env.token("dpu-1")
    for path in (f"/boot/bfcfg/dpu-1?token={tok}", f"/boot/bfks/dpu-1?token={tok}"):
        r = env.client.get(path, environ_base=EVIL)
        assert r.status_code == 403 and r.is_json and env.secret("dpu-1") not in r.get_data(True)


OTHER_DPU_IP = "10.77.0.21"  # a second bound lease of dpu-1 (another of its ports)


def _second_lease(env: Env) -> None:
    import datetime as dt

    from bootsvc.models import Lease

    with env.sessions() as s:
        s.add(Lease(vrf="", network="zone0", address=OTHER_DPU_IP, mac=DPU_MAC, node_id=env.node("dpu-1").id,
                    state="bound", expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)))
        s.commit()


def _bfcfg_events(env: Env) -> list[dict[str, Any]]:
    from sqlalchemy import select

    from bootsvc.models import Event

    with env.sessions() as s:
        return [dict(d) for d in s.scalars(select(Event.detail).where(Event.trigger == "bfcfg_served")
                                           .order_by(Event.id))]


def test_bfcfg_second_fetch_from_another_address_is_refused(env: Env) -> None:
    _second_lease(env)
    env.trigger("dpu-1", "provision")
    url = f"/boot/bfcfg/dpu-1?token={env.token('dpu-1')}"
    assert env.client.get(url).status_code == 200
    before = _refused("once")
    # the attacker racing the installer, or a replay, from another address of the node
    r = env.client.get(url, environ_base={"REMOTE_ADDR": OTHER_DPU_IP})
    assert r.status_code == 410 and r.is_json and "already served" in r.get_json()["reason"]
    assert env.secret("dpu-1") not in r.get_data(True) and _refused("once") == before + 1
    # a new install attempt (the conductor's retry after a timeout) serves it again, once, to whoever is first
    env.trigger("dpu-1", "timeout")
    assert env.client.get(url, environ_base={"REMOTE_ADDR": OTHER_DPU_IP}).status_code == 200
    assert env.client.get(url).status_code == 410


def test_bfcfg_whose_answer_was_lost_is_served_again_to_the_same_address_until_the_secret_is_traded(
        env: Env) -> None:
    """The instance died after marking bf.cfg served, or the mark's COMMIT succeeded but the connection
    died (503): the installer's retry from the same address gets the same bf.cfg, not a 410 that leaves
    the DPU waiting for its dpu_booting deadline."""
    env.trigger("dpu-1", "provision")
    url = f"/boot/bfcfg/dpu-1?token={env.token('dpu-1')}"
    first = env.client.get(url)
    again = env.client.get(url)
    assert first.status_code == again.status_code == 200
    assert again.get_data() == first.get_data() and f"secret = {env.secret('dpu-1')}" in again.get_data(True)
    ev = _bfcfg_events(env)
    assert [e.get("again", False) for e in ev] == [False, True] and {e["ip"] for e in ev} == {DPU_IP}
    # the agent traded the install secret: the bf.cfg holding it is dead (the node left the install: 409)
    sec = env.secret("dpu-1")
    assert _agent(env, sec).status_code == 200
    r = env.client.get(url)
    assert r.status_code in (401, 409) and sec not in r.get_data(True)


def test_bfcfg_is_not_served_again_once_the_secret_was_traded_even_mid_install(env: Env) -> None:
    from sqlalchemy import update

    from bootsvc.models import Node

    env.trigger("dpu-1", "provision")
    url = f"/boot/bfcfg/dpu-1?token={env.token('dpu-1')}"
    assert env.client.get(url).status_code == 200
    with env.sessions() as s:  # the first check-in's trade, with the node still installing
        s.execute(update(Node).where(Node.name == "dpu-1").values(agent_generation=Node.secret_generation))
        s.commit()
    assert env.node("dpu-1").state in ("dpu_booting", "dpu_installing")
    r = env.client.get(url)
    assert r.status_code == 410 and env.secret("dpu-1") not in r.get_data(True)


def test_callback_with_a_stolen_token_from_another_address_is_refused(env: Env) -> None:
    env.trigger("dpu-1", "provision")
    r = env.client.post("/boot/callback/dpu-1", json={"event": "done"}, environ_base=EVIL,
                        headers={"Authorization": f"Bearer {env.token('dpu-1')}"})
    assert r.status_code == 403 and env.node("dpu-1").state == "dpu_booting"


def test_unknown_node_and_bad_token_look_the_same(env: Env) -> None:
    a = env.client.post("/boot/callback/ghost", json={"event": "done"}, headers={"Authorization": "Bearer x"})
    b = env.client.post("/boot/callback/dpu-1", json={"event": "done"}, headers={"Authorization": "Bearer x"})
    assert a.status_code == b.status_code == 401 and a.json == b.json


# ---------------------------------------------------------------- the agent API
def test_checkin_from_another_address_is_refused_like_an_unknown_node(env: Env) -> None:
    env.trigger("dpu-1", "provision", "install_started", "install_done")
    sec = env.secret("dpu-1")
    evil = _agent(env, sec, addr=ATTACKER)
    unknown = _agent(env, sec, node="ghost")
    wrong = _agent(env, "0" * 64)
    assert evil.status_code == unknown.status_code == wrong.status_code == 401
    assert evil.json == unknown.json == wrong.json
    assert env.node("dpu-1").state == "dpu_rebooting"


def test_install_secret_is_traded_at_the_first_checkin_and_then_dead(env: Env) -> None:
    env.trigger("dpu-1", "provision", "install_started", "install_done")
    old = env.secret("dpu-1")
    assert _agent(env, old, path="policy").status_code == 401  # not before the exchange
    r = _agent(env, old)
    assert r.status_code == 200 and r.json["state"] == "dpu_ready"
    new = r.json["secret"]
    assert new != old and new == env.secret("dpu-1")
    assert r.headers["Cache-Control"] == "no-store"
    # the answer was lost: the old secret gets the same new one again, until the new one is used
    again = _agent(env, old)
    assert again.status_code == 200 and again.json["secret"] == new
    assert _agent(env, new, path="policy").status_code == 200
    assert "secret" not in _agent(env, new).json
    # from now on the secret that crossed the boot network is worth nothing
    assert _agent(env, old).status_code == 401
    assert _agent(env, old, path="policy").status_code == 401
    # the boot token derived from it is dead too
    tok = render.boot_token(old)
    assert env.client.post("/boot/callback/dpu-1", json={"event": "failed"},
                           headers={"Authorization": f"Bearer {tok}"}).status_code == 401


def test_installer_that_reported_nothing_finishes_at_the_agents_first_checkin(env: Env) -> None:
    env.trigger("dpu-1", "provision")  # NVIDIA's installer: no callback at all
    r = _agent(env, env.secret("dpu-1"))
    assert r.status_code == 200 and r.json["state"] == "dpu_ready" and r.json["secret"]


def test_the_old_oss_agent_cannot_end_a_reinstall(env: Env) -> None:
    """An agent that already traded its secret (the OS being replaced) checks in while the DPU is being
    reinstalled: liveness only, the install goes on."""
    env.trigger("dpu-1", "provision", "install_started", "install_done")
    new = _agent(env, env.secret("dpu-1")).json["secret"]
    env.trigger("dpu-1", "reprovision")
    assert env.node("dpu-1").state == "dpu_booting"
    r = _agent(env, new)
    assert r.status_code == 200 and r.json["state"] == "dpu_booting" and "secret" not in r.json
    # the new installer fetches bf.cfg: that secret crossed the boot network, so it is traded again
    assert env.client.get(f"/boot/bfcfg/dpu-1?token={env.token('dpu-1')}").status_code == 200
    r = _agent(env, new)
    assert r.status_code == 200 and r.json["state"] == "dpu_ready" and r.json["secret"] != new


def test_forging_a_dpu_from_its_mac_goes_nowhere(env: Env) -> None:
    """The walk the attack report made: script -> token -> bf.cfg -> secret -> check-in -> report."""
    env.trigger("dpu-1", "provision")
    script = env.client.get(f"/boot/ipxe?mac={DPU_MAC}", environ_base=EVIL).get_data(True)
    assert "token=" not in script
    guess = auth_secrets.node_secret(b"not the key", 1, 1)
    for path in (f"/boot/bfcfg/dpu-1?token={render.boot_token(guess)}", "/boot/bfks/dpu-1"):
        assert env.client.get(path, environ_base=EVIL).status_code == 401
    assert _agent(env, guess, addr=ATTACKER).status_code == 401
    assert env.node("dpu-1").state == "dpu_booting"


# ---------------------------------------------------------------- sweeps
def test_mac_sweep_is_rate_limited_and_counted(env: Env) -> None:
    burst = env.app.extensions["bootsvc_boot"].config.security.boot_sweep_burst
    before = _refused("rate")
    codes = [env.client.get(f"/boot/ipxe?mac=52:54:00:77:{i >> 8:02x}:{i & 255:02x}", environ_base=EVIL).status_code
             for i in range(burst + 30)]
    assert codes[:burst] == [200] * burst and set(codes[burst:]) == {429}
    assert _refused("rate") == before + 30
    r = env.client.get(f"/boot/ipxe?mac={DPU2_MAC}", environ_base=EVIL)
    assert r.status_code == 429 and r.is_json
    # the nodes themselves are not slowed by someone else's sweep
    assert env.client.get(f"/boot/ipxe?mac={DPU_MAC}").status_code == 200
    assert env.client.get(f"/boot/ipxe?mac={DPU2_MAC}", environ_base={"REMOTE_ADDR": DPU2_IP}).status_code == 200
    # and /metrics shows it
    env.client.environ_base["REMOTE_ADDR"] = "127.0.0.1"
    text = env.client.get("/metrics").get_data(True)
    assert re.search(r'^bootsvc_boot_refused_total\{[^}]*reason="rate"[^}]*\} [1-9]', text, re.M), text[:2000]


def test_bad_agent_secrets_draw_on_the_same_bucket(env: Env) -> None:
    burst = env.app.extensions["bootsvc_boot"].config.security.boot_sweep_burst
    codes = [_agent(env, f"{i:064x}", node=f"n{i}", addr=ATTACKER).status_code for i in range(burst + 3)]
    assert codes[:burst] == [401] * burst and set(codes[burst:]) == {429}


# ---------------------------------------------------------------- the real agent client
def _serve(env: Env) -> tuple[str, Any]:
    import threading

    from werkzeug.serving import make_server

    srv = make_server("127.0.0.1", 0, env.app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{srv.server_port}", srv


def _hold_loopback(env: Env) -> None:
    """dpu-1 also leased 127.0.0.1 (the real client below connects from there)."""
    import datetime as dt

    from bootsvc.models import Lease

    with env.sessions() as s:
        s.add(Lease(vrf="", network="zone0", address="127.0.0.1", mac=DPU_MAC, node_id=env.node("dpu-1").id,
                    state="bound", expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)))
        s.commit()


def test_the_agent_stores_the_traded_secret_and_uses_it_after_a_restart(env: Env, tmp_path: Any) -> None:
    from bootsvc.agent.client import AgentApi, ApiError
    from bootsvc.agent.main import Agent, load_config

    env.trigger("dpu-1", "provision", "install_started", "install_done")
    _hold_loopback(env)
    install = env.secret("dpu-1")
    url, srv = _serve(env)
    try:
        state = tmp_path / "agent-state"
        conf = tmp_path / "agent.conf"
        conf.write_text(f"[agent]\nurl = {url}\nnode = dpu-1\nsecret = {install}\nhost_port = eth1\n"
                        f"uplink = eth0\nstate_dir = {state}\n")
        cfg = load_config(conf)

        class NoKernel:
            def vrf_supported(self) -> bool:
                return True

        agent = Agent(cfg, dp=NoKernel())  # type: ignore[arg-type]
        assert agent.api.checkin({}) is not None
        new = agent.api.secret
        assert new != install and new == env.secret("dpu-1") and env.node("dpu-1").state == "dpu_ready"
        stored = state / "secret"
        assert stored.read_text().strip() == new and stored.stat().st_mode & 0o777 == 0o600
        assert agent.api.policy().status == 200
        # a restart reads the config (still the install secret) and the stored one wins
        again = AgentApi(url, "dpu-1", load_config(conf).secret)
        assert again.secret == new and again.policy().status == 200
        with pytest.raises(ApiError) as e:
            AgentApi(url, "dpu-1", install).checkin({})
        assert e.value.status == 401
    finally:
        srv.shutdown()


def test_an_agent_that_cannot_store_the_new_secret_keeps_the_old_and_is_sent_it_again(env: Env) -> None:
    from bootsvc.agent.client import AgentApi

    env.trigger("dpu-1", "provision")
    _hold_loopback(env)
    install = env.secret("dpu-1")
    url, srv = _serve(env)
    try:
        api = AgentApi(url, "dpu-1", install, on_new_secret=lambda _s: False)  # e.g. a read-only disk
        api.checkin({})
        assert api.secret == install
        stored: list[str] = []

        def store(s: str) -> bool:
            stored.append(s)
            return True

        api.on_new_secret = store
        api.checkin({})  # the server re-sends the new secret to the old one
        assert stored == [env.secret("dpu-1")] and api.secret == stored[0]
        assert api.policy().status == 200
    finally:
        srv.shutdown()


def test_discovery_reports_for_macs_the_address_does_not_hold_are_rate_limited(env: Env) -> None:
    burst = env.app.extensions["bootsvc_boot"].config.security.boot_sweep_burst
    codes = [env.client.post("/boot/discover", json={"mac": f"52:54:00:88:00:{i:02x}", "event": "probe"},
                             environ_base=EVIL).status_code for i in range(burst + 2)]
    assert codes[:burst] == [202] * burst and set(codes[burst:]) == {429}


# ---------------------------------------------------------------- races
def _at_once(n: int, fn: Any) -> list[Any]:
    import threading

    start = threading.Barrier(n)
    out: list[Any] = [None] * n

    def run(i: int) -> None:
        start.wait()
        out[i] = fn(i)

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    return out


def test_racing_bfcfg_fetches_exactly_one_address_wins(any_env: Env) -> None:
    env = any_env
    _second_lease(env)
    env.trigger("dpu-1", "provision")
    url = f"/boot/bfcfg/dpu-1?token={env.token('dpu-1')}"
    addrs = [DPU_IP, OTHER_DPU_IP] * 3
    codes = _at_once(6, lambda i: env.app.test_client().get(url, environ_base={"REMOTE_ADDR": addrs[i]}).status_code)
    by_addr = {a: sorted(c for c, x in zip(codes, addrs, strict=True) if x == a) for a in set(addrs)}
    ev = _bfcfg_events(env)
    first = [e for e in ev if not e.get("again")]
    assert len(first) == 1, ev
    winner = first[0]["ip"]
    assert by_addr[winner] == [200] * 3 and by_addr[OTHER_DPU_IP if winner == DPU_IP else DPU_IP] == [410] * 3, codes


def test_racing_first_checkins_all_get_the_same_new_secret(any_env: Env) -> None:
    env = any_env
    env.trigger("dpu-1", "provision", "install_started", "install_done")
    old = env.secret("dpu-1")

    def checkin(_i: int) -> Any:
        r = env.app.test_client().post("/api/v1/agent/checkin", json={}, environ_base={"REMOTE_ADDR": DPU_IP},
                                       headers={"Authorization": f"Bearer {old}", "X-Bootsvc-Node": "dpu-1"})
        return r.status_code, (r.get_json() or {}).get("secret")

    got = _at_once(4, checkin)
    assert {c for c, _s in got} == {200}, got
    assert {s for _c, s in got} == {env.secret("dpu-1")} and env.node("dpu-1").state == "dpu_ready"


def test_a_secret_pushed_through_the_bmc_is_traded_too(env: Env) -> None:
    """The Redfish path hands bf.cfg to the BMC, not to /boot/bfcfg: expose_install_secret marks it."""
    from bootsvc import inventory

    env.trigger("dpu-1", "provision", "install_started", "install_done")
    first = _agent(env, env.secret("dpu-1")).json["secret"]
    assert "secret" not in _agent(env, first).json  # traded and confirmed
    env.trigger("dpu-1", "reprovision")
    with env.sessions() as s:
        inventory.expose_install_secret(s, env.node("dpu-1").id)
        s.commit()
    r = _agent(env, first)
    assert r.json["state"] == "dpu_ready" and r.json["secret"] not in (None, first)

"""The agent loop with an in-memory kernel and API: apply, idempotence, rollback, outage, restart."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers.agent import FakeApi, make, pdoc

from bootsvc.agent.client import Unreachable
from bootsvc.agent.main import load_config
from bootsvc.agent.plan import plan
from bootsvc.agent.policy import parse


def test_first_start_isolates_then_applies_and_reports(tmp_path: Path) -> None:
    agent, dp, api = make(tmp_path)
    assert agent.env.mode == "table"  # probe said no VRF support
    api.set(pdoc("1"))
    assert agent.step() == agent.cfg.poll_interval
    assert api.reports[-1][:3] == ("1", "applied", None)
    assert api.reports[-1][3]["applied_version"] == "1"
    assert plan(agent.applied, agent.env, dp.k.observe()) == []
    saved = json.loads((tmp_path / "state" / "applied.json").read_text())
    assert saved["version"] == "1"
    # steady state: nothing runs, no GET (versions equal) and no new report
    ran = len(dp.k.ran)
    agent.step()
    assert len(dp.k.ran) == ran and len(api.reports) == 1 and api.gets == ["isolated"]


def test_failed_apply_rolls_back_and_retries_later(tmp_path: Path) -> None:
    agent, dp, api = make(tmp_path, retry_failed=3600)
    api.set(pdoc("1"))
    agent.step()
    before = dp.k.observe()
    api.set(pdoc("2", tenant="b", vrf_name="vrf-b", vrf_table=1002, l3vni=5002, peers=[]))
    dp.fail_on = "nft"  # ip changes happen, then the firewall transaction fails
    agent.step()
    v, status, err, health = api.reports[-1]
    assert (v, status) == ("2", "failed") and err is not None and "injected" in err
    assert health["applied_version"] == "1" and agent.applied.version == "1"
    after = dp.k.observe()
    assert set(after.rules) == set(before.rules) and set(after.routes) == set(before.routes)
    assert set(after.links) == set(before.links) and set(after.addrs) == set(before.addrs)
    n = len(api.reports)
    agent.step()  # within retry_failed: not retried
    assert len(api.reports) == n
    dp.fail_on = None
    object.__setattr__(agent.cfg, "retry_failed", 0.0)
    agent.step()
    assert api.reports[-1][:2] == ("2", "applied") and agent.applied.version == "2"


def test_rollback_failure_is_reported_too(tmp_path: Path) -> None:
    agent, dp, api = make(tmp_path)
    api.set(pdoc("1"))
    agent.step()
    api.set(pdoc("2", host_gateway="10.0.5.1/24"))
    dp.fail_on, dp.fail_skip = "ip", 3  # half-applied, then every ip command fails
    agent.step()
    err = api.reports[-1][2]
    assert err is not None and "rollback to 1 failed" in err


def test_invalid_policy_is_reported_and_not_applied(tmp_path: Path) -> None:
    agent, _dp, api = make(tmp_path)
    api.set(pdoc("1"))
    agent.step()
    api.set(pdoc("2", vrf_table=255))
    agent.step()
    assert api.reports[-1][:2] == ("2", "failed") and "vrf_table" in (api.reports[-1][2] or "")
    assert agent.applied.version == "1"


def test_wrong_host_port_is_refused(tmp_path: Path) -> None:
    agent, _dp, api = make(tmp_path)
    d = pdoc("1")
    d["host_port"] = "pf1hpf"
    api.set(d)
    agent.step()
    assert api.reports[-1][:2] == ("1", "failed") and "pf1hpf" in (api.reports[-1][2] or "")


def test_outage_backoff_keeps_policy_repairs_drift_and_catches_up(tmp_path: Path) -> None:
    agent, dp, api = make(tmp_path, backoff_max=8)
    api.set(pdoc("1"))
    agent.step()
    api.down = True
    delays = [agent.step() for _ in range(5)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert agent.applied.version == "1"
    # drift while offline is repaired from the persisted policy
    dp.k.rules.clear()
    agent.step()
    assert plan(agent.applied, agent.env, dp.k.observe()) == []
    # the server's wish changes while it is unreachable; the agent catches up when it returns
    api.set(pdoc("2", host_gateway="10.0.7.1/24"))
    api.down = False
    assert agent.step() == agent.cfg.poll_interval
    assert agent.applied.version == "2" and api.reports[-1][:2] == ("2", "applied")


def test_report_lost_in_outage_is_sent_later(tmp_path: Path) -> None:
    agent, _dp, api = make(tmp_path)
    api.set(pdoc("1"))

    def flaky_report(*a: Any) -> None:
        raise Unreachable("gone")

    real = api.report
    api.report = flaky_report  # type: ignore[method-assign,assignment]
    agent.step()
    assert agent.applied.version == "1" and agent.pending_report is not None
    api.report = real  # type: ignore[method-assign]
    agent.step()
    assert api.reports[-1][:2] == ("1", "applied") and agent.pending_report is None


def test_refused_checkin_backs_off(tmp_path: Path) -> None:
    agent, _dp, api = make(tmp_path)
    api.refuse = True
    assert agent.step() == 1.0 and agent.step() == 2.0


def test_restart_keeps_applied_policy_without_server(tmp_path: Path) -> None:
    agent, dp, api = make(tmp_path)
    api.set(pdoc("1"))
    agent.step()
    # new process, same kernel and state dir, server down
    api2 = FakeApi()
    api2.down = True
    agent2, _dp2, _ = make(tmp_path, k=dp.k, api=api2)
    assert agent2.applied.version == "1"
    agent2.step()
    assert plan(parse(pdoc("1")), agent2.env, dp.k.observe()) == []


def test_periodic_repull_uses_etag(tmp_path: Path) -> None:
    agent, _dp, api = make(tmp_path, repull_every=2)
    api.set(pdoc("1"))
    for _ in range(4):
        agent.step()
    assert api.gets[1:] and set(api.gets[1:]) == {"1"}  # If-None-Match with the applied version -> 304
    assert len(api.reports) == 1


def test_load_config(tmp_path: Path) -> None:
    (tmp_path / "secret").write_text("s3cret\n")
    conf = tmp_path / "agent.conf"
    conf.write_text("[agent]\nurl = http://10.98.0.1:8000\nnode = dpu1\nnode_id = 4\n"
                    f"secret_file = {tmp_path / 'secret'}\nhost_port = pf0hpf\nuplink = p0\n"
                    f"state_dir = {tmp_path}/st\nserial = MT1\npoll_interval = 5\nnft = /usr/local/sbin/nft\n")
    c = load_config(conf)
    assert c.secret == "s3cret" and c.node_id == 4 and c.poll_interval == 5.0
    assert c.tools.nft == "/usr/local/sbin/nft" and c.tools.ip == "ip"
    assert c.frr.timeout == 240.0  # frr-reload.py of a tenant move took over 60 s on the TCG lab DPU
    conf.write_text(conf.read_text() + "frr_timeout = 300\n")
    assert load_config(conf).frr.timeout == 300.0
    conf.write_text("[agent]\nurl = x\n")
    with pytest.raises(SystemExit, match="missing"):
        load_config(conf)


def test_agent_imports_only_stdlib_and_the_dhcp_codec() -> None:
    """The agent installs as a wheel on a small Debian (python3, iproute2, nftables): importing it
    must not pull in Flask, SQLAlchemy, pydantic, YAML or anything else from bootsvc."""
    import subprocess

    code = ("import sys, bootsvc.agent.main, bootsvc.agent.frr\n"
            "print('\\n'.join(sorted(m for m in sys.modules if m.split('.')[0] not in sys.stdlib_module_names\n"
            "                        and not m.startswith('_'))))")  # _: site hooks of the venv
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert {m.split(".")[0] for m in out} == {"bootsvc"}
    assert {m for m in out if not m.startswith("bootsvc.agent")} == {"bootsvc", "bootsvc.dhcp", "bootsvc.dhcp.packet"}


def test_the_agent_follows_the_advised_interval_within_its_bounds(tmp_path: Path) -> None:
    """docs/agent-api.md "Poll interval": the check-in answer's poll_seconds, kept within
    [poll_min, poll_max]; poll_interval without advice, and while the wanted policy is not applied."""
    agent, dp, api = make(tmp_path)
    api.set(pdoc("1"))
    assert agent.step() == agent.cfg.poll_interval == 30.0  # no advice (a server without the field)
    for advised, wait in ((100.0, 100.0), (1.0, agent.cfg.poll_min), (1e6, agent.cfg.poll_max)):
        api.advised_poll = advised
        assert agent.step() == wait
    api.advised_poll = 100.0
    api.set(pdoc("2", tenant="b", vrf_name="vrf-b", vrf_table=1002, l3vni=5002, peers=[]))
    dp.fail_on = "nft"  # the new policy does not apply: retried at the agent's own pace
    assert agent.step() == agent.cfg.poll_interval and agent.applied.version == "1"
    assert api.reports[-1][:2] == ("2", "failed")


def test_the_client_takes_only_a_sane_advice(monkeypatch: pytest.MonkeyPatch) -> None:
    from bootsvc.agent.client import AgentApi

    api = AgentApi("http://127.0.0.1:9", "dpu1", "ab" * 16)
    for answer, advised in ((120, 120.0), (2.5, 2.5), ("120", None), (True, None), (0, None), (-5, None),
                            (float("inf"), None), (None, None)):
        body = {"policy_version": "7", "state": "policy_applied", "poll_seconds": answer}
        monkeypatch.setattr(api, "_request", lambda *_a, b=body, **_k: (200, {}, json.dumps(b).encode()))
        assert api.checkin({}) == "7" and api.advised_poll == advised, answer


def test_a_long_advised_wait_spaces_the_checkins_not_the_drift_repair(tmp_path: Path) -> None:
    """``Agent.rest``: while the agent waits out an advised interval longer than its own (a server
    shedding resting agents while the site boots, up to poll_max), it repairs drift every poll_interval
    and does not check in; stopping ends the wait at once."""
    import threading
    import time

    agent, dp, api = make(tmp_path, poll_interval=0.05)
    api.set(pdoc("1"))
    agent.step()
    checkins = len(api.checkins)
    dp.k.rules.clear()  # drift: someone flushed the ruleset
    assert plan(agent.applied, agent.env, dp.k.observe()) != []
    t0 = time.monotonic()
    agent.rest(0.3)
    assert time.monotonic() - t0 >= 0.3
    assert plan(agent.applied, agent.env, dp.k.observe()) == [] and len(api.checkins) == checkins
    threading.Timer(0.1, agent.stop_event.set).start()
    t0 = time.monotonic()
    agent.rest(60.0)
    assert time.monotonic() - t0 < 5.0

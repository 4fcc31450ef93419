"""The conductor's I/O edge with in-memory BMCs (bootsvc.power.fake) on SQLite: the whole machine
flow (DPU first, then host into its tenant VRF), release, failures landing in the right failure
state with a reason and a hint, and retry from there. Installer and agent are scripted over bootsvc's
real HTTP routes (Flask test client)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers.conductor import (
    Lab,
    add_token,
    node,
    state,
    wait_for,
    write_erase_catalog,
)
from sqlalchemy import update

from bootsvc import images
from bootsvc.agent import policy as agent_policy
from bootsvc.conductor import DRIFT_SECONDS, Conductor
from bootsvc.models import Node
from bootsvc.power.base import DpuMode, FatalBmcError, PowerState, RetryableBmcError
from bootsvc.power.fake import FakePowerDriver, register_fake, reset_fakes


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    yield Lab(tmp_path)
    reset_fakes()


def test_whole_machine_dpu_first_then_host(lab: Lab) -> None:
    r = lab.api("POST", "/api/v1/machines/m1/provision")
    assert r.status_code == 200, r.get_json()
    assert {x["to_state"] for x in r.get_json()["results"]} == {"host_waiting_dpu", "dpu_booting"}

    lab.run()
    # DPU: BMC verified, one-time PXE, powered on; host untouched while its DPU is not ready
    assert lab.dpu_drv.calls["power_state"] >= 1 and lab.dpu_drv.calls["boot_once"] == 1
    assert lab.dpu_drv.boot.target == "Pxe" and lab.dpu_drv.power_state() is PowerState.ON
    lab.dpu_to_applied()
    assert lab.dpu_drv.boot.target == "None"  # the sticky (Continuous) override was cleared after use
    assert sum(lab.host_drv.calls.values()) == 0, "host BMC touched before its DPU applied the policy"
    assert state(lab.sessions, lab.host) == "host_waiting_dpu"

    lab.host_to_deployed()
    assert lab.host_drv.calls["boot_once"] == 1 and lab.host_drv.power_state() is PowerState.ON
    lab.run()  # the host's consumed boot override is cleared once
    assert lab.host_drv.calls["clear_boot_override"] == 1 and lab.host_drv.boot.target == "None"
    # nothing repeats once everything rests
    before = (sum(lab.dpu_drv.calls.values()), sum(lab.host_drv.calls.values()))
    lab.run(3)
    assert before == (sum(lab.dpu_drv.calls.values()), sum(lab.host_drv.calls.values()))

    dpu_path = [e.to_state for e in lab.events(lab.dpu) if e.from_state != e.to_state]
    assert dpu_path == ["dpu_booting", "dpu_installing", "dpu_rebooting", "dpu_ready", "policy_pending",
                        "policy_applied"]
    host_path = [e.to_state for e in lab.events(lab.host) if e.from_state != e.to_state]
    assert host_path == ["host_waiting_dpu", "host_booting", "host_installing", "deployed"]
    # the host's boot started only after the DPU's policy_applied event
    dpu_applied = next(e.id for e in lab.events(lab.dpu) if e.to_state == "policy_applied")
    host_boot = next(e.id for e in lab.events(lab.host) if e.trigger == "bmc_boot_network")
    assert host_boot > dpu_applied


def test_policy_document_is_the_tenants_and_the_agent_accepts_it(lab: Lab) -> None:
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.dpu_to_applied()
    doc = lab.agent.policy()
    p = agent_policy.parse(doc)  # the agent helper's own validator
    assert p.tenant is not None and p.node == "m1-dpu"
    assert (p.tenant.vrf_name, p.tenant.l3vni, p.tenant.vrf_table) == ("vrf-acme", 5001, 5001)
    assert str(p.tenant.vtep) == f"10.255.{lab.dpu >> 8}.{lab.dpu & 255}"
    assert str(p.tenant.gateway) == "10.0.0.1/24"
    assert p.tenant.relay is not None and str(p.tenant.relay.server) == "10.98.0.1"
    assert p.tenant.relay.remote_id == "MT-m1" and p.tenant.relay.vss_vrf == "vrf-acme"
    assert {(f.zone, f.proto, f.dport) for f in p.tenant.flows} == {(0, "udp", 69), (0, "tcp", 8080),
                                                                   (2, "tcp", 443)}
    # ETag / If-None-Match
    r = lab.client.get("/api/v1/agent/policy", headers={**lab.agent.headers(), "If-None-Match": f'"{doc["version"]}"'})
    assert r.status_code == 304 and r.headers["ETag"] == f'"{doc["version"]}"'


def test_release_powers_off_wipes_and_revokes_the_node_secret(lab: Lab) -> None:
    write_erase_catalog(lab.cfg)
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.dpu_to_applied()
    lab.host_to_deployed()
    old_headers = lab.agent.headers()
    gen = node(lab.sessions, lab.dpu).secret_generation
    r = lab.api("POST", "/api/v1/machines/m1/release", {"reason": "tenant left"})
    assert r.status_code == 200, r.get_json()
    lab.until(lab.host, "wiping")
    lab.until(lab.dpu, "wiping")
    # the old secret is revoked before the erase image boots; then it is network-booted
    assert node(lab.sessions, lab.dpu).secret_generation == gen + 1
    for nid in (lab.host, lab.dpu):
        wait_for(lambda n=nid: lab.booted_in_this_state(n), 5, lab.run, interval=0.0)  # type: ignore[misc]
        lab.installer.send(nid, "started", mode="wipe")
        lab.installer.send(nid, "done", mode="wipe")
        assert state(lab.sessions, nid) == "available"
    lab.run(2)  # after the wipe: power off, clear the override, rotate again
    assert lab.host_drv.power_state() is PowerState.OFF and lab.dpu_drv.power_state() is PowerState.OFF
    assert lab.host_drv.boot.target == "None" and lab.dpu_drv.boot.target == "None"
    assert node(lab.sessions, lab.dpu).secret_generation == gen + 2
    r = lab.client.post("/api/v1/agent/checkin", headers=old_headers, json={})
    assert r.status_code == 401  # the released install's secret no longer works
    # and it can be provisioned again (a reinstalled agent starts with nothing applied)
    lab.agent.applied = None
    assert lab.api("POST", "/api/v1/machines/m1/provision").status_code == 200
    lab.dpu_to_applied()
    lab.host_to_deployed()


def test_deadline_expiry_retries_then_fails_with_reason_and_retry_succeeds(lab: Lab) -> None:
    # the API stamps deadlines with the wall clock, the conductor with lab.clock (started when the Lab was
    # built): jump well past 900 s so a slow API call under load cannot leave the deadline ahead of it
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.run()
    assert lab.dpu_drv.calls["boot_once"] == 1
    for attempt in (1, 2):  # nobody calls back: the deadline passes, the DPU is booted again
        lab.clock.jump(960)
        lab.run(2)
        assert node(lab.sessions, lab.dpu).attempts == attempt
        assert lab.dpu_drv.calls["boot_once"] == attempt + 1, "a deadline retry redoes the network boot"
    lab.clock.jump(960)
    lab.run()
    n = node(lab.sessions, lab.dpu)
    assert n.state == "dpu_install_failed"
    assert n.last_error and "deadline of dpu_booting passed" in n.last_error
    assert n.hint and "DPU console" in n.hint
    lab.run()  # the host learns its DPU failed
    h = node(lab.sessions, lab.host)
    assert h.state == "blocked_by_dpu" and h.last_error and "m1-dpu" in h.last_error
    assert sum(lab.host_drv.calls.values()) == 0

    r = lab.api("POST", "/api/v1/nodes/m1-dpu/retry", {"reason": "cable reseated"})
    assert r.status_code == 200 and r.get_json()["to_state"] == "dpu_booting"
    lab.dpu_to_applied()
    lab.until(lab.host, "host_booting")  # the blocked host continues by itself
    lab.host_to_deployed()


def test_bmc_failure_lands_in_bmc_failed_and_retry_succeeds(lab: Lab) -> None:
    lab.dpu_drv.fail("power_state", FatalBmcError("401 Unauthorized", bmc="fake://m1-dpu", hint="check credentials"))
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.run()
    n = node(lab.sessions, lab.dpu)
    assert n.state == "bmc_failed" and n.last_error and "401 Unauthorized" in n.last_error
    assert n.hint and "BMC" in n.hint
    assert lab.dpu_drv.calls["boot_once"] == 0
    assert lab.api("POST", "/api/v1/machines/m1/retry").status_code == 200
    assert state(lab.sessions, lab.dpu) == "dpu_booting"
    lab.dpu_to_applied()
    lab.host_to_deployed()


def test_transient_bmc_errors_back_off_and_recover(lab: Lab) -> None:
    lab.dpu_drv.fail("boot_once", RetryableBmcError("HTTP 503 busy", bmc="fake://m1-dpu"), times=2)
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.run()
    assert node(lab.sessions, lab.dpu).action_failures == 1
    lab.run()
    assert node(lab.sessions, lab.dpu).action_failures == 2
    lab.run()
    n = node(lab.sessions, lab.dpu)
    assert n.state == "dpu_booting" and n.action_failures == 0 and lab.dpu_drv.calls["boot_once"] == 3
    assert lab.dpu_drv.power_state() is PowerState.ON


def test_bmc_keeps_failing_transiently_until_bmc_failed(lab: Lab) -> None:
    lab.dpu_drv.fail("power_state", RetryableBmcError("connection refused", bmc="fake://m1-dpu"), times=10)
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.run(3)
    n = node(lab.sessions, lab.dpu)
    assert n.state == "bmc_failed" and n.last_error and "3 times" in n.last_error


def test_installer_failure_blocks_host_and_retry_succeeds(lab: Lab) -> None:
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.run()
    lab.installer.send(lab.dpu, "started")
    lab.installer.send(lab.dpu, "failed", reason="mmcblk0: I/O error")
    n = node(lab.sessions, lab.dpu)
    assert n.state == "dpu_install_failed" and n.last_error and "I/O error" in n.last_error
    lab.run()
    assert state(lab.sessions, lab.host) == "blocked_by_dpu"
    assert lab.api("POST", "/api/v1/machines/m1/retry").status_code == 200
    assert state(lab.sessions, lab.dpu) == "dpu_booting"
    assert state(lab.sessions, lab.host) == "host_waiting_dpu"
    lab.dpu_to_applied()
    lab.host_to_deployed()


def test_host_installer_failure_and_retry(lab: Lab) -> None:
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.dpu_to_applied()
    lab.until(lab.host, "host_booting")
    lab.run()
    lab.installer.send(lab.host, "failed", reason="no disk found")
    h = node(lab.sessions, lab.host)
    assert h.state == "host_install_failed" and h.last_error and "no disk" in h.last_error
    assert h.hint and "host console" in h.hint
    assert lab.api("POST", "/api/v1/nodes/m1/retry").status_code == 200
    lab.host_to_deployed()
    assert lab.host_drv.calls["boot_once"] == 2


def test_agent_reports_failure_lands_policy_failed_and_retry(lab: Lab) -> None:
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.until(lab.dpu, "dpu_booting")
    lab.run()
    lab.installer.send(lab.dpu, "started")
    lab.installer.send(lab.dpu, "done")
    lab.agent.checkin()
    lab.until(lab.dpu, "policy_pending")
    doc = lab.agent.policy()
    lab.agent.report(doc["version"], "failed", "nft: syntax error")
    n = node(lab.sessions, lab.dpu)
    assert n.state == "policy_failed" and n.last_error and "nft: syntax error" in n.last_error
    lab.run()
    assert state(lab.sessions, lab.host) == "blocked_by_dpu"
    assert lab.api("POST", "/api/v1/nodes/m1-dpu/retry").status_code == 200
    lab.until(lab.dpu, "policy_pending")
    lab.agent.sync()
    lab.until(lab.host, "host_booting")


def test_tenant_change_resends_policy(lab: Lab) -> None:
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.dpu_to_applied()
    lab.host_to_deployed()
    v1 = lab.agent.applied
    admin = add_token(lab.sessions, "admin")
    # a deployed host cannot be left without a tenant (a move to another one: tests/unit/test_fabric.py)
    r = lab.client.put("/api/v1/machines/m1/tenant", json={"tenant": None},
                       headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 409 and r.get_json()["state"] == "deployed"
    # the DPU alone (its host's VRF stays until release) gets the new tenant's policy
    r = lab.client.put("/api/v1/nodes/m1-dpu/tenant", json={"tenant": "globex"},
                       headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200, r.get_json()
    lab.run()
    assert state(lab.sessions, lab.dpu) == "policy_applied"  # resting DPUs are checked for drift every 10 s
    lab.clock.jump(DRIFT_SECONDS)
    lab.until(lab.dpu, "policy_pending")
    lab.agent.sync()
    assert state(lab.sessions, lab.dpu) == "policy_applied" and lab.agent.applied != v1
    doc = lab.agent.policy()
    assert (doc["tenant"], doc["vrf_name"], doc["l3vni"]) == ("globex", "vrf-globex", 5002)


def test_tenant_without_network_fails_policy_with_reason(lab: Lab) -> None:
    with lab.sessions() as s:
        from bootsvc import inventory

        inventory.add_tenant(s, "initech", "vrf-initech", 5003)
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.dpu_to_applied()
    admin = add_token(lab.sessions, "admin")
    r = lab.client.put("/api/v1/nodes/m1-dpu/tenant", json={"tenant": "initech"},
                       headers={"Authorization": f"Bearer {admin}"})
    assert r.status_code == 200
    lab.clock.jump(DRIFT_SECONDS)
    lab.until(lab.dpu, "policy_failed")
    n = node(lab.sessions, lab.dpu)
    assert n.last_error and "vrf-initech" in n.last_error


def test_redfish_bfb_push_path(tmp_path: Path) -> None:
    bfb = tmp_path / "doca.bfb"
    bfb.write_bytes(b"BFB" * 100)
    img = images.make_image("doca", "2.9.1", "bfb", {"bfb": bfb})
    cat = images.Catalog(images=(img,), defaults={"dpu": "doca"})
    import yaml

    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(images.dump_catalog(cat, tmp_path)))
    lab = Lab(tmp_path, method="redfish")
    lab.dpu_drv.task_duration = 0
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.run()
    n = node(lab.sessions, lab.dpu)
    assert lab.dpu_drv.calls["install_bfb"] == 1 and lab.dpu_drv.rshim
    assert n.bmc_task and lab.dpu_drv.calls["boot_once"] == 0
    # task polled: started, transfer completed; then the DPU OS (OemLastState OsIsRunning) -> install done
    lab.until(lab.dpu, "dpu_rebooting")
    assert lab.dpu_drv.calls["dpu_os_state"] >= 1
    ev = [e for e in lab.events(lab.dpu) if e.trigger == "bmc_bfb_push"]
    assert ev and ev[0].detail["image"] == "doca.bfb" and ev[0].detail["dpu_mode"] == "DpuMode"
    assert [e.trigger for e in lab.events(lab.dpu) if e.trigger in ("bfb_transferred", "install_done")] == [
        "bfb_transferred", "install_done"]
    # the URL the BMC got: one-time push URL of the bfbpush blueprint, token never in an event
    url = lab.dpu_drv._tasks["/redfish/v1/TaskService/Tasks/1"].image_uri
    assert url.startswith("http://10.98.0.1:8080/bfb-push/b1.") and url.endswith("/doca.bfb")
    assert all(url.split("/")[4] not in str(e.detail) for e in lab.events(lab.dpu))
    lab.agent.checkin()
    lab.until(lab.dpu, "policy_pending")
    lab.agent.sync()
    lab.host_to_deployed()


def test_redfish_transfer_done_is_not_install_done(tmp_path: Path) -> None:
    """The DPU stays in dpu_installing after the transfer until its OS runs; never a PowerCycle."""
    bfb = tmp_path / "doca.bfb"
    bfb.write_bytes(b"BFB")
    cat = images.Catalog(images=(images.make_image("doca", "1", "bfb", {"bfb": bfb}),), defaults={"dpu": "doca"})
    import yaml

    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(images.dump_catalog(cat, tmp_path)))
    # a site whose dpu_installing deadline is shorter than the install's own 40 min
    lab = Lab(tmp_path, method="redfish", conductor={"deadlines": {"dpu_installing": 600}})
    lab.dpu_drv.os_state = "Installing"  # BootProgress.OemLastState while the BFB installs
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.until(lab.dpu, "dpu_installing")
    lab.run()
    lab.run()
    n = node(lab.sessions, lab.dpu)
    assert n.state == "dpu_installing" and (n.bmc_task or "").startswith("os-wait:")
    # the state's deadline must not cut the install's own 40 min short
    assert n.deadline is not None
    left = (n.deadline.replace(tzinfo=dt.UTC) - lab.clock()).total_seconds()
    assert left >= lab.cfg.power.install_timeout
    assert lab.dpu_drv.calls["dpu_os_state"] >= 1 and lab.dpu_drv.resets == []
    lab.dpu_drv.os_state = "OsIsRunning"
    with lab.sessions() as s:  # skip the OemLastState poll backoff
        s.execute(update(Node).where(Node.id == lab.dpu).values(next_check_at=None))
        s.commit()
    lab.until(lab.dpu, "dpu_rebooting")
    assert lab.dpu_drv.resets == []


def test_redfish_bfb_task_failure(tmp_path: Path) -> None:
    bfb = tmp_path / "doca.bfb"
    bfb.write_bytes(b"BFB")
    cat = images.Catalog(images=(images.make_image("doca", "1", "bfb", {"bfb": bfb}),), defaults={"dpu": "doca"})
    import yaml

    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(images.dump_catalog(cat, tmp_path)))
    lab = Lab(tmp_path, method="redfish")
    lab.dpu_drv.fail_next_task("RShim: BFB checksum mismatch")
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.until(lab.dpu, "dpu_install_failed")
    n = node(lab.sessions, lab.dpu)
    assert n.last_error and "checksum mismatch" in n.last_error


def test_missing_bfb_image_fails_install_with_reason(tmp_path: Path) -> None:
    lab = Lab(tmp_path, method="redfish")
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.run()
    n = node(lab.sessions, lab.dpu)
    assert n.state == "dpu_install_failed" and n.last_error and "no usable BFB image" in n.last_error


def test_claims_exclude_a_second_conductor(lab: Lab) -> None:
    other = Conductor(lab.cfg, lab.sessions, name="c-other", clock=lab.clock)
    lab.api("POST", "/api/v1/machines/m1/provision")
    assert lab.cond.claim(lab.dpu)
    assert not other.claim(lab.dpu)
    other.run_once()
    assert lab.dpu_drv.calls["boot_once"] == 0  # other skipped the claimed DPU
    lab.cond.release(lab.dpu)
    lab.clock.jump(0)
    other.run_once()
    assert lab.dpu_drv.calls["boot_once"] == 1
    # an expired claim (crashed conductor) is taken over
    assert lab.cond.claim(lab.host)
    lab.clock.jump(lab.cfg.orchestration.claim_seconds + 1)
    assert other.claim(lab.host)


def test_restart_under_same_name_takes_back_its_claims(lab: Lab) -> None:
    lab.api("POST", "/api/v1/machines/m1/provision")
    assert lab.cond.claim(lab.dpu)  # ... and the process dies holding it
    stranger = Conductor(lab.cfg, lab.sessions, name="c-stranger", clock=lab.clock)
    assert not stranger.claim(lab.dpu)
    reborn = Conductor(lab.cfg, lab.sessions, name="c-test", clock=lab.clock)
    assert reborn.reclaim_own() == 1
    reborn.run_once()
    assert lab.dpu_drv.calls["boot_once"] == 1


def test_bfb_push_url_serves_bfb_plus_bfcfg_once_and_only_to_the_bmc(tmp_path: Path) -> None:
    """bootsvc/web/bfbpush.py: the one-time URL the conductor hands the DPU's BMC."""
    payload = b"BFB!" * 5000
    bfb = tmp_path / "doca.bfb"
    bfb.write_bytes(payload)
    cat = images.Catalog(images=(images.make_image("doca", "1", "bfb", {"bfb": bfb}),), defaults={"dpu": "doca"})
    import yaml

    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(images.dump_catalog(cat, tmp_path)))
    lab = Lab(tmp_path, method="redfish")
    bmc = register_fake(FakePowerDriver("127.0.0.2", ignores_once=True))
    bmc.os_state = "Installing"
    with lab.sessions() as s:
        s.execute(update(Node).where(Node.id == lab.dpu).values(bmc_address="127.0.0.2", bmc_driver="fake"))
        s.commit()
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.until(lab.dpu, "dpu_installing")
    url = bmc._tasks["/redfish/v1/TaskService/Tasks/1"].image_uri
    path = "/" + url.split("/", 3)[3]
    token = path.split("/")[2]
    # anyone but the BMC: 403 JSON with the reason, and the URL stays usable
    r = lab.client.get(path, environ_base={"REMOTE_ADDR": "127.0.0.3"})
    assert r.status_code == 403 and r.get_json()["reason"] == "this URL is for the node's BMC only"
    bad = path.replace(token, token[:-2] + ("AA" if not token.endswith("AA") else "BB"))
    assert lab.client.get(bad, environ_base={"REMOTE_ADDR": "127.0.0.2"}).status_code == 403
    r = lab.client.head(path, environ_base={"REMOTE_ADDR": "127.0.0.2"})  # a size probe does not use it up
    assert r.status_code == 200 and int(r.headers["Content-Length"]) > len(payload)
    r = lab.client.get(path, environ_base={"REMOTE_ADDR": "127.0.0.2"})
    assert r.status_code == 200
    body = r.get_data()
    assert body.startswith(payload) and int(r.headers["Content-Length"]) == len(body)
    cfg = body[len(payload):].decode()
    assert "m1-dpu" in cfg and len(cfg) > 100  # the node's rendered bf.cfg follows the BFB
    ev = [e for e in lab.events(lab.dpu) if e.trigger == "bfb_push_served"]
    assert len(ev) == 1 and ev[0].detail["bytes"] == len(body) and token not in str(ev[0].detail)
    # single use
    r = lab.client.get(path, environ_base={"REMOTE_ADDR": "127.0.0.2"})
    assert r.status_code == 410 and "already used" in r.get_json()["reason"]


def _ui_login(lab: Lab) -> None:
    tok = add_token(lab.sessions, "tech")
    page = lab.client.get("/ui/login").text
    nonce = re.search(r'name="login_nonce" value="([^"]+)"', page)
    assert nonce
    r = lab.client.post("/ui/login", data={"token": tok, "login_nonce": nonce.group(1), "next": "/ui/"})
    assert r.status_code == 302, r.text


def test_dpu_in_nic_mode_stops_with_reason_and_the_ui_shows_it(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.dpu_drv.mode = DpuMode.NIC
    lab.dpu_drv.secure_boot = True
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.until(lab.dpu, "bmc_failed")
    n = node(lab.sessions, lab.dpu)
    assert n.last_error and "NIC mode" in n.last_error and "power.dpu_mode_switch" in n.last_error
    assert lab.dpu_drv.calls["boot_once"] == 0 and lab.dpu_drv.resets == []
    _ui_login(lab)
    page = lab.client.get(f"/ui/machines/{lab.host}").text
    assert re.search(r'class="dpu-mode">NicMode', page) and re.search(r'class="secure-boot">on', page)


def test_secure_boot_on_refuses_a_pxe_install_unless_allowed(tmp_path: Path) -> None:
    lab = Lab(tmp_path)
    lab.dpu_drv.secure_boot = True
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.until(lab.dpu, "bmc_failed")
    assert "Secure Boot is on" in (node(lab.sessions, lab.dpu).last_error or "")
    lab2 = Lab(tmp_path / "allowed", power={"secure_boot_disable": True})
    lab2.dpu_drv.secure_boot = True
    lab2.api("POST", "/api/v1/machines/m1/provision")
    lab2.until(lab2.dpu, "dpu_booting")
    lab2.run(2)
    assert lab2.dpu_drv.secure_boot is False and lab2.dpu_drv.calls["boot_once"] == 1
    ev = [e for e in lab2.events(lab2.dpu) if e.trigger == "bmc_boot_network"]
    assert ev and ev[0].detail["secure_boot_disabled"] is True


def test_nic_mode_switched_when_the_site_allows_it(tmp_path: Path) -> None:
    lab = Lab(tmp_path, power={"dpu_mode_switch": True})
    lab.dpu_drv.mode = DpuMode.NIC
    lab.api("POST", "/api/v1/machines/m1/provision")
    lab.until(lab.dpu, "bmc_failed")
    n = node(lab.sessions, lab.dpu)
    # Mode.Set + two Arm resets done; the power cycle needs the host (bluefieldbmcv2510ltsu1)
    assert lab.dpu_drv.mode is DpuMode.DPU and lab.dpu_drv.calls["set_dpu_mode"] == 1
    assert lab.dpu_drv.calls["reset"] == 2 and "power-cycle the host" in (n.last_error or "")
    assert [e.detail["to"] for e in lab.events(lab.dpu) if e.trigger == "dpu_mode_set"] == ["DpuMode"]

"""Release with a real wipe, through bootsvc's HTTP routes (Flask test client) and the conductor with the
in-memory BMC (bootsvc.power.fake), on SQLite: release -> power off -> wiping (secret rotated, one-time
network boot, power on) -> the node's iPXE script is the erase image with a token -> the erase image's
callbacks (what images/lab/initramfs/init sends in wipe mode) -> available -> the after-wipe step (power
off, override cleared, secret rotated again). Failure, deadline, missing image and BMC paths too."""

from __future__ import annotations

import datetime as dt
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from helpers.conductor import add_token, app_for, make_db, node, site_config, state, write_erase_catalog

from bootsvc import auth_secrets, inventory, lifecycle, render
from bootsvc.conductor import Conductor
from bootsvc.models import AgentStatus, Event
from bootsvc.power.base import FatalBmcError, PowerState, RetryableBmcError
from bootsvc.power.fake import FakePowerDriver, register_fake, reset_fakes

MAC = "52:54:00:b7:01:10"
TOKEN_RE = re.compile(r"bootsvc\.token=([0-9a-f]{64})")


class Clock:
    def __init__(self) -> None:
        self.t = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        self.t += dt.timedelta(milliseconds=1)
        return self.t

    def jump(self, seconds: float) -> None:
        self.t += dt.timedelta(seconds=seconds)


class Site:
    def __init__(self, tmp: Path, *, erase_image: bool = True) -> None:
        reset_fakes()
        self.cfg = site_config(f"sqlite:///{tmp}/bootsvc.db", tmp,
                               conductor={"interval_seconds": 0.1, "backoff_seconds": 0, "max_attempts": 3,
                                          "deadlines": {"wiping": 600}})
        if erase_image:
            write_erase_catalog(self.cfg, args="console=ttyS0 bootsvc.wipe=full")
        self.sessions = make_db(self.cfg)
        self.app = app_for(self.cfg, self.sessions)
        self.app.config["BOOT_NODE_CACHE_TTL"] = 0  # states change behind the app's back here
        self.client = self.app.test_client()
        self.api_token = add_token(self.sessions, "automation")
        self.clock = Clock()
        self.cond = Conductor(self.cfg, self.sessions, name="bw-test", clock=self.clock)
        # a BMC that keeps a "Once" override (Continuous, like sushy and BlueField): the after-wipe step
        # must clear it, or the node would boot the erase image again at its next power-on
        self.drv = register_fake(FakePowerDriver("fake://w1", dpu=False, initial=PowerState.ON, ignores_once=True))
        self.key = auth_secrets.read_ref(self.cfg.security.node_key_ref, create=True)
        with self.sessions() as s:
            (n,) = inventory.enroll(s, [inventory.NodeSpec("w1", "host", "SN-w1", bmc_address="fake://w1",
                                                           bmc_driver="fake",
                                                           # the test client's address: the boot plane answers a
                                                           # node only from its own (docs/security.md)
                                                           nics=[inventory.NicSpec(MAC, "host-pf", "127.0.0.1")])],
                                            actor="t")
            for t in ("provision", "dpu_ready", "install_started", "install_done"):
                lifecycle.apply(s, n, t, actor="t")
            self.id = n.id
            s.add(AgentStatus(node_id=n.id, health={}, applied_version="v1"))
            s.commit()

    def release(self) -> None:
        r = self.client.post("/api/v1/nodes/w1/release", json={"reason": "tenant left"},
                             headers={"Authorization": f"Bearer {self.api_token}"})
        assert r.status_code == 200, r.get_json()

    def run(self, n: int = 1) -> None:
        for _ in range(n):
            self.cond.run_once()

    def st(self) -> str:
        return state(self.sessions, self.id)

    def gen(self) -> int:
        return node(self.sessions, self.id).secret_generation

    def token(self, gen: int | None = None) -> str:
        return render.boot_token(auth_secrets.node_secret(self.key, self.id, self.gen() if gen is None else gen))

    def script(self) -> str:
        r = self.client.get(f"/boot/ipxe?mac={MAC}", headers={"Host": "10.98.0.1:8080"})
        assert r.status_code == 200
        return r.get_data(as_text=True)

    def callback(self, event: str, token: str, **extra: Any) -> Any:
        """What the lab initramfs posts in wipe mode (token in the header and the body)."""
        body = {"event": event, "token": token, "mac": MAC, "ip": "10.98.0.150", "mode": "wipe",
                "arch": "x86_64", "uptime": 3.2, **extra}
        return self.client.post("/boot/callback/w1", json=body, headers={"Authorization": f"Bearer {token}"})

    def events(self) -> list[Event]:
        with self.sessions() as s:
            return list(s.scalars(select(Event).where(Event.node_id == self.id).order_by(Event.id)))

    def to_wiping(self) -> str:
        """Release and run the conductor until the erase image is booted; returns its token (from the script)."""
        self.release()
        self.run(3)
        assert self.st() == "wiping"
        s = self.script()
        m = TOKEN_RE.search(s)
        assert m is not None, s
        return m.group(1)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    yield Site(tmp_path)
    reset_fakes()


def test_release_boots_the_erase_image_and_done_makes_it_available(site: Site) -> None:
    gen0 = site.gen()
    assert site.drv.power_state() is PowerState.ON  # the tenant's OS runs
    token = site.to_wiping()
    # releasing powered it off; wiping revoked the secret and agent state, then network-booted it
    order = [e.trigger for e in site.events() if e.actor.startswith("conductor")]
    assert order == ["bmc_power_off", "wipe_started", "bmc_boot_network"], order
    assert site.drv.calls["power_off"] == 1 and site.drv.calls["boot_once"] == 1
    assert site.drv.boot.target == "Pxe" and site.drv.power_state() is PowerState.ON
    assert site.gen() == gen0 + 1
    with site.sessions() as s:
        assert s.get(AgentStatus, site.id) is None
    boot = next(e for e in site.events() if e.trigger == "bmc_boot_network")
    assert boot.detail["purpose"] == "erase" and boot.detail["secret_rotated"] is True
    # the script: the erase image, wipe mode, this node's callback, the token of the NEW generation
    s = site.script()
    assert "bootsvc.mode=wipe" in s and "bootsvc.wipe=full" in s and "/images/erase/1/" in s
    assert "bootsvc.cb=http://10.98.0.1:8080/boot/callback/w1" in s
    assert token == site.token() and token != site.token(gen0)
    # the released install's token no longer works
    assert site.callback("started", site.token(gen0)).status_code == 401

    r = site.callback("started", token)
    assert r.status_code == 200 and r.get_json()["state"] == "wiping"
    for pct in (50, 100):
        r = site.callback("progress", token, phase="zero vda", percent=pct)
        assert r.status_code == 200 and r.get_json()["state"] == "wiping"
    assert site.callback("progress", token, phase="zero vda", percent=100).get_json()["duplicate"] is True
    site.run(3)  # nothing to do while the erase runs: no second boot, no power action
    assert site.drv.calls["boot_once"] == 1 and site.drv.calls["power_on"] == 1
    r = site.callback("done", token, phase="erased 1 disks policy full")
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["state"] == "available" and r.get_json()["event"] == "wipe_done"
    # the erase image retrying a lost response is recognised, not an error
    r = site.callback("done", token, phase="erased 1 disks policy full")
    assert r.status_code == 200 and r.get_json()["duplicate"] is True

    # after the wipe: power off, override cleared, secret rotated once more
    site.run()
    assert site.drv.power_state() is PowerState.OFF and site.drv.boot.target == "None"
    assert site.drv.calls["clear_boot_override"] == 1
    assert site.gen() == gen0 + 2 and not node(site.sessions, site.id).boot_override_set
    assert site.callback("done", token).status_code == 401  # the erase token died with the wipe
    before = sum(site.drv.calls.values())
    site.run(3)
    assert sum(site.drv.calls.values()) == before, "the after-wipe step ran twice"
    assert "boots from local disk" in site.script()

    evs = site.events()
    path = [(e.trigger, e.to_state) for e in evs if e.from_state != e.to_state]
    assert path[-3:] == [("release", "releasing"), ("wipe_started", "wiping"), ("wipe_done", "available")]
    progress = [e.detail for e in evs if e.trigger == "wipe_progress"]
    assert [d["event"] for d in progress] == ["started", "progress", "progress"]
    assert progress[-1] == {"event": "progress", "ip": "127.0.0.1", "percent": 100, "phase": "zero vda",
                            "mode": "wipe", "arch": "x86_64"}
    assert all("token" not in e.detail for e in evs)
    fin = [e for e in evs if e.trigger == "wipe_finished"]
    assert len(fin) == 1 and fin[0].detail["secret_rotated"] is True and fin[0].detail["power"] == "off"
    assert node(site.sessions, site.id).last_error is None


def test_erase_failure_lands_in_release_failed_with_the_reason_and_retry_wipes_again(site: Site) -> None:
    token = site.to_wiping()
    site.callback("started", token)
    r = site.callback("failed", token, reason="vda not zero after erase")
    assert r.status_code == 200 and r.get_json()["state"] == "release_failed"
    n = node(site.sessions, site.id)
    assert n.last_error == "vda not zero after erase" and n.hint and "erase image" in n.hint
    failed = next(e for e in site.events() if e.trigger == "wipe_failed")
    assert failed.detail["reason"] == "vda not zero after erase"
    assert "bootsvc.mode=wipe" not in site.script()  # held, not erased again by itself
    site.run(3)
    assert site.st() == "release_failed" and site.drv.calls["boot_once"] == 1
    r = site.client.post("/api/v1/nodes/w1/retry", json={}, headers={"Authorization": f"Bearer {site.api_token}"})
    assert r.status_code == 200, r.get_json()
    site.run(3)
    assert site.st() == "wiping" and site.drv.calls["boot_once"] == 2  # booted into the erase image again
    tok2 = TOKEN_RE.search(site.script())
    assert tok2 is not None
    site.callback("failed", tok2.group(1))  # no reason given: the event still says who failed
    assert node(site.sessions, site.id).last_error == "erase image reported failure"


def test_wiping_deadline_boots_the_erase_image_again_then_fails(site: Site) -> None:
    site.to_wiping()
    gen = site.gen()
    for attempt in (1, 2):  # the erase image never calls back
        site.clock.jump(601)
        site.run(3)
        n = node(site.sessions, site.id)
        assert (n.state, n.attempts) == ("wiping", attempt)
        assert site.drv.calls["boot_once"] == attempt + 1, "a deadline retry boots the erase image again"
    assert site.gen() == gen, "a retry does not rotate the secret again (a slow erase image may still report)"
    site.clock.jump(601)
    site.run(2)
    n = node(site.sessions, site.id)
    assert n.state == "release_failed" and n.last_error == "deadline of wiping passed (attempt 3 of 3; giving up)"


def test_no_erase_image_fails_the_wipe_before_anything_boots(tmp_path: Path) -> None:
    site = Site(tmp_path, erase_image=False)
    try:
        site.release()
        site.run(4)
        n = node(site.sessions, site.id)
        assert n.state == "release_failed" and n.last_error and "no usable erase image" in n.last_error
        assert site.drv.calls["boot_once"] == 0 and site.drv.power_state() is PowerState.OFF
    finally:
        reset_fakes()


def test_bmc_failure_while_booting_the_erase_image_fails_the_release(site: Site) -> None:
    site.drv.fail("boot_once", FatalBmcError("boot override refused"))
    site.release()
    site.run(4)
    n = node(site.sessions, site.id)
    assert n.state == "release_failed" and n.last_error and "boot override refused" in n.last_error


def test_after_wipe_bmc_trouble_retries_then_still_rotates_the_secret(site: Site) -> None:
    token = site.to_wiping()
    site.callback("done", token)
    assert site.st() == "available"
    gen = site.gen()
    site.drv.fail("clear_boot_override", RetryableBmcError("BMC busy"), times=3)
    site.run(5)
    n = node(site.sessions, site.id)
    assert n.state == "available" and not n.boot_override_set
    assert site.gen() == gen + 1 and site.callback("done", token).status_code == 401
    fin = [e for e in site.events() if e.trigger == "wipe_finished"]
    assert len(fin) == 1 and fin[0].detail["bmc"] == "failed"
    assert len([e for e in site.events() if e.trigger == "bmc_error"]) == 3

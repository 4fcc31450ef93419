"""Whole machines (host + DPU) through the conductor against real Redfish BMCs (sushy-tools fake
driver on loopback, ports 18100-18149), with scripted installer and agent HTTP calls (Flask test
client against the same database), on SQLite and PostgreSQL:

- the full flow: DPU network boot -> installer -> DOCA -> agent check-in -> policy -> host boot -> deployed;
- a conductor subprocess killed with SIGKILL mid-flow; a restarted one resumes without redoing steps;
- two conductor subprocesses on one database never act on the same node: every BMC action is counted
  on the emulator side (its access log) and happens exactly once per node.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "unit"))
from helpers.conductor import (
    Agent,
    Installer,
    add_token,
    app_for,
    enroll_machine,
    make_db,
    site_config,
    site_tree,
    state,
    wait_for,
)
from helpers.events import SECRET as SUB_SECRET
from helpers.events import Receiver
from helpers.procs import stop

from bootsvc.conductor import Conductor
from bootsvc.lab.bfbmc import SushyProcess, free_port
from bootsvc.models import Event, Node, Outbox, Subscriber

USER, PASSWORD = "bo-admin", "bo-s3cret"
CRED = "env:BO_SUSHY_USER:BO_SUSHY_PASS"
MACHINES = ["m1", "m2", "m3"]
UUIDS = {f"{m}{sfx}": str(uuid.UUID(int=(0xB0 << 120) + i * 2 + j))
         for i, m in enumerate(MACHINES) for j, sfx in enumerate(("", "-dpu"))}
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def creds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BO_SUSHY_USER", USER)
    monkeypatch.setenv("BO_SUSHY_PASS", PASSWORD)


@pytest.fixture
def sushy(tmp_path: Path) -> Iterator[SushyProcess]:
    systems = [{"uuid": u, "name": f"bo-{name}", "power_state": "Off", "external_notifier": False,
                "nics": [{"mac": f"52:54:00:b0:{i:02x}:ff", "ip": "127.0.0.1"}]}
               for i, (name, u) in enumerate(UUIDS.items())]
    with SushyProcess(tmp_path, systems, user=USER, password=PASSWORD, port=free_port(18100, 18149)) as s:
        yield s


def bmc(sushy: SushyProcess, name: str) -> str:
    return f"{sushy.url}/redfish/v1/Systems/{UUIDS[name]}"


def raw(sushy: SushyProcess, name: str) -> dict[str, Any]:
    r = requests.get(bmc(sushy, name), auth=(USER, PASSWORD), timeout=5)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


_LINE = re.compile(r'"(GET|POST|PATCH|PUT|DELETE) /redfish/v1/Systems/([0-9a-f-]{36})(\S*) HTTP')


def bmc_writes(sushy: SushyProcess) -> Counter[tuple[str, str]]:
    """(node name, 'reset'|'patch') -> count, read from the emulator's own access log."""
    by_uuid = {u: n for n, u in UUIDS.items()}
    out: Counter[tuple[str, str]] = Counter()
    text = re.sub(r"\x1b\[[0-9;]*m", "", sushy.log.read_text(errors="replace"))  # werkzeug colours
    for m in _LINE.finditer(text):
        method, u, rest = m.groups()
        if method == "POST" and rest.endswith("ComputerSystem.Reset"):
            out[(by_uuid[u], "reset")] += 1
        elif method == "PATCH":
            out[(by_uuid[u], "patch")] += 1
    return out


class Site:
    def __init__(self, url: str, tmp: Path, sushy: SushyProcess, machines: list[str]) -> None:
        self.tree = site_tree(url, tmp, conductor={"interval_seconds": 0.3, "backoff_seconds": 1, "max_attempts": 3},
                              orchestration={"vtep_network": "10.255.0.0/16", "claim_seconds": 60,
                                             "power_timeout_seconds": 30})
        self.cfg = site_config(url, tmp, conductor=self.tree["conductor"], orchestration=self.tree["orchestration"])
        self.sessions: sessionmaker[Session] = make_db(self.cfg, migrate=True)  # the real schema (Alembic)
        self.app = app_for(self.cfg, self.sessions)
        self.client = self.app.test_client()
        self.token = add_token(self.sessions, "automation")
        self.installer = Installer(self.client, self.cfg, self.sessions)
        self.ids: dict[str, tuple[int, int]] = {}
        for i, m in enumerate(machines, start=1):
            self.ids[m] = enroll_machine(self.sessions, m, host_bmc=bmc(sushy, m), dpu_bmc=bmc(sushy, f"{m}-dpu"),
                                         driver="redfish", cred=CRED, index=i)
        self.agents = {m: Agent(self.client, self.cfg, self.sessions, d) for m, (_h, d) in self.ids.items()}
        self.config_path = tmp / "bootsvc.yaml"
        self.config_path.write_text(yaml.safe_dump(self.tree))
        self.tmp = tmp

    def provision(self, m: str) -> None:
        r = self.client.post(f"/api/v1/machines/{m}/provision", json={},
                             headers={"Authorization": f"Bearer {self.token}"})
        assert r.status_code == 200, r.get_json()

    def st(self, node_id: int) -> str:
        return state(self.sessions, node_id)

    def booted(self, node_id: int) -> bool:
        """The conductor recorded a network boot in the node's current state entry."""
        with self.sessions() as s:
            evs = list(s.scalars(select(Event).where(Event.node_id == node_id).order_by(Event.id)))
        entered = max(e.id for e in evs if e.from_state != e.to_state)
        return any(e.trigger == "bmc_boot_network" and e.id > entered for e in evs)

    def react(self) -> None:
        """Scripted installers and agents: do what the real ones would do next, for every machine."""
        for m, (h, d) in self.ids.items():
            sd, sh = self.st(d), self.st(h)
            if sd == "dpu_booting" and self.booted(d):
                self.installer.send(d, "started")
                self.installer.send(d, "done")
            elif sd in ("dpu_rebooting", "policy_pending"):
                self.agents[m].sync()
            if sh == "host_booting" and self.booted(h):
                self.installer.send(h, "started")
                self.installer.send(h, "done")

    def all_deployed(self) -> bool:
        return all(self.st(h) == "deployed" and self.st(d) == "policy_applied" for h, d in self.ids.values())

    def conductor_proc(self, name: str) -> subprocess.Popen[bytes]:
        env = {**os.environ, "BOOTSVC_CONDUCTOR_NAME": name, "PYTHONUNBUFFERED": "1"}
        log = open(self.tmp / f"conductor-{name}.log", "ab")  # noqa: SIM115 - closed with the process
        return subprocess.Popen([sys.executable, "-m", "bootsvc", "--config", str(self.config_path), "run-service",
                                 "conductor"], cwd=str(REPO), env=env, stdout=log, stderr=subprocess.STDOUT)

    def boot_events(self) -> Counter[str]:
        with self.sessions() as s:
            rows = s.execute(select(Node.name, Event.actor).join(Event, Event.node_id == Node.id)
                             .where(Event.trigger == "bmc_boot_network")).all()
        return Counter(n for n, _a in rows)


def test_whole_machine_through_redfish(any_db_url: str, tmp_path: Path, sushy: SushyProcess) -> None:
    site = Site(any_db_url, tmp_path, sushy, ["m1"])
    cond = Conductor(site.cfg, site.sessions, name="c-inproc")
    _h, d = site.ids["m1"]
    site.provision("m1")

    def step() -> None:
        cond.run_once()
        site.react()

    wait_for(lambda: site.st(d) == "policy_applied", 60, step, interval=0.2, what="DPU policy applied")
    # the emulated DPU BMC really got a one-time PXE boot and a power-on
    assert raw(sushy, "m1-dpu")["Boot"]["BootSourceOverrideTarget"] in ("Pxe", "Hdd")  # Hdd once cleared
    assert bmc_writes(sushy)[("m1", "reset")] == 0, "host powered before its DPU applied the policy"
    wait_for(site.all_deployed, 60, step, interval=0.2, what="host deployed")
    w = bmc_writes(sushy)
    assert w[("m1-dpu", "reset")] == 1 and w[("m1", "reset")] == 1
    wait_for(lambda: raw(sushy, "m1")["PowerState"] == "On", 20, interval=0.2, what="host powered on (emulator)")
    assert site.agents["m1"].policy()["vrf_name"] == "vrf-acme"


def test_conductor_killed_mid_flow_resumes(any_db_url: str, tmp_path: Path, sushy: SushyProcess) -> None:
    site = Site(any_db_url, tmp_path, sushy, ["m1"])
    h, d = site.ids["m1"]
    site.provision("m1")
    p = site.conductor_proc("c1")
    try:
        wait_for(lambda: site.booted(d), 60, interval=0.2, what="DPU network boot by the conductor")
        site.installer.send(d, "started")
        site.installer.send(d, "done")
        # the conductor is working on this DPU (it clears the consumed boot override): kill it hard
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        assert p.returncode == -signal.SIGKILL
        site.agents["m1"].checkin()
        assert site.st(d) == "dpu_ready" and site.st(h) == "host_waiting_dpu"
        before = bmc_writes(sushy)
        p = site.conductor_proc("c1")  # a new process under the same name
        wait_for(lambda: site.st(d) == "policy_pending", 60, interval=0.2, what="policy sent after restart")
        site.agents["m1"].sync()
        wait_for(lambda: site.booted(h), 60, interval=0.2, what="host network boot after restart")
        site.installer.send(h, "started")
        site.installer.send(h, "done")
        assert site.all_deployed()
        after = bmc_writes(sushy)
        # resumed where it was: the DPU was not booted again, the host exactly once
        assert after[("m1-dpu", "reset")] == before[("m1-dpu", "reset")] == 1
        assert after[("m1", "reset")] == 1
        assert site.boot_events() == Counter({"m1-dpu": 1, "m1": 1})
    finally:
        stop(p, grace=15)


def test_two_conductors_never_act_twice(any_db_url: str, tmp_path: Path, sushy: SushyProcess) -> None:
    site = Site(any_db_url, tmp_path, sushy, MACHINES)
    recv = Receiver()  # an event subscriber: both conductors' delivery threads feed it
    (tmp_path / "sub.key").write_bytes(SUB_SECRET)
    with site.sessions() as s:
        s.add(Subscriber(name="noc", url=recv.url, secret_ref=f"file:{tmp_path}/sub.key", active=True))
        s.commit()
    procs = [site.conductor_proc("ca"), site.conductor_proc("cb")]
    try:
        for m in MACHINES:
            site.provision(m)
        wait_for(site.all_deployed, 120, site.react, interval=0.2, what="all machines deployed")
        w = bmc_writes(sushy)
        for name in UUIDS:
            assert w[(name, "reset")] == 1, (name, w)  # exactly one power-on per node, by one conductor
        assert site.boot_events() == Counter({n: 1 for n in UUIDS})
        with site.sessions() as s:
            actors = set(s.scalars(select(Event.actor).where(Event.trigger == "bmc_boot_network")))
        assert actors <= {"conductor:ca", "conductor:cb"}
        for p in procs:
            assert p.poll() is None, "a conductor died"
        # every state change reached the subscriber, signed, in order per node, no gaps
        with site.sessions() as s:
            transitions = Counter(n for (n,) in s.execute(select(Event.node_id).where(
                Event.from_state != Event.to_state)))

        def delivered() -> bool:
            with site.sessions() as s:
                return s.scalar(select(func.count()).select_from(Outbox).where(Outbox.delivered_at.is_(None))) == 0

        wait_for(delivered, 30, interval=0.2, what="outbox drained")
        assert recv.bad_sig == 0
        first_seen: dict[int, list[int]] = {}
        seen: set[int] = set()
        for ev in recv.got:
            if ev["event_id"] not in seen:  # at-least-once: duplicates allowed, order is not
                seen.add(ev["event_id"])
                first_seen.setdefault(ev["node"]["id"], []).append(ev["seq"])
        assert {k: len(v) for k, v in first_seen.items()} == dict(transitions)
        for seqs in first_seen.values():
            assert seqs == list(range(1, len(seqs) + 1))
    finally:
        for p in procs:
            stop(p, grace=15)
        recv.close()


# -------------------------------------------------------------------------- BF3 BFB push, end to end
def test_dpu_bfb_push_through_the_bmc_emulator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A DPU provisioned by Redfish BFB push: the conductor drives bootsvc.lab.bfbmc (the BF-24.10
    capture replayed), which pulls the one-time URL from bootsvc's own HTTP server (web/bfbpush) on
    loopback: BFB + that node's bf.cfg. The transfer's end is not the install's: the DPU reaches
    dpu_rebooting only once OemLastState says OsIsRunning; no PowerCycle is ever sent."""
    import hashlib
    import threading

    from werkzeug.serving import make_server

    from bootsvc import conductor_bmc as conductor_mod
    from bootsvc import images
    from bootsvc.lab.bfbmc import BfBmcProcess, default_capture

    if not default_capture().is_dir():
        pytest.skip("../shared/redfish-captures/nvidia-bf3-bmc-24.10 not present")
    monkeypatch.setattr(conductor_mod, "OS_POLL_SECONDS", 0.2)
    monkeypatch.setenv("BO_BF_USER", "root")
    monkeypatch.setenv("BO_BF_PASS", "bo-bf-pass")
    payload = os.urandom(512 * 1024)
    (tmp_path / "doca.bfb").write_bytes(payload)
    cat = images.Catalog(images=(images.make_image("doca", "2.9.2", "bfb", {"bfb": tmp_path / "doca.bfb"}),),
                         defaults={"dpu": "doca"})
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(images.dump_catalog(cat, tmp_path)))
    port = free_port(18150, 18159)
    nets = [{"name": "mgmt", "zone": 0, "cidr": "127.0.0.0/24", "gateway": "127.0.0.254", "boot_server": "127.0.0.1",
             "pools": [{"start": "127.0.0.100", "end": "127.0.0.200"}]},
            {"name": "acme-hosts", "zone": 1, "vrf": "vrf-acme", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1",
             "pools": [{"start": "10.0.0.100", "end": "10.0.0.200"}]}]
    url = f"sqlite:///{tmp_path}/bootsvc.db"
    cfg = site_config(url, tmp_path, networks=nets, boot={"provision_method": "redfish", "http_port": port},
                      power={"poll_interval": 0.05, "update_wait": 5, "rshim_wait": 2})
    sessions = make_db(cfg)
    app = app_for(cfg, sessions)
    srv = make_server("127.0.0.1", port, app, threaded=True)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with BfBmcProcess(tmp_path, user="root", password="bo-bf-pass", power_delay=0.1) as bf:
            bf.faults(arm_boot_seconds=0.5, install_seconds=1.0)
            client = app.test_client()
            token = add_token(sessions, "automation")
            _h, d = enroll_machine(sessions, "m1", host_bmc="http://127.0.0.1:9", dpu_bmc=bf.url, driver="redfish",
                                   cred="env:BO_BF_USER:BO_BF_PASS", method="redfish")
            r = client.post("/api/v1/machines/m1/provision", json={}, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.get_json()
            cond = Conductor(cfg, sessions, name="c-bf")
            seen: list[str] = []

            def step() -> None:
                cond.run_once()
                seen.append(state(sessions, d))

            wait_for(lambda: state(sessions, d) == "dpu_rebooting", 60, step, interval=0.1,
                     what="DPU OS running after the BFB push")
            s = bf.stats()
            assert s["actions"] == [["HostRshim.Set", "Disabled"]]
            (upd,) = s["updates"]
            assert upd["TransferProtocol"] == "HTTP" and upd["Targets"] == [
                "redfish/v1/UpdateService/FirmwareInventory/DPU_OS"]
            assert upd["ImageURI"].startswith(f"127.0.0.1:{port}/bfb-push/b1.")
            assert upd["ImageURI"].endswith("/doca.bfb")
            got = Path(s["bfb"]["path"]).read_bytes()
            assert got.startswith(payload) and b"m1-dpu" in got[len(payload):]  # BFB + this node's bf.cfg
            assert s["bfb"]["sha256"] == hashlib.sha256(got).hexdigest()
            assert not [x for x in s["resets"] if x.startswith("PowerCycle")]
            assert "dpu_installing" in seen
            with sessions() as db:
                trig = [e.trigger for e in db.scalars(select(Event).where(Event.node_id == d).order_by(Event.id))]
            order = [t for t in trig if t in ("bmc_bfb_push", "bfb_push_served", "bfb_transferred", "install_done")]
            # (the BMC may fetch before the conductor has written down that it started the push)
            assert sorted(order[:2]) == ["bfb_push_served", "bmc_bfb_push"], trig
            assert order[2:] == ["bfb_transferred", "install_done"], trig
            # the URL is dead once the DPU left the install states (single use: tests/unit/test_conductor.py)
            again = requests.get(f"http://{upd['ImageURI']}", timeout=5)
            assert again.status_code == 409 and "not being provisioned" in again.json()["reason"]
    finally:
        srv.shutdown()
        srv.server_close()


@pytest.mark.parametrize("server", ["gunicorn", "granian"])
def test_bfb_push_url_under_the_real_http_servers(tmp_path: Path, server: str) -> None:
    """web/bfbpush.py under ``bootsvc serve``: gunicorn sends the BFB with sendfile and the bf.cfg
    after it; granian iterates. Either way curl gets exactly BFB + bf.cfg and the announced length."""
    import time

    from bootsvc import auth_secrets, db, images, inventory
    from bootsvc.power import bfbtoken

    if server == "granian":
        pytest.importorskip("granian")
    payload = os.urandom(3 * 1024 * 1024 + 5)
    (tmp_path / "doca.bfb").write_bytes(payload)
    cat = images.Catalog(images=(images.make_image("doca", "2.9.2", "bfb", {"bfb": tmp_path / "doca.bfb"}),),
                         defaults={"dpu": "doca"})
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(images.dump_catalog(cat, tmp_path)))
    port = free_port(18160, 18169)
    tree = {"database": {"url": f"sqlite:///{tmp_path}/s.db"}, "state_dir": str(tmp_path),
            "listeners": {"http": [{"address": "127.0.0.1", "port": port}]},
            "security": {"node_key_ref": f"file:{tmp_path}/node.key"},
            "images": {"catalog": str(tmp_path / "catalog.yaml")},
            "networks": [{"name": "mgmt", "zone": 0, "cidr": "127.0.0.0/24", "gateway": "127.0.0.254",
                          "boot_server": "127.0.0.1", "pools": [{"start": "127.0.0.100", "end": "127.0.0.200"}]}]}
    cfgf = tmp_path / "c.yaml"
    cfgf.write_text(yaml.safe_dump(tree))
    env = {**os.environ, "BOOTSVC_HTTP_WORKERS": "1", "BOOTSVC_HTTP_SERVER": server}
    subprocess.run([sys.executable, "-m", "bootsvc", "--config", str(cfgf), "db", "upgrade"], check=True,
                   capture_output=True, env=env)
    engine = db.make_engine(tree["database"]["url"])
    with db.session_factory(engine)() as s:
        inventory.enroll(s, [inventory.NodeSpec(name="dpu-9", kind="dpu", serial="MT9", bmc_address="127.0.0.1")],
                         actor="test")
        n = s.scalars(select(Node).where(Node.name == "dpu-9")).one()
        n.state = "dpu_installing"
        s.commit()
        node_id = n.id
    engine.dispose()
    key = auth_secrets.read_ref(f"file:{tmp_path}/node.key", create=True)
    token = bfbtoken.mint(key, node_id, "127.0.0.1", now=time.time(), ttl=600)
    p = subprocess.Popen([sys.executable, "-m", "bootsvc", "--config", str(cfgf), "serve", "--only", "http"],
                         stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline and p.poll() is None, "bootsvc serve did not come up"
            time.sleep(0.2)
        out = tmp_path / "got.bfb"
        r = subprocess.run(["curl", "-sS", "-o", str(out), "-D", "-", "--max-time", "30",
                            f"http://127.0.0.1:{port}/bfb-push/{token}/doca.bfb"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        head = r.stdout.lower()
        got = out.read_bytes()
        assert " 200 " in head.splitlines()[0]
        assert f"content-length: {len(got)}" in head
        assert got.startswith(payload) and b"dpu-9" in got[len(payload):] and len(got) > len(payload) + 100
    finally:
        p.terminate()
        p.wait(30)

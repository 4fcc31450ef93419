"""Shared helpers for the orchestration tests: a site config, a database, scripted
installer and DPU agent that talk to bootsvc over its real HTTP routes (Flask test client), and a
bounded loop that runs conductor passes until a condition holds."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import auth_secrets, db, inventory, lifecycle, render
from bootsvc import config as config_mod
from bootsvc.conductor import Conductor
from bootsvc.config import Config
from bootsvc.models import ApiToken, Base, Event, Node
from bootsvc.power.base import PowerState
from bootsvc.power.fake import FakePowerDriver, register_fake, reset_fakes
from bootsvc.web import create_app

TENANT = {"name": "acme", "vrf": "vrf-acme", "l3vni": 5001}
# One machine (a host and its DPU, fake BMCs) as the API's POST /api/v1/machines takes it.
MACHINE = {
    "tenant": "acme",
    "host": {"name": "gpu-01", "serial": "SN-GPU-01", "rack": "r1", "slot": 1, "bmc_address": "fake://gpu-01",
             "bmc_driver": "fake", "nics": [{"mac": "52:54:00:01:00:01", "role": "host-pf", "ipv4": "10.0.0.11"}]},
    "dpus": [{"name": "gpu-01-dpu", "serial": "MT-GPU-01", "bmc_address": "fake://gpu-01-dpu", "bmc_driver": "fake",
              "nics": [{"mac": "52-54-00-01-00-02", "role": "oob"}]}],
}


def site_config(db_url: str, tmp: Path, **over: Any) -> Config:
    return config_mod.from_mapping(site_tree(db_url, tmp, **over), "<test>", env={})


def site_tree(db_url: str, tmp: Path, **over: Any) -> dict[str, Any]:
    """The test site as a config mapping (YAML-dumpable for subprocess services)."""
    tree: dict[str, Any] = {
        "database": {"url": db_url},
        "state_dir": str(tmp),
        "security": {"node_key_ref": f"file:{tmp}/node.key", "webhook_secret_ref": f"file:{tmp}/webhook.key"},
        "networks": [
            {"name": "mgmt", "zone": 0, "cidr": "10.98.0.0/24", "gateway": "10.98.0.1",
             "boot_server": "10.98.0.1", "pools": [{"start": "10.98.0.100", "end": "10.98.0.200"}]},
            {"name": "acme-hosts", "zone": 1, "vrf": "vrf-acme", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1",
             "pools": [{"start": "10.0.0.100", "end": "10.0.0.200"}]},
            # tenants overlap: same subnet in another VRF (RFC 6607)
            {"name": "globex-hosts", "zone": 1, "vrf": "vrf-globex", "cidr": "10.0.0.0/24", "gateway": "10.0.0.1",
             "pools": [{"start": "10.0.0.100", "end": "10.0.0.200"}]},
        ],
        "tenants": [TENANT, {"name": "globex", "vrf": "vrf-globex", "l3vni": 5002}],
        "images": {"catalog": str(tmp / "catalog.yaml")},
        "orchestration": {"vtep_network": "10.255.0.0/16", "egress": ["tcp:192.0.2.0/24:443"]},
        "conductor": {"interval_seconds": 0.1, "backoff_seconds": 0, "max_attempts": 3},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(tree.get(k), dict):
            tree[k] = {**tree[k], **v}
        else:
            tree[k] = v
    return tree


def make_db(cfg: Config, *, migrate: bool = False) -> sessionmaker[Session]:
    if migrate:
        db.upgrade(cfg.database.url)
        engine = db.make_engine(cfg.database.url)
    else:
        engine = db.make_engine(cfg.database.url)
        Base.metadata.create_all(engine)
    sessions = db.session_factory(engine)
    with sessions() as s:
        inventory.sync_tenants(s, cfg)
    return sessions


def dpus_booting(url: str, tmp: Path, count: int, **over: Any) -> tuple[Config, sessionmaker[Session], list[int]]:
    """``count`` stand-alone DPUs (fake BMCs fake://d<i>) provisioned: in dpu_booting, not yet powered
    (``over``: site_tree overrides, e.g. the conductor's deadlines)."""
    from bootsvc.inventory import NicSpec, NodeSpec, enroll
    from bootsvc.states import Trigger

    reset_fakes()
    cfg = site_config(url, tmp, **over)
    sessions = make_db(cfg)
    ids = []
    with sessions() as s:
        for i in range(count):
            register_fake(FakePowerDriver(f"fake://d{i}", dpu=False))
            enroll(s, [NodeSpec(name=f"d{i}", kind="dpu", serial=f"MT-d{i}", bmc_address=f"fake://d{i}",
                                bmc_driver="fake", provision_method="pxe",
                                nics=[NicSpec(f"02:00:00:00:{i >> 8:02x}:{i & 255:02x}", "oob")])], actor="test")
        for n in s.scalars(select(Node).order_by(Node.id)):
            lifecycle.apply(s, n, Trigger.PROVISION, actor="test", deadlines=cfg.conductor.deadlines)
            ids.append(n.id)
    return cfg, sessions, ids


def add_token(sessions: sessionmaker[Session], role: str, name: str | None = None) -> str:
    tok = auth_secrets.new_token()
    with sessions() as s:
        s.add(ApiToken(name=name or f"t-{role}-{tok[-6:]}", role=role, token_hash=auth_secrets.hash_token(tok)))
        s.commit()
    return tok


def enroll_machine(sessions: sessionmaker[Session], name: str, *, host_bmc: str, dpu_bmc: str,
                   driver: str = "fake", cred: str | None = None, tenant: str | None = "acme",
                   method: str = "pxe", index: int = 1) -> tuple[int, int]:
    """A host and its DPU, enrolled atomically. Returns (host id, dpu id)."""
    specs = [
        inventory.NodeSpec(name=name, kind="host", serial=f"SN-{name}", tenant=tenant, bmc_address=host_bmc,
                           bmc_driver=driver, bmc_credential_ref=cred, rack="r1", slot=index,
                           nics=[inventory.NicSpec(f"52:54:00:b0:{index:02x}:01", "host-pf",
                                                   f"10.0.0.{10 + index}")]),
        inventory.NodeSpec(name=f"{name}-dpu", kind="dpu", serial=f"MT-{name}", tenant=tenant, host=name,
                           bmc_address=dpu_bmc, bmc_driver=driver, bmc_credential_ref=cred,
                           provision_method=method, rack="r1", slot=index,
                           nics=[inventory.NicSpec(f"52:54:00:b0:{index:02x}:02", "oob")]),
    ]
    with sessions() as s:
        host, dpu = inventory.enroll(s, specs, actor="test")
        return host.id, dpu.id


def state(sessions: sessionmaker[Session], node_id: int) -> str:
    with sessions() as s:
        n = s.get(Node, node_id)
        assert n is not None
        return n.state


def node(sessions: sessionmaker[Session], node_id: int) -> Node:
    with sessions() as s:
        n = s.get(Node, node_id)
        assert n is not None
        return n


def apply_triggers(sessions: sessionmaker[Session], node_id: int, *triggers: str) -> None:
    """Move a node through ``triggers`` with bootsvc.lifecycle (each committed, actor "test"), as the
    API, agent or conductor would have."""
    with sessions() as s:
        n = s.get(Node, node_id)
        assert n is not None
        for t in triggers:
            lifecycle.apply(s, n, t, actor="test")


def node_secret(cfg: Config, sessions: sessionmaker[Session], node_id: int) -> tuple[str, str]:
    with sessions() as s:
        n = s.get(Node, node_id)
        assert n is not None
        key = auth_secrets.read_ref(cfg.security.node_key_ref, create=True)
        return n.name, auth_secrets.node_secret(key, n.id, n.secret_generation)


def write_erase_catalog(cfg: Config, *, args: str = "console=ttyS0 bootsvc.wipe=ends") -> Path:
    """A catalog at the site's ``images.catalog`` with an erase image (``defaults.wipe``): a release
    network-boots it. Kernel/initrd are placeholder bytes (nothing boots them in these tests)."""
    import yaml

    from bootsvc import images

    path = cfg.resolve(cfg.images.catalog)
    root = path.parent
    (root / "erase-vmlinuz").write_bytes(b"kernel")
    (root / "erase-initrd.gz").write_bytes(b"initrd")
    img = images.make_image("erase", "1", "kernel-initrd",
                            {"kernel": root / "erase-vmlinuz", "initrd": root / "erase-initrd.gz"}, args=args)
    cat = images.Catalog(images=(img,), defaults={"wipe": "erase"})
    path.write_text(yaml.safe_dump(images.dump_catalog(cat, root)))
    return path


def zone0_address(sessions: sessionmaker[Session], node_id: int) -> str:
    """An address that speaks for the node on the boot plane (docs/security.md): its lease or reservation,
    else a lease made up here for its first MAC."""
    import datetime as dt

    from bootsvc.models import Lease, Nic

    with sessions() as s:
        have = inventory.node_addresses(s, node_id)
        if have:
            return sorted(have)[0]
        mac = s.scalars(select(Nic.mac).where(Nic.node_id == node_id)).first()
        addr = f"10.77.1.{node_id % 250 + 1}"
        s.add(Lease(vrf="", network="zone0", address=addr, mac=mac, node_id=node_id, state="bound",
                    expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(days=1)))
        s.commit()
        return addr


class Installer:
    """Scripted installer: the callbacks a real one sends to the boot plane (``/boot/callback``)."""

    def __init__(self, client: FlaskClient, cfg: Config, sessions: sessionmaker[Session]) -> None:
        self.client, self.cfg, self.sessions = client, cfg, sessions

    def send(self, node_id: int, event: str, **extra: Any) -> Any:
        name, sec = node_secret(self.cfg, self.sessions, node_id)
        r = self.client.post(f"/boot/callback/{name}", json={"event": event, **extra},
                             headers={"Authorization": f"Bearer {render.boot_token(sec)}"},
                             environ_base={"REMOTE_ADDR": zone0_address(self.sessions, node_id)})
        assert r.status_code in (200, 409), r.get_data(as_text=True)
        return r


class Agent:
    """Scripted DPU policy agent speaking docs/agent-api.md: from an address leased to its DPU's OOB MAC
    (the agent API answers only the node's own address), trading its install secret at the first
    check-in like the real agent (bootsvc/agent/client.py)."""

    def __init__(self, client: FlaskClient, cfg: Config, sessions: sessionmaker[Session], node_id: int) -> None:
        self.client, self.cfg, self.sessions, self.node_id = client, cfg, sessions, node_id
        self.applied: str | None = None
        self.addr = zone0_address(sessions, node_id)
        if client.environ_base.get("REMOTE_ADDR") in (None, "127.0.0.1"):
            client.environ_base["REMOTE_ADDR"] = self.addr  # direct calls with headers() come from the DPU

    def headers(self) -> dict[str, str]:
        name, sec = node_secret(self.cfg, self.sessions, self.node_id)
        return {"Authorization": f"Bearer {sec}", "X-Bootsvc-Node": name}

    def _exchanged(self) -> None:
        with self.sessions() as s:
            n = s.get(Node, self.node_id)
            assert n is not None
            fresh = n.agent_generation != n.secret_generation
        if fresh:
            self.checkin()

    def checkin(self) -> Any:
        r = self.client.post("/api/v1/agent/checkin", headers=self.headers(), environ_base={"REMOTE_ADDR": self.addr},
                             json={"agent_version": "0.1.0", "health": {"applied_version": self.applied}})
        assert r.status_code == 200, r.get_data(as_text=True)
        return r.get_json()

    def policy(self) -> Any:
        self._exchanged()
        r = self.client.get("/api/v1/agent/policy", headers=self.headers(), environ_base={"REMOTE_ADDR": self.addr})
        assert r.status_code == 200, r.get_data(as_text=True)
        return r.get_json()

    def report(self, version: str, status: str = "applied", error: str | None = None) -> Any:
        self._exchanged()
        r = self.client.post("/api/v1/agent/report", headers=self.headers(), environ_base={"REMOTE_ADDR": self.addr},
                             json={"policy_version": version, "status": status, "error": error,
                                   "health": {"applied_version": version if status == "applied" else self.applied}})
        assert r.status_code == 200, r.get_data(as_text=True)
        if status == "applied":
            self.applied = version
        return r.get_json()

    def sync(self) -> str | None:
        """One agent poll: check in, pull and apply the policy if it changed."""
        want = self.checkin()["policy_version"]
        if want is not None and want != self.applied:
            doc = self.policy()
            self.report(doc["version"])
        return self.applied


def wait_for(cond: Callable[[], bool], timeout: float, step: Callable[[], Any] | None = None,
             interval: float = 0.05, what: str = "condition") -> None:
    """Run ``step`` (e.g. a conductor pass) until ``cond`` holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if step is not None:
            step()
        if cond():
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def app_for(cfg: Config, sessions: sessionmaker[Session]) -> Flask:
    app = create_app(cfg, sessions)
    app.testing = True
    return app


def dpu_ids_of(sessions: sessionmaker[Session], host_id: int) -> list[int]:
    with sessions() as s:
        return list(s.scalars(select(Node.id).where(Node.host_id == host_id)))


class Clock:
    def __init__(self) -> None:
        self.t = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        self.t += dt.timedelta(milliseconds=1)  # time passes between two looks at it
        return self.t

    def jump(self, seconds: float) -> None:
        self.t += dt.timedelta(seconds=seconds)


class Lab:
    def __init__(self, tmp: Path, method: str = "pxe", **over: Any) -> None:
        reset_fakes()
        self.cfg: Config = site_config(f"sqlite:///{tmp}/bootsvc.db", tmp, **over)
        self.sessions: sessionmaker[Session] = make_db(self.cfg)
        self.app = app_for(self.cfg, self.sessions)
        self.client = self.app.test_client()
        self.clock = Clock()
        self.cond = Conductor(self.cfg, self.sessions, name="c-test", clock=self.clock)
        self.installer = Installer(self.client, self.cfg, self.sessions)
        self.token = add_token(self.sessions, "automation")
        self.host_drv = register_fake(FakePowerDriver("fake://m1", dpu=False))
        self.dpu_drv = register_fake(FakePowerDriver("fake://m1-dpu", ignores_once=True))
        self.host, self.dpu = enroll_machine(self.sessions, "m1", host_bmc="fake://m1", dpu_bmc="fake://m1-dpu",
                                             method=method)
        self.agent = Agent(self.client, self.cfg, self.sessions, self.dpu)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        r = self.client.open(path, method=method, json=body if body is not None else {},
                             headers={"Authorization": f"Bearer {self.token}"})
        return r

    def run(self, n: int = 1) -> None:
        for _ in range(n):
            self.cond.run_once()

    def until(self, node_id: int, want: str, timeout: float = 10.0) -> None:
        wait_for(lambda: state(self.sessions, node_id) == want, timeout, self.cond.run_once,
                 interval=0.0, what=f"node {node_id} to reach {want} (is {state(self.sessions, node_id)})")

    def dpu_to_applied(self) -> None:
        self.until(self.dpu, "dpu_booting")
        # the conductor set the one-time network boot and powered the DPU on
        wait_for(lambda: self.booted_in_this_state(self.dpu), 5, self.run, interval=0.0)
        assert self.dpu_drv.power_state() is PowerState.ON
        self.installer.send(self.dpu, "started")
        self.installer.send(self.dpu, "done")
        assert state(self.sessions, self.dpu) == "dpu_rebooting"
        self.agent.checkin()
        assert state(self.sessions, self.dpu) == "dpu_ready"
        self.until(self.dpu, "policy_pending")
        self.agent.sync()
        assert state(self.sessions, self.dpu) == "policy_applied"

    def host_to_deployed(self) -> None:
        self.until(self.host, "host_booting")
        wait_for(lambda: self.booted_in_this_state(self.host), 5, self.run, interval=0.0)
        assert self.host_drv.power_state() is PowerState.ON
        self.installer.send(self.host, "started")
        self.installer.send(self.host, "done")
        assert state(self.sessions, self.host) == "deployed"

    def booted_in_this_state(self, node_id: int) -> bool:
        evs = self.events(node_id)
        entered = max(e.id for e in evs if e.from_state != e.to_state)
        return any(e.trigger == "bmc_boot_network" and e.id > entered for e in evs)

    def events(self, node_id: int) -> list[Event]:
        with self.sessions() as s:
            return list(s.scalars(select(Event).where(Event.node_id == node_id).order_by(Event.id)))

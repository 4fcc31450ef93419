#!/usr/bin/env python3
"""Site power-on storm: N DPU + host pairs from "provision" to "deployed" through the real bootsvc.

Real: ``bootsvc serve`` (DHCP, TFTP, HTTP boot plane + agent API, conductor, its Redfish driver) in
namespace ``st<id>s``, on SQLite or PostgreSQL. Simulated, in namespace ``st<id>r`` (``--child``, one
asyncio process), only what would be hardware:

* BMCs: one asyncio Redfish service answering for every BMC, each BMC its own address
  (10.200.x.y:8000, so bootsvc's per-BMC session cap applies per BMC); service root, SessionService
  sessions (at most ``--bmc-sessions`` open per BMC, like firmware: over it -> 503), one System with
  PowerState, Boot override PATCH and ComputerSystem.Reset; no BlueField OEM (the DPU preflight gets
  404 and is skipped, as for any non-BlueField BMC). Every Reset/PATCH is logged: actions sent twice
  are counted from that log.
* firmware and agents, started by a power-on with a PXE override (after ``--boot-delay``): each DPU
  does relayed DHCP (giaddr 10.98.0.2, option 82 circuit id, vendor class NVIDIA/BF/PXE), TFTP of
  its NBP, GET /boot/grub, kernel + initrd, bf.cfg, installer callbacks started/done, then agent
  check-in with bf.cfg's secret, policy, report applied. Its host then does relayed DHCP through "its
  DPU" (giaddr 10.0.0.1, option 82 with VSS 151/152 = the tenant VRF, RFC 6607), TFTP snponly.efi,
  the iPXE DHCP (user class iPXE), its iPXE script, kernel + initrd, callbacks started/done. Every
  request leaves from the address DHCP leased to that node (bootsvc checks it: boot-plane identity).

Reported: pairs/min (first provision -> last host deployed), p50/p99/max per pair (the host's
provision event -> its deployed event, from the event table), server CPU seconds per pair per
service (/proc of the service processes), SQL statements per pair per service (``sqlcount/``: a
``sitecustomize`` that counts SQLAlchemy ``before_cursor_execute``), BMC actions sent twice, errors
by kind; the box's speed (a fixed CPU probe at the start, every ~30 s and at the end) and every
10 s each service's CPU with the run's progress, from which CPU per pair per third of the run
(bench/storm/drift.py). One ``SUMMARY {json}`` line (bench/run.py collects it) and
results/storm-<N>-<db>.json.

Bounded by ``--timeout`` (the child stops itself too); everything is stopped by PID and both
namespaces deleted on the way out. Needs root.

    sudo .venv/bin/python bench/storm/run.py --pairs 200 [--db sqlite|pg] [--boot-delay 0]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
PY = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable
HERE = Path(__file__).resolve().parent

SRV, SIM = "198.18.0.1", "198.18.0.2"  # the veth pair between the two namespaces (RFC 2544 range)
DPU_RELAY, HOST_RELAY = "10.98.0.2", "10.0.0.1"
TENANT, VRF = "acme", "acme"
BMC_PORT, HTTP_PORT, API_PORT = 8000, 8080, 8081


def sh(*a: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(a), capture_output=True, text=True, check=check)


def srv_ip(k: int) -> str:
    """Instance ``k``'s address (its end of its veth to the simulator; 198.18.0.1 for the first)."""
    return f"198.18.{k}.1"


def sim_ip(k: int) -> str:
    return f"198.18.{k}.2"


def bmc_ip(i: int, kind: str) -> str:
    return f"10.200.{(2 * i + (kind == 'dpu')) // 250}.{(2 * i + (kind == 'dpu')) % 250 + 1}"


def mac(i: int, kind: str) -> str:
    return f"02:5{'d' if kind == 'dpu' else 'b'}:00:{(i >> 16) & 255:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"


def _proc(pid: int, name: str) -> str:
    try:
        return (Path("/proc") / str(pid) / name).read_text()
    except OSError:
        return ""


def box_cpu() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot, /proc/stat's first line (proc(5)): idle and iowait
    are not busy; guest time is already inside user."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(v) - v[3] - v[4], sum(v)


def proc_cpu(pid: int) -> float:
    """CPU seconds (user+system, reaped children included) of one process; 0 once it is gone."""
    st = _proc(pid, "stat").rsplit(")", 1)[-1].split()
    return sum(int(x) for x in st[11:15]) / os.sysconf("SC_CLK_TCK") if len(st) > 15 else 0.0


def _status_kb(pid: int, key: str) -> int:
    for ln in _proc(pid, "status").splitlines():
        if ln.startswith(key + ":"):
            return int(ln.split()[1])
    return 0


def proc_peak_rss_mb(pid: int) -> float:
    return round(_status_kb(pid, "VmHWM") / 1024, 1)


def proc_rss_mb(pid: int, tree: bool = False) -> float:
    """Resident MB of ``pid`` (with ``tree``: and of all its descendants)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        total += _status_kb(p, "VmRSS")
        if tree:
            for t in _proc(p, "task/" + str(p) + "/children").split():
                todo.append(int(t))
    return round(total / 1024, 1)


# ------------------------------------------------------------------------------------------ parent
class Storm:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        t = uuid.uuid4().hex[:5]
        self.k = max(1, a.instances)
        # one namespace per bootsvc instance (st<id>s, then st<id>s1, ...), one for the simulator
        self.ns_srv = [f"st{t}s" + (str(k) if k else "") for k in range(self.k)]
        self.veths = [(f"st{t}a{k}", f"st{t}b{k}") for k in range(self.k)]
        self.ns_s, self.ns_r = self.ns_srv[0], f"st{t}r"
        self.veth_s, self.veth_r = self.veths[0]
        self.dir = Path(tempfile.mkdtemp(prefix="storm-"))
        self.sqldir = self.dir / "sql"
        self.sqldir.mkdir()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pg_name: str | None = None
        self.pg_own: Path | None = None  # a PostgreSQL cluster this run started (--own-pg)
        self.serves: list[subprocess.Popen[bytes]] = []
        self.notes: dict[str, Any] = {}  # what happened mid-storm: the kill, the PostgreSQL restart
        self.dead: set[int] = set()
        self.cpu_dead: dict[str, float] = {}
        self.held: dict[int, str] = {}  # node id -> state, of the claims the killed instance held
        self.t_kill = 0.0
        self.done = 0
        if a.db == "pg":
            try:
                if a.own_pg:
                    a.pg_url = self.pg_start_own()
                if not a.pg_url:
                    raise SystemExit("--db pg needs --pg-url or BOOTSVC_TEST_PG_URL (tests/pg.sh start prints one)")
                self.db_url = self.pg_create(a.pg_url, f"storm_{t}")
            except BaseException:
                self.pg_drop()  # a cluster started here is stopped and removed, not left running
                raise
        else:
            self.db_url = f"sqlite:///{self.dir}/bootsvc.db"

    def pg_create(self, admin: str, name: str) -> str:
        """A fresh database named ``name`` on the server of ``admin`` (dropped in ``pg_drop``)."""
        from sqlalchemy import create_engine, make_url, text

        from bootsvc import db

        eng = create_engine(db.normalize_url(admin), isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
        eng.dispose()
        self.pg_name = name
        return make_url(db.normalize_url(admin)).set(database=name).render_as_string(hide_password=False)

    # A cluster of this run's own (--own-pg): it can be stopped and started mid-storm without touching
    # the PostgreSQL other tests share. Unix socket only (listen_addresses ''): no TCP port to collide.
    def _pg(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda b: int(b.parent.name))
        if not bins:
            raise SystemExit("--own-pg: PostgreSQL server binaries not found (apt-get install postgresql)")
        return sh("runuser", "-u", "postgres", "--", str(bins[-1] / argv[0]), *argv[1:], check=check)

    def pg_start_own(self) -> str:
        d = Path(tempfile.mkdtemp(prefix="storm-pg-"))
        d.chmod(0o755)
        sh("chown", "postgres:", str(d))
        self.pg_own = d
        self._pg("initdb", "-D", str(d / "data"), "-A", "trust", "-U", "postgres")
        self.pg_ctl_start()
        return f"postgresql+psycopg://postgres@/postgres?host={d}&port=5432"

    def pg_ctl_start(self) -> None:
        assert self.pg_own is not None
        d = self.pg_own
        self._pg("pg_ctl", "-D", str(d / "data"), "-l", str(d / "server.log"), "-w", "-t", "60", "-o",
                 f"-k {d} -p 5432 -c listen_addresses='' -c max_connections=400 -c fsync=on", "start")

    def pg_ctl_stop(self) -> None:
        assert self.pg_own is not None
        self._pg("pg_ctl", "-D", str(self.pg_own / "data"), "-w", "-t", "60", "-m", "fast", "stop", check=False)

    def pg_drop(self) -> None:
        if self.pg_own is not None:
            self.pg_ctl_stop()
            import shutil

            shutil.rmtree(self.pg_own, ignore_errors=True)
            return
        if self.pg_name is None:
            return
        from sqlalchemy import create_engine, text

        from bootsvc import db

        eng = create_engine(db.normalize_url(self.a.pg_url), isolation_level="AUTOCOMMIT")
        with eng.connect() as c:
            c.execute(text(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{self.pg_name}' "
                           "AND pid <> pg_backend_pid()"))
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.pg_name}"'))
        eng.dispose()

    # -- network ------------------------------------------------------------------------------------
    def net_up(self) -> None:
        for ns in (*self.ns_srv, self.ns_r):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        for k, (ns, (vs, vr)) in enumerate(zip(self.ns_srv, self.veths, strict=True)):
            sh("ip", "-n", ns, "link", "add", vs, "type", "veth", "peer", "name", vr, "netns", self.ns_r)
            sh("ip", "-n", ns, "addr", "add", f"{srv_ip(k)}/30", "dev", vs)
            sh("ip", "-n", self.ns_r, "addr", "add", f"{sim_ip(k)}/30", "dev", vr)
            sh("ip", "-n", ns, "link", "set", vs, "up")
            sh("ip", "-n", self.ns_r, "link", "set", vr, "up")
            for net in ("10.98.0.0/16", "10.0.0.0/16", "10.200.0.0/16"):
                sh("ip", "-n", ns, "route", "add", net, "via", sim_ip(k))
        for net in ("10.98.0.0/16", "10.0.0.0/16", "10.200.0.0/16"):
            # every address of these ranges is local in the simulator's namespace (AnyIP): each node's
            # requests leave from its leased address, each BMC answers on its own
            sh("ip", "-n", self.ns_r, "route", "add", "local", net, "dev", "lo")
        sh("ip", "-n", self.ns_r, "route", "add", "default", "via", SRV)

    def net_down(self) -> None:
        for ns in (*self.ns_srv, self.ns_r):
            sh("ip", "netns", "del", ns, check=False)

    # -- site -----------------------------------------------------------------------------------------
    def write_site(self) -> list[Path]:
        """The site's files (images, keys) once, and one config per instance: each has its own address
        (its DHCP server identifier, next-server and listeners) and state_dir; database, node key and
        images are shared."""
        import yaml

        from bootsvc import images

        d = self.dir
        (d / "tftp" / "arm64").mkdir(parents=True)
        (d / "tftp" / "arm64" / "grubnetaa64.efi").write_bytes(os.urandom(96 * 1024))  # small NBPs
        (d / "tftp" / "snponly.efi").write_bytes(os.urandom(64 * 1024))
        imgs = []
        for kind in ("dpu", "host"):
            (d / f"{kind}-vmlinuz").write_bytes(os.urandom(256 * 1024))
            (d / f"{kind}-initrd").write_bytes(os.urandom(512 * 1024))
            files = {"kernel": d / f"{kind}-vmlinuz", "initrd": d / f"{kind}-initrd"}
            if kind == "dpu":  # a BFB entry: the bundle plus the installer kernel/initrd taken out of it
                (d / "dpu.bfb").write_bytes(os.urandom(64 * 1024))
                files["bfb"] = d / "dpu.bfb"
            imgs.append(images.make_image(f"storm-{kind}", "1", "bfb" if kind == "dpu" else "kernel-initrd",
                                          files, args="console=ttyS0"))
        cat = images.Catalog(images=tuple(imgs), defaults={"dpu": "storm-dpu", "host": "storm-host"})
        (d / "catalog.yaml").write_text(yaml.safe_dump(images.dump_catalog(cat, d)))
        # the site key exists before the services start: several processes creating it at once can
        # read it half-written (bootsvc.auth_secrets.read_ref), and then disagree on every node secret
        from bootsvc import auth_secrets

        auth_secrets.read_ref(f"file:{d}/node.key", create=True)
        (d / "bmc.cred").write_text("storm\nstorm-password\n")
        (d / "bmc.cred").chmod(0o600)
        out = []
        for k in range(self.k):
            out.append(self._site_config(k))
        return out

    def _site_config(self, k: int) -> Path:
        import yaml

        d, a, srv = self.dir, self.a, srv_ip(k)
        sd = d / f"i{k}" if k else d  # one state_dir per instance (its run/ lock and metrics)
        sd.mkdir(exist_ok=True)
        tree: dict[str, Any] = {
            "database": {"url": self.db_url},
            "state_dir": str(sd),
            "security": {"node_key_ref": f"file:{d}/node.key"},
            "networks": [
                {"name": "oob", "zone": 0, "cidr": "10.98.0.0/16", "gateway": "10.98.0.1", "boot_server": srv,
                 # every instance's address, the same list in each config: one policy per DPU whichever
                 # instance builds it (bootsvc.policy), the relay forwards to all, flows open to all
                 **({"boot_servers": [srv_ip(j) for j in range(self.k)]} if self.k > 1 else {}),
                 "relays": [DPU_RELAY], "pools": [{"start": "10.98.1.0", "end": "10.98.255.250"}],
                 "lease_seconds": 3600},
                {"name": "acme-hosts", "zone": 1, "vrf": VRF, "cidr": "10.0.0.0/16", "gateway": HOST_RELAY,
                 "boot_server": srv, "relays": [HOST_RELAY],
                 "pools": [{"start": "10.0.1.0", "end": "10.0.255.250"}], "lease_seconds": 3600},
            ],
            "tenants": [{"name": TENANT, "vrf": VRF, "l3vni": 5001, "table": 1001, "prefixes": ["10.0.0.0/16"]}],
            "bmc_credentials": {"storm": {"ref": f"file:{d}/bmc.cred",
                                          "networks": [{"cidr": "10.200.0.0/16", "lab": True}]}},
            "images": {"catalog": str(d / "catalog.yaml"), "root": str(d)},
            "listeners": {
                "http": [{"address": srv, "port": HTTP_PORT, "roles": ["boot"]},
                         {"address": "127.0.0.1", "port": API_PORT}],
                "dhcp": [{"interface": self.veths[k][0], "address": srv}],
                "tftp": [{"address": srv, "port": 69}],
            },
            # dhcp.instance_index/instance_count (each instance its own stripe and share) stay unset, on
            # purpose: with them, a host's REQUEST names its relay's server-id-override (RFC 5107), the same
            # address for every instance, so the instance whose offer was not chosen NAKs it ("offer no
            # longer valid", bootsvc/dhcp/decide.py) and the client restarts: 3 hosts of 200 gave up in the
            # kill run (README "Several instances"). Opt in with --dhcp-instances to reproduce.
            "dhcp": {"unknown_clients": "ignore", "per_relay_rate": 1_000_000, "per_mac_rate": 100,
                     **({"instance_index": k, "instance_count": self.k} if a.dhcp_instances else {})},
            "boot": {"http_port": HTTP_PORT, "provision_method": "pxe", "tftp_root": str(d / "tftp"),
                     "grub_http_port": HTTP_PORT},
            "conductor": {"interval_seconds": 0.5, "backoff_seconds": 2, "max_attempts": 3,
                          "deadlines": dict((k, int(v)) for k, v in (d.split("=", 1) for d in a.deadline))},
            "orchestration": {"vtep_network": "10.255.0.0/16", "workers": a.workers,
                              "claim_seconds": a.claim_seconds},
            # gate off: the simulated agents run no FRR. asn set: EVPN, where a DPU's policy carries no
            # per-fleet peer list (unset: static peer lists, every DPU lists every DPU of its tenant)
            "fabric": {"gate_boot": False, **({"asn": a.fabric_asn} if a.fabric_asn else {})},
            "power": {"max_sessions_per_bmc": 2, "rack_power_ons": a.rack_budget,
                      "rack_window_seconds": a.rack_window, "max_concurrent_bmc": a.bmc_cap},
        }
        p = d / (f"bootsvc-{k}.yaml" if k else "bootsvc.yaml")
        p.write_text(yaml.safe_dump(tree))
        return p

    def enroll(self, cfgp: Path) -> None:
        from bootsvc import config as config_mod
        from bootsvc import db, inventory

        r = subprocess.run([PY, "-m", "bootsvc", "--config", str(cfgp), "db", "upgrade"], capture_output=True,
                           text=True, cwd=ROOT)
        if r.returncode:
            raise SystemExit(f"db upgrade failed: {r.stderr[-2000:]}")
        cfg = config_mod.load(cfgp)
        sessions = db.session_factory(db.make_engine(cfg.database.url))
        with sessions() as s:
            inventory.sync_tenants(s, cfg)
            batch: list[inventory.NodeSpec] = []
            for i in range(self.a.pairs):
                rack = f"r{i // self.a.rack_size:03d}"
                host = f"h{i:05d}"
                batch += [
                    inventory.NodeSpec(name=host, kind="host", serial=f"SN-{host}", tenant=TENANT,
                                       bmc_address=f"http://{bmc_ip(i, 'host')}:{BMC_PORT}", bmc_driver="redfish",
                                       bmc_credential_ref="storm", rack=rack, slot=i % self.a.rack_size,
                                       nics=[inventory.NicSpec(mac(i, "host"), "host-pf")]),
                    inventory.NodeSpec(name=f"{host}-dpu", kind="dpu", serial=f"MT-{host}", tenant=TENANT, host=host,
                                       bmc_address=f"http://{bmc_ip(i, 'dpu')}:{BMC_PORT}", bmc_driver="redfish",
                                       bmc_credential_ref="storm", rack=rack, slot=i % self.a.rack_size,
                                       provision_method="pxe", nics=[inventory.NicSpec(mac(i, "dpu"), "oob")]),
                ]
                if len(batch) >= 400:
                    self._enroll(s, batch)
                    batch = []
            if batch:
                self._enroll(s, batch)

    @staticmethod
    def _enroll(s: Any, batch: list[Any]) -> None:
        """inventory.enroll without autoflush: its per-node duplicate checks would each flush the
        node added just before (one INSERT at a time); the storm's names, serials and MACs are
        unique by construction, so the batch is flushed once. 40 % less harness CPU at enrolment
        (1000 pairs: 9.7 -> 5.9 s), the same rows."""
        from bootsvc import inventory

        with s.no_autoflush:
            inventory.enroll(s, batch, actor="storm")

    def provision_all(self, cfgp: Path) -> float:
        """PROVISION every host (what POST /machines/<host>/provision records), in one transaction per 500."""
        from sqlalchemy import select

        from bootsvc import config as config_mod
        from bootsvc import db, lifecycle
        from bootsvc.models import Node
        from bootsvc.states import Trigger

        cfg = config_mod.load(cfgp)
        sessions = db.session_factory(db.make_engine(cfg.database.url))
        t0 = time.time()
        with sessions() as s:
            hosts = list(s.scalars(select(Node).where(Node.kind == "host").order_by(Node.id)))
            for k, n in enumerate(hosts, 1):
                lifecycle.apply(s, n, Trigger.PROVISION, actor="storm", commit=False)
                if k % 500 == 0:
                    s.commit()
            s.commit()
        return t0

    # -- processes ------------------------------------------------------------------------------------
    def spawn(self, ns: str, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with log.open("ab") as f:
            p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True, env=env, cwd=ROOT)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def service_cpu(self, sup: int) -> dict[str, float]:
        """CPU seconds (user+system, reaped children included) of each service under the supervisor."""
        tick = os.sysconf("SC_CLK_TCK")
        kids: dict[int, list[int]] = {}
        info: dict[int, tuple[list[str], float]] = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                st = (d / "stat").read_text().rsplit(")", 1)[1].split()
                argv = (d / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            pid = int(d.name)
            kids.setdefault(int(st[1]), []).append(pid)
            info[pid] = (argv, sum(int(x) for x in st[11:15]) / tick)
        out: dict[str, float] = {}

        def tree(pid: int) -> float:
            return info.get(pid, ([], 0.0))[1] + sum(tree(c) for c in kids.get(pid, []))

        for pid in kids.get(sup, []):
            argv = info[pid][0]
            kind = argv[argv.index("run-service") + 1] if "run-service" in argv[:-1] else "supervisor"
            out[kind] = out.get(kind, 0.0) + tree(pid)
        out["supervisor"] = out.get("supervisor", 0.0) + info.get(sup, ([], 0.0))[1]
        return out

    def serve_pid(self, wrapper: int) -> int | None:
        """The ``bootsvc serve`` process under the ``ip netns exec`` wrapper (exec'd: the same pid)."""
        return wrapper

    def sql_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.sqldir.glob("*.json"):
            try:
                d = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            argv = d.get("argv") or []
            if "run-service" in argv[:-1]:
                kind = argv[argv.index("run-service") + 1]
            elif any("run.py" in x for x in argv):
                continue  # the harness's own enrolment
            else:
                kind = "other"
            out[kind] = out.get(kind, 0) + int(d.get("statements") or 0)
        return out

    def timings(self, cfgp: Path) -> dict[str, Any]:
        from sqlalchemy import select

        from bootsvc import config as config_mod
        from bootsvc import db
        from bootsvc.models import Event, Node

        cfg = config_mod.load(cfgp)
        sessions = db.session_factory(db.make_engine(cfg.database.url))
        with sessions() as s:
            states: dict[str, int] = {}
            for st in s.scalars(select(Node.state)):
                states[st] = states.get(st, 0) + 1
            start: dict[int, dt.datetime] = {}
            end: dict[int, dt.datetime] = {}
            q = select(Event.node_id, Event.to_state, Event.trigger, Event.at).join(Node, Node.id == Event.node_id) \
                .where(Node.kind == "host", Event.to_state.in_(("host_waiting_dpu", "deployed")))
            for nid, to, trig, at in s.execute(q):
                at = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
                if to == "host_waiting_dpu" and trig == "provision":
                    start[nid] = min(start.get(nid, at), at)
                elif to == "deployed":
                    end[nid] = max(end.get(nid, at), at)
            per = sorted((end[n] - start[n]).total_seconds() for n in end if n in start)
            from sqlalchemy import func

            from bootsvc.models import Lease

            live = Lease.state.in_(("bound", "offered"))
            dup_addr = s.execute(select(func.count()).select_from(
                select(Lease.vrf, Lease.address).where(live).group_by(Lease.vrf, Lease.address)
                .having(func.count() > 1).subquery())).scalar_one()
            dup_mac = s.execute(select(func.count()).select_from(
                select(Lease.vrf, Lease.mac).where(Lease.state == "bound").group_by(Lease.vrf, Lease.mac)
                .having(func.count() > 1).subquery())).scalar_one()
            bound = s.execute(select(func.count()).select_from(Lease).where(Lease.state == "bound")).scalar_one()
            span = ((max(end.values()) - min(start.values())).total_seconds() if end and start else None)
            db_size = db_main = None
            if cfg.database.url.startswith("sqlite"):
                p = Path(cfg.database.url.split("///", 1)[1])
                db_size = sum(f.stat().st_size for f in p.parent.glob(p.name + "*"))
                # the database proper: the WAL copied back into it (a busy service can keep part of it
                # in the WAL; then this is a lower bound and db_bytes, WAL included, the upper one)
                from sqlalchemy import text

                with contextlib.suppress(Exception):
                    s.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
                db_main = p.stat().st_size
            else:
                from sqlalchemy import text

                db_size = db_main = s.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
        return {"states": states, "per_pair": per, "span": span, "db_bytes": db_size, "db_bytes_main": db_main,
                "leases": {"bound": bound, "duplicate_vrf_address": dup_addr, "macs_with_two_bound": dup_mac},
                "policy": self.policy_sends(s)}

    @staticmethod
    def policy_sends(s: Any) -> dict[str, Any]:
        """Policies sent per DPU, and *reverts*: a DPU sent a version it had already been sent, after a
        different one. In a storm the tenant only grows, so a policy should only move forward; a revert
        means two conductors computed two different policies for one DPU and each "corrects" the other
        at its drift check (bootsvc.policy promises every instance computes the same version)."""
        from sqlalchemy import select

        from bootsvc.models import Event

        seq: dict[int, list[str]] = {}
        for nid, detail in s.execute(select(Event.node_id, Event.detail).where(Event.trigger == "policy_sent")
                                     .order_by(Event.at, Event.id)):
            seq.setdefault(nid, []).append(str((detail or {}).get("policy_version")))
        reverts = 0
        for vs in seq.values():
            for k in range(1, len(vs)):
                if vs[k] != vs[k - 1] and vs[k] in vs[:k - 1]:
                    reverts += 1
        sends = sum(len(v) for v in seq.values())
        return {"sent": sends, "per_dpu": round(sends / len(seq), 2) if seq else 0.0, "reverts": reverts,
                "dpus_with_reverts": sum(1 for vs in seq.values()
                                         if any(vs[k] != vs[k - 1] and vs[k] in vs[:k - 1] for k in range(1, len(vs))))}

    @staticmethod
    def conductor_name(k: int) -> str:
        # Instances on one machine share a hostname, the default conductor name's first half
        # (bootsvc.conductor.run): each needs its own, or they would take each other's claims for theirs.
        return f"storm-i{k}"

    def cpu_all(self) -> dict[str, float]:
        """CPU seconds per service summed over instances (a killed one: its last reading before the kill)."""
        out: dict[str, float] = {}
        for k, p in enumerate(self.serves):
            cur = self.cpu_dead if k in self.dead and self.cpu_dead else self.service_cpu(p.pid)
            for kind, v in cur.items():
                out[kind] = out.get(kind, 0.0) + v
        return out

    def kill_one(self, eng: Any) -> None:
        """kill -9 every process of the last instance (its process group: a machine or container dying)
        at a moment its conductor holds claims; then watch the survivors take those nodes over."""
        from sqlalchemy import select

        from bootsvc.models import Node

        k = self.k - 1
        name = self.conductor_name(k)
        end = time.monotonic() + 20
        while time.monotonic() < end:
            with eng.connect() as c:
                n = len(c.execute(select(Node.id).where(Node.claimed_by == name)).all())
            if n >= 2:
                break
            time.sleep(0.02)
        self.cpu_dead = self.service_cpu(self.serves[k].pid)
        os.killpg(self.serves[k].pid, signal.SIGKILL)
        self.t_kill = time.time()
        self.dead.add(k)
        with eng.connect() as c:
            rows = c.execute(select(Node.id, Node.state, Node.claim_expires).where(Node.claimed_by == name)).all()
        self.held = {r[0]: r[1] for r in rows}
        exp = [(r[2] if r[2].tzinfo else r[2].replace(tzinfo=dt.UTC)).timestamp() - self.t_kill for r in rows
               if r[2] is not None]
        self.notes["kill"] = {"instance": k, "conductor": name, "at_deployed": self.done,
                              "claims_held": len(rows), "claims_expire_after_s": round(max(exp), 1) if exp else None,
                              "claim_seconds": self.a.claim_seconds, "taken_over": {}}
        print(f"storm: kill -9 instance {k} (process group {self.serves[k].pid}) at {self.done} deployed; "
              f"it held {len(rows)} claim(s)", flush=True)

    def watch_takeover(self, eng: Any) -> None:
        """A node the dead instance held is taken over when a survivor claims it or moves it on."""
        from sqlalchemy import select

        from bootsvc.models import Node

        k = self.notes["kill"]
        left = [i for i in self.held if str(i) not in k["taken_over"]]
        if not left:
            return
        with eng.connect() as c:
            rows = c.execute(select(Node.id, Node.state, Node.claimed_by).where(Node.id.in_(left))).all()
        for nid, state, by in rows:
            if by != k["conductor"] or state != self.held[nid]:
                k["taken_over"][str(nid)] = {"after_s": round(time.time() - self.t_kill, 1), "by": by,
                                             "state": f"{self.held[nid]} -> {state}"}
        if len(k["taken_over"]) == len(self.held):
            k["takeover_s"] = max(v["after_s"] for v in k["taken_over"].values())
            print(f"storm: the survivors took over all {len(self.held)} claim(s) of the dead instance "
                  f"{k['takeover_s']}s after the kill", flush=True)

    def finish_takeover(self, eng: Any) -> None:
        """After the storm: wait (bounded: the claims' expiry + 30 s) for the rest of the dead instance's
        nodes. One that no survivor needs any more (a resting DPU, a deployed host) keeps the dead
        conductor's name on an expired claim, which blocks nothing: counted as ``expired_unneeded``."""
        k = self.notes["kill"]
        until = self.t_kill + (k["claims_expire_after_s"] or 0) + 30
        while "takeover_s" not in k and time.time() < until:
            with contextlib.suppress(Exception):
                self.watch_takeover(eng)
            time.sleep(0.5)
        if "takeover_s" in k:
            return
        left = [i for i in self.held if str(i) not in k["taken_over"]]
        k["expired_unneeded"] = len(left)
        k["expired_unneeded_states"] = sorted({self.held[i] for i in left})
        k["takeover_s"] = max((v["after_s"] for v in k["taken_over"].values()), default=None)
        print(f"storm: survivors took over {len(k['taken_over'])} of the dead instance's {len(self.held)} "
              f"claim(s) after {k['takeover_s']}s; {len(left)} expired with nothing left to do "
              f"({', '.join(k['expired_unneeded_states'])})", flush=True)

    def pg_restart(self) -> None:
        """Stop this run's own PostgreSQL (fast shutdown: every connection is cut), keep it down
        --pg-down seconds, start it again."""
        print(f"storm: stopping PostgreSQL at {self.done} deployed", flush=True)
        t = time.time()
        self.pg_ctl_stop()
        time.sleep(self.a.pg_down)
        self.pg_ctl_start()
        self.notes["pg_restart"] = {"at_deployed": self.done, "down_s": round(time.time() - t, 1),
                                    "t_up": time.time()}
        print(f"storm: PostgreSQL back after {time.time() - t:.1f}s", flush=True)

    @staticmethod
    def unintended(cfgp: Path, seen: dict[str, int]) -> int:
        """Power-ons a BMC saw beyond those bootsvc recorded for its node (bmc_boot_network, bmc_reset,
        bmc_power_cycle events: one per power action a conductor step meant to send)."""
        from sqlalchemy import func, select

        from bootsvc import config as config_mod
        from bootsvc import db
        from bootsvc.models import Event, Node

        cfg = config_mod.load(cfgp)
        eng = db.make_engine(cfg.database.url)
        with eng.connect() as c:
            meant = {(addr or "").split("//", 1)[-1].split(":", 1)[0]: n for addr, n in c.execute(
                select(Node.bmc_address, func.count()).join(Event, Event.node_id == Node.id)
                .where(Event.trigger.in_(("bmc_boot_network", "bmc_reset", "bmc_power_cycle")))
                .group_by(Node.bmc_address))}
        eng.dispose()
        return sum(max(0, n - meant.get(ip, 0)) for ip, n in seen.items())

    def lease_check(self, cfgp: Path, acks: list[list[str]]) -> dict[str, Any]:
        """Every client's last DHCPACK (as the simulated clients received it) against the leases table:
        the address must still be bound to that client's MAC."""
        from sqlalchemy import select

        from bootsvc import config as config_mod
        from bootsvc import db
        from bootsvc.models import Lease

        last: dict[str, str] = {}
        seen: dict[str, set[str]] = {}
        for mac_, addr, _giaddr, _sid in acks:
            last[mac_] = addr
            seen.setdefault(mac_, set()).add(addr)
        cfg = config_mod.load(cfgp)
        eng = db.make_engine(cfg.database.url)
        with eng.connect() as c:
            rows = {a: (m, st) for a, m, st in c.execute(select(Lease.address, Lease.mac, Lease.state))}
        eng.dispose()
        lost = [(m, a, rows.get(a)) for m, a in last.items() if rows.get(a) != (m, "bound")]
        # the duplicate that matters on the wire: one address that two clients each hold an ACK for
        # (the table's unique (vrf, address) cannot show it; the clients' view can). The two networks'
        # ranges do not overlap, so the address alone names the (VRF, address).
        holders: dict[str, set[str]] = {}
        for m, addr in last.items():
            holders.setdefault(addr, set()).add(m)
        return {"acks": len(acks), "clients_acked": len(last), "acked_lost": len(lost),
                "acked_to_two_clients": sum(1 for v in holders.values() if len(v) > 1),
                "acked_lost_examples": [list(x) for x in lost[:5]],
                "clients_with_two_addresses_acked": sum(1 for v in seen.values() if len(v) > 1)}

    def run(self) -> dict[str, Any]:
        a = self.a
        self.net_up()
        cfgs = self.write_site()
        cfgp = cfgs[0]
        t_setup = time.monotonic()
        self.enroll(cfgp)
        t_enrolled = time.monotonic() - t_setup
        env = {**os.environ, "PYTHONPATH": f"{HERE / 'sqlcount'}:{ROOT}", "BOOTSVC_STORM_SQLCOUNT": str(self.sqldir),
               "BOOTSVC_HTTP_WORKERS": str(a.http_workers)}
        for k, c in enumerate(cfgs):
            self.serves.append(self.spawn(self.ns_srv[k], [PY, "-m", "bootsvc", "--config", str(c), "serve",
                                                           "--only", "dhcp,tftp,http,conductor"],
                                          self.dir / f"serve{k or ''}.log",
                                          {**env, "BOOTSVC_CONDUCTOR_NAME": self.conductor_name(k)}))
        result_file = self.dir / "sim.json"
        sim = self.spawn(self.ns_r, [PY, str(Path(__file__).resolve()), "--child", "--pairs", str(a.pairs),
                                     "--boot-delay", str(a.boot_delay), "--delays", a.delays,
                                     "--bmc-sessions", str(a.bmc_sessions), "--bmc-latency", str(a.bmc_latency),
                                     "--sim-loop", a.sim_loop,
                                     "--rack-size", str(a.rack_size), "--rack-window", str(a.rack_window),
                                     "--agent-poll", str(a.agent_poll), "--agent-idle-poll", str(a.agent_idle_poll),
                                     "--servers", ",".join(srv_ip(k) for k in range(self.k)),
                                     "--timeout", str(a.timeout), "--out", str(result_file)],
                         self.dir / "sim.log")
        # services up: every instance's boot plane answers from the simulator's side
        end = time.monotonic() + 90 + 30 * self.k
        up: set[int] = set()
        while time.monotonic() < end and len(up) < self.k:
            for k in set(range(self.k)) - up:
                r = sh("ip", "netns", "exec", self.ns_r, "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                       f"http://{srv_ip(k)}:{HTTP_PORT}/healthz", check=False)
                if r.stdout.strip() not in ("", "000"):
                    up.add(k)
            bmcs = sh("ip", "netns", "exec", self.ns_r, "ss", "-Hltn", check=False).stdout
            if len(up) == self.k and f"0.0.0.0:{BMC_PORT}" in bmcs:
                break
            time.sleep(0.5)
        else:
            raise SystemExit(f"services did not come up; see {self.dir}/serve*.log and sim.log")
        print(f"storm: {a.pairs} pairs enrolled and {self.k} instance(s) up in {time.monotonic() - t_setup:.0f}s; "
              f"provisioning all hosts", flush=True)
        from drift import PROBE_EVERY_S, box_probe_ms, growth, probe_summary, steps_done  # bench/storm/drift.py

        # the box's speed at the start (bench/storm/drift.py): taken in this process, outside the namespaces
        probes = [[0.0, box_probe_ms()]]
        t_probe = time.monotonic()
        cpu0 = self.cpu_all()
        cpu0["simulator"] = proc_cpu(sim.pid)
        self_cpu0 = time.process_time()
        load_prov = os.getloadavg()
        box0 = box_cpu()
        sql0 = self.sql_counts()
        t0 = self.provision_all(cfgp)
        deadline = time.monotonic() + a.timeout
        from sqlalchemy import func, select

        from bootsvc import config as config_mod
        from bootsvc import db
        from bootsvc.models import Node

        cfg = config_mod.load(cfgp)
        eng = db.make_engine(cfg.database.url)
        last_print = 0.0
        db_errors = 0
        # nodes per (kind, state) every 10 s, from the database (one GROUP BY): with the simulator's
        # phases (sim.py ``timeline``) it shows where the pipeline waits
        states_timeline: list[dict[str, Any]] = []
        # every 10 s: each service's CPU seconds since the provision triggers (the totals' /proc source)
        # and the pairs deployed (hosts), DPUs done (policy_applied) and lifecycle steps done (in pairs):
        # growth within the run, at one box speed (drift.growth)
        cpu_timeline: list[dict[str, Any]] = [{"t": 0.0, "deployed": 0, "dpus_done": 0, "steps": 0.0,
                                               "cpu": {k: 0.0 for k in cpu0}}]

        def cpu_point(by_state: dict[str, int]) -> None:
            cur = self.cpu_all()
            cur["simulator"] = proc_cpu(sim.pid)
            last = cpu_timeline[-1]  # the database unreachable at the end: the last progress known
            cpu_timeline.append({"t": round(time.time() - t0, 1), "deployed": self.done,
                                 "dpus_done": by_state.get("dpu:policy_applied", 0) if by_state else last["dpus_done"],
                                 "steps": steps_done(by_state) if by_state else last["steps"],
                                 "cpu": {k: round(v - cpu0.get(k, 0.0), 3) for k, v in sorted(cur.items())}})

        while time.monotonic() < deadline and sim.poll() is None:
            try:
                with eng.connect() as conn:
                    self.done = conn.execute(select(func.count()).select_from(Node).where(
                        Node.kind == "host", Node.state == "deployed")).scalar_one()
                if a.kill_at and not self.dead and self.done >= a.kill_at * a.pairs:
                    self.kill_one(eng)
                if "kill" in self.notes and "takeover_s" not in self.notes["kill"]:
                    self.watch_takeover(eng)
            except Exception as e:  # the database restarting: the harness waits like the services do
                db_errors += 1
                if db_errors % 10 == 1:
                    print(f"storm: database unreachable ({type(e).__name__}); waiting", flush=True)
            if a.pg_restart_at and "pg_restart" not in self.notes and self.done >= a.pg_restart_at * a.pairs:
                self.pg_restart()
                self.done_at_restart = self.done
            pr = self.notes.get("pg_restart")
            if pr and "first_deployed_after_s" not in pr and self.done > pr["at_deployed"]:
                pr["first_deployed_after_s"] = round(time.time() - pr["t_up"], 1)
            if self.done >= a.pairs:
                break
            if time.monotonic() - last_print > 10:
                by_state: dict[str, int] = {}
                with contextlib.suppress(Exception), eng.connect() as conn:
                    by_state = {f"{k}:{st}": c for k, st, c in conn.execute(
                        select(Node.kind, Node.state, func.count()).group_by(Node.kind, Node.state))}
                states_timeline.append({"t": round(time.time() - t0), **by_state})
                if by_state:
                    cpu_point(by_state)
                print(f"storm: {self.done}/{a.pairs} deployed after {time.time() - t0:.0f}s; "
                      f"{' '.join(f'{k}={v}' for k, v in sorted(by_state.items()))}", flush=True)
                last_print = time.monotonic()
            if time.monotonic() - t_probe >= PROBE_EVERY_S:
                probes.append([round(time.time() - t0, 1), box_probe_ms()])
                t_probe = time.monotonic()
            time.sleep(0.5 if "kill" in self.notes and "takeover_s" not in self.notes["kill"] else 1.0)
        wall = time.time() - t0
        box1 = box_cpu()
        end_state: dict[str, int] = {}
        with contextlib.suppress(Exception), eng.connect() as conn:
            end_state = {f"{k}:{st}": c for k, st, c in conn.execute(
                select(Node.kind, Node.state, func.count()).group_by(Node.kind, Node.state))}
            self.done = end_state.get("host:deployed", self.done)
        cpu_point(end_state)  # the end of the timeline: the same moment as the totals' end reading
        probes.append([round(time.time() - t0, 1), box_probe_ms()])
        if "kill" in self.notes:
            self.finish_takeover(eng)
        eng.dispose()
        cpu1 = self.cpu_all()
        cpu1["simulator"] = proc_cpu(sim.pid)
        harness_cpu = time.process_time() - self_cpu0
        rss = {"simulator_peak_mb": proc_peak_rss_mb(sim.pid),
               "services_mb": round(sum(proc_rss_mb(p.pid, tree=True) for k, p in enumerate(self.serves)
                                        if k not in self.dead), 1)}
        time.sleep(1.2)  # the SQL counters' next flush
        sql1 = self.sql_counts()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(sim.pid, signal.SIGTERM)  # the simulator writes its log summary on SIGTERM
        with contextlib.suppress(subprocess.TimeoutExpired):
            sim.wait(timeout=20)
        simres = json.loads(result_file.read_text()) if result_file.exists() else {}
        tm = self.timings(cfgp)
        per = tm["per_pair"]
        n = max(1, a.pairs)
        cpu_pp = {k: round((cpu1.get(k, 0) - cpu0.get(k, 0)) / n, 4) for k in sorted(cpu1)}
        res: dict[str, Any] = {
            "pairs": a.pairs, "db": a.db, "boot_delay": a.boot_delay, "delays": a.delays, "deployed": len(per),
            "instances": self.k,
            "wall_s": round(wall, 1), "span_s": round(tm["span"], 1) if tm["span"] else None,
            "pairs_per_min": round(len(per) / tm["span"] * 60, 1) if tm["span"] else 0.0,
            "p50_s": round(statistics.median(per), 1) if per else None,
            "p99_s": round(per[min(len(per) - 1, int(len(per) * 0.99))], 1) if per else None,
            "max_s": round(per[-1], 1) if per else None,
            # per pair enrolled (a run stopped by --timeout divides by all pairs, not by those deployed);
            # "simulator" is the simulated BMCs/firmware/agents process: the 10k target counts it
            "cpu_s_per_pair": cpu_pp,
            "cpu_s_per_pair_total": round(sum(cpu_pp.values()), 4),
            "cpu_s_per_pair_server": round(sum(v for k, v in cpu_pp.items() if k != "simulator"), 4),
            # a run stopped by its timeout also did work for pairs it did not finish: per deployed pair
            # is the upper bound, per pair enrolled the lower one
            "cpu_s_per_deployed_pair_total": round(sum(cpu_pp.values()) * n / len(per), 4) if per else None,
            "cpu_s_per_deployed_pair_server": round(sum(v for k, v in cpu_pp.items() if k != "simulator") * n
                                                    / len(per), 4) if per else None,
            # the fraction of all the box's cores busy (user+nice+system+irq+softirq+steal) from the
            # provision triggers to the end, from /proc/stat (proc(5)): whoever used them, storm or not
            "box_cpu_busy_fraction": round((box1[0] - box0[0]) / max(1, box1[1] - box0[1]), 3),
            "box_cores": os.cpu_count(),
            "harness_cpu_s": round(harness_cpu, 1), "enroll_s": round(t_enrolled, 1), "rss": rss,
            "fabric_asn": a.fabric_asn,
            "sql_per_pair": {k: round((sql1.get(k, 0) - sql0.get(k, 0)) / n, 1) for k in sorted(sql1)},
            "states": tm["states"], "db_bytes": tm["db_bytes"], "db_bytes_main": tm["db_bytes_main"],
            "leases": tm["leases"], "policy": tm["policy"],
            "acked_leases": self.lease_check(cfgp, simres.get("acks") or []),
            "acks_by_server": simres.get("acks_by_server"),
            # A second power-on of one BMC sooner than claim_seconds + 60 s after its first: two
            # conductors acting on one step, or a resend after a crash (a survivor acts once the claim
            # expired). A retry after a state deadline (150 s and more in these runs) is not counted.
            "bmc_actions_twice": sum(1 for g in simres.get("power_on_gaps") or [] if g < a.claim_seconds + 60),
            "bmc_actions_unrecorded": self.unintended(cfgp, simres.get("power_ons_per_bmc") or {}),
            "bmc_power_ons_beyond_first": simres.get("duplicates"), "bmc_actions": simres.get("actions"),
            "errors": simres.get("errors"), "loadavg_start": os.getloadavg()[0],  # (read at the end; multi.py)
            "loadavg_at_provision": load_prov, "loadavg_at_end": os.getloadavg(),
            "max_power_ons_per_rack_window": simres.get("max_power_ons_per_rack_window"),
            "peak_open_bmc_sessions": simres.get("peak_open_sessions_all_bmcs"),
            "sim_event_loop": simres.get("event_loop"),
            # Redfish requests the simulated BMCs answered 404 (not modelled), and the check-in intervals
            # the server advised the agents (poll_seconds -> times)
            "bmc_not_found": simres.get("redfish_not_found"),
            "agent_advised_poll_s": simres.get("agent_advised_poll_s"),
            # BMCs answering a request at the same moment (all instances together): <= power.max_concurrent_bmc
            # when the cap holds; meaningful with --bmc-latency > 0 (with instant answers requests rarely overlap)
            "peak_bmcs_in_flight": simres.get("peak_bmcs_with_request_in_flight"),
            "budget": {"rack_power_ons": a.rack_budget, "rack_window_s": a.rack_window, "bmc_cap": a.bmc_cap},
            # from the simulator's side: per endpoint attempts per pair and wall time p50/p99 (ms), agent
            # check-ins per pair (pre-apply / resting), BMC requests per pair by resource; and every 10 s
            # the nodes per simulated phase and per database state
            "requests": simres.get("requests"),
            "sim_timeline": simres.get("timeline"), "states_timeline": states_timeline,
            "sim_gc": simres.get("gc"),  # the simulator's garbage collections and their CPU, per generation
            # the box's speed (bench/storm/drift.py): a fixed workload's CPU ms at the start, every ~30 s and
            # at the end; a ratio of two runs' CPU per pair moves with it (README "Measuring flatness")
            "box_probe_ms": probe_summary(probes),
            # every 10 s: CPU s per service since the provision triggers, pairs deployed, DPUs done; and from
            # it CPU per deployed pair in the first/middle/last third of the run (one box speed)
            "cpu_timeline": cpu_timeline,
            "within_run_growth": growth(cpu_timeline),
            "within_run_growth_nodes": growth(cpu_timeline, by="nodes"),
            "within_run_growth_steps": growth(cpu_timeline, by="steps"),
        }
        if "kill" in self.notes:
            k = self.notes["kill"]
            k["taken_over_count"] = len(k.pop("taken_over"))
            res["kill"] = k
        if "pg_restart" in self.notes:
            self.notes["pg_restart"].pop("t_up", None)
            res["pg_restart"] = self.notes["pg_restart"]
        return res


# ------------------------------------------------------------------------------------------ main
def arg_parser() -> argparse.ArgumentParser:
    """run.py's command line (sweep.py's and multi.py's command lines are tested against it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=200)
    ap.add_argument("--db", choices=("sqlite", "pg"), default="sqlite")
    ap.add_argument("--pg-url", default=os.environ.get("BOOTSVC_TEST_PG_URL", ""),
                    help="an empty PostgreSQL database for --db pg")
    ap.add_argument("--boot-delay", type=float, default=0.0, help="seconds from power-on to the first DHCP")
    ap.add_argument("--delays", default="zero",
                    help="boot stage durations: 'zero' (the control-plane number), 'assumed' (ASSUMED values, "
                         "bench/storm/sim.py DELAY_PROFILES: no measured source) or "
                         "dpu_post=S,dpu_install=S,dpu_reboot=S,host_post=S,host_install=S")
    ap.add_argument("--bmc-sessions", type=int, default=4, help="open sessions a simulated BMC allows")
    ap.add_argument("--sim-loop", choices=("auto", "uvloop", "asyncio"), default="auto",
                    help="the simulator's event loop (auto: uvloop when installed)")
    ap.add_argument("--bmc-latency", type=float, default=0.0,
                    help="seconds a simulated BMC takes to answer each Redfish request (0: at once)")
    ap.add_argument("--agent-idle-poll", type=float, default=30.0,
                    help="seconds between check-ins of an agent whose policy is applied (the real agent: 30)")
    ap.add_argument("--agent-poll", type=float, default=5.0,
                    help="seconds between a simulated agent's check-ins (the real agent: 30)")
    ap.add_argument("--workers", type=int, default=16, help="orchestration.workers")
    ap.add_argument("--http-workers", type=int, default=2)
    ap.add_argument("--rack-size", type=int, default=40)
    ap.add_argument("--rack-budget", type=int, default=0, help="power.rack_power_ons (0: none)")
    ap.add_argument("--rack-window", type=float, default=10.0)
    ap.add_argument("--bmc-cap", type=int, default=0, help="power.max_concurrent_bmc (0: none)")
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--instances", type=int, default=1, help="bootsvc instances on the one database")
    ap.add_argument("--dhcp-instances", action="store_true",
                    help="set dhcp.instance_index/instance_count per instance (pool stripes, DISCOVER shares)")
    ap.add_argument("--claim-seconds", type=float, default=120.0, help="orchestration.claim_seconds")
    ap.add_argument("--kill-at", type=float, default=0.0,
                    help="kill -9 the last instance when this fraction of the pairs is deployed (0: never)")
    ap.add_argument("--pg-restart-at", type=float, default=0.0,
                    help="stop and start PostgreSQL when this fraction is deployed (needs --own-pg)")
    ap.add_argument("--pg-down", type=float, default=5.0, help="seconds PostgreSQL stays down")
    ap.add_argument("--own-pg", action="store_true",
                    help="--db pg on a PostgreSQL cluster this run starts and removes (not BOOTSVC_TEST_PG_URL)")
    ap.add_argument("--fabric-asn", type=int, default=4200000000,
                    help="fabric.asn: EVPN policies, no per-fleet peer lists (the default: a 10k-pair site runs "
                         "EVPN); 0: unset, static peer lists (every DPU's policy lists every DPU of its tenant)")
    ap.add_argument("--deadline", action="append", default=[], metavar="STATE=SECONDS",
                    help="conductor.deadlines entry (e.g. dpu_booting=300: a DPU whose bf.cfg was lost with a "
                         "killed instance is retried within the run)")
    ap.add_argument("--servers", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help="appended to the results file's name (sweep.py --bracket: "
                    "the first size run again must not overwrite the first run's file)")
    ap.add_argument("--results", type=Path, default=HERE / "results",
                    help="where results/storm-<N>-<db>.json goes (tests pass a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, database)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    return ap


def main() -> int:
    a = arg_parser().parse_args()
    if a.child:
        from sim import child_main  # bench/storm/sim.py: runs inside the simulator's namespace

        return child_main(a)
    if os.geteuid() != 0:
        print("bench/storm needs root (network namespaces)", file=sys.stderr)
        return 2
    if a.pg_restart_at and not (a.db == "pg" and a.own_pg):
        print("--pg-restart-at restarts a PostgreSQL this run owns: add --db pg --own-pg", file=sys.stderr)
        return 2
    from sim import parse_delays  # bench/storm/sim.py

    parse_delays(a.delays)  # a typo stops here, before namespaces and services are set up
    storm = Storm(a)
    res: dict[str, Any] = {}

    def _terminated(signum: int, _frame: Any) -> None:
        # SIGTERM (kill, timeout(1)) unwinds like Ctrl-C: the finally below stops the services by PID and
        # deletes the namespaces (without it a terminated run left both behind)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _terminated)
    try:
        res = storm.run()
    finally:
        storm.stop_all()
        storm.net_down()
        storm.pg_drop()
        print(f"storm: work directory {storm.dir} ({'kept' if a.keep else 'removed'})", flush=True)
        if not a.keep:
            import shutil

            shutil.rmtree(storm.dir, ignore_errors=True)
    tag = (f"-x{a.instances}" if a.instances > 1 else "") + ("-kill" if a.kill_at else "") + \
        ("-pgrestart" if a.pg_restart_at else "") + ("" if a.delays == "zero" else f"-delays-{a.delays}"[:40]) + \
        "".join(c for c in a.tag if c.isalnum() or c in "-_.")
    out = a.results / f"storm-{a.pairs}-{a.db}{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\n{a.pairs} pairs on {a.db}: {res.get('deployed')} deployed, {res.get('pairs_per_min')} pairs/min, "
          f"p50 {res.get('p50_s')}s p99 {res.get('p99_s')}s max {res.get('max_s')}s")
    print(f"  CPU s/pair {res.get('cpu_s_per_pair')} (total {res.get('cpu_s_per_pair_total')}, simulator included; "
          f"server {res.get('cpu_s_per_pair_server')}); per deployed pair {res.get('cpu_s_per_deployed_pair_total')} "
          f"(server {res.get('cpu_s_per_deployed_pair_server')}); the box's {res.get('box_cores')} cores "
          f"{100 * (res.get('box_cpu_busy_fraction') or 0):.0f} % busy\n"
          f"  SQL statements/pair {res.get('sql_per_pair')}")
    print(f"  enrolment {res.get('enroll_s')}s; RSS {res.get('rss')}; harness CPU {res.get('harness_cpu_s')}s")
    print(f"  BMC actions sent twice {res.get('bmc_actions_twice')}; peak BMCs with a request in flight "
          f"{res.get('peak_bmcs_in_flight')} (power.max_concurrent_bmc {a.bmc_cap or 'unset'}, BMC latency "
          f"{a.bmc_latency:g} s); errors {res.get('errors')}")
    al = res.get("acked_leases") or {}
    print(f"  {res.get('instances')} instance(s); leases ACKed {al.get('acks')}, "
          f"ACKed and lost {al.get('acked_lost')}, "
          f"duplicate (VRF, address) {(res.get('leases') or {}).get('duplicate_vrf_address')}; "
          f"ACKs by server {res.get('acks_by_server')}")
    if "kill" in res:
        k = res["kill"]
        print(f"  kill -9 of instance {k['instance']} at {k['at_deployed']} deployed: it held {k['claims_held']} "
              f"claim(s) (expiring {k['claims_expire_after_s']}s later, claim_seconds {k['claim_seconds']:g}); "
              f"all taken over after {k.get('takeover_s')}s")
    if "pg_restart" in res:
        r = res["pg_restart"]
        print(f"  PostgreSQL restarted at {r['at_deployed']} deployed, down {r['down_s']}s; "
              f"next pair deployed {r.get('first_deployed_after_s')}s after it came back")
    for line in drift_lines(res):
        print(line)
    for line in requests_table(res.get("requests") or {}):
        print(line)
    print("SUMMARY " + json.dumps({"storm": {k: v for k, v in res.items() if not k.endswith("_timeline")}}),
          flush=True)
    return 0 if res.get("deployed") == a.pairs else 1


def drift_lines(res: dict[str, Any]) -> list[str]:
    """The box's speed over the run and the growth within it (bench/storm/drift.py), printed."""
    out = []
    bp = res.get("box_probe_ms") or {}
    if bp:
        out.append(f"  box probe (fixed workload, CPU ms; higher = slower box): start {bp['start']}, median "
                   f"{bp['median']}, end {bp['end']} (min {bp['min']}, max {bp['max']}, {len(bp['samples'])} "
                   f"samples)")
    g = res.get("within_run_growth") or {}
    if g:
        out.append(f"  within-run growth, CPU s per deployed pair in the first / middle / last third "
                   f"({g['pairs_per_part']} pairs each, ending at {' / '.join(str(t) for t in g['t_at_cut'][1:])} s), "
                   f"last/first (pipeline fill and drain bias it down: README \"Measuring flatness\"):")
        out.append("    " + "; ".join(f"{k} {' / '.join(str(v) for v in vs)} ({g['last_over_first'][k]}x)"
                                    for k, vs in g["per_pair"].items()))
        for key, what in (("nodes", "nodes done (DPUs policy_applied + hosts deployed, / 2)"),
                          ("steps", "lifecycle steps done (work in flight counted, / 9 per pair)")):
            gn = res.get(f"within_run_growth_{key}") or {}
            if gn:
                sv = gn["per_pair"]["server"]
                out.append(f"    by {what}: server {' / '.join(str(v) for v in sv)} "
                           f"({gn['last_over_first']['server']}x)")
    return out


def requests_table(rq: dict[str, Any]) -> list[str]:
    """The simulator's view, printed: per endpoint attempts per pair and wall time, check-ins per pair."""
    if not rq:
        return []
    ci = rq.get("checkins_per_pair") or {}
    out = [f"  agent check-ins per pair: {ci.get('total')} (pre-apply {ci.get('pre_apply')}, resting "
           f"{ci.get('resting')}); BMC requests per pair {rq.get('bmc_requests_per_pair_total')} "
           f"{rq.get('bmc_requests_per_pair')}; the simulator's own queue wait ms {rq.get('sim_queue_wait_ms')} "
           f"(resting agents' pool {rq.get('sim_queue_wait_ms_resting')}; > 0: the harness delays the nodes)",
           f"  {'endpoint (simulator side)':<26} {'n':>8} {'per pair':>9} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}"]
    for what, e in sorted((rq.get("endpoints") or {}).items(), key=lambda kv: -kv[1]["n"]):
        out.append(f"  {what:<26} {e['n']:>8} {e['per_pair']:>9} {e['p50_ms']:>8} {e['p99_ms']:>8} "
                   f"{e['max_ms']:>8}")
    return out


if __name__ == "__main__":
    sys.exit(main())

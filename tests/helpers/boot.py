"""The boot plane's test environment (Flask test client, SQLite or PostgreSQL): a catalog with real files,
a TFTP root with an NBP and a symlink pointing outside it, a host and two DPUs with reserved addresses,
and accessors for their secrets and boot tokens."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import auth_secrets, inventory, lifecycle, render
from bootsvc import config as config_mod
from bootsvc.db import make_engine, session_factory
from bootsvc.models import Base, Node
from bootsvc.web import create_app

DPU_MAC, HOST_MAC, DPU2_MAC = "52:54:00:aa:00:01", "52:54:00:aa:00:02", "52:54:00:aa:00:03"
# reserved addresses (Nic.ipv4): the boot plane answers a node only from an address that holds it
DPU_IP, HOST_IP, DPU2_IP = "10.77.0.11", "10.77.0.12", "10.77.0.13"


@dataclass
class Env:
    app: Flask
    client: FlaskClient
    sessions: sessionmaker[Session]
    key: bytes
    root: Path
    disk: bytes

    def node(self, name: str) -> Node:
        with self.sessions() as s:
            n = s.scalars(select(Node).where(Node.name == name)).one()
            s.expunge(n)
            return n

    def secret(self, name: str) -> str:
        n = self.node(name)
        return auth_secrets.node_secret(self.key, n.id, n.secret_generation)

    def token(self, name: str) -> str:
        return render.boot_token(self.secret(name))

    def trigger(self, name: str, *triggers: str) -> None:
        with self.sessions() as s:
            n = s.scalars(select(Node).where(Node.name == name)).one()
            for t in triggers:
                lifecycle.apply(s, n, t, actor="test")


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_env(tmp_path: Path, db_url: str) -> Iterator[Env]:
    img = tmp_path / "img"
    img.mkdir()
    disk = bytes(range(256)) * 4096  # 1 MiB
    files = {"vmlinuz": b"kernel", "initrd.gz": b"initrd", "root.img.gz": disk, "agent.whl": b"wheel"}
    for n, b in files.items():
        (img / n).write_bytes(b)
    cat = {
        "defaults": {"dpu": "doca", "host": "os", "agent": "bootsvc-agent"},
        "images": [
            {"name": "doca", "version": "1", "kind": "bfb", "args": "console=ttyS0",
             "meta": {"agent": {"host_port": "eth1", "uplink": "eth0"}},
             "files": {r: {"path": f"img/{n}", "sha256": sha(files[n])}
                       for r, n in (("kernel", "vmlinuz"), ("initrd", "initrd.gz"), ("image", "root.img.gz"))}},
            {"name": "os", "version": "2", "kind": "host-os",
             "files": {r: {"path": f"img/{n}", "sha256": sha(files[n])}
                       for r, n in (("kernel", "vmlinuz"), ("initrd", "initrd.gz"), ("image", "root.img.gz"))}},
            {"name": "bootsvc-agent", "version": "0.1", "kind": "agent",
             "files": {"wheel": {"path": "img/agent.whl", "sha256": sha(b"wheel")}}},
            {"name": "broken", "version": "1", "kind": "host-os",
             "files": {"kernel": {"path": "img/vmlinuz", "sha256": "0" * 64}}},
        ],
    }
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(cat))
    (tmp_path / "tftp").mkdir()
    (tmp_path / "tftp" / "snponly.efi").write_bytes(b"MZ-snp")
    (tmp_path / "outside").write_text("secret outside")
    (tmp_path / "tftp" / "link.efi").symlink_to(tmp_path / "outside")
    cfg = config_mod.from_mapping({
        "database": {"url": db_url},
        "state_dir": str(tmp_path / "state"),
        "images": {"catalog": str(tmp_path / "catalog.yaml"), "root": str(tmp_path)},
        "security": {"node_key_ref": f"file:{tmp_path}/node.key", "dpu_password_hash": "$6$s$hash"},
        "boot": {"tftp_root": str(tmp_path / "tftp")},
    }, env={})
    engine = make_engine(cfg.database.url)
    Base.metadata.create_all(engine)
    sessions = session_factory(engine)
    with sessions() as s:
        inventory.enroll(s, [
            inventory.NodeSpec("host-1", "host", "SN-H1", nics=[inventory.NicSpec(HOST_MAC, "host-pf", HOST_IP)]),
            inventory.NodeSpec("dpu-1", "dpu", "SN-D1", nics=[inventory.NicSpec(DPU_MAC, "oob", DPU_IP)],
                               host="host-1"),
            inventory.NodeSpec("dpu-2", "dpu", "SN-D2", nics=[inventory.NicSpec(DPU2_MAC, "oob", DPU2_IP)]),
        ], actor="test")
    app = create_app(cfg, sessions)
    app.testing = True
    app.config["BOOT_NODE_CACHE_TTL"] = 0  # states change behind the app's back here
    key = auth_secrets.read_ref(cfg.security.node_key_ref, create=True)
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = DPU_IP  # requests come from dpu-1 unless a test says otherwise
    yield Env(app, client, sessions, key, tmp_path, disk)
    engine.dispose()

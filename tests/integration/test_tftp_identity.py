"""TFTP ``grub/grub.cfg-<MAC>`` only to the node's own address, written as the attack: with only a
DPU's MAC, anyone on Zone 0 fetched its GRUB config and the boot token in it (89d089e). Now the config
is served only to the address DHCP leased (a bound lease) or reserved (the NIC's fixed address) for that
node; any other source gets ERROR 2, counted. Loopback addresses stand in for Zone 0 ones; replies are
decoded by scapy, the token compared with one derived here."""

from __future__ import annotations

import datetime as dt
import hashlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from scapy.layers.tftp import TFTP
from sqlalchemy import select

from bootsvc import auth_secrets, inventory, lifecycle, metrics, render, tftp
from bootsvc import config as config_mod
from bootsvc.db import make_engine, session_factory
from bootsvc.models import Base, Lease, Node

DPU1_MAC, DPU2_MAC, DPU3_MAC = "52:54:00:bb:00:01", "52:54:00:bb:00:02", "52:54:00:bb:00:03"
DPU1_IP, DPU2_IP, DPU3_LEASE, STRANGER = "127.0.6.11", "127.0.6.13", "127.0.6.21", "127.0.6.99"


@dataclass
class Env:
    svc: tftp.TftpService
    tokens: dict[str, str]


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    img = tmp_path / "img"
    img.mkdir()
    files = {"vmlinuz": b"kernel", "initrd.gz": b"initrd", "root.img.gz": b"disk"}
    for n, b in files.items():
        (img / n).write_bytes(b)
    cat = {"defaults": {"dpu": "doca"}, "images": [
        {"name": "doca", "version": "1", "kind": "bfb", "args": "console=ttyS0",
         "files": {r: {"path": f"img/{n}", "sha256": hashlib.sha256(files[n]).hexdigest()}
                   for r, n in (("kernel", "vmlinuz"), ("initrd", "initrd.gz"), ("image", "root.img.gz"))}}]}
    (tmp_path / "catalog.yaml").write_text(yaml.safe_dump(cat))
    (tmp_path / "tftp").mkdir()
    cfg = config_mod.from_mapping({
        "database": {"url": f"sqlite:///{tmp_path}/db.sqlite"},
        "state_dir": str(tmp_path / "state"),
        "images": {"catalog": str(tmp_path / "catalog.yaml"), "root": str(tmp_path)},
        "security": {"node_key_ref": f"file:{tmp_path}/node.key"},
        "boot": {"tftp_root": str(tmp_path / "tftp")},
    }, env={})
    engine = make_engine(cfg.database.url)
    Base.metadata.create_all(engine)
    sessions = session_factory(engine)
    key = auth_secrets.read_ref(cfg.security.node_key_ref, create=True)
    tokens: dict[str, str] = {}
    with sessions() as s:
        inventory.enroll(s, [
            inventory.NodeSpec("dpu-1", "dpu", "SN-1", nics=[inventory.NicSpec(DPU1_MAC, "oob", DPU1_IP)]),
            inventory.NodeSpec("dpu-2", "dpu", "SN-2", nics=[inventory.NicSpec(DPU2_MAC, "oob", DPU2_IP)]),
            inventory.NodeSpec("dpu-3", "dpu", "SN-3", nics=[inventory.NicSpec(DPU3_MAC, "oob")]),
        ], actor="test")
        for name in ("dpu-1", "dpu-2", "dpu-3"):
            n = s.scalars(select(Node).where(Node.name == name)).one()
            lifecycle.apply(s, n, "provision", actor="test")  # an install: its config carries a token
            tokens[name] = render.boot_token(auth_secrets.node_secret(key, n.id, n.secret_generation))
        n3 = s.scalars(select(Node).where(Node.name == "dpu-3")).one()
        s.add(Lease(vrf="", network="zone0", address=DPU3_LEASE, mac=DPU3_MAC, node_id=n3.id, state="bound",
                    expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)))
        s.commit()
    generate, image_file = tftp.make_generator(cfg)
    svc = tftp.TftpService("127.0.0.1", 0, tftp.Resolver(tmp_path / "tftp", generate, image_file), timeout=2.0)
    stop = threading.Event()
    th = threading.Thread(target=svc.serve, args=(stop,), daemon=True)
    th.start()
    yield Env(svc, tokens)
    stop.set()
    th.join(timeout=5)
    engine.dispose()


def fetch(env: Env, src: str, mac: str) -> tuple[int, bytes]:
    """(0, file) or (ERROR code, message); a lock-step client of plain RFC 1350."""
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind((src, 0))
    c.settimeout(3)
    try:
        c.sendto(struct.pack("!H", 1) + f"/grub/grub.cfg-{mac}".encode() + b"\0octet\0", ("127.0.0.1", env.svc.port))
        data = bytearray()
        while True:
            buf, peer = c.recvfrom(2048)
            p = TFTP(buf)
            if p.op == 5:
                return p.errorcode, p.errormsg
            assert p.op == 3
            data += buf[4:]
            c.sendto(struct.pack("!HH", 4, p.block), peer)
            if len(buf) - 4 < 512:
                return 0, bytes(data)
    finally:
        c.close()


def test_config_with_token_only_to_the_reserved_address(env: Env) -> None:
    code, body = fetch(env, DPU1_IP, DPU1_MAC)
    assert code == 0 and env.tokens["dpu-1"].encode() in body
    before = metrics.counters.get("bootsvc_tftp_refused_total", {"reason": "identity"})
    assert fetch(env, STRANGER, DPU1_MAC) == (2, b"Access violation")  # no lease, no reservation
    assert fetch(env, DPU2_IP, DPU1_MAC) == (2, b"Access violation")  # another node's address
    assert env.svc.refused.get("identity") == 2
    assert metrics.counters.get("bootsvc_tftp_refused_total", {"reason": "identity"}) - before == 2


def test_config_with_token_to_the_leased_address(env: Env) -> None:
    code, body = fetch(env, DPU3_LEASE, DPU3_MAC.replace(":", "-").upper())
    assert code == 0 and env.tokens["dpu-3"].encode() in body
    assert fetch(env, STRANGER, DPU3_MAC)[0] == 2
    assert fetch(env, DPU1_IP, DPU3_MAC)[0] == 2


def test_unknown_mac_is_not_found_so_grub_falls_back(env: Env) -> None:
    assert fetch(env, STRANGER, "52:54:00:ff:ff:ff")[0] == 1

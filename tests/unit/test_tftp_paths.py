"""bootsvc.tftp path safety and root assembly (no sockets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootsvc import tftp


@pytest.mark.parametrize("name", [
    "../etc/passwd", "a/../../b", "..", ".", "a/./b", "a//b", "//etc/passwd", "", "a\\b", "a\0b",
    "caf\u00e9", "%2e%2e/x", "a b", "x" * 256, "/", "dir/",
])
def test_clean_name_refuses(name: str) -> None:
    with pytest.raises(tftp.Refused) as e:
        tftp.clean_name(name)
    assert e.value.code == tftp.ERR_ACCESS


@pytest.mark.parametrize(("name", "rel"), [
    ("snponly.efi", "snponly.efi"), ("/snponly.efi", "snponly.efi"), ("arm64/grubnetaa64.efi", "arm64/grubnetaa64.efi"),
    ("/grub/grub.cfg-52:54:00:77:00:20", "grub/grub.cfg-52:54:00:77:00:20"), ("/etc/passwd", "etc/passwd"),
])
def test_clean_name_accepts(name: str, rel: str) -> None:
    assert tftp.clean_name(name) == rel


def test_symlinks_and_dirs_never_served(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "ok.efi").write_bytes(b"ok")
    (tmp_path / "secret").write_text("s")
    (root / "link").symlink_to(tmp_path / "secret")
    (root / "dirlink").symlink_to(tmp_path)
    assert tftp.safe_resolve(root, "ok.efi") == root / "ok.efi"
    for bad in ("link", "dirlink/secret", "sub", "missing", "../secret"):
        assert tftp.safe_resolve(root, bad) is None
    r = tftp.Resolver(root)
    assert r("ok.efi", "1.2.3.4").block(0, 10) == b"ok"
    for bad, code in (("link", tftp.ERR_ACCESS), ("dirlink/secret", tftp.ERR_ACCESS), ("sub", tftp.ERR_NOT_FOUND),
                      ("missing", tftp.ERR_NOT_FOUND), ("../secret", tftp.ERR_ACCESS)):
        with pytest.raises(tftp.Refused) as e:
            r(bad, "1.2.3.4")
        assert e.value.code == code, bad


def test_generated_and_catalog_files(tmp_path: Path) -> None:
    (tmp_path / "k").write_bytes(b"kernel")
    r = tftp.Resolver(tmp_path, generate=lambda rel, ip: f"cfg {rel} {ip}".encode() if "cfg-" in rel else None,
                      image_file=lambda n, v, f: tmp_path / "k" if (n, v, f) == ("doca", "1", "vmlinuz") else None)
    assert r("/grub/grub.cfg-52:54:00:00:00:01", "10.0.0.9").block(0, 100) == \
        b"cfg grub/grub.cfg-52:54:00:00:00:01 10.0.0.9"
    assert r("images/doca/1/vmlinuz", "x").block(0, 100) == b"kernel"
    with pytest.raises(tftp.Refused):
        r("images/doca/1/other", "x")
    with pytest.raises(tftp.Refused):
        r("grub/grub.cfg", "x")  # generator said no, and no such file


def test_ensure_root_is_read_only_copies(tmp_path: Path) -> None:
    ipxe = tmp_path / "ipxe"
    ipxe.mkdir()
    for f in tftp.IPXE_FILES:
        (ipxe / f).write_bytes(f.encode())
    (tmp_path / "grub.efi").write_bytes(b"grub")
    root = tmp_path / "root"
    names = tftp.ensure_root(root, arm64_nbp="arm64/grubnetaa64.efi", arm64_src=tmp_path / "grub.efi", ipxe_dir=ipxe)
    assert names == ["arm64/grubnetaa64.efi", "ipxe.efi", "snponly.efi", "undionly.kpxe"]
    for n in names:
        p = root / n
        assert not p.is_symlink() and (p.stat().st_mode & 0o777) == 0o444
    assert (root.stat().st_mode & 0o777) == 0o555
    if os.geteuid() != 0:  # root ignores permissions
        with pytest.raises(PermissionError):
            (root / "new").write_text("x")
    # idempotent
    assert tftp.ensure_root(root, arm64_nbp="arm64/grubnetaa64.efi", arm64_src=tmp_path / "grub.efi",
                            ipxe_dir=ipxe) == names


def test_http_base_for_client() -> None:
    from bootsvc import config as config_mod

    cfg = config_mod.from_mapping({
        "boot": {"http_port": 8080},
        "networks": [{"name": "a", "zone": 0, "cidr": "10.77.0.0/24", "boot_server": "10.77.0.1"},
                     {"name": "b", "zone": 0, "cidr": "10.77.2.0/24", "boot_server": "10.77.1.1"}]}, env={})
    assert tftp.http_base_for(cfg, "10.77.2.9") == "http://10.77.1.1:8080"
    assert tftp.http_base_for(cfg, "10.77.0.9") == "http://10.77.0.1:8080"
    assert tftp.http_base_for(cfg, "192.0.2.1") == "http://10.77.0.1:8080"


_PIN_PROBE = """
import json, os, socket, sys
from pathlib import Path
from bootsvc import tftp
cpus = sorted(os.sched_getaffinity(0))
out = {"cpus": cpus, "mismatch": tftp.pin(0, len(cpus) + 1)}
os.environ["BOOTSVC_TFTP_PIN"] = "0"
out["off"] = tftp.pin(0, len(cpus))
os.environ["BOOTSVC_TFTP_PIN"] = "1"
out["after_refusals"] = sorted(os.sched_getaffinity(0))
last = len(cpus) - 1
out["pinned"] = tftp.pin(last, len(cpus))
out["affinity"] = sorted(os.sched_getaffinity(0))
svc = tftp.TftpService("127.0.0.1", 0, tftp.Resolver(Path(sys.argv[1]), lambda n, ip: None), cpu=out["pinned"])
out["incoming_cpu"] = svc.sock.getsockopt(socket.SOL_SOCKET, tftp.SO_INCOMING_CPU)
svc.sock.close()
print(json.dumps(out))
"""


def test_one_worker_per_cpu_is_pinned_and_steered(tmp_path: Path) -> None:
    """With one worker per allowed CPU, worker i runs on CPU i only and asks the kernel for the
    requests that arrive on that CPU (SO_INCOMING_CPU); otherwise, or with BOOTSVC_TFTP_PIN=0, the
    affinity is left alone. In a child process: pinning the test runner would be a side effect."""
    import json
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _PIN_PROBE, str(tmp_path)], capture_output=True, text=True,
                       timeout=60, env={**os.environ, "BOOTSVC_TFTP_PIN": "1"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    cpus = out["cpus"]
    assert out["mismatch"] is None and out["off"] is None and out["after_refusals"] == cpus
    assert out["pinned"] == cpus[-1] and out["affinity"] == [cpus[-1]]
    assert out["incoming_cpu"] == cpus[-1]

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

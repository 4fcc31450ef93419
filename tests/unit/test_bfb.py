"""bootsvc.bfb and `bootsvc image import-bfb`: the mlx-mkbfb stream format (header bits, padding, CRC,
following-images bitmap), byte-identical round trips, and every way a file can fail to be a usable BFB
(foreign, truncated, corrupted, appended bf.cfg, no kernel/initramfs) - each one error line, exit 2,
nothing written. Plus a large stream imported with bounded memory."""

from __future__ import annotations

import hashlib
import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from bootsvc import bfb
from bootsvc import images as im
from bootsvc.cli import cli

KERNEL = b"MZ\x00\x00arm64-kernel" + bytes(range(256)) * 17 + b"odd"  # not a multiple of 8
INITRD = b"\x1f\x8b initramfs " * 1000 + b"x"


def _expected_header(image_id: int, payload: bytes, following: int, version: int = 0, next_version: int = 0) -> bytes:
    """The header spelled out from mlx-mkbfb's ImageHdr.get_bits, independently of bfb.Header.pack."""
    pad = (-len(payload)) % 8
    crc = zlib.crc32(payload + b"\0" * pad) & 0xFFFFFFFF
    w0 = 0x13026642 | (1 << 32) | (2 << 36) | (next_version << 44) | (version << 48) | (3 << 52) | (image_id << 56)
    return struct.pack("<QQQ", w0, len(payload) | crc << 32, following)


def _mkbfb(*parts: bfb.Part) -> bytes:
    out = io.BytesIO()
    bfb.write_bfb(out, parts)
    return out.getvalue()


def _bf3() -> bytes:
    return _mkbfb(bfb.Part("initramfs", INITRD), bfb.Part("image", KERNEL), bfb.Part("boot-args", b"console=hvc0"))


def test_writer_matches_the_mlx_mkbfb_layout_bit_for_bit() -> None:
    raw = _bf3()
    # mlx-mkbfb order: boot-args (59), image (62), initramfs (63); each padded to 8 with zeros
    args, k, i = b"console=hvc0", KERNEL, INITRD
    want = b""
    want += _expected_header(59, args, (1 << 62) | (1 << 63)) + args + b"\0" * ((-len(args)) % 8)
    want += _expected_header(62, k, 1 << 63) + k + b"\0" * ((-len(k)) % 8)
    want += _expected_header(63, i, 0) + i + b"\0" * ((-len(i)) % 8)
    assert raw == want


def test_versions_keep_their_bit_and_name_the_next_version() -> None:
    raw = _mkbfb(bfb.Part("image", b"v1-kernel", version=1), bfb.Part("image", b"v0-kernel", version=0))
    s = bfb.scan_stream(io.BytesIO(raw))
    assert [e.name for e in s.entries] == ["image-v0", "image-v1"]
    first, second = s.entries
    assert first.header.following == 1 << 62 and first.header.next_version == 1
    assert second.header.following == 0 and second.header.next_version == 0


def test_round_trip_is_byte_identical(tmp_path: Path) -> None:
    raw = _bf3()
    s = bfb.scan_stream(io.BytesIO(raw))
    assert [e.name for e in s.entries] == ["boot-args-v0", "image-v0", "initramfs-v0"]
    assert s.size == len(raw) and s.sha256 == hashlib.sha256(raw).hexdigest()
    # re-emit every image from its extracted payload: the same bytes
    payloads = {e.header.image_id: raw[e.payload_offset:e.payload_offset + e.header.length] for e in s.entries}
    again = _mkbfb(*(bfb.Part(iid, data) for iid, data in payloads.items()))
    assert again == raw
    src = tmp_path / "bf3.bfb"
    src.write_bytes(raw)
    ex = bfb.import_stream(src, tmp_path / "out", bfb_name="x.bfb")
    assert ex.kernel.name == "dump-image-v0" and ex.initrd.name == "dump-initramfs-v0"  # mlx-mkbfb -x names
    assert ex.kernel.read_bytes() == KERNEL and ex.initrd.read_bytes() == INITRD
    assert ex.bfb is not None and ex.bfb.read_bytes() == raw
    assert ex.kernel_entry.sha256 == hashlib.sha256(KERNEL).hexdigest()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dump-image-v0", "dump-initramfs-v0", "x.bfb"]


def test_writer_streams_files(tmp_path: Path) -> None:
    k = tmp_path / "Image"
    k.write_bytes(KERNEL)
    out = io.BytesIO()
    bfb.write_bfb(out, [bfb.Part("image", k), bfb.Part("initramfs", INITRD)], chunk=7)
    assert out.getvalue() == _mkbfb(bfb.Part("image", KERNEL), bfb.Part("initramfs", INITRD))


def _cli(tmp_path: Path, *args: str) -> tuple[int, str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\nimages: {{catalog: {tmp_path}/cat/catalog.yaml}}\n")
    r = CliRunner().invoke(cli, ["--config", str(cfg), "image", "import-bfb", *args])
    return r.exit_code, r.output


def test_import_bfb_registers_one_entry(tmp_path: Path) -> None:
    src = tmp_path / "bf-bundle-3.2.1-147_25.01_ubuntu-24.04_prod.bfb"
    src.write_bytes(_bf3())
    code, out = _cli(tmp_path, str(src), "--default-for-dpu")
    assert code == 0, out
    cat = im.load_catalog(tmp_path / "cat" / "catalog.yaml")
    [img] = cat.images
    assert img.kind == "bfb" and img.name == "bf-bundle-3.2.1-147_25.01_ubuntu-24.04_prod"
    assert img.version == hashlib.sha256(src.read_bytes()).hexdigest()[:12]
    assert img.args == "console=hvc0 console=ttyAMA0 earlycon=pl011,0x13010000 initrd=initramfs"
    assert cat.defaults["dpu"] == img.ref
    assert {f.role for f in img.files} == {"bfb", "kernel", "initrd"}
    checked, checks = im.verify(cat)
    assert not checked.bad and all(c.ok for c in checks)
    k = img.file("kernel")
    assert k is not None and k.path.read_bytes() == KERNEL
    # the same BFB again: refused, nothing changed
    before = (tmp_path / "cat" / "catalog.yaml").read_text()
    code, out = _cli(tmp_path, str(src))
    assert code == 2 and "already in the catalog" in out and "nothing was changed" in out
    assert (tmp_path / "cat" / "catalog.yaml").read_text() == before


def _bad(tmp_path: Path, data: bytes, *more: str) -> str:
    src = tmp_path / "x.bfb"
    src.write_bytes(data)
    code, out = _cli(tmp_path, str(src), "--name", "x", "--version", "1", *more)
    assert code == 2, out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in out
    assert not (tmp_path / "cat" / "catalog.yaml").exists()
    store = tmp_path / "cat" / "bfb"
    assert not store.exists() or not any(p.is_file() for p in store.rglob("*")), list(store.rglob("*"))
    return lines[0]


@pytest.mark.parametrize("data, why", [
    (b"", "empty"),
    (b"#!/bin/sh\necho not a bfb\n" * 4, "not a BFB"),
    (b"\x7fELF" + b"\0" * 60, "not a BFB"),
    (b"\x42\x66\x02\x13", "truncated"),
])
def test_foreign_files_are_refused(tmp_path: Path, data: bytes, why: str) -> None:
    assert why in _bad(tmp_path, data)


def test_truncated_in_a_payload_is_refused(tmp_path: Path) -> None:
    raw = _bf3()
    assert "truncated" in _bad(tmp_path, raw[:-100])
    assert "truncated" in _bad(tmp_path, raw[:len(raw) // 2])
    assert "truncated" in _bad(tmp_path, raw[:30])


def test_corrupted_payload_fails_the_crc(tmp_path: Path) -> None:
    raw = bytearray(_bf3())
    raw[len(raw) // 2] ^= 0x01
    assert "CRC-32" in _bad(tmp_path, bytes(raw))


def test_bad_header_fields_are_refused(tmp_path: Path) -> None:
    raw = bytearray(_bf3())
    raw[4] = (raw[4] & 0xF0) | 2  # major 2
    assert "major version 2" in _bad(tmp_path, bytes(raw))


def test_appended_bfcfg_is_named(tmp_path: Path) -> None:
    line = _bad(tmp_path, _bf3() + b"ubuntu_PASSWORD='$6$x'\n")
    assert "bf.cfg appended" in line


def test_no_kernel_or_no_initramfs(tmp_path: Path) -> None:
    assert "no installer initramfs" in _bad(tmp_path, _mkbfb(bfb.Part("image", KERNEL)))
    assert "no kernel" in _bad(tmp_path, _mkbfb(bfb.Part("initramfs", INITRD), bfb.Part("boot-args", b"x")))


def test_version_choice(tmp_path: Path) -> None:
    two = _mkbfb(bfb.Part("image", b"k1", version=1), bfb.Part("image", b"k2", version=2),
                 bfb.Part("initramfs", b"i1", version=1), bfb.Part("initramfs", b"i2", version=2))
    assert "--image-version" in _bad(tmp_path, two)
    src = tmp_path / "two.bfb"
    src.write_bytes(two)
    ex = bfb.import_stream(src, tmp_path / "o", version=2)
    assert ex.kernel.read_bytes() == b"k2" and sorted(p.name for p in ex.directory.iterdir()) == [
        "dump-image-v2", "dump-initramfs-v2", "image.bfb"]


def test_large_stream_with_bounded_memory(tmp_path: Path) -> None:
    """A 256 MiB initramfs (sparse on disk) is imported with a few MiB of Python memory."""
    size = 256 << 20
    src = tmp_path / "big.bfb"
    crc = 0
    zeros = bytes(1 << 20)
    for _ in range(size >> 20):
        crc = zlib.crc32(zeros, crc)
    with src.open("wb") as f:
        f.write(_mkbfb(bfb.Part("image", KERNEL)))
        f.write(bfb.Header(bfb.ID_INITRAMFS, size, crc).pack())
        f.truncate(f.tell() + size)  # a hole: nothing is written, the file reads as zeros
    cat = im.Catalog()
    tracemalloc.start()
    try:
        cat, img = im.import_bfb(cat, src, tmp_path / "store", name="big", version="1", copy=False)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes"
    i = img.file("initrd")
    assert i is not None and i.path.stat().st_size == size
    h = hashlib.sha256()
    for _ in range(size >> 20):
        h.update(zeros)
    assert i.sha256 == h.hexdigest()
    b = img.file("bfb")
    assert b is not None and b.path == src.resolve()
    assert yaml.safe_dump(im.dump_catalog(cat))  # the entry serialises


def test_imported_bfb_boots_over_http(tmp_path: Path) -> None:
    """The entry import-bfb wrote is what a DPU's iPXE script loads, byte for byte, over HTTP."""
    import re

    from bootsvc import config as config_mod
    from bootsvc import inventory, lifecycle
    from bootsvc.db import make_engine, session_factory
    from bootsvc.models import Base, Node
    from bootsvc.web import create_app

    raw = _bf3()
    src = tmp_path / "bf3.bfb"
    src.write_bytes(raw)
    code, out = _cli(tmp_path, str(src), "--name", "doca", "--version", "3.2.1", "--default-for-dpu")
    assert code == 0, out
    cfg = config_mod.from_mapping({
        "database": {"url": f"sqlite:///{tmp_path}/db.sqlite"}, "state_dir": str(tmp_path / "state"),
        "images": {"catalog": str(tmp_path / "cat" / "catalog.yaml")},
        "security": {"node_key_ref": f"file:{tmp_path}/node.key"}}, env={})
    engine = make_engine(cfg.database.url)
    Base.metadata.create_all(engine)
    sessions = session_factory(engine)
    with sessions() as s:
        (n,) = inventory.enroll(s, [inventory.NodeSpec("dpu-1", "dpu", "SN", nics=[
            inventory.NicSpec("52:54:00:aa:00:01", "oob", "10.77.0.11")])], actor="t")
        lifecycle.apply(s, s.get(Node, n.id), "provision", actor="t")  # type: ignore[arg-type]
    c = create_app(cfg, sessions).test_client()
    c.environ_base["REMOTE_ADDR"] = "10.77.0.11"
    script = c.get("/boot/ipxe?mac=52:54:00:aa:00:01", headers={"Host": "10.77.0.1:8080"}).get_data(True)
    kernel = re.search(r"^kernel http://10\.77\.0\.1:8080(\S+) initrd=initramfs console=hvc0 ", script, re.M)
    initrd = re.search(r"^initrd --name initramfs http://10\.77\.0\.1:8080(\S+) ", script, re.M)
    assert kernel and initrd, script
    assert "bfnet=oob_net0:dhcp bfks=http://10.77.0.1:8080/boot/bfks/dpu-1?token=" in script
    assert c.get(kernel.group(1)).data == KERNEL and c.get(initrd.group(1)).data == INITRD
    assert c.get("/images/doca/3.2.1/doca.bfb").data == raw  # the whole BFB, for the Redfish push
    engine.dispose()


def test_bfb_list(tmp_path: Path) -> None:
    import json

    src = tmp_path / "x.bfb"
    src.write_bytes(_bf3())
    r = CliRunner().invoke(cli, ["image", "bfb-list", str(src), "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert [i["name"] for i in doc["images"]] == ["boot-args-v0", "image-v0", "initramfs-v0"]
    assert doc["images"][1]["length"] == len(KERNEL) and doc["sha256"] == hashlib.sha256(_bf3()).hexdigest()
    src.write_bytes(_bf3()[:-3])
    r = CliRunner().invoke(cli, ["image", "bfb-list", str(src)])
    assert r.exit_code == 2 and "truncated" in r.output and "Traceback" not in r.output

"""bootsvc.images: catalog parsing, lookups that can't escape the catalog, verification and its cache."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import yaml

from bootsvc import images as im


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, object]:
    (tmp_path / "k").write_bytes(b"kernel")
    (tmp_path / "i.gz").write_bytes(b"initrd")
    return {
        "defaults": {"host": "os"},
        "images": [
            {"name": "os", "version": "1.9", "kind": "host-os",
             "files": {"kernel": {"path": "k", "sha256": _sha(b"kernel")},
                       "initrd": {"path": "i.gz", "sha256": _sha(b"initrd")}}},
            {"name": "os", "version": "1.10", "kind": "host-os",
             "files": {"kernel": {"path": str(tmp_path / "k"), "sha256": _sha(b"kernel")}}},
        ],
    }


def test_parse_and_resolve(tree: dict[str, object], tmp_path: Path) -> None:
    cat = im.parse_catalog(tree, tmp_path)
    assert [i.ref for i in cat.images] == ["os:1.9", "os:1.10"]
    assert cat.resolve(None, "host").version == "1.10"  # type: ignore[union-attr]  # natural version order
    assert cat.resolve("os:1.9").file("initrd").path == tmp_path / "i.gz"  # type: ignore[union-attr]
    assert cat.resolve("nope") is None and cat.resolve(None, "dpu") is None
    assert im.url_path(cat.resolve("os:1.9"), "initrd") == "/images/os/1.9/i.gz"  # type: ignore[arg-type]


@pytest.mark.parametrize(("mutate", "msg"), [
    (lambda t: t["images"][0].update(name="../x"), "not a valid image name"),
    (lambda t: t["images"][0].update(kind="iso"), "kind"),
    (lambda t: t["images"][1].update(version="1.9"), "listed twice"),
    (lambda t: t["images"][0]["files"]["kernel"].update(sha256="zz"), "sha256"),
    (lambda t: t["images"][0]["files"]["kernel"].update(name="a/b"), "URL-safe"),
    (lambda t: t.update(defaults={"dpu": "missing"}), "no image"),
    (lambda t: t["images"][0].update(files={}), "files"),
])
def test_parse_errors_name_the_field(tree: dict[str, object], tmp_path: Path, mutate, msg: str) -> None:  # type: ignore[no-untyped-def]
    mutate(tree)
    with pytest.raises(im.CatalogError, match=msg):
        im.parse_catalog(tree, tmp_path, "cat.yaml")


@pytest.mark.parametrize("fname", ["..", "../k", "k/..", "", "a\\b", "k\0", ".", "%2e%2e"])
def test_lookup_never_leaves_the_catalog(tree: dict[str, object], tmp_path: Path, fname: str) -> None:
    cat = im.parse_catalog(tree, tmp_path)
    assert cat.lookup_file("os", "1.9", fname) is None
    assert cat.lookup_file("..", "1.9", "k") is None
    assert cat.lookup_file("os", "1.9", "k") is not None


def test_verify_ok_mismatch_missing_and_cache(tree: dict[str, object], tmp_path: Path) -> None:
    cache = tmp_path / "state" / "verify.json"
    cat = im.parse_catalog(tree, tmp_path)
    cat, checks = im.verify(cat, cache)
    # the second image reuses "k": hashed once, then a cache hit
    assert not cat.bad and [c.reason for c in checks] == ["ok", "ok", "cached"]
    cat, checks = im.verify(cat, cache)
    assert {c.reason for c in checks} == {"cached"}  # same size+mtime: no rehash
    # same size, new content, new mtime -> rehashed -> mismatch -> both images using "k" are bad
    st = (tmp_path / "k").stat()
    (tmp_path / "k").write_bytes(b"KERNEL")
    os.utime(tmp_path / "k", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    cat, checks = im.verify(cat, cache)
    assert cat.bad == {"os:1.9", "os:1.10"}
    assert any("mismatch" in c.reason for c in checks)
    assert cat.lookup_file("os", "1.9", "i.gz") is None  # a bad image serves nothing
    (tmp_path / "i.gz").unlink()
    cat, checks = im.verify(cat, cache)
    assert any(c.reason == "missing" for c in checks)
    assert json.loads(cache.read_text())  # cache written


def test_verify_cache_is_fast_for_big_files(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as f:
        f.truncate(256 << 20)  # sparse 256 MiB
    cat = im.Catalog((im.Image("b", "1", "host-os", (im.ImageFile("image", "big", big, "0" * 64),)),))
    cache = tmp_path / "c.json"
    json_entry = {str(big): [big.stat().st_size, big.stat().st_mtime_ns, "0" * 64]}
    cache.write_text(json.dumps(json_entry))
    import time

    t0 = time.monotonic()
    cat2, checks = im.verify(cat, cache)
    assert time.monotonic() - t0 < 0.5 and checks[0].reason == "cached" and not cat2.bad


def test_add_dump_roundtrip(tmp_path: Path) -> None:
    (tmp_path / "w.whl").write_bytes(b"wheel")
    img = im.make_image("bootsvc-agent", "0.1.0", "agent", {"wheel": tmp_path / "w.whl"})
    cat = im.add_image(im.Catalog(), img)
    with pytest.raises(im.CatalogError):
        im.add_image(cat, img)
    tree = im.dump_catalog(cat, tmp_path)
    assert tree["images"][0]["files"]["wheel"]["path"] == "w.whl"
    p = tmp_path / "catalog.yaml"
    p.write_text(yaml.safe_dump(tree))
    again = im.load_catalog(p)
    assert again.images[0].files[0].sha256 == _sha(b"wheel")
    assert im.load_catalog(tmp_path / "absent.yaml").images == ()


def test_lab_catalog_from_artifacts(tmp_path: Path) -> None:
    from types import SimpleNamespace

    root = tmp_path / "build-x"
    for rel in ("x86/vmlinuz", "x86/initrd.gz", "arm64/Image", "arm64/initrd.gz", "tftp/undionly.kpxe",
                "tftp/snponly.efi", "tftp/ipxe.efi", "tftp/arm64/grubnetaa64.efi"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode())
    (root / "manifest.json").write_text(json.dumps({"files": {"x86/vmlinuz": _sha(b"x86/vmlinuz")}}))
    arts = SimpleNamespace(root=root, key="k1", kernel=root / "x86/vmlinuz", initrd=root / "x86/initrd.gz",
                           kernel_arm64=root / "arm64/Image", initrd_arm64=root / "arm64/initrd.gz",
                           undionly=root / "tftp/undionly.kpxe", snponly=root / "tftp/snponly.efi",
                           ipxe_efi=root / "tftp/ipxe.efi", grub_arm64=root / "tftp/arm64/grubnetaa64.efi")
    disk = tmp_path / "doca.img.gz"
    disk.write_bytes(b"disk")
    cat = im.lab_catalog(arts, SimpleNamespace(path=disk, sha256=_sha(b"disk")))
    cat, checks = im.verify(cat, None)
    assert not cat.bad, [c for c in checks if not c.ok]
    doca = cat.resolve(None, "dpu")
    assert doca is not None and doca.kind == "bfb"
    assert {f.name for f in doca.files} == {"vmlinuz", "initrd.gz", "doca.img.gz", "Image", "initrd-arm64.gz"}

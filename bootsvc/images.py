"""Image catalog: named, versioned boot images and the files that make them up, verified by sha256.

Owns: the catalog file format (``images/catalog.yaml``; see ``images/README.md``), resolving a node's
image (``Node.image`` = ``name[:version]``, else the catalog's default for the node's kind), the
file a URL ``/images/<name>/<version>/<file>`` names (never a path built from the URL: only files the
catalog lists can be served), and start-up verification: every listed file is hashed once and the
result cached by (path, size, mtime_ns) in ``<state_dir>/image-verify.json`` so restarts stay fast.

Image kinds: ``bfb`` (DOCA BFB bundle: ``bfb`` + the installer ``kernel``/``initrd`` extracted from it,
or the lab's kernel/initrd + ``image``), ``kernel-initrd`` (e.g. a discovery image), ``host-os``
(installer kernel/initrd + the OS ``image``), ``nbp`` (network boot programs) and ``agent`` (the DPU
policy agent wheel). Pure except for ``load_catalog`` (reads YAML), ``verify`` (reads files) and
``import_bfb`` (a ``.bfb`` as delivered -> one ``bfb`` entry, through ``bootsvc.bfb``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from bootsvc import bfb as bfb_mod

log = logging.getLogger("bootsvc.images")

KINDS = ("bfb", "kernel-initrd", "host-os", "nbp", "agent")
# URL components: a conservative charset so a name/version/file can never carry '/', '..', NUL or '\'.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class CatalogError(ValueError):
    """A catalog that cannot be used; the message names the file, the entry and the reason."""


@dataclass(frozen=True, slots=True)
class ImageFile:
    role: str  # kernel | initrd | image | bfb | wheel | nbp ... (what the boot plan uses it for)
    name: str  # the file name in URLs (basename of path)
    path: Path  # absolute
    sha256: str


@dataclass(frozen=True, slots=True)
class Image:
    name: str
    version: str
    kind: str
    files: tuple[ImageFile, ...]
    args: str = ""  # extra kernel arguments for this image's installer
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def file(self, role: str) -> ImageFile | None:
        return next((f for f in self.files if f.role == role), None)

    def by_name(self, fname: str) -> ImageFile | None:
        return next((f for f in self.files if f.name == fname), None)


@dataclass(frozen=True)
class Catalog:
    images: tuple[Image, ...] = ()
    defaults: Mapping[str, str] = field(default_factory=dict)  # dpu|host|discovery|agent -> name[:version]
    source: str = "<empty>"
    bad: frozenset[str] = frozenset()  # refs that failed verification (never served)

    def get(self, name: str, version: str | None = None) -> Image | None:
        """An image by name and version; without a version the highest version (natural order)."""
        cands = [i for i in self.images if i.name == name and (version is None or i.version == version)]
        if not cands:
            return None
        return max(cands, key=lambda i: _version_key(i.version))

    def resolve(self, ref: str | None, default_for: str | None = None) -> Image | None:
        """``name[:version]``; ``None`` -> the catalog default for ``default_for`` (dpu/host/...)."""
        if not ref and default_for:
            ref = self.defaults.get(default_for)
        if not ref:
            return None
        name, _, version = ref.partition(":")
        return self.get(name, version or None)

    def usable(self, image: Image | None) -> bool:
        return image is not None and image.ref not in self.bad

    def lookup_file(self, name: str, version: str, fname: str) -> ImageFile | None:
        """The catalog file a URL names, or None (unknown, or the image failed verification)."""
        if not all(_NAME_RE.match(x) for x in (name, version, fname)):
            return None
        img = self.get(name, version)
        if img is None or img.ref in self.bad:
            return None
        return img.by_name(fname)


def _version_key(v: str) -> tuple[tuple[int, int | str], ...]:
    # "2.10" > "2.9": compare numeric runs as numbers, the rest as text
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-+_]", v))


def url_path(image: Image, role: str) -> str | None:
    f = image.file(role)
    if f is None:
        return None
    return f"/images/{image.name}/{image.version}/{f.name}"


def parse_catalog(tree: Mapping[str, Any], base: Path, source: str = "<mapping>") -> Catalog:
    """Validate a catalog mapping; relative file paths are relative to ``base``."""
    if not isinstance(tree, Mapping):
        raise CatalogError(f"{source}: expected a mapping at the top level")
    raw = tree.get("images") or []
    if not isinstance(raw, list):
        raise CatalogError(f"{source}: images: expected a list")
    images: list[Image] = []
    seen: set[tuple[str, str]] = set()
    for i, e in enumerate(raw):
        where = f"{source}: images.{i}"
        if not isinstance(e, Mapping):
            raise CatalogError(f"{where}: expected a mapping")
        name, version, kind = str(e.get("name", "")), str(e.get("version", "")), str(e.get("kind", ""))
        if not _NAME_RE.match(name):
            raise CatalogError(f"{where}.name: {name!r} is not a valid image name ([A-Za-z0-9._+-])")
        if not _NAME_RE.match(version):
            raise CatalogError(f"{where}.version: {version!r} is not a valid version ([A-Za-z0-9._+-])")
        if kind not in KINDS:
            raise CatalogError(f"{where}.kind: {kind!r} is not one of {', '.join(KINDS)}")
        if (name, version) in seen:
            raise CatalogError(f"{where}: {name}:{version} is listed twice")
        seen.add((name, version))
        files_raw = e.get("files") or {}
        if not isinstance(files_raw, Mapping) or not files_raw:
            raise CatalogError(f"{where}.files: expected a non-empty mapping role -> {{path, sha256}}")
        files: list[ImageFile] = []
        for role, fe in files_raw.items():
            fw = f"{where}.files.{role}"
            if not isinstance(fe, Mapping) or "path" not in fe or "sha256" not in fe:
                raise CatalogError(f"{fw}: expected {{path, sha256}}")
            p = Path(str(fe["path"]))
            p = p if p.is_absolute() else base / p
            sha = str(fe["sha256"]).lower()
            if not _SHA_RE.match(sha):
                raise CatalogError(f"{fw}.sha256: not a sha256 hex digest")
            fname = str(fe.get("name") or p.name)
            if not _NAME_RE.match(fname):
                raise CatalogError(f"{fw}: file name {fname!r} is not URL-safe ([A-Za-z0-9._+-])")
            if any(f.name == fname for f in files):
                raise CatalogError(f"{fw}: two files of {name}:{version} are both named {fname!r}")
            files.append(ImageFile(str(role), fname, p, sha))
        args = str(e.get("args") or "")
        meta = e.get("meta") or {}
        if not isinstance(meta, Mapping):
            raise CatalogError(f"{where}.meta: expected a mapping")
        images.append(Image(name, version, kind, tuple(files), args, dict(meta)))
    defaults = tree.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise CatalogError(f"{source}: defaults: expected a mapping")
    cat = Catalog(tuple(images), {str(k): str(v) for k, v in defaults.items()}, source)
    for k, ref in cat.defaults.items():
        if cat.resolve(ref) is None:
            raise CatalogError(f"{source}: defaults.{k}: no image {ref!r} in the catalog")
    return cat


def load_catalog(path: str | Path) -> Catalog:
    """Read a catalog file; a missing file is an empty catalog (a site without images yet)."""
    p = Path(path)
    if not p.exists():
        log.warning("image catalog %s does not exist; no images will be served", p)
        return Catalog(source=str(p))
    try:
        tree = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CatalogError(f"{p}: cannot read: {e}") from None
    return parse_catalog(tree, p.parent.resolve(), str(p))


def dump_catalog(cat: Catalog, base: Path | None = None) -> dict[str, Any]:
    """The YAML mapping for ``cat`` (paths relative to ``base`` where possible)."""
    out: list[dict[str, Any]] = []
    for img in cat.images:
        files: dict[str, Any] = {}
        for f in img.files:
            p: str = str(f.path)
            if base is not None:
                with contextlib.suppress(ValueError):
                    p = str(f.path.relative_to(base))
            entry: dict[str, Any] = {"path": p, "sha256": f.sha256}
            if f.name != f.path.name:
                entry["name"] = f.name
            files[f.role] = entry
        e: dict[str, Any] = {"name": img.name, "version": img.version, "kind": img.kind, "files": files}
        if img.args:
            e["args"] = img.args
        if img.meta:
            e["meta"] = dict(img.meta)
        out.append(e)
    tree: dict[str, Any] = {}
    if cat.defaults:
        tree["defaults"] = dict(cat.defaults)
    tree["images"] = out
    return tree


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class FileCheck:
    image: str
    role: str
    path: Path
    ok: bool
    reason: str  # "ok", "cached", "missing", "sha256 mismatch (got ...)"


def verify(cat: Catalog, cache_path: Path | None = None, *, force: bool = False,
           only: Iterable[str] | None = None) -> tuple[Catalog, list[FileCheck]]:
    """Hash every file (or reuse the cached digest when path, size and mtime are unchanged).

    Returns the catalog with ``bad`` set to the refs of images with a missing or mismatching file, and
    one check per file. The cache maps ``path`` -> ``[size, mtime_ns, sha256]``; it is rewritten
    atomically. ``only`` restricts the work to those refs (others keep their current status).
    """
    cache: dict[str, list[Any]] = {}
    if cache_path is not None and cache_path.exists() and not force:
        try:
            loaded = json.loads(cache_path.read_text())
            if isinstance(loaded, dict):
                cache = loaded
        except (OSError, ValueError):
            cache = {}
    wanted = set(only) if only is not None else None
    checks: list[FileCheck] = []
    bad = set(cat.bad)
    for img in cat.images:
        if wanted is not None and img.ref not in wanted:
            continue
        img_ok = True
        for f in img.files:
            try:
                st = f.path.stat()
            except OSError:
                checks.append(FileCheck(img.ref, f.role, f.path, False, "missing"))
                img_ok = False
                continue
            key = str(f.path)
            hit = cache.get(key)
            if hit is not None and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
                digest, how = str(hit[2]), "cached"
            else:
                digest, how = sha256_file(f.path), "ok"
                cache[key] = [st.st_size, st.st_mtime_ns, digest]
            if digest != f.sha256:
                checks.append(FileCheck(img.ref, f.role, f.path, False, f"sha256 mismatch (got {digest[:16]}...)"))
                img_ok = False
            else:
                checks.append(FileCheck(img.ref, f.role, f.path, True, how))
        if img_ok:
            bad.discard(img.ref)
        else:
            bad.add(img.ref)
            log.error("image %s failed verification; it will not be served", img.ref)
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_name(cache_path.name + f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
            tmp.replace(cache_path)
        except OSError as e:
            log.warning("cannot write image verify cache %s: %s", cache_path, e.strerror)
    return replace(cat, bad=frozenset(bad)), checks


def make_image(name: str, version: str, kind: str, files: Mapping[str, Path], *, args: str = "",
               meta: Mapping[str, Any] | None = None) -> Image:
    """An Image for files on disk (hashing them), for ``image add`` and the lab catalog."""
    if kind not in KINDS:
        raise CatalogError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    for x in (name, version):
        if not _NAME_RE.match(x):
            raise CatalogError(f"{x!r} is not a valid image name/version ([A-Za-z0-9._+-])")
    out = []
    for role, p in files.items():
        p = Path(p).resolve()
        if not p.is_file():
            raise CatalogError(f"{role}: {p} is not a file")
        if not _NAME_RE.match(p.name):
            raise CatalogError(f"{role}: file name {p.name!r} is not URL-safe")
        out.append(ImageFile(role, p.name, p, sha256_file(p)))
    return Image(name, version, kind, tuple(out), args, dict(meta or {}))


def add_image(cat: Catalog, img: Image, *, replace_existing: bool = False) -> Catalog:
    others = tuple(i for i in cat.images if (i.name, i.version) != (img.name, img.version))
    if len(others) != len(cat.images) and not replace_existing:
        raise CatalogError(f"{img.ref} is already in the catalog (use --replace)")
    return replace(cat, images=(*others, img))


# The BF3 installer's console and initrd arguments (osbuild's ``org.osbuild.bfb`` stage): hvc0 and the
# PL011 UART at 0x13010000; ``initrd=initramfs`` names the initrd as iPXE loads it (render keeps the
# name in step; GRUB loads the initrd itself and drops the word).
BF3_ARGS = "console=hvc0 console=ttyAMA0 earlycon=pl011,0x13010000 initrd=initramfs"


def bfb_default_name(path: Path) -> str:
    """A catalog name from a BFB's file name (``bf-bundle-3.2.1-147_25.01_ubuntu-24.04_prod.bfb``
    -> ``bf-bundle-3.2.1-147_25.01_ubuntu-24.04_prod``), reduced to the URL-safe alphabet."""
    stem = re.sub(r"[^A-Za-z0-9._+-]", "-", path.name.removesuffix(".bfb")).lstrip("._+-")[:128]
    return stem or "bfb"


def import_bfb(cat: Catalog, src: Path, store: Path, *, name: str | None = None, version: str | None = None,
               image_version: int | None = None, copy: bool = True, replace_existing: bool = False,
               chunk: int = bfb_mod.CHUNK) -> tuple[Catalog, Image]:
    """Read the BFB ``src`` once (``bootsvc.bfb.import_stream``) into ``store/<name>/<version>/``: the
    whole BFB (for the Redfish push; ``copy=False`` leaves it where it is), the arm64 kernel and the
    installer initramfs as ``mlx-mkbfb -x`` names them. Returns the catalog with one ``bfb`` entry
    (files ``bfb``, ``kernel``, ``initrd``; args :data:`BF3_ARGS`). ``version`` defaults to the first
    12 hex digits of the BFB's sha256. On any error nothing is left in ``store`` and the caller's
    catalog is unchanged (it is returned, never written, here)."""
    name = name or bfb_default_name(src)
    for x in (name, version or "v"):
        if not _NAME_RE.match(x):
            raise CatalogError(f"{x!r} is not a valid image name/version ([A-Za-z0-9._+-])")
    if version is not None and cat.get(name, version) is not None and not replace_existing:
        raise CatalogError(f"{name}:{version} is already in the catalog (use --replace)")
    if not src.is_file():
        raise CatalogError(f"{src} is not a file")
    store = store.resolve()
    incoming = store / name / f".incoming-{os.getpid()}"
    try:
        ex = bfb_mod.import_stream(src, incoming, bfb_name=f"{name}.bfb", copy=copy, version=image_version,
                                   chunk=chunk)
    except bfb_mod.BfbError as e:
        raise CatalogError(f"{src}: {e}") from None
    version = version or ex.stream.sha256[:12]
    final = store / name / version
    try:
        if cat.get(name, version) is not None and not replace_existing:
            raise CatalogError(f"{name}:{version} is already in the catalog (this BFB was imported before; "
                               "use --replace)")
        if final.exists():
            if not replace_existing:
                raise CatalogError(f"{final} already exists; remove it or use --replace")
            old = final.with_name(f".old-{version}-{os.getpid()}")
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        incoming.rename(final)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    bfb_path = final / f"{name}.bfb" if copy else src.resolve()
    files = [ImageFile("bfb", f"{name}.bfb", bfb_path, ex.stream.sha256),
             ImageFile("kernel", ex.kernel.name, final / ex.kernel.name, ex.kernel_entry.sha256),
             ImageFile("initrd", ex.initrd.name, final / ex.initrd.name, ex.initrd_entry.sha256)]
    meta = {"bfnet": "oob_net0:dhcp", "source": "import-bfb",
            "bfb_images": [{"name": e.name, "length": e.header.length} for e in ex.stream.entries]}
    img = Image(name, version, "bfb", tuple(files), BF3_ARGS, meta)
    return add_image(cat, img, replace_existing=replace_existing), img


def lab_catalog(arts: Any, doca: Any | None = None, agent_wheel: Path | None = None,
                version: str | None = None) -> Catalog:
    """The catalog for the QEMU lab, from ``bootsvc.lab.artifacts`` outputs (``LabArtifacts`` and
    optionally ``DocaImage``): a ``lab-discovery`` kernel/initrd (probe mode), ``lab-host`` (host-os:
    kernel/initrd, the lab DOCA root as the disk image), ``lab-doca`` (bfb kind: the arm64 or x86
    kernel/initrd + the disk image), ``lab-wipe`` (the erase image, ``defaults.wipe``), ``lab-nbp``
    and, if given, the agent wheel."""
    v = version or str(arts.key)
    imgs: list[Image] = []
    imgs.append(_prehashed("lab-discovery", v, "kernel-initrd", {"kernel": arts.kernel, "initrd": arts.initrd},
                           arts.root, args="console=ttyS0,115200 panic=-1"))
    imgs.append(_prehashed("lab-nbp", v, "nbp", {"undionly": arts.undionly, "snponly": arts.snponly,
                                                 "ipxe": arts.ipxe_efi, "grub-arm64": arts.grub_arm64},
                           arts.root))
    imgs.append(_prehashed("lab-arm64", v, "kernel-initrd",
                           {"kernel": arts.kernel_arm64, "initrd": arts.initrd_arm64}, arts.root,
                           args="console=ttyAMA0 panic=-1"))
    # the erase image for released nodes: the same initramfs in wipe mode; lab disks are small, so the
    # policy is a full zero pass (bootsvc.wipe=full; real sites would use "ends" + discard)
    imgs.append(_prehashed("lab-wipe", v, "kernel-initrd",
                           {"kernel": arts.kernel, "initrd": arts.initrd, "kernel-arm64": arts.kernel_arm64,
                            "initrd-arm64": (arts.initrd_arm64, "initrd-arm64.gz")}, arts.root,
                           args="console=ttyS0,115200 panic=-1 bootsvc.wipe=full",
                           meta={"args_arm64": "console=ttyAMA0 panic=-1 bootsvc.wipe=full"}))
    defaults = {"discovery": "lab-discovery", "wipe": "lab-wipe"}
    if doca is not None:
        disk: dict[str, Path | tuple[Path, str]] = {"kernel": arts.kernel, "initrd": arts.initrd,
                                                    "image": doca.path}
        dpu = {**disk, "kernel-arm64": arts.kernel_arm64, "initrd-arm64": (arts.initrd_arm64, "initrd-arm64.gz")}
        imgs.append(_prehashed("lab-doca", v, "bfb", dpu, arts.root, args="console=ttyS0,115200 panic=-1",
                               image_sha=str(doca.sha256),
                               meta={"agent": {"host_port": "eth1", "uplink": "eth0"},
                                     "args_arm64": "console=ttyAMA0 panic=-1"}))
        imgs.append(_prehashed("lab-host", v, "host-os", disk, arts.root, args="console=ttyS0,115200 panic=-1",
                               image_sha=str(doca.sha256)))
        defaults |= {"dpu": "lab-doca", "host": "lab-host"}
    if agent_wheel is not None:
        imgs.append(make_image("bootsvc-agent", v, "agent", {"wheel": agent_wheel}))
        defaults["agent"] = "bootsvc-agent"
    return Catalog(tuple(imgs), defaults, source="<lab>")


def _prehashed(name: str, version: str, kind: str, files: Mapping[str, Path | tuple[Path, str]], root: Path, *,
               args: str = "",
               image_sha: str | None = None, meta: Mapping[str, Any] | None = None) -> Image:
    """Lab artifacts come with a manifest of sha256s (``manifest.json``); reuse it instead of rehashing."""
    manifest: dict[str, str] = {}
    mf = Path(root) / "manifest.json"
    if mf.exists():
        manifest = json.loads(mf.read_text()).get("files", {})
    out = []
    for role, spec in files.items():
        p, fname = (Path(spec[0]), spec[1]) if isinstance(spec, tuple) else (Path(spec), Path(spec).name)
        try:
            rel = str(p.relative_to(root))
        except ValueError:
            rel = ""
        sha = manifest.get(rel) or (image_sha if role == "image" and image_sha else None) or sha256_file(p)
        out.append(ImageFile(role, fname, p, sha))
    return Image(name, version, kind, tuple(out), args, dict(meta or {}))

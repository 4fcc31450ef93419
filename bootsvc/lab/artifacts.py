"""Boot artifacts for the QEMU lab, built from Debian packages and cached (owned by the lab helper).

``build_artifacts(cache_dir)`` returns a :class:`LabArtifacts` with:

* x86_64: ``vmlinuz`` from Debian's current ``linux-image-*-cloud-amd64`` (``apt-get download`` +
  ``dpkg -x``; the version is resolved with ``apt-cache``, never hard-coded) and ``initrd.gz``:
  busybox-static + virtio net/blk modules + ``images/lab/initramfs/init`` (modes probe, host-install,
  dpu-install, disk; see that file for the kernel command line);
* iPXE: ``undionly.kpxe``, ``snponly.efi``, ``ipxe.efi`` from Debian's ``ipxe`` package;
* arm64: raw kernel ``Image`` (GRUB's http module fails on a gzip-ed Image with "out of memory"),
  busybox-static:arm64 initrd, and ``grubnetaa64.efi`` (``grub-mkimage -O arm64-efi`` with
  ``images/lab/grub-early.cfg`` embedded: it loads ``grub/grub.cfg-<mac>`` then ``grub/grub.cfg``
  over TFTP from the PXE next-server);
* a TFTP root holding ``undionly.kpxe snponly.efi ipxe.efi arm64/grubnetaa64.efi``.

``build_doca_image(cache_dir, ...)`` builds the "lab DOCA image": a debootstrap'd minimal Debian root
(minbase + python3, iproute2, nftables, busybox, kmod; busybox init) as a gzip-ed raw ext4 image that
the initramfs ``dpu-install`` mode writes to ``/dev/vda``.

arm64 packages are fetched with a *private* apt state (own lists/status/cache dirs, ``APT::Architecture
=arm64``) instead of ``dpkg --add-architecture``: the machine's dpkg configuration is never changed, so
a concurrent ``apt-get install`` elsewhere cannot be affected.

Cache: ``$BOOTSVC_LAB_CACHE`` or ``/var/cache/bootsvc-lab``. Outputs live in ``build-<key>/`` where the
key hashes the resolved package versions and every input file, so a rerun with the same inputs only
reads ``resolved.json`` and checks a manifest (milliseconds). A file lock serialises concurrent builders.

One module (~560 lines) on purpose: every artifact shares the cache layout, its lock, the resolved
package versions and the input-hash keys; the arm64 BlueField parts are in :mod:`bootsvc.lab.bf3`.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import click

DEFAULT_CACHE = Path("/var/cache/bootsvc-lab")
CACHE_ENV = "BOOTSVC_LAB_CACHE"
BUILDER_VERSION = "4"  # bump when the build recipe changes in a way the inputs don't show
IMAGES_DIR = Path(__file__).resolve().parents[2] / "images" / "lab"
VIRTIO_MODULES = (
    "virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
    "failover", "net_failover", "virtio_net", "virtio_blk",
)
GRUB_MODULES = (
    "efinet", "net", "tftp", "http", "linux", "gzio", "echo", "normal", "configfile", "test",
    "sleep", "part_gpt", "ext2", "fat",
)
DOCA_PACKAGES = ("python3", "iproute2", "nftables", "busybox", "kmod", "ca-certificates")
DOCA_MODULE_TREES = ("kernel/net", "kernel/drivers/net", "kernel/drivers/virtio", "kernel/drivers/block",
                     "kernel/lib", "kernel/crypto", "kernel/arch")
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# what the agent wheel holds besides bootsvc/agent/*.py (the agent imports these, stdlib only)
AGENT_FILES = ("bootsvc/__init__.py", "bootsvc/dhcp/__init__.py", "bootsvc/dhcp/packet.py")
RESOLVE_TTL = 24 * 3600.0


class ArtifactError(RuntimeError):
    pass


def cache_root(cache_dir: str | Path | None = None) -> Path:
    p = Path(cache_dir) if cache_dir is not None else Path(os.environ.get(CACHE_ENV, str(DEFAULT_CACHE)))
    p.mkdir(parents=True, exist_ok=True)
    return p


@dataclass(frozen=True)
class Resolved:
    """Package versions chosen for a build (from apt-cache)."""

    kernel_amd64: str  # e.g. linux-image-6.1.0-56-cloud-amd64
    kernel_amd64_version: str
    kernel_arm64: str
    kernel_arm64_version: str
    busybox_version: str
    busybox_arm64_version: str
    ipxe_version: str
    grub_arm64_version: str
    at: float

    @property
    def kver_amd64(self) -> str:
        return self.kernel_amd64.removeprefix("linux-image-")

    @property
    def kver_arm64(self) -> str:
        return self.kernel_arm64.removeprefix("linux-image-")


@dataclass(frozen=True)
class LabArtifacts:
    root: Path  # build-<key> directory
    kernel: Path  # x86_64 bzImage (EFI stub)
    initrd: Path
    kernel_arm64: Path  # raw Image
    initrd_arm64: Path
    grub_arm64: Path  # grubnetaa64.efi
    tftp_root: Path  # undionly.kpxe snponly.efi ipxe.efi arm64/grubnetaa64.efi
    undionly: Path
    snponly: Path
    ipxe_efi: Path
    kver: str
    kver_arm64: str
    key: str
    build_seconds: float  # 0.0 when served from cache


@dataclass(frozen=True)
class DocaImage:
    path: Path  # gzip-ed raw ext4 image (what the installer downloads)
    sha256: str  # of the .gz bytes (what the installer verifies)
    size: int  # bytes of the .gz
    raw_size: int  # bytes of the uncompressed ext4 image
    key: str
    build_seconds: float
    debootstrap_seconds: float


# ---- small helpers ----------------------------------------------------------------------------------
def _run(cmd: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None,
         timeout: float = 900) -> str:
    res = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout,
                         check=False)
    if res.returncode != 0:
        raise ArtifactError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()[-2000:]}")
    return res.stdout


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _locked(cache: Path, name: str) -> Iterator[None]:
    """Exclusive flock so that two test sessions don't build into the same cache at once."""
    with (cache / f".{name}.lock").open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _inputs_digest(paths: Sequence[Path], extra: object) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for p in sorted(paths):
        h.update(str(p.relative_to(IMAGES_DIR)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _arm_apt_opts(cache: Path) -> list[str]:
    d = cache / "apt-arm64"
    for sub in ("lists/partial", "archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    (d / "status").touch()
    return [
        "-o", f"Dir::State::Lists={d}/lists", "-o", f"Dir::State::status={d}/status",
        "-o", f"Dir::Cache={d}", "-o", f"Dir::Cache::archives={d}/archives",
        "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
    ]


def _apt_field(pkg: str, field: str, opts: Sequence[str] = ()) -> str:
    out = _run(["apt-cache", *opts, "show", "--no-all-versions", pkg])
    for line in out.splitlines():
        if line.startswith(field + ":"):
            return line.split(":", 1)[1].strip()
    raise ArtifactError(f"apt-cache: {pkg} has no {field}")


def _kernel_pkg(meta: str, opts: Sequence[str] = ()) -> tuple[str, str]:
    """linux-image-cloud-amd64 -> (linux-image-6.1.0-NN-cloud-amd64, version) via its Depends."""
    dep = _apt_field(meta, "Depends", opts)
    name = dep.split("(")[0].split(",")[0].strip()
    return name, _apt_field(name, "Version", opts)


def resolve(cache: Path, *, refresh: bool = False) -> Resolved:
    """Pick package versions (cached in resolved.json for a day so warm runs do no apt work)."""
    f = cache / "resolved.json"
    if f.exists() and not refresh:
        r = Resolved(**json.loads(f.read_text()))
        if time.time() - r.at < RESOLVE_TTL:
            return r
    try:
        arm = _arm_apt_opts(cache)
        _run(["apt-get", *arm, "update"], timeout=300)
        k64, k64v = _kernel_pkg("linux-image-cloud-amd64")
        ka, kav = _kernel_pkg("linux-image-cloud-arm64", arm)
        r = Resolved(
            kernel_amd64=k64, kernel_amd64_version=k64v, kernel_arm64=ka, kernel_arm64_version=kav,
            busybox_version=_apt_field("busybox-static", "Version"),
            busybox_arm64_version=_apt_field("busybox-static", "Version", arm),
            ipxe_version=_apt_field("ipxe", "Version"),
            grub_arm64_version=_apt_field("grub-efi-arm64-bin", "Version", arm),
            at=time.time(),
        )
    except (ArtifactError, subprocess.TimeoutExpired):
        if f.exists():  # offline or apt lists missing: keep building what we resolved before
            return Resolved(**json.loads(f.read_text()))
        raise
    f.write_text(json.dumps(asdict(r), indent=1))
    return r


def _deb(cache: Path, pkg: str, version: str, arch: str) -> Path:
    """Download pkg=version (arch) once into debs/ and extract it once; returns the extracted root."""
    debs = cache / "debs"
    debs.mkdir(exist_ok=True)
    xdir = cache / "x" / f"{pkg}_{version.replace(':', '%3a')}_{arch}"
    if (xdir / ".done").exists():
        return xdir
    pat = f"{pkg}_{version.replace(':', '%3a')}_{arch}.deb"
    deb = debs / pat
    if not deb.exists():
        opts = _arm_apt_opts(cache) if arch == "arm64" else []
        spec = f"{pkg}={version}" if arch == "all" else f"{pkg}:{arch}={version}"
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            os.chmod(tmp, 0o755)
            _run(["apt-get", *opts, "download", spec], cwd=Path(tmp), timeout=600)
            got = list(Path(tmp).glob("*.deb"))
            if len(got) != 1:
                raise ArtifactError(f"apt-get download {spec}: got {got}")
            got[0].replace(deb)
    shutil.rmtree(xdir, ignore_errors=True)
    xdir.mkdir(parents=True)
    _run(["dpkg", "-x", str(deb), str(xdir)])
    (xdir / ".done").touch()
    return xdir


def _cpio_gz(root: Path, out: Path) -> None:
    """newc cpio of ``root`` (sorted, owned by root), gzip-ed: the kernel's initramfs format."""
    files = subprocess.run(["find", ".", "-print0"], cwd=root, capture_output=True, check=True).stdout
    names = b"\0".join(sorted(files.split(b"\0")[:-1])) + b"\0"
    cpio = subprocess.run(["cpio", "--quiet", "-o", "-0", "-H", "newc", "-R", "0:0"], cwd=root, input=names,
                          capture_output=True, check=True).stdout
    with gzip.open(out, "wb", compresslevel=6) as g:
        g.write(cpio)


def _initramfs(busybox: Path, kroot: Path, kver: str, out: Path, work: Path) -> None:
    r = work / "initramfs"
    shutil.rmtree(r, ignore_errors=True)
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "mnt", "lib/modules"):
        (r / d).mkdir(parents=True)
    shutil.copy2(busybox, r / "bin" / "busybox")
    shutil.copy2(IMAGES_DIR / "initramfs" / "init", r / "init")
    shutil.copy2(IMAGES_DIR / "initramfs" / "udhcpc.script", r / "etc" / "udhcpc.script")
    os.chmod(r / "init", 0o755)
    os.chmod(r / "etc" / "udhcpc.script", 0o755)
    mods = kroot / "lib" / "modules" / kver
    for m in VIRTIO_MODULES:
        found = [p for p in mods.rglob(f"{m}.ko*")]
        if not found:
            continue  # built into this kernel (e.g. virtio on arm64 cloud)
        src = found[0]
        if src.suffix != ".ko":  # bookworm ships plain .ko; busybox insmod can't read compressed ones
            raise ArtifactError(f"compressed module {src}")
        shutil.copy2(src, r / "lib" / "modules" / f"{m}.ko")
    _cpio_gz(r, out)
    shutil.rmtree(r, ignore_errors=True)


def _input_files() -> list[Path]:
    return [
        IMAGES_DIR / "initramfs" / "init",
        IMAGES_DIR / "initramfs" / "udhcpc.script",
        IMAGES_DIR / "grub-early.cfg",
    ]


def build_artifacts(cache_dir: str | Path | None = None, *, refresh: bool = False) -> LabArtifacts:
    """Build (or return cached) kernels, initrds, iPXE and GRUB binaries for the lab."""
    cache = cache_root(cache_dir)
    with _locked(cache, "artifacts"):
        t0 = time.monotonic()
        r = resolve(cache, refresh=refresh)
        extra = {k: v for k, v in asdict(r).items() if k != "at"} | {"builder": BUILDER_VERSION}
        key = _inputs_digest(_input_files(), extra)
        out = cache / f"build-{key}"
        if not (out / "manifest.json").exists():
            _build(cache, r, out)
            built = time.monotonic() - t0
        else:
            built = 0.0
        return LabArtifacts(
            root=out, kernel=out / "x86" / "vmlinuz", initrd=out / "x86" / "initrd.gz",
            kernel_arm64=out / "arm64" / "Image", initrd_arm64=out / "arm64" / "initrd.gz",
            grub_arm64=out / "tftp" / "arm64" / "grubnetaa64.efi", tftp_root=out / "tftp",
            undionly=out / "tftp" / "undionly.kpxe", snponly=out / "tftp" / "snponly.efi",
            ipxe_efi=out / "tftp" / "ipxe.efi", kver=r.kver_amd64, kver_arm64=r.kver_arm64, key=key,
            build_seconds=built,
        )


def _build(cache: Path, r: Resolved, out: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=cache))
    try:
        for d in ("x86", "arm64", "tftp/arm64", "work"):
            (tmp / d).mkdir(parents=True)
        # x86_64
        k = _deb(cache, r.kernel_amd64, r.kernel_amd64_version, "amd64")
        bb = _deb(cache, "busybox-static", r.busybox_version, "amd64")
        shutil.copy2(k / "boot" / f"vmlinuz-{r.kver_amd64}", tmp / "x86" / "vmlinuz")
        _initramfs(bb / "bin" / "busybox", k, r.kver_amd64, tmp / "x86" / "initrd.gz", tmp / "work")
        # iPXE
        ip = _deb(cache, "ipxe", r.ipxe_version, "all")
        for f in ("undionly.kpxe", "snponly.efi", "ipxe.efi"):
            shutil.copy2(ip / "usr" / "lib" / "ipxe" / f, tmp / "tftp" / f)
        # arm64
        ka = _deb(cache, r.kernel_arm64, r.kernel_arm64_version, "arm64")
        bba = _deb(cache, "busybox-static", r.busybox_arm64_version, "arm64")
        ga = _deb(cache, "grub-efi-arm64-bin", r.grub_arm64_version, "arm64")
        shutil.copy2(ka / "boot" / f"vmlinuz-{r.kver_arm64}", tmp / "arm64" / "Image")
        _initramfs(bba / "bin" / "busybox", ka, r.kver_arm64, tmp / "arm64" / "initrd.gz", tmp / "work")
        if not shutil.which("grub-mkimage"):
            raise ArtifactError("grub-mkimage missing: apt-get install grub-common")
        # GRUB's embedded-config reader knows no comments: embed the file without them
        early = tmp / "work" / "grub-early.cfg"
        early.write_text("".join(
            ln for ln in (IMAGES_DIR / "grub-early.cfg").read_text().splitlines(keepends=True)
            if ln.strip() and not ln.lstrip().startswith("#")))
        _run([
            "grub-mkimage", "-O", "arm64-efi", "-d", str(ga / "usr" / "lib" / "grub" / "arm64-efi"),
            "-o", str(tmp / "tftp" / "arm64" / "grubnetaa64.efi"), "-p", "(tftp)/grub",
            "-c", str(early), *GRUB_MODULES,
        ])
        shutil.rmtree(tmp / "work")
        manifest = {
            str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        (tmp / "manifest.json").write_text(json.dumps({"resolved": asdict(r), "files": manifest}, indent=1))
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- the lab "DOCA" image ---------------------------------------------------------------------------
def _doca_inputs() -> list[Path]:
    return sorted(p for p in (IMAGES_DIR / "rootfs").rglob("*") if p.is_file())


def build_doca_image(cache_dir: str | Path | None = None, *, refresh: bool = False,
                     suite: str = "bookworm") -> DocaImage:
    """debootstrap minbase + python3/iproute2/nftables/busybox/kmod + the lab kernel's modules, with
    ``images/lab/rootfs/`` overlaid (busybox init), packed as a gzip-ed raw ext4 image (no partition
    table: the installer writes it to ``/dev/vda`` and the disk boot mounts ``root=/dev/vda``)."""
    cache = cache_root(cache_dir)
    arts = build_artifacts(cache, refresh=refresh)
    with _locked(cache, "doca"):
        t0 = time.monotonic()
        extra = {"suite": suite, "pkgs": DOCA_PACKAGES, "kver": arts.kver, "builder": BUILDER_VERSION}
        key = _inputs_digest(_doca_inputs(), extra)
        out = cache / f"doca-{key}"
        meta = out / "image.json"
        if meta.exists():
            m = json.loads(meta.read_text())
            return DocaImage(path=out / "doca-lab.img.gz", sha256=m["sha256"], size=m["size"],
                             raw_size=m["raw_size"], key=key, build_seconds=0.0,
                             debootstrap_seconds=m["debootstrap_seconds"])
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=cache))
        try:
            root = tmp / "root"
            td = time.monotonic()
            _run(["debootstrap", "--variant=minbase", "--include=" + ",".join(DOCA_PACKAGES), suite,
                  str(root), DEBIAN_MIRROR], timeout=1200)
            dbs = time.monotonic() - td
            r = resolve(cache)
            k = _deb(cache, r.kernel_amd64, r.kernel_amd64_version, "amd64")
            # only the module trees a lab DPU OS uses (net + netfilter, virtio, block, crypto/lib deps):
            # 87 MB of modules would double the image and the TCG write time
            src_mods = k / "lib" / "modules" / arts.kver
            dst_mods = root / "lib" / "modules" / arts.kver
            for sub in DOCA_MODULE_TREES:
                if (src_mods / sub).is_dir():
                    shutil.copytree(src_mods / sub, dst_mods / sub, dirs_exist_ok=True)
            for f in src_mods.glob("modules.*"):
                shutil.copy2(f, dst_mods / f.name)
            _run(["chroot", str(root), "depmod", "-a", arts.kver])
            # trim what a lab root never needs (halves the image and the time to write it under TCG)
            for d in ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info",
                      "var/cache/apt", "var/lib/apt/lists", "usr/share/zoneinfo"):
                shutil.rmtree(root / d, ignore_errors=True)
            (root / "var/cache/apt").mkdir(parents=True, exist_ok=True)
            (root / "var/lib/apt/lists").mkdir(parents=True, exist_ok=True)
            for p in root.rglob("__pycache__"):
                shutil.rmtree(p, ignore_errors=True)
            _overlay(IMAGES_DIR / "rootfs", root)
            (root / "etc" / "hostname").write_text("bootsvc-lab-dpu\n")
            (root / "etc" / "bootsvc-lab-image").write_text(json.dumps({"key": key, "suite": suite}) + "\n")
            used = int(_run(["du", "-sk", "--apparent-size", str(root)]).split()[0])
            size_mb = max(160, (used * 115 // 100) // 1024 + 64)  # 15% + 64 MB for the agent and logs
            raw = tmp / "doca-lab.img"
            _run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", "bootsvc-root", "-d", str(root),
                  "-E", "root_owner=0:0", str(raw), f"{size_mb}M"], timeout=600)
            raw_size = raw.stat().st_size
            gz = tmp / "doca-lab.img.gz"
            with raw.open("rb") as src, gzip.open(gz, "wb", compresslevel=1) as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            raw.unlink()
            shutil.rmtree(root)
            digest = _sha256(gz)
            gz_size = gz.stat().st_size
            (tmp / "doca-lab.img.gz.sha256").write_text(f"{digest}  doca-lab.img.gz\n")
            built = time.monotonic() - t0
            (tmp / "image.json").write_text(json.dumps({
                "sha256": digest, "size": gz_size, "raw_size": raw_size, "suite": suite,
                "packages": DOCA_PACKAGES, "kver": arts.kver, "debootstrap_seconds": round(dbs, 1),
                "build_seconds": round(built, 1),
            }, indent=1))
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
            return DocaImage(path=out / "doca-lab.img.gz", sha256=digest, size=gz_size,
                             raw_size=raw_size, key=key, build_seconds=built, debootstrap_seconds=dbs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


REPO_ROOT = Path(__file__).resolve().parents[2]


def build_agent_wheel(out_dir: Path) -> Path:
    """A pure-Python wheel of the policy agent (``bootsvc.agent`` + ``bootsvc.dhcp.packet``, stdlib
    only at runtime): what bf.cfg's ``bfb_modify_os`` unpacks into the DPU image (busybox ``unzip -o
    WHEEL -d /mnt/opt/bootsvc-agent``; run as ``PYTHONPATH=/opt/bootsvc-agent python3 -m
    bootsvc.agent.main``: the image has python3, no pip and no third-party package). The only agent
    wheel builder of the project. Deterministic (fixed timestamps, sorted entries), so its sha256
    changes only when the agent's code does; an unchanged wheel keeps its file (and mtime)."""
    agent = (REPO_ROOT / "bootsvc" / "agent").glob("*.py")
    files = sorted({*AGENT_FILES, *(str(p.relative_to(REPO_ROOT)) for p in agent)})
    from bootsvc.agent import AGENT_VERSION

    dist = f"bootsvc_agent-{AGENT_VERSION}.dist-info"
    meta = {
        f"{dist}/METADATA": (f"Metadata-Version: 2.1\nName: bootsvc-agent\nVersion: {AGENT_VERSION}\n"
                             "Summary: bootsvc DPU policy agent (stdlib only)\nRequires-Python: >=3.11\n"),
        f"{dist}/WHEEL": ("Wheel-Version: 1.0\nGenerator: bootsvc.lab.artifacts\nRoot-Is-Purelib: true\n"
                          "Tag: py3-none-any\n"),
        f"{dist}/entry_points.txt": "[console_scripts]\nbootsvc-agent = bootsvc.agent.main:main\n",
    }
    entries: list[tuple[str, bytes]] = [(f, (REPO_ROOT / f).read_bytes()) for f in files]
    entries += [(k, v.encode()) for k, v in meta.items()]
    record = []
    for name, data in entries:
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    entries.append((f"{dist}/RECORD", ("\n".join(record) + "\n").encode()))
    out_dir.mkdir(parents=True, exist_ok=True)
    whl = out_dir / f"bootsvc_agent-{AGENT_VERSION}-py3-none-any.whl"
    tmp = whl.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    if whl.exists() and whl.read_bytes() == tmp.read_bytes():
        tmp.unlink()  # unchanged: keep the old mtime so the catalog's verify cache stays valid
    else:
        tmp.replace(whl)
    return whl


def _overlay(src: Path, dst: Path) -> None:
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        t = dst / rel
        if p.is_dir():
            t.mkdir(parents=True, exist_ok=True)
        else:
            t.parent.mkdir(parents=True, exist_ok=True)
            if t.is_symlink() or t.exists():
                t.unlink()
            shutil.copy2(p, t)
            os.chmod(t, 0o755 if os.access(p, os.X_OK) else 0o644)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bootsvc.lab.artifacts [--doca] [--refresh] [--cache DIR]``: build and print paths."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default=None)
    ap.add_argument("--doca", action="store_true", help="also build the lab DOCA image (~1-2 min cold)")
    ap.add_argument("--refresh", action="store_true", help="re-resolve package versions with apt-cache")
    ap.add_argument("--wheel", action="store_true", help="also build the policy agent wheel (into CACHE/wheels)")
    ap.add_argument("--prune", action="store_true", help="delete cached builds other than the current ones")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    arts = build_artifacts(a.cache, refresh=a.refresh)
    print(json.dumps({k: str(v) for k, v in asdict(arts).items()}, indent=1))
    img: DocaImage | None = None
    if a.doca:
        img = build_doca_image(a.cache, refresh=a.refresh)
        print(json.dumps({k: str(v) for k, v in asdict(img).items()}, indent=1))
    keep = {arts.root.name}
    if img is not None:
        keep.add(img.path.parent.name)
    if a.wheel:
        whl = build_agent_wheel(cache_root(a.cache) / "wheels" / "agent")
        keep.add(whl.parent.name)
        print(json.dumps({"wheel": str(whl)}))
    if a.prune:
        cache = cache_root(a.cache)
        for d in [*cache.glob("build-*"), *(cache.glob("doca-*") if a.doca else []),
                  *((cache / "wheels").glob("*") if a.wheel else [])]:
            if d.is_dir() and d.name not in keep:
                shutil.rmtree(d, ignore_errors=True)
                print(f"pruned {d}")
    print(f"total {time.monotonic() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


@click.command("build")
@click.option("--cache", default=None, help="cache dir (default $BOOTSVC_LAB_CACHE or /var/cache/bootsvc-lab)")
@click.option("--doca", is_flag=True, help="also build the lab DOCA image")
@click.option("--wheel", is_flag=True, help="also build the policy agent wheel")
@click.option("--refresh", is_flag=True, help="re-resolve Debian package versions")
def build_cmd(cache: str | None, doca: bool, wheel: bool, refresh: bool) -> None:
    """Build (or reuse) lab kernels, initrds, iPXE and GRUB binaries (and the DOCA image, the wheel)."""
    argv = [*(["--cache", cache] if cache else []), *(["--doca"] if doca else []),
            *(["--wheel"] if wheel else []), *(["--refresh"] if refresh else [])]
    raise SystemExit(main(argv))


@click.command("sweep")
@click.argument("prefix")
def sweep_cmd(prefix: str) -> None:
    """Remove namespaces and processes that a crashed lab run left under PREFIX."""
    from bootsvc.lab.netns import sweep

    for ns in sweep(prefix):
        click.echo(f"removed {ns}")


# ``bootsvc lab`` is the capstone's group (bootsvc/lab/cli.py): add these with
# ``lab.add_command(build_cmd)`` / ``lab.add_command(sweep_cmd)``; this group is for standalone use.
lab_cli = click.Group("lab", commands=[build_cmd, sweep_cmd], help="QEMU lab artifacts and cleanup.")

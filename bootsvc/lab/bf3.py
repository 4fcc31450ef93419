"""The lab's BlueField-3 software: the arm64 lab DOCA OS, its installer initramfs and the lab BFB.

Owned by the lab helper. ``build_lab_bfb(cache_dir)`` returns a :class:`LabBfb`, built from Debian
packages and cached under ``$BOOTSVC_LAB_CACHE`` (default ``/var/cache/bootsvc-lab``) in
``bf3-<key>/``, where the key hashes every input (package versions, the files under
``images/lab/bfinstall`` and ``images/lab/rootfs``, the recipe version); a warm call only reads
``bf3.json``.

What is in it, and why this way:

* **arm64 root** (the lab DOCA OS): ``debootstrap --foreign --arch=arm64 --variant=minbase`` with
  python3 (for the policy agent), iproute2, nftables, busybox, kmod and fdisk, then every downloaded
  ``.deb`` unpacked with ``dpkg-deb --fsys-tarfile | tar`` (``--keep-directory-symlink``: merged /usr).
  No arm64 binary ever runs on the build machine, so neither qemu-user-static nor a binfmt_misc
  registration (a kernel-global setting) is needed, and the machine's dpkg configuration is never
  touched (no ``dpkg --add-architecture``). What maintainer scripts would have done and a busybox-init
  system needs is done here: passwd/group from base-passwd, a locked root, ``/bin/sh``, ``depmod -b``
  (the host's kmod reads arm64 modules). The kernel's module trees for networking are added
  (virtio, vrf, bridge, nftables), the rest trimmed.
* **disk layout**: the installer partitions the disk GPT (ESP + root), like NVIDIA's ``install.sh``.
  The ESP is a FAT image (``mkfs.vfat`` + ``mcopy``) holding GRUB (``grub-mkimage -O arm64-efi`` from
  Debian's ``grub-efi-arm64-bin``) at the removable-media path ``\\EFI\\BOOT\\BOOTAA64.EFI`` (UEFI
  spec 2.10, 3.5.1.1: firmware boots it without any NVRAM boot entry) and its ``grub.cfg``. The root is
  an ext4 image (``mke2fs -d``) with the kernel and the lab initramfs (disk mode: loads virtio_blk,
  which the Debian arm64 cloud kernel builds as a module, then switch_root) in ``/boot``.
* **installer initramfs** (a gzip-ed newc cpio of the tools, then a stored one of the OS payload, whose
  files are gzip already): busybox-static
  (arm64), the virtio modules, ``sfdisk`` and ``curl`` with the shared libraries they need (found with
  ``readelf -d``),
  ``images/lab/bfinstall/init``, and the OS payload ``/lab-os/{esp.vfat.gz,root.ext4.gz}``.
* **the BFB**: the kernel (``image``, id 62) and the installer initramfs (``initramfs``, id 63) in the
  boot-stream format of Mellanox/bfscripts ``mlx-mkbfb``, written by :func:`bootsvc.bfb.write_bfb`.

One module (~550 lines) on purpose: the arm64 OS root, its disk images, the installer initramfs, the
BFB and the RShim boot are one recipe with one cache key (this file is hashed into it).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bootsvc.lab import artifacts as A

BF3_RECIPE = "3"  # the key also hashes this file, so any change to the recipe rebuilds
SUITE = "bookworm"
# frr + frr-pythontools: the DPU's routing suite the policy agent configures (frr-reload.py, vtysh)
OS_PACKAGES = ("python3", "iproute2", "nftables", "busybox", "kmod", "ca-certificates", "fdisk", "curl", "frr",
               "frr-pythontools")
# what Debian's frr.postinst creates (adduser --system); fixed ids, the image has no other system users
FRR_UID, FRR_GID, FRRVTY_GID = 101, 101, 102
# FRR daemons the DPU runs (/etc/frr/daemons; zebra, staticd and watchfrr always run): BGP only
FRR_DAEMONS = {"bgpd": "yes"}
# watchfrr (frr-watchfrr(8)) kills a daemon start that takes over -T s (default 20) and gives up on an
# unresponsive daemon after -t s (default 90): under TCG a loaded machine starts zebra + bgpd in 20-100 s,
# so the defaults killed bgpd mid-start (measured: "restart bgpd child process still running after 20
# seconds, sending signal 15", bgpd up only 95 s later)
WATCHFRR_OPTIONS = '\n# bootsvc lab (TCG): generous start and liveness timeouts\nwatchfrr_options="-T 240 -t 300"\n'
# the lab's command console: a root shell on a virtio console (hvc0) whose host side is a unix socket
# next to the VM's disk (bootsvc.lab.fabric.dpu_exec); lab only, like the getty on the serial console
HVC_INITTAB = "::respawn:/etc/bootsvc-lab/console-shell\n"
# the installer's own tools beyond busybox: sfdisk (GPT) and curl (bf.cfg's callbacks use curl when there
# is one, as on NVIDIA's installer; busybox 1.35's wget -T crashes)
INSTALLER_TOOLS = ("usr/sbin/sfdisk", "usr/bin/curl")
ESP_MB = 8  # FAT image size; the installer's ESP partition is 64 MiB (the image is dd-ed to its start)
ROOT_LABEL = "lab-root"
GRUB_ESP_MODULES = ("part_gpt", "fat", "ext2", "linux", "normal", "configfile", "echo", "search",
                    "search_label", "test", "gzio")
# Debian's arm64 cloud kernel builds virtio as modules; the initramfs (installer and disk mode) loads them
KERNEL_ARGS = "console=ttyAMA0 panic=-1"
# trimmed from the lab OS: never used by a busybox-init lab system (halves the image and its TCG write)
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/info", "usr/share/zoneinfo",
        "var/cache/apt", "var/lib/apt/lists", "usr/share/i18n", "usr/share/common-licenses",
        "usr/lib/aarch64-linux-gnu/gconv", "usr/share/perl5", "usr/lib/aarch64-linux-gnu/perl-base",
        "usr/share/bash-completion", "usr/share/lintian", "usr/bin/perl", "usr/bin/perl5.36.0",
        "usr/lib/aarch64-linux-gnu/perl", "usr/bin/openssl",
        # FRR daemons the DPU never runs (/etc/frr/daemons enables bgpd; zebra, staticd, watchfrr always run)
        *(f"usr/lib/frr/{d}" for d in ("babeld", "bfdd", "eigrpd", "fabricd", "isisd", "ldpd", "nhrpd", "ospf6d",
                                       "ospfd", "pathd", "pbrd", "pim6d", "pimd", "ripd", "ripngd", "vrrpd")))
GRUB_CFG = """\
# bootsvc lab DOCA OS: GRUB on the ESP (\\EFI\\BOOT\\grub.cfg), written by the lab BFB's installer
set timeout=0
echo 'bootsvc-lab: GRUB from disk, booting the lab DOCA OS'
search --no-floppy --label --set=root {label}
linux /boot/vmlinuz root=/dev/vda2 {args} bootsvc.mode=disk
initrd /boot/initrd.img
boot
"""


@dataclass(frozen=True)
class LabBfb:
    path: Path  # the .bfb
    sha256: str
    size: int
    kernel: Path  # what went into the BFB (for byte-identity checks)
    initramfs: Path
    root_image: Path  # root.ext4.gz (also inside the initramfs)
    esp_image: Path
    key: str
    kver: str
    build_seconds: float  # 0.0 when served from the cache
    seconds: dict[str, float]


def _inputs() -> list[Path]:
    return sorted(p for d in ("bfinstall", "rootfs", "initramfs") for p in (A.IMAGES_DIR / d).rglob("*")
                  if p.is_file())


def build_lab_bfb(cache_dir: str | Path | None = None, *, refresh: bool = False) -> LabBfb:
    """Build (or return the cached) lab BFB and its parts."""
    cache = A.cache_root(cache_dir)
    arts = A.build_artifacts(cache, refresh=refresh)
    r = A.resolve(cache)
    with A._locked(cache, "bf3"):
        t0 = time.monotonic()
        extra = {"suite": SUITE, "pkgs": OS_PACKAGES, "kernel": r.kernel_arm64_version, "kver": r.kver_arm64,
                 "busybox": r.busybox_arm64_version, "grub": r.grub_arm64_version, "recipe": BF3_RECIPE,
                 "args": KERNEL_ARGS, "recipe_src": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}
        key = A._inputs_digest(_inputs(), extra)
        out = cache / f"bf3-{key}"
        meta = out / "bf3.json"
        if meta.exists():
            m: dict[str, Any] = json.loads(meta.read_text())
            return _result(out, key, _ensure_bfb(out, m), 0.0)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=cache))
        secs: dict[str, float] = {}
        try:
            t = time.monotonic()
            root = tmp / "root"
            _arm64_root(cache, root, tmp)
            secs["arm64 root (debootstrap --foreign + unpack)"] = time.monotonic() - t
            t = time.monotonic()
            ka = A._deb(cache, r.kernel_arm64, r.kernel_arm64_version, "arm64")
            _lab_os(root, ka, r.kver_arm64, arts)
            tool_files = _collect_elf(root, INSTALLER_TOOLS)
            _root_image(root, tmp / "root.ext4.gz", key)
            _esp_image(cache, r, tmp / "esp.vfat.gz", tmp)
            secs["lab OS images (ext4 root, ESP with GRUB)"] = time.monotonic() - t
            t = time.monotonic()
            bba = A._deb(cache, "busybox-static", r.busybox_arm64_version, "arm64")
            _installer(bba / "bin" / "busybox", ka, r.kver_arm64, root, tool_files, tmp, key)
            shutil.rmtree(root)
            shutil.copy2(arts.kernel_arm64, tmp / "Image")
            secs["installer initramfs"] = time.monotonic() - t
            m = {"kver": r.kver_arm64, "seconds": secs, "packages": OS_PACKAGES,
                                 "build_seconds": round(time.monotonic() - t0, 1)}
            (tmp / "bf3.json").write_text(json.dumps(m, indent=1))
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
            return _result(out, key, _ensure_bfb(out, m), time.monotonic() - t0)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _ensure_bfb(out: Path, m: dict[str, Any]) -> dict[str, Any]:
    """Write the BFB from the cached kernel + installer initramfs once (a few seconds: a copy + CRC32)."""
    bfb = out / "lab-bf3.bfb"
    if "sha256" in m and bfb.exists():
        return m
    t = time.monotonic()
    tmp = bfb.with_suffix(".tmp")
    _write_bfb(tmp, out / "Image", out / "installer.cpio")
    tmp.replace(bfb)
    m = {**m, "sha256": A._sha256(bfb), "size": bfb.stat().st_size}
    m["seconds"] = {**m.get("seconds", {}), "BFB (mlx-mkbfb format)": round(time.monotonic() - t, 1)}
    (out / "bf3.json").write_text(json.dumps(m, indent=1))
    return m


def _result(out: Path, key: str, m: dict[str, Any], built: float) -> LabBfb:
    return LabBfb(path=out / "lab-bf3.bfb", sha256=m["sha256"], size=m["size"], kernel=out / "Image",
                  initramfs=out / "installer.cpio", root_image=out / "root.ext4.gz", esp_image=out / "esp.vfat.gz",
                  key=key, kver=m["kver"], build_seconds=built, seconds=dict(m.get("seconds", {})))


# ---- arm64 root without running arm64 code ----------------------------------------------------------
def _arm64_root(cache: Path, root: Path, tmp: Path) -> None:
    debs = cache / "debootstrap-arm64"
    debs.mkdir(exist_ok=True)
    A._run(["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase", f"--cache-dir={debs}",
            "--include=" + ",".join(OS_PACKAGES), SUITE, str(root), A.DEBIAN_MIRROR], timeout=1200)
    # the first stage unpacked only the "required" set; unpack everything it fetched, as the second
    # stage's dpkg would, minus the maintainer scripts (which would need arm64 emulation)
    for line in (root / "debootstrap" / "debpaths").read_text().splitlines():
        _pkg, path = line.split(None, 1)
        deb = debs / Path(path).name
        if not deb.exists():
            deb = root / path.lstrip("/")
        _unpack(deb, root)
    shutil.rmtree(root / "debootstrap")
    # where it cannot mount proc (a container, a namespace), debootstrap's first stage links the target's
    # /proc to the host's ("/proc"): in the image that is a link to itself. Mount points are directories.
    for d in ("proc", "sys", "dev", "run", "tmp"):
        p = root / d
        if p.is_symlink():
            p.unlink()
        p.mkdir(exist_ok=True)
    os.chmod(root / "tmp", 0o1777)


def _unpack(deb: Path, root: Path) -> None:
    fs = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    try:
        res = subprocess.run(["tar", "-C", str(root), "--keep-directory-symlink", "-xf", "-"], stdin=fs.stdout,
                             capture_output=True, check=False)
    finally:
        assert fs.stdout is not None
        fs.stdout.close()
        fs.wait()
    if res.returncode != 0 or fs.returncode != 0:
        raise A.ArtifactError(f"unpacking {deb.name}: {res.stderr.decode(errors='replace')[-500:]}")


def _lab_os(root: Path, ka: Path, kver: str, arts: Any) -> None:
    """What dpkg's maintainer scripts and a first boot would do, for a busybox-init lab OS."""
    etc = root / "etc"
    bp = root / "usr" / "share" / "base-passwd"
    shutil.copy2(bp / "passwd.master", etc / "passwd")
    shutil.copy2(bp / "group.master", etc / "group")
    # root locked ("!"): bf.cfg decides about passwords (ubuntu_PASSWORD), as on a real BFB
    _frr_users(root)
    users = [ln.split(":", 1)[0] for ln in (etc / "passwd").read_text().splitlines() if ln]
    (etc / "shadow").write_text("".join(f"{u}:!:19000:0:99999:7:::\n" for u in users))
    os.chmod(etc / "shadow", 0o640)
    sh = root / "usr" / "bin" / "sh"
    if not sh.exists() and not sh.is_symlink():
        sh.symlink_to("dash")
    (etc / "fstab").write_text("# the lab DOCA OS: root is mounted by the initramfs (root=/dev/vda2)\n")
    # kernel modules: the networking trees the agent uses (vrf, bridge, nftables) and virtio
    src = ka / "lib" / "modules" / kver
    dst = root / "lib" / "modules" / kver
    for sub in (*A.DOCA_MODULE_TREES, "kernel/fs/fat", "kernel/fs/nls"):
        if (src / sub).is_dir():
            shutil.copytree(src / sub, dst / sub, dirs_exist_ok=True)
    for f in src.glob("modules.*"):
        shutil.copy2(f, dst / f.name)
    for rel in ("kernel/drivers/char/virtio_console.ko", "kernel/drivers/char/virtio_console.ko.xz"):
        if (src / rel).exists():  # hvc0, the lab's command console
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dst / rel)
    A._run(["depmod", "-b", str(root), kver])
    for d in TRIM:
        p = root / d
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    (root / "var/cache/apt").mkdir(parents=True, exist_ok=True)
    (root / "var/lib/apt/lists").mkdir(parents=True, exist_ok=True)
    A._overlay(A.IMAGES_DIR / "rootfs", root)
    # busybox init: the arm64 virt machine's console is the PL011 (ttyAMA0), not ttyS0
    inittab = etc / "inittab"
    inittab.write_text(inittab.read_text().replace("ttyS0", "ttyAMA0") + HVC_INITTAB)
    (etc / "hostname").write_text("bootsvc-lab-dpu\n")
    boot = root / "boot"
    boot.mkdir(exist_ok=True)
    shutil.copy2(arts.kernel_arm64, boot / "vmlinuz")
    shutil.copy2(arts.initrd_arm64, boot / "initrd.img")


# /etc/pam.d/common-* as libpam-runtime's postinst (pam-auth-update, profile "unix") writes them: vtysh
# (which frr-reload.py runs) opens a PAM session, and /etc/pam.d/other includes these files
PAM_COMMON = {
    "common-auth": "auth\t[success=1 default=ignore]\tpam_unix.so nullok\nauth\trequisite\tpam_deny.so\n"
                   "auth\trequired\tpam_permit.so\n",
    "common-account": "account\t[success=1 new_authtok_reqd=done default=ignore]\tpam_unix.so\n"
                      "account\trequisite\tpam_deny.so\naccount\trequired\tpam_permit.so\n",
    "common-password": "password\t[success=1 default=ignore]\tpam_unix.so obscure yescrypt\n"
                       "password\trequisite\tpam_deny.so\npassword\trequired\tpam_permit.so\n",
    "common-session": "session\t[default=1]\tpam_permit.so\nsession\trequisite\tpam_deny.so\n"
                      "session\trequired\tpam_permit.so\nsession\trequired\tpam_unix.so\n",
}
PAM_COMMON["common-session-noninteractive"] = PAM_COMMON["common-session"]


def _frr_users(root: Path) -> None:
    """What Debian's frr.postinst does that FRR needs at run time: users frr (groups frr, frrvty), its
    directories owned by it, and /etc/frr/daemons with the daemons the DPU runs (``bgpd=yes``)."""
    etc = root / "etc"
    frr_etc = etc / "frr"
    if not frr_etc.is_dir():
        return
    with (etc / "passwd").open("a") as f:
        f.write(f"frr:x:{FRR_UID}:{FRR_GID}:Frr routing suite:/nonexistent:/usr/sbin/nologin\n")
    with (etc / "group").open("a") as f:
        f.write(f"frr:x:{FRR_GID}:\nfrrvty:x:{FRRVTY_GID}:frr\n")
    daemons = frr_etc / "daemons"
    text = daemons.read_text()
    for d, v in FRR_DAEMONS.items():
        text = re.sub(rf"^{d}=.*$", f"{d}={v}", text, flags=re.M)
    daemons.write_text(text + WATCHFRR_OPTIONS)
    (root / "var" / "log" / "frr").mkdir(parents=True, exist_ok=True)
    for p in (frr_etc, *frr_etc.iterdir(), root / "var" / "log" / "frr"):
        os.chown(p, FRR_UID, FRR_GID)
    if (frr_etc / "vtysh.conf").exists():
        os.chown(frr_etc / "vtysh.conf", FRR_UID, FRRVTY_GID)
    pam = etc / "pam.d"
    for name, text in PAM_COMMON.items():
        if not (pam / name).exists():
            (pam / name).write_text(text)


def _root_image(root: Path, out: Path, key: str) -> None:
    (root / "etc" / "bootsvc-lab-image").write_text(json.dumps({"key": key, "suite": SUITE, "arch": "arm64"}) + "\n")
    used = int(A._run(["du", "-sk", "--apparent-size", str(root)]).split()[0])
    size_mb = max(192, (used * 120 // 100) // 1024 + 64)  # 20 % + 64 MB for the agent and logs
    raw = out.with_suffix("")
    A._run(["mke2fs", "-q", "-F", "-t", "ext4", "-L", ROOT_LABEL, "-d", str(root), "-E", "root_owner=0:0",
            str(raw), f"{size_mb}M"], timeout=600)
    _gzip(raw, out)


def _esp_image(cache: Path, r: A.Resolved, out: Path, tmp: Path) -> None:
    ga = A._deb(cache, "grub-efi-arm64-bin", r.grub_arm64_version, "arm64")
    efi = tmp / "BOOTAA64.EFI"
    A._run(["grub-mkimage", "-O", "arm64-efi", "-d", str(ga / "usr" / "lib" / "grub" / "arm64-efi"),
            "-o", str(efi), "-p", "/EFI/BOOT", *GRUB_ESP_MODULES])
    cfg = tmp / "grub.cfg"
    cfg.write_text(GRUB_CFG.format(label=ROOT_LABEL, args=KERNEL_ARGS))
    raw = out.with_suffix("")
    for tool in ("mkfs.vfat", "mmd", "mcopy"):
        if not shutil.which(tool):
            raise A.ArtifactError(f"{tool} missing: apt-get install dosfstools mtools")
    A._run(["mkfs.vfat", "-C", "-n", "LABESP", str(raw), str(ESP_MB * 1024)])
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    A._run(["mmd", "-i", str(raw), "::/EFI", "::/EFI/BOOT"], env=env)
    A._run(["mcopy", "-i", str(raw), str(efi), str(cfg), "::/EFI/BOOT/"], env=env)
    _gzip(raw, out)


def _gzip(raw: Path, out: Path) -> None:
    # level 6: built once, fetched by GRUB over HTTP at every install (the slowest link under TCG)
    with raw.open("rb") as src, gzip.open(out, "wb", compresslevel=6) as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    raw.unlink()


# ---- installer initramfs ------------------------------------------------------------------------------
_NEEDED = re.compile(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]")
_INTERP = re.compile(r"Requesting program interpreter: (\S+)\]")
LIB_DIRS = ("usr/lib/aarch64-linux-gnu", "lib/aarch64-linux-gnu", "usr/lib", "lib")


def _collect_elf(root: Path, binaries: Sequence[str]) -> list[str]:
    """The binaries and every shared library they need (transitively), as paths relative to ``root``
    (``readelf`` reads foreign-architecture ELF; nothing is executed)."""
    todo = list(binaries)
    seen: list[str] = []
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        p = root / rel
        if not p.exists():
            raise A.ArtifactError(f"{rel} missing in the arm64 root")
        seen.append(rel)
        text = A._run(["readelf", "-d", "-l", str(p.resolve())])
        for m in _INTERP.finditer(text):
            todo.append(m.group(1).lstrip("/"))
        for m in _NEEDED.finditer(text):
            lib = m.group(1)
            for d in LIB_DIRS:
                if (root / d / lib).exists():
                    todo.append(f"{d}/{lib}")
                    break
            else:
                raise A.ArtifactError(f"{rel} needs {lib}, not in the arm64 root")
    return seen


def _installer(busybox: Path, ka: Path, kver: str, root: Path, files: Sequence[str], tmp: Path, key: str) -> None:
    r = tmp / "initramfs"
    for d in ("bin", "sbin", "etc", "proc", "sys", "dev", "tmp", "run", "mnt", "lib/modules", "lab-os",
              "usr/sbin", "usr/lib/aarch64-linux-gnu"):
        (r / d).mkdir(parents=True, exist_ok=True)
    # merged /usr, as in the OS the libraries come from (the ELF interpreter is /lib/ld-linux-aarch64.so.1)
    (r / "lib" / "aarch64-linux-gnu").symlink_to("../usr/lib/aarch64-linux-gnu")
    shutil.copy2(busybox, r / "bin" / "busybox")
    shutil.copy2(A.IMAGES_DIR / "bfinstall" / "init", r / "init")
    shutil.copy2(A.IMAGES_DIR / "initramfs" / "udhcpc.script", r / "etc" / "udhcpc.script")
    # bootsvc's bfks script checks bf.cfg with `bash -n`; the installer's shell is busybox ash
    (r / "bin" / "bash").write_text('#!/bin/busybox sh\nexec /bin/busybox sh "$@"\n')
    for f in ("init", "etc/udhcpc.script", "bin/bash"):
        os.chmod(r / f, 0o755)
    for rel in files:
        src = (root / rel).resolve()
        norm = rel.replace("lib/aarch64-linux-gnu", "usr/lib/aarch64-linux-gnu", 1) if rel.startswith("lib/") \
            else rel
        dst = r / norm
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists():
            shutil.copy2(src, dst)
    if not (r / "lib" / "ld-linux-aarch64.so.1").exists():
        (r / "lib" / "ld-linux-aarch64.so.1").symlink_to("aarch64-linux-gnu/ld-linux-aarch64.so.1")
    mods = ka / "lib" / "modules" / kver
    for m in A.VIRTIO_MODULES:
        found = list(mods.rglob(f"{m}.ko*"))
        if found:
            shutil.copy2(found[0], r / "lib" / "modules" / f"{m}.ko")
    for f in ("root.ext4.gz", "esp.vfat.gz"):
        shutil.copy2(tmp / f, r / "lab-os" / f)
    (r / "lab-os" / "image-id").write_text(f"lab DOCA OS {SUITE} arm64 {key}\n")
    names = subprocess.run(["find", ".", "-print0"], cwd=r, capture_output=True, check=True).stdout
    every = sorted(names.split(b"\0")[:-1])
    payload = [n for n in every if n.startswith(b"./lab-os/")]
    tools = [n for n in every if not n.startswith(b"./lab-os/")]

    def cpio(listing: list[bytes]) -> bytes:
        return subprocess.run(["cpio", "--quiet", "-o", "-0", "-H", "newc", "-R", "0:0"], cwd=r,
                              input=b"\0".join(listing) + b"\0", capture_output=True, check=True).stdout

    # Two archives back to back, which the kernel unpacks in turn (Documentation/driver-api/
    # early-userspace/buffer-format.rst): the tools gzip-ed, the already gzip-ed OS payload stored
    # The kernel takes an uncompressed archive only at a 4-byte aligned offset and skips zero bytes in
    # between (init/initramfs.c, unpack_to_rootfs): pad the gzip member, or the payload is "invalid magic".
    with (tmp / "installer.cpio").open("wb") as out:
        gz = gzip.compress(cpio(tools), compresslevel=9)
        out.write(gz + b"\0" * (-len(gz) % 4))
        out.write(cpio(payload))
    shutil.rmtree(r)


# ---- the BFB -----------------------------------------------------------------------------------------
# The lab BFB's boot-args (id 59: "Arguments for boot image", what the DPU's UEFI boots the stream's
# kernel with when the BMC pushes the BFB over RShim): the BF3's, with QEMU virt's PL011 for the early
# console, and the OOB port by DHCP so that bf.cfg's hooks reach bootsvc.
RSHIM_BOOT_ARGS = "console=hvc0 console=ttyAMA0 earlycon=pl011,0x9000000 initrd=initramfs bfnet=oob_net0:dhcp"


def _write_bfb(out: Path, kernel: Path, initramfs: Path) -> None:
    from bootsvc import bfb

    with out.open("wb") as f:
        bfb.write_bfb(f, [bfb.Part("boot-args", RSHIM_BOOT_ARGS.encode()), bfb.Part("image", kernel),
                          bfb.Part("initramfs", initramfs)])


# ---- the RShim boot (Redfish BFB push) -------------------------------------------------------------------
MAX_BFCFG = 1 << 20


@dataclass(frozen=True)
class RshimBoot:
    kernel: Path
    initrd: Path  # the BFB's initramfs + a cpio with /etc/bf.cfg
    args: str  # the BFB's boot-args
    bfcfg_bytes: int


class _Limited:
    """A read-only view of the first ``n`` bytes of a file (the BFB part of ``BFB + bf.cfg``)."""

    def __init__(self, f: Any, n: int) -> None:
        self.f, self.left = f, n

    def read(self, k: int = -1) -> bytes:
        k = self.left if k < 0 else min(k, self.left)
        b: bytes = self.f.read(k)
        self.left -= len(b)
        return b


def rshim_boot_files(pushed: Path, out_dir: Path) -> RshimBoot:
    """What the lab DPU's Arm boots after its BMC pushed ``pushed`` into the RShim boot FIFO: the
    stream's kernel (``image``) with its ``boot-args``, and its ``initramfs`` followed by a cpio that
    puts the appended bf.cfg at ``/etc/bf.cfg`` (bluefield-real.md section 3: the BMC writes
    ``cat image.bfb bf.cfg``; where the installer reads it from is NVIDIA's business - the lab puts it
    where install.sh sources it). Raises ``bootsvc.bfb.BfbError`` for a stream that is not a BFB."""
    from bootsvc import bfb

    out_dir.mkdir(parents=True, exist_ok=True)
    with pushed.open("rb") as f:  # find where the images end: the bytes after them are bf.cfg
        end = 0
        while True:
            raw = f.read(bfb.HEADER_LEN)
            if len(raw) < bfb.HEADER_LEN:
                break
            try:
                h = bfb.parse_header(raw, end)
            except bfb.BfbError:
                break
            end += bfb.HEADER_LEN + h.length + bfb.padding(h.length)
            f.seek(end)
    files: dict[int, Path] = {}
    sinks: list[Any] = []

    def sink(h: Any) -> Any:
        if h.image_id not in (bfb.ID_IMAGE, bfb.ID_INITRAMFS, bfb.ID_BOOT_ARGS) or h.image_id in files:
            return None
        p = out_dir / f"dump-{bfb.IMAGE_NAMES.get(h.image_id, h.image_id)}"
        files[h.image_id] = p
        fo = p.open("wb")
        sinks.append(fo)
        return fo

    try:
        with pushed.open("rb") as f:
            bfb.scan_stream(_Limited(f, end), sink=sink)  # type: ignore[arg-type]
            cfg = f.read(MAX_BFCFG + 1)
    finally:
        for fo in sinks:
            fo.close()
    if bfb.ID_IMAGE not in files or bfb.ID_INITRAMFS not in files:
        raise bfb.BfbError("the pushed BFB has no kernel (image) or no initramfs")
    if len(cfg) > MAX_BFCFG:
        raise bfb.BfbError(f"more than {MAX_BFCFG} bytes after the BFB's last image: not a bf.cfg")
    args = files[bfb.ID_BOOT_ARGS].read_text(errors="replace").strip() if bfb.ID_BOOT_ARGS in files else ""
    initrd = out_dir / "initrd-with-bfcfg"
    with tempfile.TemporaryDirectory(dir=out_dir) as td:
        (Path(td) / "etc").mkdir()
        (Path(td) / "etc" / "bf.cfg").write_bytes(cfg)
        os.chmod(Path(td) / "etc" / "bf.cfg", 0o600)
        extra = subprocess.run(["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"], cwd=td,
                               input=b"etc\netc/bf.cfg\n", capture_output=True, check=True).stdout
    with initrd.open("wb") as o, files[bfb.ID_INITRAMFS].open("rb") as i:
        shutil.copyfileobj(i, o, 1 << 20)
        o.write(extra)  # a further archive: the kernel unpacks it over the first (buffer-format.rst)
    return RshimBoot(files[bfb.ID_IMAGE], initrd, args, len(cfg))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bootsvc.lab.bf3 [--cache DIR]``: build (or reuse) the lab BFB and print what it holds."""
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--prune", action="store_true", help="delete cached lab BFB builds other than this one")
    a = ap.parse_args(argv)
    t0 = time.monotonic()
    b = build_lab_bfb(a.cache)
    print(json.dumps({k: str(v) for k, v in asdict(b).items()}, indent=1))
    if a.prune:
        for d in A.cache_root(a.cache).glob("bf3-*"):
            if d.is_dir() and d != b.path.parent:
                shutil.rmtree(d, ignore_errors=True)
                print(f"pruned {d}")
    print(f"total {time.monotonic() - t0:.2f} s")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

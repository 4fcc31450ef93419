"""QEMU virtual machines for the lab, one tap per NIC inside a lab namespace (owned by the lab helper).

Kinds (firmware + NIC option ROM), as measured in the shared lab notes:

* ``bios``        SeaBIOS + ``/usr/lib/ipxe/qemu/pxe-virtio.rom`` (iPXE; sends opt93=0, user-class iPXE)
* ``uefi``        OVMF + ``efi-virtio.rom`` (iPXE as EFI driver; opt93=7, user-class iPXE)
* ``uefi-native`` OVMF's own VirtioNetDxe + PXE (``romfile=``; opt93=7, no user-class) - like vendor UEFI
* ``arm64``       AAVMF on ``virt``/cortex-a72 (opt93=11), always TCG on an x86 host

Debian's virtio ROMs are built for the modern-only PCI ID 1af4:1041, so x86 NICs use
``disable-legacy=on`` (else SeaBIOS silently skips the ROM). Every VM gets ``-uuid`` (DHCP opt97 is the
SMBIOS UUID; all zeros without it). The accelerator is KVM only if the CPU shows ``vmx``/``svm`` and the
loaded KVM is not ``kvm_pvm`` (PVM can't run firmware); else TCG. ``BOOTSVC_LAB_ACCEL`` overrides.

"Boot from disk": the arm64 DPU boots its disk through AAVMF (the lab BFB installs GPT + ESP + GRUB,
see bf3.py), with the disk first and the NIC second in the firmware boot order, as a BlueField-3's
UEFI; x86 VMs use QEMU direct kernel boot (``-kernel/-initrd/-append``, ``root=/dev/vda``), because the
x86 lab image (the hosts' OS) carries no bootloader.

:class:`Vm` runs one QEMU with ``-no-reboot`` and its serial console on a pipe; a thread timestamps each
line (seconds since QEMU start) into a log file and lets tests ``wait_for_serial(pattern, timeout)``.

:class:`QemuPowerBackend` is the "server" side a Redfish/BMC emulator drives (see its docstring).

One module (~575 lines) on purpose: the command line per VM kind, the running VM with its serial log,
and the power backend a BMC emulator drives are one view of QEMU; the backend restarts ``Vm`` with
the argv rules above, and splitting them would split the boot-order rules from their only user.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
AAVMF_CODE = Path("/usr/share/AAVMF/AAVMF_CODE.fd")
AAVMF_VARS = Path("/usr/share/AAVMF/AAVMF_VARS.fd")
PXE_ROM = Path("/usr/lib/ipxe/qemu/pxe-virtio.rom")
EFI_ROM = Path("/usr/lib/ipxe/qemu/efi-virtio.rom")
_ANSI = re.compile(rb"\x1b\[[0-9;?]*[a-zA-Z]|\x1b[c()][0-9A-Za-z]?|\x1b[=>]")
_MAC_RE = re.compile(r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")


class VmKind(StrEnum):
    BIOS = "bios"
    UEFI = "uefi"
    UEFI_NATIVE = "uefi-native"
    ARM64 = "arm64"


class BootDevice(StrEnum):
    NETWORK = "network"  # Redfish "Pxe"
    DISK = "disk"  # Redfish "Hdd"


class VmError(RuntimeError):
    pass


class VmExited(VmError):
    """The VM's QEMU process ended while a caller was waiting for serial output."""


def detect_accel() -> str:
    """``kvm`` only with real VT-x/AMD-V and a non-PVM KVM module (see lab.md section 7), else ``tcg``."""
    env = os.environ.get("BOOTSVC_LAB_ACCEL")
    if env:
        return env
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "tcg"
    has_virt = re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M) is not None
    if Path("/dev/kvm").exists() and has_virt and not Path("/sys/module/kvm_pvm").exists():
        return "kvm"
    return "tcg"


def uuid_for_mac(mac: str) -> str:
    """Deterministic SMBIOS UUID per MAC (so captures and callbacks can be correlated)."""
    return "7ab00000-0000-4000-8000-" + mac.replace(":", "").lower()


@dataclass(frozen=True)
class Nic:
    tap: str
    mac: str

    def __post_init__(self) -> None:
        if not _MAC_RE.match(self.mac):
            raise VmError(f"bad MAC {self.mac!r} (want lowercase aa:bb:cc:dd:ee:ff)")


@dataclass(frozen=True)
class VmSpec:
    """Everything needed to start one VM. ``netns`` is the full namespace name holding the taps."""

    name: str
    kind: VmKind
    netns: str
    nics: tuple[Nic, ...]
    uuid: str | None = None
    mem_mb: int | None = None  # default 512 (x86) / 1024 (arm64)
    smp: int = 1
    disk: Path | None = None  # raw image, virtio-blk (/dev/vda)
    boot: BootDevice = BootDevice.NETWORK
    kernel: Path | None = None  # direct kernel boot (used for boot=DISK, or explicitly)
    initrd: Path | None = None
    append: str = ""
    extra_args: tuple[str, ...] = ()
    accel: str | None = None

    @property
    def mac(self) -> str:
        return self.nics[0].mac

    @property
    def smbios_uuid(self) -> str:
        return self.uuid or uuid_for_mac(self.mac)


def qemu_argv(spec: VmSpec, *, vars_path: Path | None, qmp_path: Path | None, accel: str) -> list[str]:
    """The QEMU command line for ``spec`` (pure; the caller prepares the per-VM NVRAM copy)."""
    if not spec.nics:
        raise VmError("a lab VM needs at least one NIC")
    arm = spec.kind is VmKind.ARM64
    mem = spec.mem_mb or (1024 if arm else 512)
    if arm:
        # no KVM for a foreign architecture on an x86 host
        argv = ["qemu-system-aarch64", "-machine", "virt,accel=tcg", "-cpu", "cortex-a72"]
    else:
        cpu = "host" if accel == "kvm" else "qemu64"
        argv = ["qemu-system-x86_64", "-machine", f"q35,accel={accel}", "-cpu", cpu]
    argv += ["-name", spec.name, "-smp", str(spec.smp), "-m", str(mem), "-uuid", spec.smbios_uuid,
             "-display", "none", "-monitor", "none", "-serial", "stdio", "-no-reboot"]
    if qmp_path is not None:
        argv += ["-qmp", f"unix:{qmp_path},server=on,wait=off"]
    if spec.kind in (VmKind.UEFI, VmKind.UEFI_NATIVE, VmKind.ARM64):
        if vars_path is None:
            raise VmError("UEFI kinds need a writable NVRAM copy")
        code = AAVMF_CODE if arm else OVMF_CODE
        argv += ["-drive", f"if=pflash,format=raw,unit=0,readonly=on,file={code}",
                 "-drive", f"if=pflash,format=raw,unit=1,file={vars_path}"]
    net_boot = spec.boot is BootDevice.NETWORK and spec.kernel is None
    # arm64 (the lab BlueField): the firmware always boots, from a boot order like a BF3's UEFI - the
    # disk first, then PXE on the OOB port; a one-time PXE override puts the NIC first. An installed
    # disk (ESP with \EFI\BOOT\BOOTAA64.EFI) boots; a blank one fails at once and AAVMF goes on to PXE.
    fw_order = arm and spec.kernel is None and spec.disk is not None
    nic_index, disk_index = ((1, 2) if net_boot else (2, 1)) if fw_order else ((1, None) if net_boot else (None, 2))
    rom = {VmKind.BIOS: str(PXE_ROM), VmKind.UEFI: str(EFI_ROM)}.get(spec.kind, "")
    for i, nic in enumerate(spec.nics):
        dev = "virtio-net-pci"
        if not arm:
            dev += ",disable-legacy=on"  # Debian's ROMs match 1af4:1041 only (lab.md 7.2)
        dev += f",netdev=n{i},mac={nic.mac},romfile={rom if i == 0 else ''}"
        if i == 0 and nic_index is not None:
            dev += f",bootindex={nic_index}"
        argv += ["-netdev", f"tap,id=n{i},ifname={nic.tap},script=no,downscript=no", "-device", dev]
    if spec.disk is not None:
        argv += ["-drive", f"file={spec.disk},format=raw,if=none,id=d0,cache=unsafe",
                 "-device", "virtio-blk-pci,drive=d0" + (f",bootindex={disk_index}" if disk_index else "")]
    if spec.kernel is not None:
        argv += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        argv += ["-append", spec.append]
    argv += list(spec.extra_args)
    return argv


@dataclass(frozen=True)
class SerialLine:
    t: float  # seconds since QEMU start
    text: str


@dataclass
class _Serial:
    lines: list[SerialLine] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    closed: bool = False


class Vm:
    """One running QEMU. Use as a context manager or call :meth:`kill`."""

    def __init__(self, spec: VmSpec, workdir: Path, *, on_pid: Callable[[int], None] | None = None,
                 serial_log: Path | None = None) -> None:
        self.spec = spec
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.serial_log = serial_log or self.workdir / f"{spec.name}.serial.log"
        self.qemu_log = self.workdir / f"{spec.name}.qemu.log"
        self.qmp_path = self.workdir / f"{spec.name}.qmp"
        self.accel = spec.accel or detect_accel()
        self._on_pid = on_pid
        self._serial = _Serial()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self.t0 = 0.0  # epoch of QEMU start
        self._m0 = 0.0  # monotonic of QEMU start
        self.exit_time: float | None = None  # seconds since start when QEMU exited

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Vm:
        spec = self.spec
        vars_path = None
        if spec.kind in (VmKind.UEFI, VmKind.UEFI_NATIVE, VmKind.ARM64):
            vars_path = self.workdir / f"{spec.name}.vars.fd"
            if not vars_path.exists():  # keep NVRAM across power cycles of the same VM, like hardware
                shutil.copyfile(AAVMF_VARS if spec.kind is VmKind.ARM64 else OVMF_VARS, vars_path)
        self.qmp_path.unlink(missing_ok=True)
        argv = ["ip", "netns", "exec", spec.netns,
                *qemu_argv(spec, vars_path=vars_path, qmp_path=self.qmp_path, accel=self.accel)]
        errlog = self.qemu_log.open("ab")
        errlog.write((" ".join(argv) + "\n").encode())
        errlog.flush()
        self._serial = _Serial()
        self.exit_time = None
        self.t0 = time.time()
        self._m0 = time.monotonic()
        self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errlog)
        errlog.close()
        if self._on_pid:
            self._on_pid(self._proc.pid)
        log = self.serial_log.open("ab")
        # epoch= lets a reader put every later "[  t]" line (seconds since this start) on the wall clock
        log.write(f"==== {time.strftime('%H:%M:%S')} start {spec.name} kind={spec.kind} boot={spec.boot}"
                  f" accel={self.accel} firmware_boot={spec.kernel is None} epoch={self.t0:.3f}\n".encode())
        assert self._proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self._proc.stdout, log), daemon=True)
        self._reader.start()
        return self

    def _read(self, pipe: IO[bytes], log: IO[bytes]) -> None:
        buf = b""
        fd = pipe.fileno()
        try:
            while True:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk.replace(b"\r", b"\n")
                while b"\n" in buf:
                    raw, buf = buf.split(b"\n", 1)
                    self._emit(raw, log)
            if buf:
                self._emit(buf, log)
        finally:
            log.close()
            with self._serial.cond:
                self._serial.closed = True
                self._serial.cond.notify_all()

    def _emit(self, raw: bytes, log: IO[bytes]) -> None:
        line = _ANSI.sub(b"", raw).strip()
        if not line:
            return
        t = time.monotonic() - self._m0
        log.write(b"[%8.2f] " % t + line + b"\n")
        log.flush()
        with self._serial.cond:
            self._serial.lines.append(SerialLine(t, line.decode("utf-8", "replace")))
            self._serial.cond.notify_all()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself (guest poweroff/reboot with -no-reboot); returns its code."""
        if self._proc is None:
            raise VmError("not started")
        try:
            rc = self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise TimeoutError(f"{self.spec.name}: still running after {timeout} s") from e
        self._finish()
        return rc

    def _finish(self) -> None:
        if self.exit_time is None:
            self.exit_time = time.monotonic() - self._m0
        if self._reader is not None:
            self._reader.join(timeout=5)

    def kill(self, grace: float = 2.0) -> None:
        """Hard power-off: SIGTERM, then SIGKILL after ``grace`` seconds."""
        p = self._proc
        if p is None or p.poll() is not None:
            if p is not None:
                self._finish()
            return
        with contextlib.suppress(ProcessLookupError):
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)
        self._finish()

    def __enter__(self) -> Vm:
        if self._proc is None:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    # ---- serial console -----------------------------------------------------------------------
    def lines(self) -> list[SerialLine]:
        with self._serial.cond:
            return list(self._serial.lines)

    def wait_for_serial(self, pattern: str | re.Pattern[str], timeout: float, *,
                        since: float = 0.0) -> tuple[SerialLine, re.Match[str]]:
        """Block until a serial line (at or after ``since`` s) matches ``pattern``; raises
        ``TimeoutError`` (with the console tail) at the deadline or ``VmExited`` when QEMU ended."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        idx = 0
        with self._serial.cond:
            while True:
                lines = self._serial.lines
                while idx < len(lines):
                    ln = lines[idx]
                    idx += 1
                    if ln.t >= since:
                        m = rx.search(ln.text)
                        if m:
                            return ln, m
                if self._serial.closed:
                    raise VmExited(f"{self.spec.name}: QEMU exited before /{rx.pattern}/; tail:\n"
                                   + self._tail())
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.spec.name}: no /{rx.pattern}/ within {timeout} s; tail:\n"
                                       + self._tail())
                self._serial.cond.wait(timeout=min(left, 1.0))

    def _tail(self, n: int = 15) -> str:
        return "\n".join(f"[{ln.t:8.2f}] {ln.text}" for ln in self._serial.lines[-n:])

    def exit_reason(self) -> str:
        """``reboot``/``poweroff`` from the guest kernel's last words, ``running``, or ``unknown``."""
        if self.running():
            return "running"
        for ln in reversed(self.lines()[-30:]):
            if "reboot: Restarting system" in ln.text:
                return "reboot"
            if "reboot: Power down" in ln.text or "reboot: System halted" in ln.text:
                return "poweroff"
        return "unknown"

    # ---- QMP (graceful power and reset) -------------------------------------------------------
    def qmp(self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 5.0) -> Any:
        """Send one QMP command (after capability negotiation) and return its ``return`` value."""
        # the QMP socket lives in the filesystem, so the root namespace reaches it without any IP
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.qmp_path))
            f = s.makefile("rwb")

            def rpc(msg: dict[str, Any]) -> Any:
                f.write(json.dumps(msg).encode() + b"\n")
                f.flush()
                while True:
                    line = f.readline()
                    if not line:
                        raise VmError("QMP connection closed")
                    r = json.loads(line)
                    if "return" in r:
                        return r["return"]
                    if "error" in r:
                        raise VmError(f"QMP {msg['execute']}: {r['error']}")

            json.loads(f.readline())  # greeting
            rpc({"execute": "qmp_capabilities"})
            msg: dict[str, Any] = {"execute": command}
            if arguments:
                msg["arguments"] = arguments
            return rpc(msg)


class QemuPowerBackend:
    """QEMU as a power-controllable machine for a BMC/Redfish emulator (e.g. ``bootsvc/lab/bfbmc.py``).

    The method names follow sushy-tools' systems driver so a driver can delegate one-to-one:

    * ``get_power_state() -> "On" | "Off"``
    * ``set_power_state(state)`` with a Redfish ``ResetType``: ``On``/``ForceOn`` (start QEMU),
      ``ForceOff`` (kill), ``GracefulShutdown`` (ACPI power button via QMP ``system_powerdown``),
      ``ForceRestart``/``GracefulRestart``/``PowerCycle`` (kill + start again: a new boot honours the
      override), ``Nmi`` (QMP ``inject-nmi``), ``PushPowerButton`` (toggle).
    * ``get_boot_device() -> "Pxe" | "Hdd"`` and ``set_boot_device(target, once=True)`` (Redfish
      ``BootSourceOverrideTarget``; ``once`` = ``BootSourceOverrideEnabled: Once`` and IS honoured:
      the override applies to the next start only, then the persistent ``default_boot`` is back).
    * ``boots`` - list of (epoch, BootDevice) of every start, for assertions.

    ``VmSpec.boot`` of each start is set from the override; boot=DISK uses direct kernel boot with
    ``disk_kernel``/``disk_initrd``/``disk_append`` (``root=/dev/vda``). With ``follow_reboots``, a
    guest-initiated reboot (QEMU exits under ``-no-reboot`` and the console said "Restarting system")
    starts the VM again, as real hardware would. Thread-safe.
    """

    def __init__(self, spec: VmSpec, workdir: Path, *, on_pid: Callable[[int], None] | None = None,
                 default_boot: BootDevice = BootDevice.DISK, disk_kernel: Path | None = None,
                 disk_initrd: Path | None = None, disk_append: str = "",
                 net_kernel: tuple[Path, Path, str] | None = None, follow_reboots: bool = True) -> None:
        self.spec = spec
        self.workdir = Path(workdir)
        self._on_pid = on_pid
        self.default_boot = default_boot
        self._override: BootDevice | None = None
        self._override_once = True
        self.disk_kernel = disk_kernel
        self.disk_initrd = disk_initrd
        self.disk_append = disk_append
        self.net_kernel = net_kernel  # optional: "network" boot as direct kernel (skips firmware PXE)
        self.follow_reboots = follow_reboots
        self.vm: Vm | None = None
        self.boots: list[tuple[float, BootDevice]] = []
        self._lock = threading.RLock()
        self._watch: threading.Thread | None = None
        self._closed = False
        self._gen = 0
        self._once_kernel: tuple[Path, Path, str] | None = None

    # ---- boot override ------------------------------------------------------------------------
    def set_boot_device(self, target: str | BootDevice, once: bool = True) -> None:
        dev = _boot_dev(target)
        with self._lock:
            self._override, self._override_once = dev, once
            if not once:
                self.default_boot = dev

    def get_boot_device(self) -> str:
        with self._lock:
            dev = self._override or self.default_boot
        return "Pxe" if dev is BootDevice.NETWORK else "Hdd"

    def boot_kernel_once(self, kernel: Path, initrd: Path, append: str) -> None:
        """The next start boots this kernel directly, once: the lab's model of a BlueField Arm booting
        the stream its BMC pushed into the RShim boot FIFO (the firmware boots it, not a disk or PXE)."""
        with self._lock:
            self._once_kernel = (kernel, initrd, append)

    def next_boot(self) -> BootDevice:
        with self._lock:
            return self._override or self.default_boot

    # ---- power --------------------------------------------------------------------------------
    def get_power_state(self) -> str:
        with self._lock:
            return "On" if self.vm is not None and self.vm.running() else "Off"

    def set_power_state(self, state: str) -> None:
        s = state.replace(" ", "")
        if s in ("On", "ForceOn"):
            self.power_on()
        elif s == "ForceOff":
            self.power_off()
        elif s == "GracefulShutdown":
            with self._lock:
                if self.vm is not None and self.vm.running():
                    self.vm.qmp("system_powerdown")
        elif s in ("ForceRestart", "GracefulRestart", "PowerCycle"):
            self.power_off()
            self.power_on()
        elif s == "Nmi":
            with self._lock:
                if self.vm is not None and self.vm.running():
                    self.vm.qmp("inject-nmi")
        elif s == "PushPowerButton":
            if self.get_power_state() == "On":
                self.set_power_state("GracefulShutdown")
            else:
                self.power_on()
        else:
            raise VmError(f"unsupported ResetType {state!r}")

    def power_on(self) -> Vm:
        with self._lock:
            if self.vm is not None and self.vm.running():
                return self.vm
            return self._start()

    def _start(self) -> Vm:
        dev = self._override or self.default_boot
        if self._override is not None and self._override_once:
            self._override = None
        spec = self.spec
        once, self._once_kernel = self._once_kernel, None
        if once is not None:
            k, i, a = once
            spec = replace(spec, boot=dev, kernel=k, initrd=i, append=a)
        elif dev is BootDevice.DISK and self.spec.kind is VmKind.ARM64 and self.disk_kernel is None:
            # the firmware boots the disk (its ESP), falling through to PXE when the disk is blank
            spec = replace(spec, boot=dev, kernel=None, initrd=None, append="")
        elif dev is BootDevice.DISK:
            if self.disk_kernel is None:
                raise VmError("boot=disk needs disk_kernel (direct kernel boot of root=/dev/vda)")
            spec = replace(spec, boot=dev, kernel=self.disk_kernel, initrd=self.disk_initrd,
                           append=self.disk_append)
        elif self.net_kernel is not None:
            k, i, a = self.net_kernel
            spec = replace(spec, boot=dev, kernel=k, initrd=i, append=a)
        else:
            spec = replace(spec, boot=dev, kernel=None, initrd=None, append="")
        vm = Vm(spec, self.workdir, on_pid=self._on_pid,
                serial_log=self.workdir / f"{self.spec.name}.serial.log")
        vm.start()
        self.vm = vm
        self.boots.append((vm.t0, dev))
        self._gen += 1
        if self.follow_reboots:
            self._watch = threading.Thread(target=self._watcher, args=(vm, self._gen), daemon=True)
            self._watch.start()
        return vm

    def _watcher(self, vm: Vm, gen: int) -> None:
        assert vm._proc is not None
        vm._proc.wait()
        vm._finish()
        with self._lock:
            if self._closed or gen != self._gen or vm.exit_reason() != "reboot":
                return
            self._start()

    def power_off(self) -> None:
        with self._lock:
            self._gen += 1  # a kill is not a guest reboot: the watcher must not restart it
            if self.vm is not None:
                self.vm.kill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self.power_off()

    def wait_power(self, state: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.get_power_state() != state:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.spec.name}: power state not {state} after {timeout} s")
            time.sleep(0.1)


def _boot_dev(target: str | BootDevice) -> BootDevice:
    if isinstance(target, BootDevice):
        return target
    t = target.lower()
    if t in ("pxe", "network", "uefihttp"):
        return BootDevice.NETWORK
    if t in ("hdd", "disk", "usb", "sdcard", "uefitarget"):
        return BootDevice.DISK
    raise VmError(f"unsupported boot target {target!r}")


def nic_specs(pairs: Sequence[tuple[str, str]]) -> tuple[Nic, ...]:
    return tuple(Nic(t, m) for t, m in pairs)

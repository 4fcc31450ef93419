"""A Redfish BMC for the Vagrant pair: sushy-tools' libvirt driver, with a boot override that is really
one-time and a machine that reboots the way the QEMU lab's does (owned by vagrant/).

Run (root namespace, 127.0.0.1, where bootsvc's conductor runs; the libvirt binding from Debian's
python3-libvirt on PYTHONPATH, see README.md):

    PYTHONPATH=$W/pylibvirt .venv/bin/python vagrant/libvirt_bmc.py --config $W/bmc.conf

``bmc.conf`` is a sushy-tools config file (SUSHY_EMULATOR_LISTEN_IP/PORT, _LIBVIRT_URI,
_ALLOWED_INSTANCES, _AUTH_FILE) plus ``BOOTSVC_VAGRANT_MACHINES``: per domain UUID ``{"default": "Hdd",
"boot_mac": MAC, "disk_kernel": [kernel, initrd, cmdline] or None}``.

Why not sushy-tools' libvirt driver as it is (measured with sushy-tools 2.x and libvirt 9.0 here):

* it keeps every override as the domain's persistent boot order and reports ``Continuous``
  (sushy_tools/emulator/main.py: "In libvirt we always set the boot device frequency to
  continuous"), ``BootSourceOverrideEnabled: Disabled`` without a target is a 400, and its ``Pxe``
  makes *every* NIC bootable ahead of the disk. A BlueField-3 whose one-time PXE override stuck would
  PXE-boot the installer again after the installer's reboot, which bootsvc answers with the install
  (bootsvc/render.py: dpu_booting and dpu_installing install).
* a guest reboot is a reset inside the running QEMU, which keeps the boot order QEMU was started with,
  so even a cleared override would apply only at the next power-on.

So this BMC does what a real one does with ``BootSourceOverrideEnabled: Once`` (Redfish
ComputerSystem schema: "Once - boot to the target once, then revert to the normal boot order"): the
override is kept here and applied to the one start it is for; every start rewrites the persistent
domain definition (boot order, and for the x86 host the direct kernel boot of its installed disk,
as bootsvc/lab/qemu.py QemuPowerBackend does); the domains have ``<on_reboot>destroy</on_reboot>``
and a follower starts a machine again when its guest rebooted (the kernel's "reboot: Restarting
system" on the console, as QemuPowerBackend's exit_reason reads it), now with the normal boot order.
Power off by this BMC, or a guest that powered off, stays off.
"""

from __future__ import annotations

import argparse
import json
import logging
import runpy
import signal
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("vagrant.bmc")

TARGETS = ("Pxe", "Hdd")
POWER_ON = ("On", "ForceOn")
RESTART = ("ForceRestart", "GracefulRestart", "PowerCycle")
FOLLOW_SECONDS = 0.5


@dataclass
class Machine:
    """What this BMC keeps for one domain (the rest is libvirt's)."""

    uuid: str
    default: str = "Hdd"  # the normal boot order's first device
    boot_mac: str | None = None  # the NIC that network-boots (a BF3's OOB port)
    disk_kernel: tuple[str, str, str] | None = None  # x86 host: its installed OS, direct kernel boot
    pending: str | None = None  # a Once override, consumed by the next start
    expect_running: bool = False  # started by this BMC (or a followed reboot) and not powered off by it
    boots: list[tuple[float, str]] = field(default_factory=list)


def boot_xml(tree: ET.Element, m: Machine, dev: str) -> ET.Element:
    """The persistent definition for one start booting ``dev`` (pure: edits and returns ``tree``)."""
    os_el = tree.find("os")
    assert os_el is not None, "a domain has <os>"
    for tag in ("boot", "kernel", "initrd", "cmdline"):
        for el in os_el.findall(tag):
            os_el.remove(el)
    if dev == "Hdd" and m.disk_kernel is not None:
        for tag, text in zip(("kernel", "initrd", "cmdline"), m.disk_kernel, strict=True):
            ET.SubElement(os_el, tag).text = text
    devices = tree.find("devices")
    assert devices is not None, "a domain has <devices>"
    disks = [d for d in devices.findall("disk") if d.get("device", "disk") == "disk"]
    nics = devices.findall("interface")
    for el in [*disks, *nics]:
        for b in el.findall("boot"):
            el.remove(b)
    def mac(n: ET.Element) -> str:
        el = n.find("mac")
        return (el.get("address") or "").lower() if el is not None else ""

    nic = next((n for n in nics if mac(n) == (m.boot_mac or "").lower()), nics[0] if nics else None)
    order = [nic, disks[0] if disks else None] if dev == "Pxe" else [disks[0] if disks else None, nic]
    for i, el in enumerate([e for e in order if e is not None], start=1):
        ET.SubElement(el, "boot", order=str(i))
    # a guest reboot ends the QEMU process, so the next start is this BMC's (with the normal order)
    on_reboot = tree.find("on_reboot")
    if on_reboot is None:
        on_reboot = ET.SubElement(tree, "on_reboot")
    on_reboot.text = "destroy"
    # one console log across starts (QEMU's file chardev truncates unless append=on)
    for kind in ("serial", "console"):
        for el in devices.findall(kind):
            src = el.find("source")
            if el.get("type") == "file" and src is not None:
                src.set("append", "on")
    return tree


def serial_paths(tree: ET.Element) -> list[str]:
    return [str(s.get("path")) for s in tree.findall("devices/serial[@type='file']/source") if s.get("path")]


def guest_rebooted(console_tail: str) -> bool:
    """Did the guest ask for a reboot? The kernel's last words (kernel/reboot.c), else assume it did:
    firmware and GRUB reset without a word, and only a power-off is said out loud."""
    for line in reversed(console_tail.splitlines()):
        if "reboot: Restarting system" in line:
            return True
        if "reboot: Power down" in line or "reboot: System halted" in line:
            return False
    return True


class Bmc:
    """The machines and their power, over one libvirt URI. Thread-safe (the HTTP server is threaded)."""

    def __init__(self, uri: str, machines: Iterable[Machine], libvirt: Any) -> None:
        self.uri = uri
        self.libvirt = libvirt
        self.machines = {m.uuid.lower(): m for m in machines}
        self.lock = threading.RLock()
        self.stop = threading.Event()

    def machine(self, ident: str) -> Machine | None:
        return self.machines.get(ident.lower())

    def _dom(self, conn: Any, m: Machine) -> Any:
        return conn.lookupByUUIDString(m.uuid)

    def start(self, m: Machine, why: str) -> None:
        with self.lock:
            dev = m.pending or m.default
            m.pending = None  # Once: this start uses it up
            conn = self.libvirt.open(self.uri)
            try:
                dom = self._dom(conn, m)
                tree = boot_xml(ET.fromstring(dom.XMLDesc(self.libvirt.VIR_DOMAIN_XML_INACTIVE)), m, dev)
                conn.defineXML(ET.tostring(tree).decode())
                for p in serial_paths(tree):
                    with open(p, "a") as f:  # where each start begins, on the wall clock
                        f.write(f"\n==== vagrant-bmc start {dom.name()} boot={dev} epoch={time.time():.3f} ({why})\n")
                dom.create()
            finally:
                conn.close()
            m.expect_running = True
            m.boots.append((time.time(), dev))
            log.info("bmc: %s started, boot %s%s (%s)", m.uuid, dev,
                     " (direct kernel boot of the installed disk)" if dev == "Hdd" and m.disk_kernel else "", why)

    def power_state(self, m: Machine) -> str:
        conn = self.libvirt.open(self.uri)
        try:
            return "On" if self._dom(conn, m).isActive() else "Off"
        finally:
            conn.close()

    def set_power(self, m: Machine, state: str) -> None:
        with self.lock:
            on = self.power_state(m) == "On"
            if state in POWER_ON:
                if not on:
                    self.start(m, f"Redfish {state}")
            elif state in ("ForceOff", "GracefulShutdown", "PushPowerButton") and on:
                # GracefulShutdown as ForceOff: firmware, installers and the lab OS answer no ACPI event
                self._off(m)
            elif state == "PushPowerButton":
                self.start(m, "Redfish PushPowerButton")
            elif state in RESTART:
                if on:
                    self._off(m)
                self.start(m, f"Redfish {state}")
            elif state == "Nmi" and on:
                conn = self.libvirt.open(self.uri)
                try:
                    self._dom(conn, m).injectNMI()
                finally:
                    conn.close()
            elif state not in ("ForceOff", "GracefulShutdown", "Nmi"):
                raise ValueError(f"unsupported ResetType {state!r}")

    def _off(self, m: Machine) -> None:
        m.expect_running = False
        conn = self.libvirt.open(self.uri)
        try:
            dom = self._dom(conn, m)
            if dom.isActive():
                dom.destroy()
        finally:
            conn.close()
        log.info("bmc: %s powered off", m.uuid)

    def follow(self) -> None:
        """Start a machine again after its guest rebooted (the domain was destroyed by on_reboot)."""
        while not self.stop.wait(FOLLOW_SECONDS):
            for m in self.machines.values():
                with self.lock:
                    if not m.expect_running or self.power_state(m) == "On":
                        continue
                    tail = ""
                    conn = self.libvirt.open(self.uri)
                    try:
                        dom = self._dom(conn, m)
                        reason = dom.state()
                        for p in serial_paths(ET.fromstring(dom.XMLDesc(self.libvirt.VIR_DOMAIN_XML_INACTIVE))):
                            with open(p, "rb") as f:
                                f.seek(0, 2)
                                f.seek(max(0, f.tell() - 4096))
                                tail = f.read().decode("utf-8", "replace")
                    finally:
                        conn.close()
                    if guest_rebooted(tail):
                        log.info("bmc: %s guest rebooted (libvirt state %s)", m.uuid, reason)
                        try:
                            self.start(m, "guest reboot")
                        except self.libvirt.libvirtError as e:
                            m.expect_running = False
                            log.error("bmc: %s could not be started again after its reboot: %s", m.uuid, e)
                    else:
                        m.expect_running = False
                        log.info("bmc: %s guest powered off (libvirt state %s)", m.uuid, reason)


def boot_middleware(app: Callable[..., Any], bmc: Bmc) -> Callable[..., Any]:
    """WSGI in front of sushy-tools (inside its auth): the Boot object of a System is this BMC's."""
    import io

    prefix = "/redfish/v1/Systems/"

    def err(start_response: Callable[..., Any], status: str, msg: str) -> list[bytes]:
        body = json.dumps({"error": {"code": "Base.1.0.GeneralError", "message": msg}}).encode()
        start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    def mw(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        path = str(environ.get("PATH_INFO", "")).rstrip("/")
        ident = path[len(prefix):] if path.startswith(prefix) else ""
        m = bmc.machine(ident) if ident and "/" not in ident else None
        method = environ.get("REQUEST_METHOD")
        if m is None or method not in ("GET", "PATCH"):
            return app(environ, start_response)
        if method == "PATCH":
            try:
                n = int(environ.get("CONTENT_LENGTH") or 0)
                doc = json.loads(environ["wsgi.input"].read(max(0, min(n, 1 << 16))) or b"{}")
            except ValueError:
                return err(start_response, "400 Bad Request", "the body is not JSON")
            if not isinstance(doc, dict):
                return err(start_response, "400 Bad Request", "the body is not a JSON object")
            boot = doc.pop("Boot", None)
            if isinstance(boot, dict):
                target, enabled = boot.get("BootSourceOverrideTarget"), boot.get("BootSourceOverrideEnabled")
                with bmc.lock:
                    if enabled == "Disabled" or target == "None":
                        m.pending = None
                    elif target in TARGETS and enabled in (None, "Once"):
                        m.pending = target
                    elif target in TARGETS and enabled == "Continuous":
                        m.default, m.pending = target, None
                    else:
                        return err(start_response, "400 Bad Request",
                                   f"unsupported boot override {target!r}/{enabled!r} (Pxe or Hdd; Once, "
                                   "Continuous or Disabled)")
                    log.info("bmc: %s boot override %s/%s -> next start boots %s", m.uuid, target, enabled,
                             m.pending or m.default)
            if not doc:
                start_response("204 No Content", [])
                return [b""]
            body = json.dumps(doc).encode()
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            return app(environ, start_response)
        # GET: sushy's System document, with this BMC's Boot override and power state
        got: dict[str, Any] = {}

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            got["status"], got["headers"] = status, headers
            return lambda _b: None

        chunks = app(environ, capture)
        try:
            raw = b"".join(chunks)
        finally:
            if hasattr(chunks, "close"):
                chunks.close()
        if str(got.get("status", "")).startswith("200"):
            try:
                sysdoc = json.loads(raw)
                with bmc.lock:
                    b = sysdoc.setdefault("Boot", {})
                    b["BootSourceOverrideTarget"] = m.pending or m.default
                    b["BootSourceOverrideEnabled"] = "Once" if m.pending else "Disabled"
                raw = json.dumps(sysdoc).encode()
            except ValueError:
                pass
        headers = [(k, v) for k, v in got.get("headers", []) if k.lower() != "content-length"]
        start_response(got.get("status", "500 Internal Server Error"), [*headers, ("Content-Length", str(len(raw)))])
        return [raw]

    return mw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="sushy-tools config file with BOOTSVC_VAGRANT_MACHINES")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    import libvirt  # type: ignore[import-not-found]  # Debian's python3-libvirt, put on PYTHONPATH
    from sushy_tools.emulator import main as sushy_main
    from sushy_tools.emulator.resources.systems import libvirtdriver
    from werkzeug.serving import make_server

    conf = runpy.run_path(args.config)
    machines = [Machine(uuid=u, default=str(v.get("default", "Hdd")), boot_mac=v.get("boot_mac"),
                        disk_kernel=(str(v["disk_kernel"][0]), str(v["disk_kernel"][1]), str(v["disk_kernel"][2]))
                        if v.get("disk_kernel") else None)
                for u, v in conf["BOOTSVC_VAGRANT_MACHINES"].items()]
    bmc = Bmc(conf["SUSHY_EMULATOR_LIBVIRT_URI"], machines, libvirt)

    class OnceLibvirtDriver(libvirtdriver.LibvirtDriver):  # type: ignore[misc]
        """sushy's libvirt driver (identity, NICs, memory, CPUs, boot mode); power and boot are the BMC's."""

        def _m(self, identity: str) -> Machine:
            m = bmc.machine(self.uuid(identity))
            if m is None:
                from sushy_tools import error

                raise error.FishyError(f"system {identity} is not managed by this BMC")
            return m

        def get_power_state(self, identity: str) -> str:
            return bmc.power_state(self._m(identity))

        def set_power_state(self, identity: str, state: str) -> None:
            from sushy_tools import error

            try:
                bmc.set_power(self._m(identity), state)
            except (ValueError, libvirt.libvirtError) as e:
                raise error.FishyError(str(e)) from e

        def get_boot_device(self, identity: str) -> str:
            m = self._m(identity)
            return m.pending or m.default

        def set_boot_device(self, identity: str, boot_source: str) -> None:
            m = self._m(identity)
            with bmc.lock:
                m.pending = boot_source if boot_source in TARGETS else None

    # sushy builds its systems driver from this module attribute on first use
    libvirtdriver.LibvirtDriver = OnceLibvirtDriver
    app = sushy_main.app
    app.wsgi_app = boot_middleware(app.wsgi_app, bmc)
    app.configure(config_file=args.config)  # after: its auth middleware wraps ours
    follower = threading.Thread(target=bmc.follow, name="reboot-follower", daemon=True)
    follower.start()
    host, port = conf.get("SUSHY_EMULATOR_LISTEN_IP", "127.0.0.1"), int(conf.get("SUSHY_EMULATOR_LISTEN_PORT", 8000))
    srv = make_server(host, port, app, threaded=True)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    log.info("bmc: Redfish for %d libvirt domains on http://%s:%d (%s)", len(machines), host, port, bmc.uri)
    try:
        srv.serve_forever()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        bmc.stop.set()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

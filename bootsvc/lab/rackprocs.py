"""The rack's long-running helper processes (started by :func:`bootsvc.lab.rack.up`, one per VM/role).

Owns: ``python -m bootsvc.lab.rackprocs bmc SPEC.json`` - one VM's BMC on 127.0.0.1 (the BlueField
BMC emulator :class:`bootsvc.lab.bfbmc.BfBmc` for a DPU, sushy-tools for a host; both drive QEMU through
:class:`bootsvc.lab.qemu.QemuPowerBackend`), with the Zone 0 -> loopback routing of the boot plane's
URLs the DPU BMC fetches (see :func:`bootsvc.lab.rack.boot_route`); and ``ra DEV`` - Zone 0's IPv6
router advertisement source inside the prov namespace.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("bootsvc.lab.rack")


def _routed(uri: str, route: dict[str, str]) -> str:
    from urllib.parse import urlsplit, urlunsplit

    u = urlsplit(uri if "://" in uri else f"http://{uri}")
    return urlunsplit(u._replace(netloc=route[u.netloc])) if u.netloc in route else uri


def _install_boot_host(route: dict[str, str]) -> None:
    """The BMC's fetch of a routed URL keeps the Zone 0 ``Host`` it was given: bootsvc renders the
    bf.cfg it appends with URLs on the host the request names, and the DPU must reach those."""
    back = {v: k for k, v in route.items()}

    class KeepHost(urllib.request.BaseHandler):
        handler_order = 100  # before HTTPHandler adds a Host header of its own

        def http_request(self, req: urllib.request.Request) -> urllib.request.Request:
            if req.host in back and not req.has_header("Host"):
                req.add_unredirected_header("Host", back[req.host])
            return req

    urllib.request.install_opener(urllib.request.build_opener(KeepHost()))


def _route_simple_update(app: Any, route: dict[str, str]) -> Any:
    """WSGI middleware in front of the lab's DPU BMC: a SimpleUpdate ``ImageURI`` on bootsvc's Zone 0
    address is rewritten to its loopback listener (see :func:`boot_route`) before the emulator sees it,
    so the emulator's own rule (it fetches from loopback only) holds and the fetch reaches bootsvc."""
    import io

    def mw(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") == "POST" and str(environ.get("PATH_INFO", "")).endswith(
                "UpdateService.SimpleUpdate"):
            try:
                n = int(environ.get("CONTENT_LENGTH") or 0)
            except ValueError:
                n = 0
            body = environ["wsgi.input"].read(max(0, min(n, 1 << 20)))
            try:
                doc = json.loads(body)
            except ValueError:
                doc = None
            if isinstance(doc, dict) and isinstance(doc.get("ImageURI"), str):
                new = _routed(doc["ImageURI"], route)
                if new != doc["ImageURI"]:
                    log.info("bmc: SimpleUpdate ImageURI routed to the boot plane's loopback listener %s",
                             new.split("/")[2])
                    body = json.dumps({**doc, "ImageURI": new}).encode()
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
        return app(environ, start_response)

    return mw


# ---------------------------------------------------------------------------------------------- BMC process
def _serve_bmc(spec_file: str) -> int:
    """``python -m bootsvc.lab.rackprocs bmc SPEC``: one VM's BMC on 127.0.0.1 until SIGTERM."""
    from werkzeug.serving import make_server

    from bootsvc.lab import bfbmc
    from bootsvc.lab.qemu import BootDevice, QemuPowerBackend, VmKind, VmSpec, nic_specs

    spec = json.loads(Path(spec_file).read_text())
    user = os.environ["BOOTSVC_LAB_BMC_USER"]
    password = os.environ["BOOTSVC_LAB_BMC_PASSWORD"]
    workdir = Path(spec["workdir"])
    vm = VmSpec(name=spec["name"], kind=VmKind(spec["kind"]), netns=spec["netns"],
                nics=nic_specs([tuple(n) for n in spec["nics"]]), mem_mb=spec["mem_mb"],
                disk=Path(spec["disk"]), extra_args=tuple(spec.get("extra_args") or ()))
    backend = QemuPowerBackend(vm, workdir, default_boot=BootDevice.DISK,
                               disk_kernel=Path(spec["disk_kernel"]) if spec["disk_kernel"] else None,
                               disk_initrd=Path(spec["disk_initrd"]) if spec["disk_initrd"] else None,
                               disk_append=spec["disk_append"])

    from sushy_tools.emulator import main as sushy_main
    from sushy_tools.emulator.resources.systems import fakedriver

    base = fakedriver.FakeDriver

    class QemuSystems(base):  # type: ignore[misc,valid-type]
        """sushy's fake driver for identity/NICs; power and boot device go to QEMU."""

        def get_power_state(self, identity: str) -> str:
            self._get(identity)
            return backend.get_power_state()

        def set_power_state(self, identity: str, state: str) -> None:
            self._get(identity)
            log.info("bmc %s: reset %s (next boot %s)", vm.name, state, backend.next_boot())
            backend.set_power_state(state)

        def get_boot_device(self, identity: str) -> str:
            self._get(identity)
            return backend.get_boot_device()

        def set_boot_device(self, identity: str, boot_source: str) -> None:
            self._get(identity)
            # Redfish "Once": QEMU boots the override on the next start only (QemuPowerBackend)
            backend.set_boot_device(boot_source, once=True)

    # sushy builds its systems driver from this module attribute on first use; this process serves
    # exactly one VM, so pointing it at the QEMU-backed subclass is the whole integration.
    fakedriver.FakeDriver = QemuSystems
    app: Any
    if spec["bmc"] == "bluefield":

        class QemuBfBmc(bfbmc.BfBmc):
            """The BF3 BMC emulator; at a reset its pending boot settings pick what QEMU boots."""

            def _set_power(self, reset_type: str) -> None:
                if reset_type not in ("ForceOff", "GracefulShutdown"):
                    with self.lock:
                        boot = dict(self.settings_boot)
                    target = boot.get("BootSourceOverrideTarget")
                    if boot.get("BootSourceOverrideEnabled") in ("Once", "Continuous") and target in (
                            "Pxe", "UefiHttp", "Hdd"):
                        backend.set_boot_device(target, once=True)
                super()._set_power(reset_type)

            def bfb_fetched(self, path: Path, size: int, sha256: str) -> None:
                """The BMC pushed BFB + bf.cfg into the RShim boot FIFO: stage the stream's kernel and
                initramfs (with bf.cfg) for the Arm's next start, which the emulator's ForceRestart right
                after this hook performs; the installer then reboots into its disk."""
                from bootsvc import bfb as bfb_mod
                from bootsvc.lab import bf3

                try:
                    boot = bf3.rshim_boot_files(path, workdir / "rshim")
                except (bfb_mod.BfbError, OSError) as e:
                    log.error("bmc %s: pushed image %s is not bootable: %s", vm.name, path.name, e)
                    return
                log.info("bmc %s: RShim boot of %s (%d bytes, sha256 %s, bf.cfg %d bytes) args=%r", vm.name,
                         path.name, size, sha256[:12], boot.bfcfg_bytes, boot.args)
                backend.boot_kernel_once(boot.kernel, boot.initrd, boot.args)

        app = QemuBfBmc(user=user, password=password, state_dir=str(workdir / "bmc-state"), power_state="Off")
        if spec.get("boot_route"):
            app = _route_simple_update(app, dict(spec["boot_route"]))
            _install_boot_host(dict(spec["boot_route"]))
    else:
        import bcrypt

        htpasswd = workdir / "bmc.htpasswd"
        htpasswd.write_text(f"{user}:{bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()}\n")
        sushy_main.app.configure(extra_config={
            "SUSHY_EMULATOR_FAKE_DRIVER": True,
            "SUSHY_EMULATOR_STATE_DIR": str(workdir / "bmc-state"),
            "SUSHY_EMULATOR_AUTH_FILE": str(htpasswd),
            "SUSHY_EMULATOR_FAKE_SYSTEMS": [{
                "uuid": vm.smbios_uuid, "name": spec["name"], "power_state": "Off", "external_notifier": False,
                "nics": [{"mac": m, "ip": "127.0.0.1"} for _, m in spec["nics"]]}],
        })
        app = sushy_main.app
    srv = make_server("127.0.0.1", int(spec["port"]), app, threaded=True)

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    print(f"bmc {spec['bmc']} for {vm.name} on http://127.0.0.1:{spec['port']}", flush=True)
    try:
        srv.serve_forever()
    except (SystemExit, KeyboardInterrupt):
        pass
    finally:
        backend.close()  # power the VM off: a BMC that goes away takes its machine with it
    return 0


def _serve_ra(dev: str) -> int:
    """``python -m bootsvc.lab.rackprocs ra DEV`` (inside the prov namespace): Zone 0's RA source."""
    from bootsvc.agent.ra import RaSender, parse_mac

    mac = Path(f"/sys/class/net/{dev}/address").read_text().strip()
    sender = RaSender(dev, parse_mac(mac), interval=10.0)
    sender.start()
    stop = {"now": False}

    def on_term(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    while not stop["now"]:
        time.sleep(0.5)
    sender.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if len(args) == 2 and args[0] == "bmc":
        return _serve_bmc(args[1])
    if len(args) == 2 and args[0] == "ra":
        return _serve_ra(args[1])
    print("usage: python -m bootsvc.lab.rackprocs bmc SPEC.json | ra DEV", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())

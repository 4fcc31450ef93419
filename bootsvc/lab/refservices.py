"""Reference boot services for lab self-tests and captures (owned by the lab helper).

These stand in for bootsvc so the lab machinery can be proven on its own (tests/e2e/test_lab_infra.py)
and so real firmware DHCP can be captured (capture.py): dnsmasq for DHCP/TFTP/RA (config from
:func:`dnsmasq_conf`) and :class:`LabHttp`, an in-process HTTP server bound *inside* a lab namespace
(via :func:`bootsvc.lab.netns.socket_in_netns`) that serves kernels/initrds, per-MAC iPXE scripts and
records the initramfs callbacks (``POST /cb`` JSON, see images/lab/initramfs/init).
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from bootsvc.lab.netns import socket_in_netns


def dnsmasq_conf(
    *, interfaces: list[str], ranges: list[tuple[str, str, str]], tftp_root: Path, http_url: str,
    leasefile: Path, logfile: Path, ra_prefixes: Sequence[str] = (), relay_url: str | None = None,
    relay_router: str | None = None, efi64_bootfile: str = "snponly.efi",
    arm64_bootfile: str = "arm64/grubnetaa64.efi",
) -> str:
    """dnsmasq config: DHCP (+ TFTP + RA), no DNS. ``ranges`` = (tag, start, end); tag ``relayed``
    is the range chosen by giaddr. iPXE (user-class iPXE / opt175) gets ``http_url``/boot.ipxe."""
    lines = ["port=0", "bind-interfaces", "except-interface=lo", "dhcp-authoritative", "no-ping",
             "log-dhcp", f"log-facility={logfile}", f"dhcp-leasefile={leasefile}", "pid-file=", "user=root"]
    lines += [f"interface={i}" for i in interfaces]
    lines += [f"dhcp-range=set:{tag},{a},{b},255.255.255.0,10m" for tag, a, b in ranges]
    if relay_router:
        lines.append(f"dhcp-option=tag:relayed,option:router,{relay_router}")
    for p in ra_prefixes:
        # an RA source on the segment saves iPXE ~16 s of IPv6 autoconf wait (lab.md section 4);
        # router lifetime 0: clients get a prefix but no IPv6 default route
        lines += ["enable-ra", f"dhcp-range={p},ra-only,64,10m"]
    for i in interfaces:
        lines.append(f"ra-param={i},10,0")
    lines += [
        "dhcp-userclass=set:ipxe,iPXE", "dhcp-match=set:ipxe,175",
        "dhcp-match=set:bios,option:client-arch,0", "dhcp-match=set:efi64,option:client-arch,7",
        "dhcp-match=set:efi64,option:client-arch,9", "dhcp-match=set:efiarm64,option:client-arch,11",
        "dhcp-boot=tag:!ipxe,tag:bios,undionly.kpxe", f"dhcp-boot=tag:!ipxe,tag:efi64,{efi64_bootfile}",
        f"dhcp-boot=tag:!ipxe,tag:efiarm64,{arm64_bootfile}",
        # iPXE no-pxedhcp (175.176=1): don't wait for ProxyDHCP offers (saves ~4 s per boot)
        "dhcp-option=tag:ipxe,encap:175,176,1",
        f"dhcp-boot=tag:ipxe,tag:!relayed,{http_url}/boot.ipxe",
    ]
    if relay_url:
        lines.append(f"dhcp-boot=tag:ipxe,tag:relayed,{relay_url}/boot.ipxe")
    lines += ["enable-tftp", f"tftp-root={tftp_root}"]
    return "\n".join(lines) + "\n"


@dataclass
class NodeBoot:
    """What LabHttp tells one MAC to boot (iPXE script)."""

    kernel: str = "vmlinuz"
    initrd: str = "initrd.gz"
    append: str = ""  # extra kernel args, e.g. "bootsvc.mode=dpu-install bootsvc.image=..."
    token: str = "lab-token"
    console: str = "ttyS0,115200"


@dataclass
class Event:
    t: float  # epoch
    kind: str  # "http" or "callback"
    path: str
    peer: str
    data: dict[str, Any] = field(default_factory=dict)


class LabHttp:
    """HTTP server inside namespace ``ns`` on ``addr:port``; a context manager."""

    def __init__(self, ns: str, addr: str, port: int, files: dict[str, Path],
                 nodes: dict[str, NodeBoot] | None = None,
                 script: Callable[[str, dict[str, str], str], str] | None = None) -> None:
        self.ns, self.addr, self.port = ns, addr, port
        self.files = dict(files)
        self.nodes = nodes if nodes is not None else {}
        self.script = script
        self.events: list[Event] = []
        self.cond = threading.Condition()
        self._srv: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def base(self) -> str:
        return f"http://{self.addr}:{self.port}"

    def __enter__(self) -> LabHttp:
        sock = socket_in_netns(self.ns, socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.addr, self.port))
        sock.listen(64)
        srv = ThreadingHTTPServer((self.addr, self.port), _handler(self), bind_and_activate=False)
        srv.socket.close()
        srv.socket = sock
        srv.daemon_threads = True
        self._srv = srv
        self._thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._srv is not None:
            self._srv.shutdown()
            self._srv.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def record(self, ev: Event) -> None:
        with self.cond:
            self.events.append(ev)
            self.cond.notify_all()

    def wait_event(self, pred: Callable[[Event], bool], timeout: float, since: float = 0.0) -> Event:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for e in self.events:
                    if e.t >= since and pred(e):
                        return e
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching event within {timeout} s; have "
                                       f"{[(e.kind, e.path, e.data.get('event')) for e in self.events[-10:]]}")
                self.cond.wait(timeout=min(left, 1.0))

    def wait_callback(self, mac: str, event: str, timeout: float, since: float = 0.0) -> Event:
        return self.wait_event(
            lambda e: e.kind == "callback" and e.data.get("mac") == mac and e.data.get("event") == event,
            timeout, since)

    def callbacks(self, mac: str) -> list[Event]:
        with self.cond:
            return [e for e in self.events if e.kind == "callback" and e.data.get("mac") == mac]

    def ipxe_script(self, q: dict[str, str], base: str) -> str:
        mac = q.get("mac", "")
        if self.script is not None:
            return self.script(mac, q, base)
        if not mac:  # first hop: re-chain with the identifying variables
            return ("#!ipxe\nchain " + base
                    + "/boot.ipxe?mac=${net0/mac}&arch=${buildarch}&platform=${platform}\n")
        nb = self.nodes.get(mac, NodeBoot())
        return "\n".join([
            "#!ipxe",
            f"kernel {base}/{nb.kernel} initrd=initrd.gz console={nb.console} panic=-1 "
            f"bootsvc.cb={base}/cb bootsvc.token={nb.token} {nb.append}".rstrip(),
            f"initrd --name initrd.gz {base}/{nb.initrd}",
            "boot", ""])


def _handler(owner: LabHttp) -> type[BaseHTTPRequestHandler]:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _base(self) -> str:
            me = self.connection.getsockname()[0]  # the address the client reached us on
            return f"http://{me}:{owner.port}"

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            u = urlsplit(self.path)
            q = {k: v[0] for k, v in parse_qs(u.query).items()}
            owner.record(Event(time.time(), "http", self.path, self.client_address[0]))
            if u.path == "/boot.ipxe":
                return self._send(200, owner.ipxe_script(q, self._base()).encode())
            if u.path == "/cb":
                owner.record(Event(time.time(), "callback", self.path, self.client_address[0], dict(q)))
                return self._send(200, b"ok\n")
            f = owner.files.get(u.path.lstrip("/"))
            if f is None:
                return self._send(404, b"not found\n")
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(f.stat().st_size))
            self.end_headers()
            if self.command != "HEAD":
                with f.open("rb") as fh:
                    shutil.copyfileobj(fh, self.wfile, 1 << 20)

        def do_POST(self) -> None:
            u = urlsplit(self.path)
            n = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(n) if n else b""
            owner.record(Event(time.time(), "http", self.path, self.client_address[0]))
            if u.path != "/cb":
                return self._send(404, b"not found\n")
            try:
                data = json.loads(body)
            except ValueError:
                return self._send(400, b"bad json\n")
            if not isinstance(data, dict):
                return self._send(400, b"want an object\n")
            data["authorization"] = self.headers.get("Authorization", "")
            owner.record(Event(time.time(), "callback", u.path, self.client_address[0], data))
            return self._send(200, b"ok\n")

    return H

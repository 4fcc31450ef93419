"""Packet capture inside lab namespaces and DHCP decoding (owned by the lab helper).

* :class:`Capture` runs ``dumpcap`` inside a lab namespace on one interface with a BPF filter (default
  DHCP + TFTP: ``udp port 67 or udp port 68 or udp port 69``) and stops it cleanly.
* :func:`decode_dhcp` turns a pcap into :class:`DhcpPacket` rows with tshark fields: message type,
  chaddr, opt93 (client arch, RFC 4578 section 2.1), opt60 (vendor class, RFC 2132 section 9.13), opt77
  (user class, RFC 3004), giaddr (RFC 2131 section 2), opt82 circuit/remote id (RFC 3046), opt97
  (client UUID, RFC 4578 section 2.3) and the raw BOOTP/DHCP payload (hex, from udp.payload).
* ``python -m bootsvc.lab.capture --out tests/data/dhcp/captures`` produces the reference captures of
  real clients (SeaBIOS iPXE, OVMF iPXE, OVMF native PXE, AAVMF arm64, busybox udhcpc, ISC dhclient)
  against dnsmasq in a ``blc*`` lab namespace; see the README written next to them.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from bootsvc.lab.netns import Lab

DHCP_TFTP_FILTER = "udp port 67 or udp port 68 or udp port 69"
MSG_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK", 7: "RELEASE",
             8: "INFORM"}
_FIELDS = [
    "frame.time_epoch", "ip.src", "ip.dst", "dhcp.option.dhcp", "dhcp.hw.mac_addr", "dhcp.ip.relay",
    "dhcp.option.client_system_architecture", "dhcp.option.vendor_class_id", "dhcp.option.user_class.text",
    "dhcp.option.agent_information_option.agent_circuit_id",
    "dhcp.option.agent_information_option.agent_remote_id", "dhcp.client_id.uuid", "dhcp.file",
    "dhcp.option.bootfile_name", "udp.payload",
]


class Capture:
    """``with Capture(lab, "prov", "blbr0", path): ...`` - dumpcap inside the lab namespace."""

    def __init__(self, lab: Lab, ns: str, iface: str, pcap: Path, bpf: str = DHCP_TFTP_FILTER) -> None:
        self.lab, self.ns, self.iface, self.pcap, self.bpf = lab, ns, iface, Path(pcap), bpf
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Capture:
        self.pcap.parent.mkdir(parents=True, exist_ok=True)
        self.pcap.unlink(missing_ok=True)
        self._proc = self.lab.popen(self.ns, ["dumpcap", "-q", "-i", self.iface, "-f", self.bpf,
                                              "-w", str(self.pcap)])
        # dumpcap writes the pcapng header once the interface is open: only then is nothing missed
        deadline = time.monotonic() + 10
        while not (self.pcap.exists() and self.pcap.stat().st_size > 0):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dumpcap on {self.ns}/{self.iface} did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> Path:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # dumpcap flushes and closes the file on SIGINT
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.lab.stop(self._proc)
        return self.pcap

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@dataclass(frozen=True)
class DhcpPacket:
    t: float
    src: str
    dst: str
    msg_type: int | None
    chaddr: str
    giaddr: str
    opt93: int | None
    opt60: str
    opt77: str
    opt82_circuit: bytes
    opt82_remote: bytes
    opt97_uuid: str
    file: str
    opt67: str
    options: tuple[int, ...]  # option codes in wire order
    payload: bytes  # the raw BOOTP/DHCP message (UDP payload)

    @property
    def type_name(self) -> str:
        return MSG_TYPES.get(self.msg_type or 0, "BOOTP")

    @property
    def from_client(self) -> bool:
        return self.msg_type in (1, 3, 4, 7, 8)


def _hexbytes(s: str) -> bytes:
    s = s.split(",")[0].replace(":", "")
    return bytes.fromhex(s) if s else b""


def option_codes(payload: bytes) -> tuple[int, ...]:
    """Option codes in wire order from a raw DHCP message (after the magic cookie, RFC 2131 section 3),
    ending with 255 (End); Pad (0) is skipped."""
    if len(payload) < 240 or payload[236:240] != b"\x63\x82\x53\x63":
        return ()
    codes: list[int] = []
    i = 240
    while i < len(payload):
        c = payload[i]
        if c == 0:
            i += 1
            continue
        codes.append(c)
        if c == 255 or i + 1 >= len(payload):
            break
        i += 2 + payload[i + 1]
    return tuple(codes)


def decode_dhcp(pcap: Path) -> list[DhcpPacket]:
    """All DHCP packets in ``pcap`` (tshark fields, one row each)."""
    cmd = ["tshark", "-r", str(pcap), "-Y", "dhcp", "-T", "fields", "-E", "separator=|", "-E", "occurrence=a",
           "-E", "aggregator=,"]
    for f in _FIELDS:
        cmd += ["-e", f]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    pkts = []
    for line in out.splitlines():
        r = dict(zip(_FIELDS, line.split("|"), strict=True))
        arch = r["dhcp.option.client_system_architecture"].split(",")[0]
        mt = r["dhcp.option.dhcp"].split(",")[0]
        pkts.append(DhcpPacket(
            t=float(r["frame.time_epoch"]), src=r["ip.src"], dst=r["ip.dst"],
            msg_type=int(mt) if mt else None, chaddr=r["dhcp.hw.mac_addr"].split(",")[0],
            giaddr=r["dhcp.ip.relay"], opt93=int(arch) if arch else None,
            opt60=r["dhcp.option.vendor_class_id"], opt77=r["dhcp.option.user_class.text"],
            opt82_circuit=_hexbytes(r["dhcp.option.agent_information_option.agent_circuit_id"]),
            opt82_remote=_hexbytes(r["dhcp.option.agent_information_option.agent_remote_id"]),
            opt97_uuid=r["dhcp.client_id.uuid"], file=r["dhcp.file"], opt67=r["dhcp.option.bootfile_name"],
            options=option_codes(_hexbytes(r["udp.payload"])),
            payload=_hexbytes(r["udp.payload"]),
        ))
    return pkts


def tftp_requests(pcap: Path) -> list[tuple[float, str]]:
    """(time, filename) of every TFTP read request in ``pcap``."""
    out = subprocess.run(["tshark", "-r", str(pcap), "-Y", "tftp.opcode==1", "-T", "fields", "-e",
                          "frame.time_epoch", "-e", "tftp.source_file"], capture_output=True, text=True,
                         check=True).stdout
    return [(float(a), b) for a, b in (ln.split("\t") for ln in out.splitlines() if ln.strip())]


def summary(p: DhcpPacket) -> str:
    parts = [p.type_name, p.chaddr]
    if p.opt93 is not None:
        parts.append(f"opt93={p.opt93}")
    if p.opt60:
        parts.append(f"opt60={p.opt60}")
    if p.opt77:
        parts.append(f"opt77={p.opt77}")
    if p.giaddr not in ("", "0.0.0.0"):
        parts.append(f"giaddr={p.giaddr}")
    if p.opt82_circuit:
        parts.append(f"opt82.circuit={p.opt82_circuit!r}")
    if p.opt97_uuid:
        parts.append(f"opt97={p.opt97_uuid}")
    parts.append("options=" + ",".join(str(o) for o in p.options))
    return " ".join(parts)


def write_hex(pkts: list[DhcpPacket], path: Path, header: str) -> int:
    """One file per client kind: ``#`` comment lines, then per client packet a summary comment and
    the raw DHCP payload as one hex line. Returns the number of packets written."""
    client = [p for p in pkts if p.from_client]
    lines = [f"# {h}" for h in header.splitlines()]
    for p in client:
        lines.append("# " + summary(p))
        lines.append(p.payload.hex())
    path.write_text("\n".join(lines) + "\n")
    return len(client)


# ---- the reference capture run ------------------------------------------------------------------------
FIRMWARE_KINDS = {"seabios-ipxe": "bios", "ovmf-ipxe": "uefi", "ovmf-native": "uefi-native",
                  "aavmf-arm64": "arm64"}
ALL_KINDS = [*FIRMWARE_KINDS, "udhcpc", "dhclient"]
CLI_MAC = "52:54:00:4e:00:99"  # the Linux clients' veth in the client namespace


def capture_reference(out: Path, kinds: list[str], work: Path, prefix: str = "blc") -> dict[str, int]:
    """Boot each client kind against dnsmasq in a private lab and save pcaps + hex payloads."""
    from bootsvc.lab.artifacts import build_artifacts
    from bootsvc.lab.netns import Topology
    from bootsvc.lab.qemu import Nic, Vm, VmKind, VmSpec
    from bootsvc.lab.refservices import LabHttp, dnsmasq_conf

    arts = build_artifacts()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    tftp = work / "tftp"
    shutil.copytree(arts.tftp_root, tftp)
    (tftp / "grub").mkdir()
    (tftp / "grub" / "grub.cfg").write_text(
        "linux (http,10.78.0.1:8080)/Image console=ttyAMA0 panic=-1 bootsvc.cb=http://10.78.0.1:8080/cb\n"
        "initrd (http,10.78.0.1:8080)/initrd-arm64.gz\nboot\n")
    t = Topology(prefix)
    t.netns("srv")
    t.netns("cli")
    br = t.bridge("srv", "br0", ["10.78.0.1/24", "fd00:a:4e::1/64"])
    t.tap("srv", "tap0", bridge=br)
    t.veth(("srv", "vs"), ("cli", "vc"), a_bridge=br, b_mac=CLI_MAC)
    counts: dict[str, int] = {}
    out.mkdir(parents=True, exist_ok=True)
    with Lab(t) as lab:
        conf = work / "dnsmasq.conf"
        conf.write_text(dnsmasq_conf(
            interfaces=[br], ranges=[("direct", "10.78.0.100", "10.78.0.199")], tftp_root=tftp,
            http_url="http://10.78.0.1:8080", leasefile=work / "leases", logfile=work / "dnsmasq.log",
            ra_prefixes=["fd00:a:4e::"]))
        (work / "leases").touch()
        lab.popen("srv", ["dnsmasq", "-k", "-C", str(conf)])
        files = {"vmlinuz": arts.kernel, "initrd.gz": arts.initrd, "Image": arts.kernel_arm64,
                 "initrd-arm64.gz": arts.initrd_arm64}
        with LabHttp(lab.ns("srv"), "10.78.0.1", 8080, files) as http:
            for kind in kinds:
                pcap = out / f"{kind}.pcap"
                with Capture(lab, "srv", br, pcap, "udp port 67 or udp port 68"):
                    if kind in FIRMWARE_KINDS:
                        mac = "52:54:00:4e:00:%02x" % (0x10 + list(FIRMWARE_KINDS).index(kind))
                        spec = VmSpec(name=f"cap-{kind}", kind=VmKind(FIRMWARE_KINDS[kind]), netns=lab.ns("srv"),
                                      nics=(Nic(t.dev("tap0"), mac),))
                        with Vm(spec, work, on_pid=lab.record_pid) as vm:
                            # a full boot to the initramfs callback: firmware, iPXE and udhcpc DORAs
                            http.wait_callback(mac, "done", 180)
                            vm.wait_exit(30)
                    elif kind == "udhcpc":
                        lab.exec_in("cli", ["busybox", "udhcpc", "-i", t.dev("vc"), "-n", "-q", "-t", "5",
                                            "-s", "/bin/true", "-x", "hostname:bootsvc-lab"], timeout=60)
                    elif kind == "dhclient":
                        lf, pf = work / "dhclient.leases", work / "dhclient.pid"
                        # -sf /bin/true: never run dhclient-script, which would rewrite the
                        # machine's /etc/resolv.conf (a netns shares the root filesystem)
                        base = ["dhclient", "-sf", "/bin/true", "-pf", str(pf), "-lf", str(lf)]
                        lab.exec_in("cli", [*base, "-1", "-v", t.dev("vc")], timeout=60)
                        lab.exec_in("cli", [*base, "-r", "-v", t.dev("vc")], timeout=60)
                    time.sleep(0.3)  # let the last reply reach dumpcap's ring before SIGINT
                pkts = decode_dhcp(pcap)
                if kind in FIRMWARE_KINDS:
                    # the VM ends in the initramfs' busybox udhcpc: that client has its own file
                    pkts = [p for p in pkts if not p.opt60.startswith("udhcp")]
                if kind == "udhcpc":
                    # the firmware runs above also end in busybox udhcpc (initramfs): keep only the CLI client
                    pkts = [p for p in pkts if p.chaddr == CLI_MAC]
                hdr = (f"client kind: {kind}\ncaptured: {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}"
                       f" by python -m bootsvc.lab.capture (dnsmasq in netns {lab.ns('srv')})\n"
                       "format: per client packet a '# summary' line, then the UDP payload (BOOTP/DHCP) in hex")
                counts[kind] = write_hex(pkts, out / f"{kind}.hex", hdr)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="capture real DHCP clients in a lab namespace")
    ap.add_argument("--out", type=Path, default=Path("tests/data/dhcp/captures"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/blc-work"))
    ap.add_argument("--decode", type=Path, help="just decode this pcap")
    ap.add_argument("--rehex", action="store_true", help="rewrite the .hex files from the saved pcaps")
    ap.add_argument("kinds", nargs="*", default=ALL_KINDS)
    a = ap.parse_args(argv)
    if a.decode:
        for p in decode_dhcp(a.decode):
            print(f"{p.t:.3f} {summary(p)}")
        return 0
    if a.rehex:
        for k in a.kinds:
            pcap = a.out / f"{k}.pcap"
            pk = [p for p in decode_dhcp(pcap) if not (k in FIRMWARE_KINDS and p.opt60.startswith("udhcp"))]
            if k == "udhcpc":
                pk = [p for p in pk if p.chaddr == CLI_MAC]
            old = [ln[2:] for ln in (a.out / f"{k}.hex").read_text().splitlines()[:3] if ln.startswith("# ")]
            print(k, write_hex(pk, a.out / f"{k}.hex", "\n".join(old)))
        return 0
    bad = [k for k in a.kinds if k not in ALL_KINDS]
    if bad:
        ap.error(f"unknown kinds {bad}; choose from {ALL_KINDS}")
    counts = capture_reference(a.out, a.kinds, a.work)
    for k, n in counts.items():
        print(f"{k}: {n} client packets")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


#!/usr/bin/env python3
"""NBP download time of real UEFI firmware (OVMF, EDK2's PXE client) from bootsvc vs tftpd-hpa.

Does EDK2 ask for RFC 7440 ``windowsize``, and what does bootsvc's answer to it buy? Inside a private
namespace ``bq-ovmf`` (created and deleted here): a bridge with 10.98.0.1, dnsmasq for DHCP only
(``--port=0``, boot file ``nbp.efi`` from next-server 10.98.0.1), the TFTP server under test on
10.98.0.1:69, and a QEMU VM (KVM where the lab would use it, else TCG) booting OVMF from the network with EDK2's own
PXE driver (``romfile=``: no iPXE option ROM). dumpcap records the bridge; the download time is the
RRQ that fetches the file to the client's last ACK, read from the capture (the same clock for both
servers). Servers alternate per rep; each boot is stopped once the file is through (or after
``--timeout`` s). Prints the options OVMF asked for and the median times and their ratio.

    sudo .venv/bin/python bench/tftp/ovmf.py [--reps 3] [--size-mb 4]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import CG_ROOT, sh, teardown
from bench.common import start as _start
from bootsvc.lab.qemu import detect_accel

NS = "bq-ovmf"
REPO = Path(__file__).resolve().parents[2]
CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
SERVER_IP = "10.98.0.1"


def download_of(pcap: Path, size: int) -> tuple[float, dict[str, str], list[dict[str, str]]] | None:
    """(seconds, options of the fetching RRQ, options of every RRQ) of the last complete download of a
    ``size``-byte file in ``pcap``, or None while there is none. Decoded with scapy, not bootsvc."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.tftp import TFTP
    from scapy.utils import rdpcap

    try:
        pkts = rdpcap(str(pcap))
    except Exception:
        return None
    rrqs: list[tuple[float, int, dict[str, str]]] = []
    for p in pkts:
        if UDP in p and p[UDP].dport == 69 and IP in p and p[IP].src != SERVER_IP:
            raw = bytes(p[UDP].payload)
            if raw[:2] == b"\x00\x01":
                t = TFTP(raw)
                opts = {o.oname.decode().lower(): o.value.decode() for o in getattr(t, "options", [])} if hasattr(
                    t, "options") else {}
                rrqs.append((float(p.time), p[UDP].sport, opts))
    for t0, cport, opts in reversed(rrqs):
        # done = the client ACKed the last block (a packet still being written may look short: the
        # block number, not a short payload, says which is last)
        last_block = (size // int(opts.get("blksize", 512)) + 1) & 0xFFFF
        for p in pkts:
            if UDP not in p or float(p.time) < t0:
                continue
            raw = bytes(p[UDP].payload)
            if p[UDP].sport == cport and raw[:2] == b"\x00\x04" and len(raw) >= 4 and (
                    int.from_bytes(raw[2:4], "big") == last_block):
                return float(p.time) - t0, opts, [o for _, _, o in rrqs]
    return None


def boot_once(server: str, work: Path, root: Path, timeout: float, kvm: bool) -> tuple[float, dict[str, str],
                                                                                       list[dict[str, str]]]:
    cg = CG_ROOT / f"bq-ovmf-{server}"
    procs: list[subprocess.Popen[bytes]] = []
    pcap = work / f"{server}-{time.monotonic_ns()}.pcap"
    try:
        if server == "tftpd-hpa":
            procs.append(_start(NS, ["/usr/sbin/in.tftpd", "-L", "-s", "-a", f"{SERVER_IP}:69", str(root)], cg))
        else:
            cfg = work / "bootsvc.yaml"
            cfg.write_text(f"database: {{url: 'sqlite:///{work}/db.sqlite'}}\nstate_dir: {work}/state\n"
                           f"images: {{catalog: {work}/none.yaml}}\nboot: {{tftp_root: {root}}}\n"
                           f"security: {{node_key_ref: 'file:{work}/key'}}\n"
                           f"listeners:\n  http: []\n  tftp: [{{address: {SERVER_IP}, port: 69}}]\n")
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            procs.append(_start(NS, [sys.executable, "-m", "bootsvc", "--config", str(cfg), "run-service", "tftp"], cg,
                                env=env, log=work / "bootsvc.log"))
        procs.append(_start(NS, ["dumpcap", "-q", "-P", "-i", "br0", "-f", "udp", "-w", str(pcap)], cg))
        time.sleep(1.5)  # servers bound, capture running
        vars_copy = work / "vars.fd"
        shutil.copyfile(VARS, vars_copy)
        qemu = ["qemu-system-x86_64", "-machine", "q35,accel=" + ("kvm" if kvm else "tcg"), "-m", "512",
                "-display", "none", "-serial", "null", "-monitor", "none", "-no-reboot",
                "-drive", f"if=pflash,format=raw,readonly=on,file={CODE}",
                "-drive", f"if=pflash,format=raw,file={vars_copy}",
                "-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no",
                "-device", "virtio-net-pci,netdev=n0,romfile=,mac=52:54:00:98:00:10", "-boot", "n"]
        procs.append(_start(NS, qemu, cg, log=work / "qemu.log"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(1.0)
            got = download_of(pcap, (root / "nbp.efi").stat().st_size)
            if got is not None:
                return got
        logs = "\n".join(f"--- {f.name}\n" + f.read_text(errors="replace")[-1500:]
                          for f in (work / "bootsvc.log", work / "qemu.log") if f.exists())
        raise SystemExit(f"{server}: no complete download within {timeout:.0f} s\n{logs}")
    finally:
        teardown(NS + "-none", procs, (cg,), grace=3)  # the namespace stays for the next boot


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mb", type=float, default=4.0, help="size of the NBP file OVMF downloads")
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per boot")
    ap.add_argument("--order", default="tftpd-hpa,bootsvc", help="servers, in the order each rep runs them")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespace, tap, KVM)")
    kvm = detect_accel() == "kvm"  # KVM only with real VT-x/AMD-V (docs/lab.md); TCG otherwise
    work = Path(tempfile.mkdtemp(prefix="bootsvc-bench-ovmf-"))
    root = work / "root"
    root.mkdir()
    (root / "nbp.efi").write_bytes(os.urandom(int(a.size_mb * (1 << 20))))
    os.chmod(work, 0o755)
    sh("ip", "netns", "del", NS, check=False)
    sh("ip", "netns", "add", NS)
    dns: list[subprocess.Popen[bytes]] = []
    try:
        for cmd in (["link", "set", "lo", "up"], ["link", "add", "br0", "type", "bridge"],
                    ["addr", "add", f"{SERVER_IP}/24", "dev", "br0"], ["link", "set", "br0", "up"],
                    ["tuntap", "add", "tap0", "mode", "tap"], ["link", "set", "tap0", "master", "br0"],
                    ["link", "set", "tap0", "up"]):
            sh("ip", "-n", NS, *cmd)
        dns.append(_start(NS, ["dnsmasq", "--no-daemon", "--port=0", "--interface=br0", "--bind-interfaces",
                               "--dhcp-range=10.98.0.50,10.98.0.60,2m", f"--dhcp-boot=nbp.efi,,{SERVER_IP}",
                               "--no-resolv", "--no-hosts", "--leasefile-ro", "--log-dhcp"],
                          CG_ROOT / "bq-ovmf-dnsmasq", log=work / "dnsmasq.log"))
        times: dict[str, list[float]] = {s: [] for s in a.order.split(",")}
        asked: list[dict[str, str]] = []
        t_all = time.monotonic()
        for _ in range(a.reps):
            for server in times:
                secs, opts, every = boot_once(server, work, root, a.timeout, kvm)
                times[server].append(secs)
                asked = every
                print(f"{server}: {a.size_mb:g} MiB in {secs:.3f} s, options {opts}", flush=True)
        med = {s: statistics.median(v) for s, v in times.items()}
        print(f"\nOVMF ({'KVM' if kvm else 'TCG'}, {CODE.name}) NBP download of {a.size_mb:g} MiB, median of "
              f"{a.reps} ({time.monotonic() - t_all:.0f} s)")
        print(f"RRQ options OVMF sent (per request): {asked}")
        print("| server | median s | per rep s |\n|---|---|---|")
        for s, v in times.items():
            print(f"| {s} | {med[s]:.3f} | {', '.join(f'{x:.3f}' for x in v)} |")
        print(f"\nNBP download time tftpd-hpa / bootsvc: **{med['tftpd-hpa'] / med['bootsvc']:.2f}x** "
              "(> 1: bootsvc faster)")
        return 0
    finally:
        teardown(NS, dns, (CG_ROOT / "bq-ovmf-dnsmasq",), grace=3)
        sh("ip", "netns", "del", NS, check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

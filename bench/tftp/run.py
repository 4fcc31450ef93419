#!/usr/bin/env python3
"""TFTP benchmark: bootsvc's TFTP vs tftpd-hpa, N concurrent curl downloads, one run prints the ratios.

Everything runs inside a private network namespace ``bq-tftp`` (loopback only; created and deleted
here), so no port on the machine is touched. Matrix: files 64 KiB and 1 MiB x blksize 512 and 1468 x
1, 20, 100 concurrent clients; each cell ``--reps`` times per server, servers alternated, median wall.
Server CPU = utime+stime of the server's process group (children included, reaped ones too).

    sudo .venv/bin/python bench/tftp/run.py [--reps 3] [--workers N] [--json out.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import CG_ROOT, cg_cpu, in_cgroup, sh, summary, teardown
from bench.common import in_ns as _in_ns
from bench.common import start as _start

NS = "bq-tftp"
HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent


def ns(*a: str) -> list[str]:
    return _in_ns(NS, *a)


def start(cmd: list[str], cg: Path, env: dict[str, str] | None = None,
          log: Path | None = None) -> subprocess.Popen[bytes]:
    return _start(NS, cmd, cg, env=env, log=log)


def wait_ready(port: int, name: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = subprocess.run(ns("curl", "-s", "--max-time", "2", "-o", "/dev/null", "-w", "%{size_download}",
                              f"tftp://127.0.0.1:{port}/{name}"), capture_output=True, text=True)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise SystemExit(f"server on {port} did not come up")


CLIENT_CG = CG_ROOT / "bq-tftp-clients"


def clients(port: int, name: str, blk: int, n: int, size: int) -> tuple[float, int]:
    # the clients run in their own cgroup too: their CPU shows whether the box (2 cores shared by
    # server and 100 curl processes) or the server's latency sets the wall time
    loop = ('for i in $(seq "$1"); do curl -s --max-time 120 -o /dev/null -w "%{size_download}\\n" '
            '--tftp-blksize "$2" "$3" & done; wait')
    cmd = in_cgroup(CLIENT_CG, *ns("sh", "-c", loop, "sh", str(n), str(blk), f"tftp://127.0.0.1:{port}/{name}"))
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300).stdout.split()
    wall = time.monotonic() - t0
    bad = n - sum(1 for x in out if x.isdigit() and int(x) == size)
    return wall, bad


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="bootsvc TFTP worker processes")
    ap.add_argument("--nice", type=int, default=0, help="BOOTSVC_TFTP_NICE for the bootsvc workers")
    ap.add_argument("--json", help="append per-run records here")
    ap.add_argument("--clients", default="1,20,100")
    ap.add_argument("--files", default="64k,1m", help="subset of 64k,1m")
    ap.add_argument("--blksizes", default="512,1468")
    ap.add_argument("--code", default=str(REPO), help="source tree to run bootsvc from (compare revisions)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespace)")
    work = Path(tempfile.mkdtemp(prefix="bootsvc-bench-tftp-"))
    root = work / "root"
    root.mkdir()
    files = {f"{k}.bin": v for k, v in {"64k": 64 << 10, "1m": 1 << 20}.items() if k in a.files.split(",")}
    for name, size in files.items():
        (root / name).write_bytes(os.urandom(size))
    os.chmod(work, 0o755)
    cfg = work / "bootsvc.yaml"
    cfg.write_text(f"database: {{url: 'sqlite:///{work}/db.sqlite'}}\nstate_dir: {work}/state\n"
                   f"images: {{catalog: {work}/none.yaml}}\nboot: {{tftp_root: {root}}}\n"
                   f"security: {{node_key_ref: 'file:{work}/key'}}\n"
                   # every curl comes from 127.0.0.1: lift the per-address cap (bootsvc/tftp/service.py)
                   "tftp: {max_per_client: 10000}\n"
                   "listeners:\n  http: []\n  tftp: [{address: 127.0.0.1, port: 1069}]\n")
    sh("ip", "netns", "del", NS, check=False)
    sh("ip", "netns", "add", NS)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        # tftpd-hpa resolves its bind address with AI_ADDRCONFIG, which ignores loopback: without one
        # non-loopback IPv4 address in the namespace it exits (EX_NOINPUT). A veth pair (both ends in
        # the namespace) provides one.
        sh("ip", "-n", NS, "link", "add", "bqd0", "type", "veth", "peer", "name", "bqd1")
        sh("ip", "-n", NS, "addr", "add", "198.18.255.1/32", "dev", "bqd0")
        sh("ip", "-n", NS, "link", "set", "bqd0", "up")
        CLIENT_CG.mkdir(exist_ok=True)
        env = {**os.environ, "BOOTSVC_TFTP_WORKERS": str(a.workers), "PYTHONPATH": a.code,
               "BOOTSVC_TFTP_NICE": str(a.nice)}
        # bootsvc's root assembly would add the iPXE files: harmless; the bench files are what we fetch
        cgs = {"tftpd-hpa": CG_ROOT / "bq-tftp-hpa", "bootsvc": CG_ROOT / "bq-tftp-bootsvc"}
        hpa = start(["/usr/sbin/in.tftpd", "-L", "-s", "-a", "127.0.0.1:69", str(root)], cgs["tftpd-hpa"])
        bsv = start([sys.executable, "-m", "bootsvc", "--config", str(cfg), "run-service", "tftp"], cgs["bootsvc"],
                    env=env, log=work / "bootsvc.log")
        procs = [hpa, bsv]
        servers = {"tftpd-hpa": (hpa, 69), "bootsvc": (bsv, 1069)}
        for _, port in servers.values():
            wait_ready(port, next(iter(files)))
        rows = []
        loads: list[float] = []
        t_all = time.monotonic()
        for name, size in files.items():
            for blk in (int(x) for x in a.blksizes.split(",")):
                for n in (int(x) for x in a.clients.split(",")):
                    res: dict[str, dict[str, list[float]]] = {s: {"wall": [], "cpu": [], "bad": [], "ccpu": []}
                                                              for s in servers}
                    for _ in range(a.reps):
                        for sname, (_p, port) in servers.items():
                            loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
                            c0, cc0 = cg_cpu(cgs[sname]), cg_cpu(CLIENT_CG)
                            wall, bad = clients(port, name, blk, n, size)
                            time.sleep(0.05)
                            c1, cc1 = cg_cpu(cgs[sname]), cg_cpu(CLIENT_CG)
                            res[sname]["wall"].append(wall)
                            res[sname]["cpu"].append(c1 - c0)
                            res[sname]["ccpu"].append(cc1 - cc0)
                            res[sname]["bad"].append(bad)
                            if a.json:
                                with open(a.json, "a") as f:
                                    f.write(json.dumps({"server": sname, "file": name, "blksize": blk, "clients": n,
                                                        "wall_s": round(wall, 4), "cpu_s": round(c1 - c0, 3),
                                                        "failed": bad}) + "\n")
                    med = {s: statistics.median(v["wall"]) for s, v in res.items()}
                    cpu = {s: statistics.median(v["cpu"]) for s, v in res.items()}
                    ccpu = {s: statistics.median(v["ccpu"]) for s, v in res.items()}
                    # per-rep ratios (servers alternate, so rep i of each ran under similar load): the spread
                    ratios = sorted(h / b for h, b in zip(res["tftpd-hpa"]["wall"], res["bootsvc"]["wall"],
                                                         strict=True))
                    rows.append((name, blk, n, med["tftpd-hpa"], med["bootsvc"], n * size / med["tftpd-hpa"] / 1e6,
                                 n * size / med["bootsvc"] / 1e6, cpu["tftpd-hpa"], cpu["bootsvc"],
                                 int(sum(res["tftpd-hpa"]["bad"])), int(sum(res["bootsvc"]["bad"])),
                                 ccpu["tftpd-hpa"], ccpu["bootsvc"], ratios[0], ratios[-1]))
        print(f"\nTFTP: bootsvc ({a.workers} workers, nice -{a.nice}) vs tftpd-hpa, median of {a.reps}, curl clients, "
              "netns loopback"
              f" ({time.monotonic() - t_all:.0f} s)")
        print(f"1-min load before each run: {min(loads):.1f}-{max(loads):.1f}")
        print("| file | blksize | clients | hpa wall s | bootsvc wall s | hpa MB/s | bootsvc MB/s | "
              "throughput bootsvc/hpa [per-rep min-max] | hpa CPU s | bootsvc CPU s | client CPU s (hpa/bootsvc) | "
              "failed hpa/bootsvc |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.1f} | {r[6]:.1f} | "
                  f"**{r[3] / r[4]:.2f}x** [{r[13]:.2f}-{r[14]:.2f}] | {r[7]:.2f} | {r[8]:.2f} | "
                  f"{r[11]:.2f}/{r[12]:.2f} | {r[9]}/{r[10]} |")
        big100 = [r for r in rows if r[2] == max(int(x) for x in a.clients.split(","))]
        print("\nAggregate throughput ratio at the largest client count (target >= 1.0x): "
              + ", ".join(f"{r[0]}@{r[1]}: {r[3] / r[4]:.2f}x" for r in big100))
        summary({"tftp": [{"file": r[0], "blksize": r[1], "clients": r[2], "hpa_wall_s": r[3],
                           "bootsvc_wall_s": r[4], "ratio": round(r[3] / r[4], 3),
                           "ratio_min": round(r[13], 3), "ratio_max": round(r[14], 3),
                           "failed_hpa": r[9], "failed_bootsvc": r[10]} for r in rows]})
        return 0
    finally:
        teardown(NS, procs, (CG_ROOT / "bq-tftp-hpa", CG_ROOT / "bq-tftp-bootsvc", CLIENT_CG), grace=5)
        blog = work / "bootsvc.log"
        if blog.exists():
            for line in blog.read_text(errors="replace").splitlines():
                if "stopped:" in line or "ERROR" in line or "Traceback" in line:
                    print("bootsvc:", line.split(" ", 3)[-1])
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

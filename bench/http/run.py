#!/usr/bin/env python3
"""HTTP benchmark: bootsvc's HTTP (`bootsvc run-service http`, gunicorn and/or granian + Flask) vs nginx (sendfile).

Image downloads (a catalog image of ``--size-mb``; 1 and 16 concurrent curl to /dev/null) and iPXE
script requests (wrk -t2 -c64 -d``--seconds``: bootsvc's real /boot/ipxe?mac= for an enrolled DPU
that is installing - the heaviest script - vs nginx's ``return 200`` of a same-sized script). All
inside a private namespace ``bq-http`` on loopback; server CPU from a cpuacct cgroup per server.

    sudo .venv/bin/python bench/http/run.py [--reps 3] [--size-mb 256] [--seconds 10]
        [--servers gunicorn:2x8,granian:2x8]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from bench.common import CG_ROOT, cg_cpu, sh, summary, teardown
from bench.common import in_ns as _in_ns
from bench.common import start as _start

NS = "bq-http"
REPO = Path(__file__).resolve().parents[2]
MAC = "52:54:00:be:00:01"
B_PORT, N_PORT = 18500, 18501

# What nginx returns for /boot.ipxe: bootsvc's DPU install script shape (~same size), with nginx variables.
_T = "0123456789abcdef" * 4
NGINX_SCRIPT = "\n".join([
    "#!ipxe",
    "# bootsvc: $arg_mac (dpu, dpu_booting) -> dpu-install",
    "echo bootsvc: $arg_mac dpu-install",
    "kernel http://$host/images/bench/1/vmlinuz initrd=initrd console=ttyS0,115200 bfnet=oob_net0:dhcp "
    f"bfks=http://$host/boot/bfks/n?token={_T} bootsvc.mode=dpu-install bootsvc.cb=http://$host/boot/callback/n "
    f"bootsvc.token={_T} bootsvc.image=http://$host/images/bench/1/big.bin bootsvc.sha256={_T} || goto failed",
    "initrd --name initrd http://$host/images/bench/1/initrd.gz || goto failed",
    "boot || goto failed",
    ":failed",
    "sleep 15",
    "chain --autofree --replace http://$host/boot/ipxe?mac=$arg_mac || goto failed",
    "",
]).replace("\n", "\\n")  # nginx string escapes

NGINX_CONF = """worker_processes 2;
daemon off;
pid @W@/nginx.pid;
error_log @W@/nginx-error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    default_type application/octet-stream;
    client_body_temp_path @W@/tmp; proxy_temp_path @W@/tmp; fastcgi_temp_path @W@/tmp;
    uwsgi_temp_path @W@/tmp; scgi_temp_path @W@/tmp;
    geo $dollar { default "$"; }
    server {
        listen 127.0.0.1:@PORT@;
        root @W@/www;
        location = /boot.ipxe {
            default_type text/plain;
            return 200 "@SCRIPT@";
        }
    }
}
"""


def ns(*a: str) -> list[str]:
    return _in_ns(NS, *a)


def start(cmd: list[str], cg: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
          log: Path | None = None) -> subprocess.Popen[bytes]:
    return _start(NS, cmd, cg, env=env, cwd=cwd, log=log)


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(ns("curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", url),
                           capture_output=True, text=True)
        if r.stdout == "200":
            return
        time.sleep(0.2)
    raise SystemExit(f"{url} not up")


def big(url: str, n: int, size: int) -> tuple[float, int]:
    cmd = ns("sh", "-c", 'for i in $(seq "$1"); do curl -s --max-time 300 -o /dev/null -w "%{size_download}\\n" '
             '"$2" & done; wait', "sh", str(n), url)
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stdout.split()
    wall = time.monotonic() - t0
    return wall, n - sum(1 for x in out if x.isdigit() and int(x) == size)


def wrk(url: str, seconds: int) -> dict[str, float]:
    out = subprocess.run(ns("timeout", str(seconds + 30), "wrk", "-t2", "-c64", f"-d{seconds}s", "--latency", url),
                         capture_output=True, text=True).stdout

    def lat(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        if not m:
            return float("nan")
        v, u = float(m.group(1)), m.group(2)
        return v / 1000 if u == "us" else v * 1000 if u == "s" else v

    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n2 = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {"rps": float(m.group(1)) if m else 0.0, "p50": lat("50"), "p99": lat("99"),
            "errors": (int(n2.group(1)) if n2 else 0) + (sum(int(x) for x in se.groups()) if se else 0)}


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def parse_variant(v: str) -> tuple[str, str, int, int, str]:
    """SERVER:WORKERSxTHREADS[:ENV=VALUE] (one extra environment variable, e.g. BOOTSVC_HTTP_FILE_CHUNK=262144)."""
    server, _, rest = v.partition(":")
    shape, _, extra = rest.partition(":")
    w, _, t = (shape or "2x8").partition("x")
    return f"{server} {w}x{t}{' ' + extra if extra else ''}", server, int(w), int(t), extra


def setup_bootsvc(work: Path, size: int) -> Path:
    sys.path.insert(0, str(REPO))
    import yaml

    from bootsvc import images as im
    from bootsvc import inventory, lifecycle
    from bootsvc.db import make_engine, session_factory
    from bootsvc.models import Base

    (work / "img").mkdir()
    for n, b in (("vmlinuz", b"k" * 4096), ("initrd.gz", b"i" * 4096)):
        (work / "img" / n).write_bytes(b)
    shutil.copyfile(work / "www" / "big.bin", work / "img" / "big.bin")
    img = im.make_image("bench", "1", "bfb", {"kernel": work / "img/vmlinuz", "initrd": work / "img/initrd.gz",
                                             "image": work / "img/big.bin"}, args="console=ttyS0,115200")
    cat = im.Catalog((img,), {"dpu": "bench"})
    (work / "catalog.yaml").write_text(yaml.safe_dump(im.dump_catalog(cat, work)))
    cfg = {"database": {"url": f"sqlite:///{work}/db.sqlite"}, "state_dir": str(work / "state"),
           "images": {"catalog": str(work / "catalog.yaml")},
           # the bench's clients all come from 127.0.0.1, which holds no lease: boot-plane identity
           # (docs/security.md) and the MAC-sweep limit would turn the measured script into "hold"
           "security": {"node_key_ref": f"file:{work}/node.key", "boot_bind_address": False,
                        "boot_sweep_rate": 1e9, "boot_sweep_burst": 1_000_000_000},
           "listeners": {"http": [{"address": "127.0.0.1", "port": B_PORT}]}}
    p = work / "bootsvc.yaml"
    p.write_text(yaml.safe_dump(cfg))
    engine = make_engine(cfg["database"]["url"])  # type: ignore[index]
    Base.metadata.create_all(engine)
    with session_factory(engine)() as s:
        (n,) = inventory.enroll(s, [inventory.NodeSpec("bench-dpu", "dpu", "SN-B",
                                                       nics=[inventory.NicSpec(MAC, "oob")])], actor="bench")
        lifecycle.apply(s, n, "provision", actor="bench")
    engine.dispose()
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--size-mb", type=int, default=256)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--servers", default="gunicorn:2x8,granian:2x8",
                    help="bootsvc variants to run side by side: SERVER:WORKERSxTHREADS,... (gunicorn|granian)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root (network namespace)")
    work = Path(tempfile.mkdtemp(prefix="bootsvc-bench-http-"))
    os.chmod(work, 0o755)
    (work / "www").mkdir()
    (work / "tmp").mkdir()
    size = a.size_mb << 20
    with (work / "www" / "big.bin").open("wb") as f:
        chunk = os.urandom(1 << 20)
        for _ in range(a.size_mb):
            f.write(chunk)
    cfgp = setup_bootsvc(work, size)
    (work / "nginx.conf").write_text(NGINX_CONF.replace("@W@", str(work)).replace("@PORT@", str(N_PORT))
                                     .replace("@SCRIPT@", NGINX_SCRIPT))
    variants = [parse_variant(v) for v in a.servers.split(",")]
    sh("ip", "netns", "del", NS, check=False)
    sh("ip", "netns", "add", NS)
    cgs = {"nginx": CG_ROOT / "bq-http-nginx"}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        procs.append(start(["/usr/sbin/nginx", "-c", str(work / "nginx.conf"), "-p", str(work)], cgs["nginx"]))
        urls = {"nginx": (f"http://127.0.0.1:{N_PORT}/big.bin", f"http://127.0.0.1:{N_PORT}/boot.ipxe?mac={MAC}")}
        for i, (label, server, workers, threads, extra) in enumerate(variants):
            port = B_PORT + 10 + i
            vcfg = work / f"bootsvc-{i}.yaml"
            vcfg.write_text(cfgp.read_text().replace(f"port: {B_PORT}", f"port: {port}"))
            env = {**os.environ, "PYTHONPATH": str(REPO), "BOOTSVC_HTTP_SERVER": server,
                   "BOOTSVC_HTTP_WORKERS": str(workers), "BOOTSVC_HTTP_THREADS": str(threads)}
            if extra:
                env[extra.partition("=")[0]] = extra.partition("=")[2]
            cgs[label] = CG_ROOT / f"bq-http-b{i}"
            procs.append(start([sys.executable, "-m", "bootsvc", "--config", str(vcfg), "run-service", "http"],
                               cgs[label], env=env, cwd=work, log=work / f"bootsvc-{i}.log"))
            urls[label] = (f"http://127.0.0.1:{port}/images/bench/1/big.bin",
                           f"http://127.0.0.1:{port}/boot/ipxe?mac={MAC}")
        for _, small in urls.values():
            wait_http(small)
        nx = subprocess.run(ns("curl", "-s", urls["nginx"][1]), capture_output=True, text=True).stdout
        for label, *_ in variants:
            b = subprocess.run(ns("curl", "-s", urls[label][1]), capture_output=True, text=True).stdout
            assert "bootsvc.mode=dpu-install" in b, b
        print(f"script sizes: bootsvc {len(b)} B, nginx {len(nx)} B; load before: {loadavg()}")
        res: dict[str, dict[str, list[float]]] = {s_: {} for s_ in urls}
        loads: list[float] = []
        t_all = time.monotonic()
        if a.size_mb > 0:
            for _ in range(a.reps):
                for s_, (bigurl, _) in urls.items():
                    for n in (1, 16):
                        c0 = cg_cpu(cgs[s_])
                        wall, bad = big(bigurl, n, size)
                        c1 = cg_cpu(cgs[s_])
                        res[s_].setdefault(f"big{n}_mbps", []).append(n * size / wall / 1e6)
                        res[s_].setdefault(f"big{n}_cpu_per_gib", []).append((c1 - c0) / (n * size / 2**30))
                        res[s_].setdefault(f"big{n}_failed", []).append(bad)
        for _, small in urls.values():
            subprocess.run(ns("wrk", "-t1", "-c4", "-d1s", small), capture_output=True)  # warm-up
        for _ in range(a.reps):
            for s_, (_, small) in urls.items():
                loads.append(float(loadavg().split()[0]))
                c0 = cg_cpu(cgs[s_])
                r = wrk(small, a.seconds)
                c1 = cg_cpu(cgs[s_])
                for k, v in r.items():
                    res[s_].setdefault(f"small_{k}", []).append(v)
                res[s_].setdefault("small_cpu_us", []).append((c1 - c0) / max(1.0, r["rps"] * a.seconds) * 1e6)
        med = {s_: {k: statistics.median(v) for k, v in d.items()} for s_, d in res.items()}
        spread = {s_: {k: (min(v), max(v)) for k, v in d.items()} for s_, d in res.items()}
        n_ = med["nginx"]
        print(f"\nHTTP: bootsvc vs nginx (2 workers, sendfile), median [min-max] of {a.reps}, netns loopback, "
              f"{a.size_mb} MiB image, wrk -t2 -c64 -d{a.seconds}s ({time.monotonic() - t_all:.0f} s); "
              f"1-min load before each wrk run: {min(loads):.1f}-{max(loads):.1f}, after: {loadavg()}")
        labels = [v[0] for v in variants]
        print("| metric | nginx | " + " | ".join(f"{lb} | {lb}/nginx" for lb in labels) + " |")
        print("|---|---|" + "---|---|" * len(labels))
        for k, label in (("big1_mbps", "1x image download MB/s"), ("big16_mbps", "16x image download aggregate MB/s"),
                         ("big16_cpu_per_gib", "server CPU s per GiB (16x)"), ("small_rps", "script req/s (wrk c64)"),
                         ("small_p50", "script p50 ms"), ("small_p99", "script p99 ms"),
                         ("small_cpu_us", "server CPU us/request"), ("small_errors", "wrk errors/non-2xx"),
                         ("big1_failed", "failed downloads (1x)"), ("big16_failed", "failed downloads (16x)")):
            if k not in n_:
                continue
            nv = n_[k]
            cells = []
            for lb in labels:
                bv = med[lb].get(k, float("nan"))
                lo, hi = spread[lb].get(k, (bv, bv))
                cells.append(f"{bv:.2f} [{lo:.2f}-{hi:.2f}] | " + (f"{bv / nv:.2f}x" if nv else "-"))
            nlo, nhi = spread["nginx"][k]
            print(f"| {label} | {nv:.2f} [{nlo:.2f}-{nhi:.2f}] | " + " | ".join(cells) + " |")
        for lb in labels:
            b_ = med[lb]
            img = (f"1x {b_['big1_mbps'] / n_['big1_mbps']:.2f}x, 16x {b_['big16_mbps'] / n_['big16_mbps']:.2f}x"
                   if "big1_mbps" in n_ else "not measured")
            print(f"targets [{lb}]: image throughput >= 0.9x nginx: {img}; script >= 5000 req/s: "
                  f"{b_['small_rps']:.0f} ({b_['small_rps'] / n_['small_rps']:.3f}x nginx); "
                  f"p99 < 50 ms: {b_['small_p99']:.1f} ms; CPU {b_['small_cpu_us']:.0f} us/request")
        summary({"http": {"median": med, "spread": spread}})
        return 0
    finally:
        teardown(NS, procs, cgs.values())
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""``make bench``: the three peer benchmarks in one go, then every speed target of issues #3 and #4 with
the ratio this run measured.

* bench/dhcp: bootsvc vs Kea (memfile, persist) vs dnsmasq, and on PostgreSQL bootsvc with 1 and 2
  instances vs Kea 2.2's PostgreSQL lease backend, perfdhcp in relay mode (~6-10 min);
* bench/tftp: bootsvc vs tftpd-hpa, 1/20/100 curl clients, 64 KiB and 1 MiB, blksize 512 and 1468 (~1-2 min);
* bench/http: bootsvc (gunicorn, the default; granian, opt-in) vs nginx, image downloads and iPXE scripts
  (~2 min);
* bench/storm: the site power-on storm, 1k/3k/10k DPU + host pairs through the real services against
  simulated BMCs/firmware/agents (bench/storm/README.md; up to ~1 h on 2 cores; --quick: 200 pairs).
* multi (bench/storm/multi.py): 3 instances on one PostgreSQL, one killed with SIGKILL mid-storm, then
  PostgreSQL restarted mid-storm: every pair deployed, 0 ACKed leases lost, 0 doubled (1000 pairs each;
  --quick: 200).

Each runs in namespaces of its own, one after the other (they would steal each other's CPU on a small
box), bounded by its own budget and by a hard timeout here; the peer is measured in the same run, so
read the ratios, not the absolute numbers. Needs root and the Debian packages ``make test`` installs.

    sudo .venv/bin/python -m bench.run [--only dhcp,tftp,http] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 900  # per bench; each also bounds itself
TIMEOUTS = {"storm": 4 * 3600, "multi": 3600}  # storms: each run bounded by its own --timeout


def benches(quick: bool) -> dict[str, list[str]]:
    return {
        # SQLite/memfile servers and the PostgreSQL ones (bootsvc 1 and 2 instances, Kea 2.2 single- and
        # multi-threaded) in one run, so every ratio compares servers measured side by side
        "dhcp": ["dhcp/run.py", "--servers", "bootsvc,kea,dnsmasq,bootsvc-pg,bootsvc-pg2,kea-pg,kea-pg-mt",
                 "--cpu-rounds", "2" if quick else "3", "--steps", "3" if quick else "5",
                 "--budget", "300" if quick else "600"],
        "tftp": ["tftp/run.py", "--reps", "1" if quick else "3"]
                + (["--files", "1m", "--clients", "100"] if quick else []),
        "http": ["http/run.py", "--reps", "1" if quick else "3", "--seconds", "3" if quick else "5",
                 "--size-mb", "64" if quick else "256"],
        # --bracket: the first size again after the last, so the verdict shows the box's drift (storm/README.md)
        "storm": ["storm/sweep.py", "--sizes", "200" if quick else "1000,3000,10000",
                  *([] if quick else ["--bracket"])],
        "multi": ["storm/multi.py", "--pairs", "200" if quick else "1000"],
    }


def run_one(name: str, argv: list[str]) -> dict[str, Any] | None:
    """Run one bench, echoing its output as it comes; its ``SUMMARY {json}`` line, or None."""
    print(f"\n===== bench/{name}: {' '.join(argv)}", flush=True)
    found: dict[str, Any] | None = None
    with subprocess.Popen([sys.executable, str(HERE / argv[0]), *argv[1:]], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as p:
        # a timer, not a check per output line: a bench stuck without printing is stopped too (SIGINT
        # first, so its own teardown removes its namespaces and servers; SIGKILL if that hangs as well)
        timed_out = threading.Event()

        def interrupt() -> None:
            timed_out.set()
            p.send_signal(signal.SIGINT)

        limit = TIMEOUTS.get(name, TIMEOUT_S)
        stop = threading.Timer(limit, interrupt)
        kill = threading.Timer(limit + 60, p.kill)
        for t in (stop, kill):
            t.daemon = True
            t.start()
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("SUMMARY "):
                found = json.loads(line[len("SUMMARY "):])
            else:
                print(line, end="", flush=True)
        rc = p.wait()
        for t in (stop, kill):
            t.cancel()
    if rc != 0:
        print(f"bench/{name}: exited with {rc}" + (f" (stopped after {limit} s)" if timed_out.is_set() else ""),
              flush=True)
    return found


def _row(what: str, value: float | None, target: str, ok: bool | None, detail: str) -> str:
    v = f"{value:.2f}x" if value is not None else "-"
    verdict = "n/a" if ok is None else ("met" if ok else "NOT met")
    return f"| {what} | {v} | {target} | {verdict} | {detail} |"


def targets(res: dict[str, dict[str, Any] | None]) -> list[str]:
    rows: list[str] = []
    d = res.get("dhcp")
    if d:
        b, k = d.get("bootsvc", {}), d.get("kea", {})
        bm, km, bc, kc = b.get("max_dora_per_s"), k.get("max_dora_per_s"), b.get("cpu_us_per_dora"), k.get(
            "cpu_us_per_dora")
        rate = bm / km if bm and km else None
        cpu = bc / kc if bc and kc else None
        rows.append(_row("DHCP max DORA/s, <1 % failed, bootsvc / Kea", rate, ">= 1.0x",
                         None if rate is None else rate >= 1.0, f"{bm} vs {km} DORA/s"))
        rows.append(_row(f"DHCP CPU per DORA @{b.get('cpu_rate')}/s, bootsvc / Kea", cpu, "<= 1.0x",
                         None if cpu is None else cpu <= 1.0, f"{bc} vs {kc} us"))
        # DHCP on PostgreSQL: against Kea 2.2's PostgreSQL lease backend, as shipped
        # (single-threaded) and multi-threaded; bench/dhcp/README.md
        for kname in ("kea-pg", "kea-pg-mt"):
            kp = d.get(kname, {})
            for bname, what in (("bootsvc-pg", "1 instance"), ("bootsvc-pg2", "2 instances")):
                bp = d.get(bname)
                if not bp or not kp:
                    continue
                bm, km = bp.get("max_dora_per_s"), kp.get("max_dora_per_s")
                r = bm / km if bm and km else None
                dup = bp.get("dup_address", 0) + bp.get("clients_bound_twice", 0)
                rows.append(_row(f"DHCP on PostgreSQL max DORA/s, <1 % failed, bootsvc {what} / {kname}", r,
                                 ">= 1.0x, 0 doubled", None if r is None else (r >= 1.0 and dup == 0),
                                 f"{bm} vs {km} DORA/s; failed at {bp.get('cpu_rate')}/s: {bp.get('cpu_fail_pct')} % "
                                 f"vs {kp.get('cpu_fail_pct')} %; (VRF, address) or client doubled: {dup}"))
    t = res.get("tftp")
    if t:
        cells = t.get("tftp", [])
        top = max((c["clients"] for c in cells), default=0)
        for c in cells:
            if c["clients"] == top:
                rows.append(_row(f"TFTP throughput, {top} clients x {c['file']} @{c['blksize']}, bootsvc / tftpd-hpa",
                                 c["ratio"], ">= 1.0x", c["ratio"] >= 1.0,
                                 f"per rep {c['ratio_min']:.2f}-{c['ratio_max']:.2f}; failed "
                                 f"{c['failed_hpa']}/{c['failed_bootsvc']}"))
    h = res.get("http")
    if h:
        med = h.get("http", {}).get("median", {})
        ng = med.get("nginx", {})
        for label, m in med.items():
            if label == "nginx":
                continue
            for key, what in (("big1_mbps", "1 download"), ("big16_mbps", "16 downloads")):
                if key in m and ng.get(key):
                    r = m[key] / ng[key]
                    rows.append(_row(f"HTTP image, {what}, {label} / nginx", r, ">= 0.9x", r >= 0.9,
                                     f"{m[key]:.0f} vs {ng[key]:.0f} MB/s"))
            rps, p99 = m.get("small_rps", 0.0), m.get("small_p99", 0.0)
            rows.append(_row(f"HTTP iPXE script, wrk c64, {label}", None, ">= 5000 req/s, p99 < 50 ms",
                             rps >= 5000 and p99 < 50, f"{rps:.0f} req/s, p99 {p99:.1f} ms"))
    st = res.get("storm")
    if st:
        rows_ = st.get("storm", [])
        for r in rows_:
            rows.append(_row(f"storm {r['pairs']} pairs: pairs/min provision -> deployed", None, ">= 667 at 10k",
                             r["pairs_per_min"] >= 667 and r["deployed"] == r["pairs"] if r["pairs"] >= 10_000
                             else None,
                             f"{r['pairs_per_min']} pairs/min, p50 {r['p50_s']} s, p99 {r['p99_s']} s, "
                             f"{r['deployed']}/{r['pairs']} deployed, BMC actions twice {r['bmc_actions_twice']}"))
        small = min(rows_, key=lambda r: r["pairs"], default=None)
        big = max(rows_, key=lambda r: r["pairs"], default=None)
        if small and big and big["pairs"] > small["pairs"]:
            # the server's services; the target counts the simulator too (the same box runs it)
            for what, skip in (("server", {"simulator"}), ("server + simulator", set())):
                cs = sum(v for k, v in small["cpu_s_per_pair"].items() if k not in skip)
                cb = sum(v for k, v in big["cpu_s_per_pair"].items() if k not in skip)
                r = cb / cs if cs else None
                rows.append(_row(f"storm {what} CPU per pair, {big['pairs']} / {small['pairs']} pairs", r,
                                 "<= 1.2x", None if r is None else r <= 1.2,
                                 f"{cb:.3f} vs {cs:.3f} s ({big['deployed']}/{big['pairs']} deployed)"))
    mu = res.get("multi")
    if mu:
        for r in mu.get("multi", []):
            what = f"{r['deployed']}/{r['pairs']} deployed, ACKed leases lost {r['acked_leases']['acked_lost']}, " \
                   f"duplicate (VRF, address) {r['leases']['duplicate_vrf_address']}, BMC actions twice " \
                   f"{r['bmc_actions_twice']}"
            if "kill" in r:
                what += f", claims taken over after {r['kill'].get('takeover_s')} s"
            rows.append(_row(f"{r['instances']} instances on PostgreSQL, {r['scenario']} at 50%", None,
                             "all deployed, 0 lost, 0 doubled", bool(r.get("ok")), what))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="dhcp,tftp,http,storm,multi")
    ap.add_argument("--quick", action="store_true",
                    help="fewer rounds and cells, ~2 min; one rep per cell, so a ratio near 1.0 can land on "
                         "either side of a target: use the full run to judge one")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces, cgroups)", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    plan = benches(a.quick)
    res = {name: run_one(name, plan[name]) for name in a.only.split(",") if name in plan}
    print(f"\n===== targets (issues #3, #4), this run ({time.monotonic() - t0:.0f} s; ratios against the peer "
          "measured in the same run)")
    print("| what | ratio | target | verdict | measured |")
    print("|---|---|---|---|---|")
    for row in targets(res):
        print(row)
    missing = [n for n, r in res.items() if r is None]
    if missing:
        print(f"no summary from: {', '.join(missing)} (see their output above)")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env python3
"""The storm at several sizes (``make bench``: 1k, 3k, 10k pairs): one bench/storm/run.py per size, a
table (CPU seconds per pair per service, the simulator's included, SQL statements per pair, database
bytes per 10k deployed pairs, load averages), the ratio of per-pair CPU at the largest size to the
smallest (the target: <= 1.2x; printed last, in a box: SERVER CPU per pair, the total next to it),
the cost curve as SVG (results/storm-curve-<db>.svg, drawn by hand: no plotting library needed) and
one ``SUMMARY {json}`` line for bench/run.py.

With ``--bracket`` the first size runs once more after the last: this box's speed drifts by up to
+-20 % within an hour (README "Measuring flatness on a drifting box"), so the verdict box also shows
the ratio against that bracketing run and the ratio with each run's CPU divided by its box probe
(bench/storm/drift.py); the raw ratio against the sweep's first run stays the headline.

Extra arguments go to every run.py (EVPN is run.py's default: ``--fabric-asn 0`` for static peer
lists). A run stopped by its timeout is a row that says how far it got (deployed of pairs); its
pairs/min is over the pairs that were deployed, its CPU per pair over all the pairs.

    sudo .venv/bin/python bench/storm/sweep.py --sizes 1000,3000,10000 [--db sqlite] \
        [--timeouts 1000=240,3000=480,10000=900] [--bracket]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def default_timeout(size: int) -> int:
    """10k pairs at the 667 pairs/min target is 15 min; leave room for a slower box, then give up."""
    return max(300, int(size * 0.25))


def command(size: int, db: str, extra: list[str], timeout: int, tag: str = "") -> list[str]:
    """run.py's command line for one size; ``tag`` starts with "-", so it goes as --tag=... (argparse
    takes a separate "-bracket" for an option)."""
    return [sys.executable, str(HERE / "run.py"), "--pairs", str(size), "--db", db, "--timeout", str(timeout),
            *extra, *([f"--tag={tag}"] if tag else [])]


def run(size: int, db: str, extra: list[str], timeout: int, tag: str = "") -> dict[str, Any] | None:
    cmd = command(size, db, extra, timeout, tag)
    print(f"--- {' '.join(cmd[1:])}", flush=True)
    found = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("SUMMARY "):
                found = json.loads(line[len("SUMMARY "):])["storm"]
            else:
                print(line, end="", flush=True)
    if found is not None:
        found["timeout_s"] = timeout
    return found


def total(r: dict[str, Any], server_only: bool = False) -> float:
    """CPU seconds per pair of every service (and, unless ``server_only``, of the simulator)."""
    return sum(float(v) for k, v in r["cpu_s_per_pair"].items() if not (server_only and k == "simulator"))


def per_deployed(r: dict[str, Any], server_only: bool = False) -> float | None:
    """CPU seconds per DEPLOYED pair (the run's CPU over the pairs that finished): equal to per enrolled
    pair when all deployed; for a run stopped by its timeout the upper bound (per enrolled: the lower)."""
    if not r.get("deployed"):
        return None
    return total(r, server_only) * int(r["pairs"]) / int(r["deployed"])


def busy(r: dict[str, Any]) -> str:
    """The share of the box's cores busy over the run (/proc/stat): under 100 % the run was not CPU-bound."""
    f = r.get("box_cpu_busy_fraction")
    return f"{100 * f:.0f} % of {r.get('box_cores', '?')}" if f is not None else "-"


def db_per_10k(r: dict[str, Any]) -> str:
    """Database bytes (SQLite: after a WAL checkpoint) per 10k deployed pairs, from the run's own end
    state; a run stopped early also holds the pairs it did not finish, so it says what it holds instead."""
    b, n = r.get("db_bytes_main") or r.get("db_bytes"), r.get("deployed") or 0
    if not b or not n:
        return "-"
    if n < r["pairs"]:
        return f"{b / 1e6:.0f} MB holding {r['pairs']} enrolled, {n} deployed"
    return f"{b / n * 10_000 / 1e6:.0f} MB"


def table(rows: list[dict[str, Any]]) -> list[str]:
    out = ["| pairs | deployed (timeout) | pairs/min | p50 / p99 / max s | CPU s/pair conductor, http, dhcp, tftp, "
           "supervisor | simulator | total (server) per enrolled pair | total (server) per DEPLOYED pair | "
           "cores busy | SQL/pair conductor, http, dhcp | DB per 10k deployed | "
           "enrol s | load avg start -> end | BMC twice | errors |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, q = r["cpu_s_per_pair"], r["sql_per_pair"]
        label = f"{r['pairs']} again (bracket)" if r.get("bracket") else str(r["pairs"])
        la0, la1 = r.get("loadavg_at_provision"), r.get("loadavg_at_end")
        load = f"{la0[0]:.1f} -> {la1[0]:.1f}" if la0 and la1 else "-"
        pd, pds = per_deployed(r), per_deployed(r, True)
        dep = f"{pd:.3f} ({pds:.3f})" if pd is not None and pds is not None else "-"
        out.append(
            f"| {label} | {r['deployed']} ({r.get('timeout_s', '-')} s) | {r['pairs_per_min']} | "
            f"{r['p50_s']} / {r['p99_s']} / {r['max_s']} | "
            f"{c.get('conductor')}, {c.get('http')}, {c.get('dhcp')}, {c.get('tftp')}, {c.get('supervisor')} | "
            f"{c.get('simulator')} | {total(r):.3f} ({total(r, True):.3f}) | {dep} | {busy(r)} | "
            f"{q.get('conductor')}, {q.get('http')}, {q.get('dhcp')} | {db_per_10k(r)} | {r.get('enroll_s', '-')} | "
            f"{load} | {r['bmc_actions_twice']} | {sum((r.get('errors') or {}).values())} |")
    return out


def ratio(rows: list[dict[str, Any]]) -> str | None:
    """Per-pair CPU at the largest size over the smallest (target <= 1.2x), with and without the simulator."""
    small = min(rows, key=lambda r: r["pairs"], default=None)
    big = max(rows, key=lambda r: r["pairs"], default=None)
    if not small or not big or big["pairs"] <= small["pairs"] or not total(small, True):
        return None
    incomplete = "" if big["deployed"] == big["pairs"] and small["deployed"] == small["pairs"] else \
        f" ({big['deployed']} of {big['pairs']} deployed in its timeout: per enrolled pair is the lower bound, " \
        f"per deployed pair the upper one)"
    sb, ss = total(big, True), total(small, True)
    line = (f"per-pair CPU at {big['pairs']} / at {small['pairs']}, per ENROLLED pair: server {sb / ss:.2f}x "
            f"({sb:.3f} vs {ss:.3f} s), simulator included {total(big) / total(small):.2f}x "
            f"({total(big):.3f} vs {total(small):.3f} s)")
    db_, ds = per_deployed(big, True), per_deployed(small, True)
    tb, ts = per_deployed(big), per_deployed(small)
    if db_ and ds and tb and ts:
        line += (f"; per DEPLOYED pair: server {db_ / ds:.2f}x ({db_:.3f} vs {ds:.3f} s), simulator included "
                 f"{tb / ts:.2f}x ({tb:.3f} vs {ts:.3f} s)")
    return line + f"; target <= 1.2x{incomplete}"


def headline(rows: list[dict[str, Any]], bracket: dict[str, Any] | None = None) -> list[str]:
    """The issue's two numbers, in a box above everything else: the largest size's time against 15 min, and
    SERVER CPU per pair at the largest size over the smallest (<= 1.2x), with the total (simulator included)
    next to it, the ratio per service (which one grows), and agent check-ins per pair (the load that grows
    with the fleet by design: resting agents keep checking in). Under them, the box's drift (``drift_lines``);
    the verdict is the raw ratio's."""
    small = min(rows, key=lambda r: r["pairs"], default=None)
    big = max(rows, key=lambda r: r["pairs"], default=None)
    if not small or not big or big["pairs"] <= small["pairs"] or not total(small, True):
        return []
    complete = big["deployed"] == big["pairs"] and small["deployed"] == small["pairs"]
    # a run stopped by its timeout: per DEPLOYED pair is the honest upper bound of what a pair costs
    sb, ss = (per_deployed(big, True), per_deployed(small, True)) if not complete else \
        (total(big, True), total(small, True))
    tb, ts = (per_deployed(big), per_deployed(small)) if not complete else (total(big), total(small))
    if not (sb and ss and tb and ts):
        return []
    basis = "per pair" if complete else "per DEPLOYED pair (a run stopped by its timeout: the upper bound)"
    ok = "met" if sb / ss <= 1.2 else "NOT MET"
    span = big.get("span_s")
    fast = big["deployed"] == big["pairs"] and span is not None and span <= 900
    bar = "=" * 100
    out = [bar,
           f"SERVER CPU {basis}, {big['pairs']} vs {small['pairs']} pairs: {sb / ss:.2f}x ({sb:.4f} vs {ss:.4f} s)"
           f"  -- target <= 1.2x: {ok}",
           f"  total, simulator included:  {tb / ts:.2f}x ({tb:.4f} vs {ts:.4f} s)"]
    cb, cs = big["cpu_s_per_pair"], small["cpu_s_per_pair"]
    out.append("  per service, per enrolled pair: " + ", ".join(
        f"{k} {float(cb[k]) / float(cs[k]):.2f}x ({cb[k]} vs {cs[k]})" for k in sorted(cb)
        if k in cs and float(cs[k]) > 0.0005))
    ci = [((r.get("requests") or {}).get("checkins_per_pair") or {}) for r in (big, small)]
    if ci[0] and ci[1]:
        out.append(f"  agent check-ins per pair: {ci[0].get('total')} vs {ci[1].get('total')} (pre-apply "
                   f"{ci[0].get('pre_apply')} vs {ci[1].get('pre_apply')}, resting {ci[0].get('resting')} vs "
                   f"{ci[1].get('resting')})")
    out.append(f"{big['pairs']} pairs: {big['deployed']} deployed in {span} s ({big['pairs_per_min']} pairs/min)  "
               f"-- target all in <= 900 s (>= 667 pairs/min): {'met' if fast else 'NOT MET'}")
    out += drift_lines(small, big, bracket)
    return [*out, bar]


def server_pp(r: dict[str, Any]) -> float | None:
    """Server CPU s per pair as the headline takes it: per pair when all deployed, else per DEPLOYED pair."""
    return total(r, True) if r["deployed"] == r["pairs"] else per_deployed(r, True)


def probe_med(r: dict[str, Any]) -> float | None:
    m = (r.get("box_probe_ms") or {}).get("median")
    return float(m) if m else None


def drift_lines(small: dict[str, Any], big: dict[str, Any], bracket: dict[str, Any] | None) -> list[str]:
    """The box's speed next to the ratio: each run's median box probe (bench/storm/drift.py), the ratio
    against the bracketing run (the first size run again after the last, ``--bracket``), the ratio with
    each run's CPU per pair divided by its median probe, and the largest run's growth within itself."""
    sb, ss = server_pp(big), server_pp(small)
    if not sb or not ss:
        return []
    out = []
    runs = [(f"{small['pairs']} (first)", small), (str(big["pairs"]), big)]
    if bracket:
        runs.append((f"{bracket['pairs']} (bracket)", bracket))
    meds = [probe_med(r) for _, r in runs]
    if any(meds):
        out.append("  box probe median, CPU ms of a fixed workload (higher = slower box): " + ", ".join(
            f"{label} {m if m else '-'}" for (label, _), m in zip(runs, meds, strict=True)))
    if bracket:
        sk = server_pp(bracket)
        if sk:
            out.append(f"  against the bracketing {bracket['pairs']} run (the same size run again after the last): "
                       f"server {sb / sk:.2f}x ({sb:.4f} vs {sk:.4f} s); the two {small['pairs']} runs differ "
                       f"{sk / ss:.2f}x; against their mean {2 * sb / (ss + sk):.2f}x")
    norm = []
    mb = meds[1]
    for (label, r), mr in zip(runs[::2], meds[::2], strict=True):
        sr = server_pp(r)
        if mb and mr and sr:
            norm.append(f"against {label} {(sb / mb) / (sr / mr):.2f}x")
    if norm:
        out.append("  box-probe-normalised (each run's server CPU per pair / its median probe): " + ", ".join(norm))
    for key, what in (("within_run_growth", f"  within the {big['pairs']} run (one box speed), server CPU per pair "
                                            "last / first third of the deployed pairs"),
                      ("within_run_growth_steps", "    by lifecycle steps done (work in flight counted: less "
                                                  "fill/drain bias)")):
        g = big.get(key) or {}
        lof, first = g.get("last_over_first") or {}, {k: v[0] for k, v in (g.get("per_pair") or {}).items()}
        if lof.get("server"):
            out.append(f"{what}: {lof['server']}x (" + ", ".join(
                f"{k} {v}x" for k, v in lof.items() if k != "server" and v and first.get(k, 1) > 0.0005) + ")")
    if len(out) > 0:
        out.append("  (the verdict above is the raw ratio; these say how much of it the box's drift can explain: "
                   "README \"Measuring flatness on a drifting box\")")
    return out


def svg(rows: list[dict[str, Any]], path: Path) -> None:
    """pairs/min and CPU milliseconds per pair (server; server + simulator) against pairs, with the
    issue's 667 pairs/min target as a dashed line; the legend sits under the plot."""
    w, h, pad, plot_bottom = 640, 360, 50, 260
    sizes = [int(r["pairs"]) for r in rows]
    series = [("pairs/min (provision -> deployed; 'n/N' = deployed of N)",
               [float(r["pairs_per_min"] or 0.0) for r in rows], "#1f77b4"),
              ("server CPU ms per pair", [1000 * total(r, True) for r in rows], "#d62728"),
              ("server + simulator CPU ms per pair", [1000 * total(r) for r in rows], "#ff7f0e")]
    target = 667.0
    top = max([target, *(v for _, vs, _ in series for v in vs)]) * 1.1
    xmax = max(sizes) * 1.08

    def x(v: float) -> float:
        return pad + (w - 2 * pad) * v / xmax

    def y(v: float) -> float:
        return plot_bottom - (plot_bottom - pad) * v / top

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11">', f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{plot_bottom}" x2="{w - pad}" y2="{plot_bottom}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{plot_bottom}" stroke="black"/>',
           f'<text x="{w / 2}" y="{plot_bottom + 30}" text-anchor="middle">pairs in the storm</text>',
           f'<text x="{pad}" y="20">bootsvc site power-on storm (bench/storm), zero boot delay</text>',
           f'<line x1="{pad}" y1="{y(target):.1f}" x2="{w - pad}" y2="{y(target):.1f}" stroke="#1f77b4" '
           f'stroke-dasharray="4,4"/>',
           f'<text x="{pad + 4}" y="{y(target) - 4:.1f}" fill="#1f77b4">target: 667 pairs/min at 10k</text>']
    for r, s in zip(rows, sizes, strict=True):
        lab = str(s) if r["deployed"] == r["pairs"] else f"{r['deployed']}/{s}"
        out.append(f'<text x="{x(s):.0f}" y="{plot_bottom + 14}" text-anchor="middle">{lab}</text>')
    for k, (label, vs, color) in enumerate(series):
        pts = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(sizes, vs, strict=True))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for s, v in zip(sizes, vs, strict=True):
            out.append(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" fill="{color}"/>'
                       f'<text x="{x(s) + 5:.1f}" y="{y(v) - 5:.1f}" fill="{color}">{v:.0f}</text>')
        out.append(f'<text x="{pad}" y="{plot_bottom + 52 + 14 * k}" fill="{color}">{label}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,3000,10000")
    ap.add_argument("--db", choices=("sqlite", "pg"), default="sqlite")
    ap.add_argument("--timeouts", default="", help="per size: SIZE=SECONDS,... (default max(300, size/4))")
    ap.add_argument("--bracket", action="store_true",
                    help="run the first size again after the last: the box's drift over the sweep, in the verdict box")
    a, extra = ap.parse_known_args()
    tmo = {int(k): int(v) for k, v in (x.split("=", 1) for x in a.timeouts.split(",") if x)}
    rows = []
    sizes = [int(x) for x in a.sizes.split(",")]
    for n in sizes:
        r = run(n, a.db, extra, tmo.get(n, default_timeout(n)))
        if r is not None:
            rows.append(r)
            (HERE / "results").mkdir(exist_ok=True)
            (HERE / "results" / f"sweep-{a.db}.json").write_text(json.dumps(rows, indent=1) + "\n")
    bracket = None
    if a.bracket and sizes:
        # kept out of ``rows`` (sweep-<db>.json, the curve and bench/run.py read those): its own file and key
        bracket = run(sizes[0], a.db, extra, tmo.get(sizes[0], default_timeout(sizes[0])), tag="-bracket")
        if bracket is not None:
            bracket["bracket"] = True
            (HERE / "results" / f"sweep-{a.db}-bracket.json").write_text(json.dumps(bracket, indent=1) + "\n")
    print()
    print("\n".join(table(rows + ([bracket] if bracket else []))))
    rt = ratio(rows)
    if rt:
        print(rt)
    print("\n".join(headline(rows, bracket)))
    if rows:
        (HERE / "results").mkdir(exist_ok=True)
        svg(rows, HERE / "results" / f"storm-curve-{a.db}.svg")
    print("SUMMARY " + json.dumps({"storm": rows, **({"bracket": bracket} if bracket else {})}), flush=True)
    return 0 if rows and all(r["deployed"] == r["pairs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

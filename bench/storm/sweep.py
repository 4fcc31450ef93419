#!/usr/bin/env python3
"""The storm at several sizes (``make bench``: 1k, 3k, 10k pairs): one bench/storm/run.py per size, a
table, the cost curve as SVG (results/storm-curve.svg, drawn by hand: no plotting library needed) and
one ``SUMMARY {json}`` line for bench/run.py.

    sudo .venv/bin/python bench/storm/sweep.py --sizes 1000,3000,10000 [--db sqlite]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run(size: int, db: str, extra: list[str]) -> dict[str, Any] | None:
    # 10k pairs at the 667 pairs/min target is 15 min; leave room for a slower box, then give up
    timeout = max(300, int(size * 0.25))
    cmd = [sys.executable, str(HERE / "run.py"), "--pairs", str(size), "--db", db, "--timeout", str(timeout), *extra]
    print(f"--- {' '.join(cmd[1:])}", flush=True)
    found = None
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as p:
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("SUMMARY "):
                found = json.loads(line[len("SUMMARY "):])["storm"]
            else:
                print(line, end="", flush=True)
    return found


def svg(rows: list[dict[str, Any]], path: Path) -> None:
    """Two panels: pairs/min and server CPU seconds per pair (all services), against pairs."""
    w, h, pad = 640, 300, 50
    sizes = [r["pairs"] for r in rows]
    series = [("pairs/min (provision -> deployed)", [r["pairs_per_min"] or 0.0 for r in rows], "#1f77b4"),
              ("server CPU s per pair (x100)", [100 * sum(r["cpu_s_per_pair"].values()) for r in rows], "#d62728")]
    top = max([1.0, *(v for _, vs, _ in series for v in vs)]) * 1.15
    xmax = max(sizes) * 1.05

    def x(v: float) -> float:
        return pad + (w - 2 * pad) * v / xmax

    def y(v: float) -> float:
        return h - pad - (h - 2 * pad) * v / top

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11">', f'<rect width="{w}" height="{h}" fill="white"/>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">pairs in the storm</text>',
           f'<text x="{pad}" y="20">bootsvc site power-on storm (bench/storm)</text>']
    for s in sizes:
        out.append(f'<text x="{x(s):.0f}" y="{h - pad + 14}" text-anchor="middle">{s}</text>')
    for k, (label, vs, color) in enumerate(series):
        pts = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in zip(sizes, vs, strict=True))
        out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="2"/>')
        for s, v in zip(sizes, vs, strict=True):
            out.append(f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3" fill="{color}"/>'
                       f'<text x="{x(s) + 5:.1f}" y="{y(v) - 5:.1f}" fill="{color}">{v:.1f}</text>')
        out.append(f'<text x="{w - pad - 220}" y="{pad + 14 * k}" fill="{color}">{label}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1000,3000,10000")
    ap.add_argument("--db", choices=("sqlite", "pg"), default="sqlite")
    a, extra = ap.parse_known_args()
    rows = [r for r in (run(int(n), a.db, extra) for n in a.sizes.split(",")) if r is not None]
    print("\n| pairs | deployed | pairs/min | p50 s | p99 s | max s | CPU s/pair (conductor, http, dhcp, tftp) | "
          "SQL/pair (conductor, http, dhcp) | BMC actions twice | errors |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c, q = r["cpu_s_per_pair"], r["sql_per_pair"]
        print(f"| {r['pairs']} | {r['deployed']} | {r['pairs_per_min']} | {r['p50_s']} | {r['p99_s']} | {r['max_s']} | "
              f"{c.get('conductor')}, {c.get('http')}, {c.get('dhcp')}, {c.get('tftp')} | "
              f"{q.get('conductor')}, {q.get('http')}, {q.get('dhcp')} | {r['bmc_actions_twice']} | "
              f"{sum((r.get('errors') or {}).values())} |")
    if rows:
        (HERE / "results").mkdir(exist_ok=True)
        svg(rows, HERE / "results" / f"storm-curve-{a.db}.svg")
    print("SUMMARY " + json.dumps({"storm": rows}), flush=True)
    return 0 if rows and all(r["deployed"] == r["pairs"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

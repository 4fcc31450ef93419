#!/usr/bin/env python3
"""What a running storm's services wait on: every thread of every ``run-service`` process of the storm (and
the simulator), its state and kernel wait channel from /proc, HZ times a second for D seconds, threads named
from one ``py-spy dump`` per process first. Also the box's idle share per sample, against how many service
threads sleep in ``hrtimer_nanosleep`` at that moment (SQLite's default busy handler sleeps there between
tries for the write lock; nothing else in these threads sleeps so).

    .venv/bin/python bench/storm/waits.py --seconds 60 --hz 10 --out waits.txt   # mid-run, as root
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import time
from pathlib import Path

PYSPY = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "py-spy"


def role(cmd: str) -> str | None:
    m = re.search(r"run-service (\w+)", cmd)
    return m.group(1) if m else ("sim" if "--child" in cmd else None)


def box_idle() -> tuple[int, int]:
    """(idle + iowait jiffies, all jiffies) of the whole box, from /proc/stat (proc(5))."""
    with open("/proc/stat") as f:
        v = list(map(int, f.readline().split()[1:]))
    return v[3] + v[4], sum(v)


def thread_names(pids: dict[int, str]) -> dict[int, str]:
    names: dict[int, str] = {}
    for p in pids:
        out = subprocess.run([str(PYSPY), "dump", "--nonblocking", "--pid", str(p)], capture_output=True,
                             text=True, timeout=20, check=False).stdout
        for m in re.finditer(r"Thread (\d+) \(\w+\): \"([^\"]*)\"", out):
            n = m.group(2)
            names[int(m.group(1))] = re.sub(r"_\d+$", "_N", re.sub(r"\d+", "N", n) if n.startswith("Thread") else n)
    return names


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--hz", type=float, default=10.0)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    pids: dict[int, str] = {}
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        r = role(cmd)
        if r and "storm" in cmd:
            pids[int(p)] = r
    names = thread_names(pids)
    seen: collections.Counter[tuple[str, str, str]] = collections.Counter()
    corr: list[tuple[float, int]] = []  # (box idle share since the previous sample, busy-handler sleepers)
    n = 0
    i0 = box_idle()
    end = time.monotonic() + a.seconds
    while time.monotonic() < end:
        n += 1
        sleepers = 0
        for p, r in pids.items():
            try:
                tids = os.listdir(f"/proc/{p}/task")
            except OSError:
                continue
            for t in tids:
                try:
                    st = Path(f"/proc/{p}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
                    wc = Path(f"/proc/{p}/task/{t}/wchan").read_text().strip() or "-"
                except OSError:
                    continue
                nm = names.get(int(t), "?")
                seen[(r, nm, st if st == "R" else f"{st}:{wc}")] += 1
                if r != "sim" and wc == "hrtimer_nanosleep" and not nm.startswith(("storm-sqlcount", "metrics-")):
                    sleepers += 1
        i1 = box_idle()
        corr.append(((i1[0] - i0[0]) / max(1, i1[1] - i0[1]), sleepers))
        i0 = i1
        time.sleep(1 / a.hz)
    k = max(1, len(corr))
    lines = [f"{n} samples over {a.seconds:g} s of {len(pids)} processes; box idle {sum(x[0] for x in corr) / k:.3f}; "
             f"service threads asleep in the busy handler {sum(x[1] for x in corr) / k:.1f} on average"]
    for (r, nm, s), c in sorted(seen.items(), key=lambda kv: (kv[0][0], -kv[1])):
        lines.append(f"{r:10s} {nm:28s} {s:36s} {c / max(1, n):7.2f} threads on average")
    a.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:1]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

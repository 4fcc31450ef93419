"""The box's speed and what grows within one storm: the harness's measuring aids for flatness.

Owns three pure-ish pieces that bench/storm/run.py and sweep.py share:

* ``box_probe_ms``: a fixed CPU workload (pure Python arithmetic and an in-memory sqlite3 table: the
  two kinds of work the services do) timed with ``time.thread_time`` in the calling thread. Its CPU
  milliseconds rise when the machine's cores get slower (a shared VM host: other guests, cache and
  memory-bandwidth pressure, frequency), not when this box is merely loaded (the scheduler does not
  charge a thread for the time it waits for a core). ~25-50 ms of CPU; the storm takes one every ~30 s.
* ``growth``: from the harness's CPU timeline (each service's cumulative CPU seconds, the pairs
  deployed and the DPUs done, every 10 s), CPU per pair over the first, middle and last third of the
  deployed pairs, per service and for the server: growth WITHIN one run, at one box speed.
* ``probe_summary`` and ``normalised``: the probe's start/median/end, and a per-pair CPU figure
  divided by its run's median probe (what a ratio of two runs looks like with the box's drift
  taken out).
"""

from __future__ import annotations

import itertools
import sqlite3
import statistics
import time
from typing import Any

PROBE_EVERY_S = 30.0  # the storm's probe interval: ~30 ms of CPU per 30 s is ~0.1 % of one core

# A storm node's place on its path (bootsvc/states.py's module docstring): a DPU has 6 steps to
# policy_applied, its host 3 more to deployed; a pair is 9 steps.
STEPS = {"dpu:registered": 0, "dpu:dpu_booting": 1, "dpu:dpu_installing": 2, "dpu:dpu_rebooting": 3,
         "dpu:dpu_ready": 4, "dpu:policy_pending": 5, "dpu:policy_applied": 6,
         "host:registered": 0, "host:host_waiting_dpu": 0, "host:host_booting": 1, "host:host_installing": 2,
         "host:deployed": 3}
STEPS_PER_PAIR = 9


def box_probe_ms() -> float:
    """CPU milliseconds of one fixed workload in the calling thread (``CLOCK_THREAD_CPUTIME_ID``):
    120k iterations of integer arithmetic (the interpreter), then 2000 INSERTs, 3000 point SELECTs
    and one UPDATE over a third of an in-memory sqlite3 table (the C library, allocation, B-tree)."""
    t = time.thread_time()
    s = 0
    for i in range(120_000):
        s += i * i % 7
    con = sqlite3.connect(":memory:")
    try:
        con.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT)")
        con.executemany("INSERT INTO t VALUES (?, ?)", ((i, f"v{i}") for i in range(2000)))
        for i in range(3000):
            con.execute("SELECT v FROM t WHERE k = ?", (i * 7 % 2000,)).fetchone()
        con.execute("UPDATE t SET v = v || 'x' WHERE k % 3 = 0")
    finally:
        con.close()
    return round((time.thread_time() - t) * 1000, 2)


def probe_summary(samples: list[list[float]]) -> dict[str, Any]:
    """``samples``: [seconds since the provision triggers, probe ms], in order, the first taken at the
    start and the last at the end. The median is the run's box speed (the one to normalise by)."""
    ms = [float(x[1]) for x in samples]
    if not ms:
        return {}
    return {"start": ms[0], "median": round(statistics.median(ms), 2), "end": ms[-1],
            "min": min(ms), "max": max(ms), "samples": samples}


def _interp(timeline: list[dict[str, Any]], by: str, at: float, value: Any) -> float:
    """``value(row)`` (a cumulative quantity) interpolated linearly at the moment ``row[by]`` reached ``at``."""
    prev = timeline[0]
    for row in timeline[1:]:
        if _by(row, by) >= at:
            d0, d1 = _by(prev, by), _by(row, by)
            f = 1.0 if d1 == d0 else (at - d0) / (d1 - d0)
            return float(value(prev)) + f * (float(value(row)) - float(value(prev)))
        prev = row
    return float(value(prev))


def steps_done(by_state: dict[str, int]) -> float:
    """Lifecycle steps every node has taken, in pairs' worth (``by_state``: "kind:state" -> nodes); a
    node in a failure or other state counts 0."""
    return round(sum(STEPS.get(k, 0) * n for k, n in by_state.items()) / STEPS_PER_PAIR, 1)


def _by(row: dict[str, Any], by: str) -> float:
    """How far the run was at ``row``: "deployed" (hosts deployed: pairs), "nodes" (DPUs done plus
    hosts deployed, over 2: pairs' worth of nodes, so that a DPU's work counts when the DPU is done)
    or "steps" (every node's lifecycle steps, in pairs' worth: work in flight counts as it is done)."""
    if by == "nodes":
        return (float(row["deployed"]) + float(row.get("dpus_done", 0))) / 2
    return float(row[by])


def growth(timeline: list[dict[str, Any]], parts: int = 3, by: str = "deployed") -> dict[str, Any]:
    """CPU seconds per pair in each of ``parts`` equal slices of the run's progress (``by``: pairs
    deployed, "nodes": DPUs done + hosts deployed, over 2, or "steps": lifecycle steps, over 9), per
    service and for the server (every service but the simulator), and last/first.

    ``timeline``: rows {"t", "deployed", "dpus_done", "cpu": {service: cumulative CPU s since the
    provision triggers}}, the first at t=0 with nothing done. Read with care: every host is provisioned
    at once, so the first slice also pays for work on pairs still in flight at its end (DPUs booted,
    hosts not yet deployed) and the last slice had part of its pairs' work done before it: last/first
    is biased DOWN by the pipeline's fill and drain, more at 1k (the run is mostly fill and drain) than
    at 10k; "steps" counts work in flight as it is done (each step weighs the same: an approximation).
    """
    if len(timeline) < 2:
        return {}
    n = _by(timeline[-1], by)
    if n < parts:
        return {}
    keys = sorted({k for row in timeline for k in row["cpu"]})
    cuts = [n * j / parts for j in range(parts + 1)]

    def cpu(key: str) -> Any:
        return lambda row: row["cpu"].get(key, 0.0)

    out: dict[str, Any] = {"by": by, "pairs_per_part": round(n / parts, 1), "per_pair": {}, "last_over_first": {}}
    for k in [*keys, "server"]:
        vals = []
        for a, b in itertools.pairwise(cuts):
            if k == "server":
                c = sum(_interp(timeline, by, b, cpu(s)) - _interp(timeline, by, a, cpu(s))
                        for s in keys if s != "simulator")
            else:
                c = _interp(timeline, by, b, cpu(k)) - _interp(timeline, by, a, cpu(k))
            vals.append(round(c / (b - a), 4))
        out["per_pair"][k] = vals
        out["last_over_first"][k] = round(vals[-1] / vals[0], 2) if vals[0] > 0 else None
    # when each slice ended, seconds after the provision triggers: a slice's span shows its rate
    out["t_at_cut"] = [round(_interp(timeline, by, c, lambda row: row["t"]), 1) for c in cuts]
    return out


def normalised(cpu_per_pair: float, probe: dict[str, Any] | None) -> float | None:
    """CPU seconds per pair divided by the run's median probe (s), None without a probe: a unitless
    'pair costs this many probes' that a slower box inflates as much as the numerator."""
    med = (probe or {}).get("median")
    return cpu_per_pair / (float(med) / 1000) if med else None

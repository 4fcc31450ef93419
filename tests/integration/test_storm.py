"""A 200-pair power-on storm as a test of behaviour, not of speed (bench/storm/run.py does the work).

The real ``bootsvc serve`` (DHCP, TFTP, HTTP boot plane and agent API, conductor with its Redfish
driver) in a namespace of its own; simulated BMCs, firmware, installers and agents in another one,
all over real sockets (bench/storm/sim.py). Asserted: every pair reaches deployed, no (VRF, address)
leased twice, no MAC holding two bound leases, no BMC powered on twice (counted by the simulated
BMCs). Bounded: the harness stops itself after ``--timeout``; the test kills it after a few minutes
more; the harness stops its processes by PID and deletes its namespaces on every way out.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAIRS = int(os.environ.get("BOOTSVC_STORM_PAIRS", "200"))

pytestmark = pytest.mark.netns


def _storm(*extra: str, timeout: float = 240.0, pairs: int = PAIRS) -> dict[str, object]:
    results = tempfile.mkdtemp(prefix="storm-results-")  # not the repository's bench/storm/results
    p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "storm" / "run.py"), "--pairs", str(pairs),
                          "--timeout", str(timeout), "--results", results, *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    try:
        out, _ = p.communicate(timeout=timeout + 180)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)  # the harness's own teardown removes namespaces and servers
        out, _ = p.communicate(timeout=60)
        raise AssertionError(f"storm harness did not stop by itself:\n{out[-3000:]}") from None
    line = next((ln for ln in out.splitlines() if ln.startswith("SUMMARY ")), None)
    assert line is not None, out[-3000:]
    res: dict[str, object] = json.loads(line[len("SUMMARY "):])["storm"]
    # the results file holds what SUMMARY leaves out (the *_timeline keys)
    files = list(Path(results).glob("storm-*.json"))
    assert len(files) == 1, (files, out[-3000:])
    res["cpu_timeline"] = json.loads(files[0].read_text())["cpu_timeline"]
    return res


def test_storm_every_pair_deploys_once(tmp_path: Path) -> None:
    res = _storm()
    detail = json.dumps(res, indent=1)
    assert res["deployed"] == PAIRS, detail
    states = res["states"]
    assert isinstance(states, dict)
    assert states.get("deployed") == PAIRS and states.get("policy_applied") == PAIRS, detail
    leases = res["leases"]
    assert isinstance(leases, dict)
    assert leases["duplicate_vrf_address"] == 0 and leases["macs_with_two_bound"] == 0, detail
    # a DPU and a host per pair, each leased once (the host's PXE and iPXE DHCP share one lease)
    assert leases["bound"] == 2 * PAIRS, detail
    assert res["bmc_actions_twice"] == 0, detail
    acked = res["acked_leases"]
    assert isinstance(acked, dict) and acked["acked_lost"] == 0 and acked["acked_to_two_clients"] == 0, detail
    # the report the 10k target is judged by: every service's CPU and the simulator's, measured
    cpu = res["cpu_s_per_pair"]
    assert isinstance(cpu, dict), detail
    for kind in ("conductor", "http", "dhcp", "tftp", "simulator"):
        assert cpu.get(kind, 0) > 0, f"no CPU measured for {kind}: {detail}"
    # the simulator's side of it (bench/storm/README.md "Where the time and the CPU go"): every firmware and
    # agent request counted and timed per endpoint, check-ins split pre-apply / resting, BMC requests counted
    rq = res["requests"]
    assert isinstance(rq, dict), detail
    for what in ("dpu dhcp", "dpu tftp", "dpu bf.cfg", "agent policy", "agent report", "host script"):
        e = rq["endpoints"][what]
        assert e["n"] >= PAIRS and e["per_pair"] >= 1 and 0 < e["p50_ms"] <= e["p99_ms"] <= e["max_ms"], detail
    ci = rq["checkins_per_pair"]
    assert ci["pre_apply"] >= 1 and abs(ci["total"] - ci["pre_apply"] - ci["resting"]) <= 0.02, detail
    assert rq["bmc_requests_per_pair_total"] >= 4, detail  # at least session, PATCH, Reset, GET per node
    # the box's speed at the start and end, and the growth within the run (bench/storm/drift.py, README
    # "Measuring flatness on a drifting box"): the timeline ends where the totals end, from the same /proc
    bp = res["box_probe_ms"]
    assert isinstance(bp, dict) and len(bp["samples"]) >= 2 and 0 < bp["min"] <= bp["median"] <= bp["max"], detail
    tl = res["cpu_timeline"]
    assert isinstance(tl, list) and tl[0]["deployed"] == 0 and tl[-1]["deployed"] == PAIRS, detail
    assert tl[-1]["dpus_done"] == PAIRS and tl[-1]["steps"] == PAIRS, detail
    for kind in ("conductor", "http", "simulator"):
        end = tl[-1]["cpu"][kind] / PAIRS
        assert abs(end - cpu[kind]) <= max(0.1 * cpu[kind], 0.002), (kind, end, cpu[kind], tl[-1])
    g = res["within_run_growth"]
    assert isinstance(g, dict) and set(g["per_pair"]) >= {"conductor", "http", "simulator", "server"}, detail
    assert all(v > 0 for v in g["per_pair"]["server"]) and g["last_over_first"]["server"] > 0, detail
    assert res["within_run_growth_steps"]["last_over_first"]["server"] > 0, detail  # type: ignore[index]


def test_storm_bmc_cap_holds_at_the_bmcs() -> None:
    """power.max_concurrent_bmc seen from the BMCs' side: never more BMCs answering a request at once
    than the cap. The simulated BMCs take 20 ms per answer (--bmc-latency) so that requests overlap as
    they do on real BMCs; without the cap the same run has 16 step threads' worth of BMCs in flight."""
    cap = 4
    res = _storm("--bmc-cap", str(cap), "--bmc-latency", "0.02", pairs=60, timeout=180.0)
    detail = json.dumps({k: v for k, v in res.items() if k not in ("errors",)}, indent=1)[:3000]
    assert res["deployed"] == 60, detail
    peak = res["peak_bmcs_in_flight"]
    assert isinstance(peak, int) and 1 < peak <= cap, detail
    assert res["bmc_actions_twice"] == 0, detail

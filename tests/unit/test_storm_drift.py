"""The storm harness's flatness aids (bench/storm/drift.py, sweep.py's verdict box, run.py's print): the
box probe, growth within one run from the CPU timeline, and the drift lines next to the raw ratio."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

STORM = Path(__file__).resolve().parents[2] / "bench" / "storm"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"storm_{name}", STORM / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


drift = _load("drift")
sweep = _load("sweep")
run = _load("run")


def _timeline(n: int, cost: Any, dpu_lead: int = 0) -> list[dict[str, Any]]:
    """Every 10 pairs a row; ``cost(d)``: cumulative CPU s per service after d pairs deployed."""
    rows: list[dict[str, Any]] = [{"t": 0.0, "deployed": 0, "dpus_done": 0, "cpu": {k: 0.0 for k in cost(0)}}]
    for d in range(10, n + 1, 10):
        rows.append({"t": float(d), "deployed": d, "dpus_done": min(n, d + dpu_lead), "cpu": cost(d)})
    return rows


def test_probe_is_cpu_of_a_fixed_workload() -> None:
    ms = [drift.box_probe_ms() for _ in range(3)]
    assert all(1.0 < m < 2000.0 for m in ms), ms
    s = drift.probe_summary([[0.0, ms[0]], [30.0, ms[1]], [61.5, ms[2]]])
    assert s["start"] == ms[0] and s["end"] == ms[2] and s["min"] <= s["median"] <= s["max"]
    assert len(s["samples"]) == 3
    assert drift.probe_summary([]) == {}


def test_flat_costs_show_no_growth() -> None:
    g = drift.growth(_timeline(300, lambda d: {"http": 0.05 * d, "conductor": 0.04 * d, "simulator": 0.01 * d}))
    assert g["per_pair"]["http"] == [0.05, 0.05, 0.05]
    assert g["per_pair"]["server"] == [0.09, 0.09, 0.09]  # the simulator is not server
    assert g["last_over_first"] == {"conductor": 1.0, "http": 1.0, "simulator": 1.0, "server": 1.0}
    assert g["pairs_per_part"] == 100.0 and g["t_at_cut"] == [0.0, 100.0, 200.0, 300.0]


def test_a_cost_growing_with_the_run_is_seen_per_service() -> None:
    # conductor: 0.04 s per pair plus 0.0002 s per pair per pair already deployed (a scan over the fleet)
    g = drift.growth(_timeline(300, lambda d: {"http": 0.05 * d, "conductor": 0.04 * d + 0.0001 * d * d}))
    assert g["per_pair"]["conductor"] == [0.05, 0.07, 0.09]
    assert g["last_over_first"]["conductor"] == 1.8 and g["last_over_first"]["http"] == 1.0
    assert g["last_over_first"]["server"] == round(0.14 / 0.10, 2)


def test_growth_interpolates_between_samples() -> None:
    # samples that do not fall on the thirds: 0, 70, 250, 300 pairs deployed, CPU 0.1 s per pair throughout
    tl = [{"t": t, "deployed": d, "dpus_done": d, "cpu": {"http": 0.1 * d}}
          for t, d in ((0.0, 0), (10.0, 70), (20.0, 250), (30.0, 300))]
    g = drift.growth(tl)
    assert g["per_pair"]["http"] == [0.1, 0.1, 0.1]
    assert g["t_at_cut"][1] == pytest.approx(10.0 + 10.0 * 30 / 180, abs=0.1)


def test_growth_by_nodes_counts_dpus_done() -> None:
    # the DPUs run 60 pairs ahead of their hosts: by nodes done, the work of a DPU counts when it is done
    tl = _timeline(300, lambda d: {"http": 0.1 * d}, dpu_lead=60)
    g = drift.growth(tl, by="nodes")
    assert g["by"] == "nodes" and g["pairs_per_part"] == 100.0
    assert g["t_at_cut"][1] < drift.growth(tl)["t_at_cut"][1]


def test_steps_count_work_in_flight() -> None:
    # 10 pairs: 4 done (9 steps each), 3 DPUs at policy_pending (5) with hosts waiting, 3 not started
    by_state = {"dpu:policy_applied": 4, "host:deployed": 4, "dpu:policy_pending": 3, "host:host_waiting_dpu": 6,
                "dpu:registered": 3, "dpu:policy_failed": 0}
    assert drift.steps_done(by_state) == round((4 * 9 + 3 * 5) / 9, 1)
    # every pair done: the steps are the pairs
    assert drift.steps_done({"dpu:policy_applied": 7, "host:deployed": 7}) == 7.0


def test_growth_by_steps_sees_through_the_pipeline_fill() -> None:
    # a flat 0.1 s per pair, but the first third of the run is mostly work in flight: by deployed pairs
    # the first third looks dearer; by steps it is flat
    tl = [{"t": t, "deployed": d, "dpus_done": d, "steps": st, "cpu": {"http": 0.1 * st}}
          for t, d, st in ((0.0, 0, 0.0), (10.0, 50, 150.0), (20.0, 200, 250.0), (30.0, 300, 300.0))]
    assert drift.growth(tl)["last_over_first"]["http"] < 0.8
    assert drift.growth(tl, by="steps")["last_over_first"]["http"] == 1.0


def test_growth_needs_a_run() -> None:
    assert drift.growth([]) == {}
    assert drift.growth(_timeline(0, lambda d: {"http": 0.0})) == {}


def test_normalised_divides_by_the_median_probe() -> None:
    assert drift.normalised(0.1, {"median": 25.0}) == pytest.approx(4.0)
    assert drift.normalised(0.1, None) is None


def _row(pairs: int, server: float, probe: float | None, growth: float | None = None) -> dict[str, Any]:
    r: dict[str, Any] = {"pairs": pairs, "deployed": pairs, "span_s": pairs / 12, "pairs_per_min": 720.0,
                         "cpu_s_per_pair": {"conductor": server / 2, "http": server / 2, "simulator": 0.015}}
    if probe is not None:
        r["box_probe_ms"] = {"start": probe, "median": probe, "end": probe, "samples": [[0.0, probe]]}
    if growth is not None:
        r["within_run_growth"] = {"last_over_first": {"conductor": growth, "http": 1.0, "server": growth},
                                  "per_pair": {"conductor": [0.04], "http": [0.05], "server": [0.09]}}
        r["within_run_growth_steps"] = {"last_over_first": {"conductor": 1.02, "tftp": 3.0, "server": 1.01},
                                        "per_pair": {"conductor": [0.04], "tftp": [0.0001], "server": [0.09]}}
    return r


def test_verdict_box_keeps_the_raw_ratio_and_shows_the_drift() -> None:
    small, big, again = _row(1000, 0.08, 20.0), _row(10000, 0.104, 26.0, growth=1.05), _row(1000, 0.096, 24.0)
    box = "\n".join(sweep.headline([small, big], again))
    # the verdict is the raw ratio against the sweep's first run: 1.30x, not met
    assert "SERVER CPU per pair, 10000 vs 1000 pairs: 1.30x" in box and "NOT MET" in box
    assert "box probe median" in box and "1000 (first) 20.0, 10000 26.0, 1000 (bracket) 24.0" in box
    assert "against the bracketing 1000 run" in box and "server 1.08x" in box and "differ 1.20x" in box
    # normalised: (0.104 / 26) / (0.08 / 20) = 1.00; against the bracket (0.104 / 26) / (0.096 / 24) = 1.00
    assert "against 1000 (first) 1.00x, against 1000 (bracket) 1.00x" in box
    assert "last / first third of the deployed pairs: 1.05x (conductor 1.05x, http 1.0x)" in box
    # by steps; a service of under 0.5 ms per pair (tftp here) is left out: its ratio is noise
    assert "by lifecycle steps done (work in flight counted: less fill/drain bias): 1.01x (conductor 1.02x)" in box


def test_verdict_box_without_probes_is_the_old_one() -> None:
    box = sweep.headline([_row(1000, 0.08, None), _row(10000, 0.09, None)])
    assert "1.12x" in box[1] and "met" in box[1]
    assert not any("probe" in ln or "bracket" in ln for ln in box)


def test_bracket_row_is_labelled_in_the_table() -> None:
    rows = [_row(1000, 0.08, 20.0), {**_row(1000, 0.09, 22.0), "bracket": True}]
    for r in rows:
        r.update(sql_per_pair={}, p50_s=1, p99_s=2, max_s=3, bmc_actions_twice=0)
    t = sweep.table(rows)
    assert t[2].startswith("| 1000 |") and t[3].startswith("| 1000 again (bracket) |")


def test_sweep_command_lines_parse_as_run_py_reads_them() -> None:
    for tag in ("", "-bracket"):
        cmd = sweep.command(1000, "sqlite", ["--fabric-asn", "0"], 270, tag=tag)
        a = run.arg_parser().parse_args(cmd[2:])
        assert (a.pairs, a.db, a.timeout, a.fabric_asn, a.tag) == (1000, "sqlite", 270.0, 0, tag)

"""Counters, snapshot files, and the /metrics exposition (text format 0.0.4).

Every exposition produced here is checked twice: by a strict line grammar written from the format
description, and by prometheus_client's own parser (the reference implementation Prometheus tooling
uses) when it is installed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask import Flask
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from bootsvc import config as config_mod
from bootsvc import db, inventory, lifecycle, metrics
from bootsvc.metrics import Flusher, Registry, Sample
from bootsvc.models import Base, Lease, Node
from bootsvc.states import Trigger
from bootsvc.web import create_app
from bootsvc.web import metrics as webmetrics

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|Inf)|NaN)"
SAMPLE_RE = re.compile(rf"^({_NAME})(?:\{{({_LABEL}(?:,{_LABEL})*)?\}})? {_VALUE}$")
HELP_RE = re.compile(rf"^# HELP ({_NAME}) (?:[^\\\n]|\\[\\n])*$")
TYPE_RE = re.compile(rf"^# TYPE ({_NAME}) (counter|gauge|summary|histogram|untyped)$")


def strict_parse(text: str) -> dict[str, tuple[str, list[str]]]:
    """Parse the exposition strictly: every line valid, HELP then TYPE before a family's samples, each
    family in one block, no series twice. Returns family -> (type, sample lines)."""
    assert text.endswith("\n")
    fams: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    seen_series: set[str] = set()
    lines = text[:-1].split("\n")
    i = 0
    while i < len(lines):
        h, t = HELP_RE.match(lines[i]), TYPE_RE.match(lines[i + 1]) if i + 1 < len(lines) else None
        if h:
            assert t and t.group(1) == h.group(1), f"HELP without TYPE at line {i}: {lines[i]!r}"
            current = h.group(1)
            assert current not in fams, f"family {current} appears twice"
            fams[current] = (t.group(2), [])
            i += 2
            continue
        m = SAMPLE_RE.match(lines[i])
        assert m, f"bad line {i}: {lines[i]!r}"
        assert current is not None
        name = m.group(1)
        ok = {current} | ({current + "_count", current + "_sum"} if fams[current][0] == "summary" else set())
        assert name in ok, f"sample {name} outside its family block ({current})"
        series = lines[i].rsplit(" ", 1)[0]
        assert series not in seen_series, f"series twice: {series}"
        seen_series.add(series)
        fams[current][1].append(lines[i])
        i += 1
    return fams


def reference_parse(text: str) -> dict[str, str]:
    parser = pytest.importorskip("prometheus_client.parser")
    return {f.name: f.type for f in parser.text_string_to_metric_families(text)}


# ------------------------------------------------------------------------------------ registry


def test_registry_counts_sets_and_observes() -> None:
    r = Registry()
    r.inc("bootsvc_dhcp_messages_total", {"direction": "in", "type": "DISCOVER"})
    r.inc("bootsvc_dhcp_messages_total", {"type": "DISCOVER", "direction": "in"}, 2)  # label order irrelevant
    r.set("bootsvc_test_gauge", None, 7.5)
    r.set("bootsvc_test_gauge", None, 3)
    r.observe("bootsvc_bmc_request_seconds", {"op": "power_on"}, 0.25)
    r.observe("bootsvc_bmc_request_seconds", {"op": "power_on"}, 0.5)
    assert r.get("bootsvc_dhcp_messages_total", {"direction": "in", "type": "DISCOVER"}) == 3
    assert r.get("bootsvc_test_gauge") == 3
    assert r.get("bootsvc_bmc_request_seconds", {"op": "power_on"}, "_count") == 2
    assert r.get("bootsvc_bmc_request_seconds", {"op": "power_on"}, "_sum") == 0.75


@pytest.mark.parametrize(("call", "message"), [
    (lambda r: r.inc("bootsvc_x_total", None, -1), "only go up"),
    (lambda r: r.inc("bad-name", None), "bad metric name"),
    (lambda r: r.inc("bootsvc_x_total", {"bad-label": 1}), "bad label name"),
    (lambda r: r.inc("bootsvc_x_total", {"service": "dhcp"}), "bad label name"),
    (lambda r: r.inc("bootsvc_x_total", {"__name__": "x"}), "bad label name"),
    (lambda r: r.set("bootsvc_dhcp_messages_total", None, 1), "is a counter, not a gauge"),
])
def test_registry_refuses_what_would_break_the_exposition(call: object, message: str) -> None:
    r = Registry()
    with pytest.raises(ValueError, match=message):
        call(r)  # type: ignore[operator]


def test_registry_type_is_fixed_by_first_use() -> None:
    r = Registry()
    r.set("bootsvc_y", None, 1)
    with pytest.raises(ValueError, match="is a gauge"):
        r.inc("bootsvc_y")


def test_series_limit_drops_and_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MAX_SERIES_PER_METRIC", 3)
    r = Registry()
    for i in range(5):
        r.inc("bootsvc_by_mac_total", {"mac": f"m{i}"})
    r.inc("bootsvc_by_mac_total", {"mac": "m0"})  # existing series still count
    assert r.get("bootsvc_by_mac_total", {"mac": "m0"}) == 2
    assert r.get("bootsvc_by_mac_total", {"mac": "m4"}) == 0
    assert r.get("bootsvc_metrics_dropped_series_total", {"metric": "bootsvc_by_mac_total"}) == 2


def test_sources_join_snapshots_and_a_broken_one_is_contained() -> None:
    r = Registry()
    r.add_source(lambda: [Sample("bootsvc_dhcp_dropped_total", (("reason", "rate_mac"),), 4, "counter")])

    def broken() -> list[Sample]:
        raise RuntimeError("boom")

    r.add_source(broken)
    r.inc("bootsvc_boots_total", {"phase": "nbp"})
    names = sorted(s.name for s in r.snapshot())
    assert names == ["bootsvc_boots_total", "bootsvc_dhcp_dropped_total"]


def test_dhcp_counter_mapping() -> None:
    flat = {"rx": 10, "rx_discover": 6, "rx_request": 4, "tx_offer": 6, "tx_ack": 3, "tx_nak": 1,
            "drop_rate_mac": 2, "drop_not_dhcp": 1, "tx_error": 1, "offer": 6, "commits": 2}
    got = {(s.name, s.labels): s.value for s in metrics.dhcp_counter_samples(flat, "bxbr0")}
    assert got[("bootsvc_dhcp_messages_total", (("direction", "in"), ("interface", "bxbr0"),
                                                ("type", "DISCOVER")))] == 6
    assert got[("bootsvc_dhcp_messages_total", (("direction", "out"), ("interface", "bxbr0"), ("type", "NAK")))] == 1
    assert got[("bootsvc_dhcp_dropped_total", (("interface", "bxbr0"), ("reason", "rate_mac")))] == 2
    assert got[("bootsvc_dhcp_events_total", (("event", "tx_error"), ("interface", "bxbr0")))] == 1
    assert got[("bootsvc_dhcp_events_total", (("event", "commits"), ("interface", "bxbr0")))] == 2
    assert not any(k[0] == "bootsvc_dhcp_messages_total" and ("type", "") in k[1] for k in got)
    assert sum(v for k, v in got.items() if k[0] == "bootsvc_dhcp_messages_total" and
               ("direction", "in") in k[1]) == flat["rx"]


# ------------------------------------------------------------------------------------ snapshot files


def test_flusher_writes_atomically_and_reader_sorts_fresh_from_stale(tmp_path: Path) -> None:
    r = Registry()
    r.inc("bootsvc_tftp_bytes_total", None, 1024)
    f = Flusher(tmp_path, "tftp", "0", registry=r, interval=5)
    path = f.flush()
    assert path == tmp_path / "tftp-0.json"
    assert not list(tmp_path.glob(".tmp-*")), "temp files must be renamed away"
    r.inc("bootsvc_tftp_bytes_total", None, 1024)
    f.flush()
    old = metrics.encode([Sample("bootsvc_boots_total", (), 1, "counter")], service="dhcp", instance="0",
                         interval=5, now=time.time() - 3600)
    (tmp_path / "dhcp-0.json").write_text(json.dumps(old))
    (tmp_path / "broken-0.json").write_text("{not json")
    ancient = metrics.encode([], service="http", instance="pid1", interval=5, now=time.time() - 2 * 86400)
    (tmp_path / "http-pid1.json").write_text(json.dumps(ancient))
    fresh, stale = metrics.read_snapshots(tmp_path, stale_after=60)
    assert [(s.service, s.samples[0].value) for s in fresh] == [("tftp", 2048)]
    assert [s.service for s in stale] == ["dhcp"]
    assert not (tmp_path / "http-pid1.json").exists(), "a day-old snapshot (dead worker) is pruned"


def test_flusher_thread_publishes_until_stopped(tmp_path: Path) -> None:
    r = Registry()
    f = Flusher(tmp_path, "conductor", "0", registry=r, interval=0.05).start()
    try:
        r.inc("bootsvc_bmc_requests_total", {"op": "power_on"})
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            fresh, _ = metrics.read_snapshots(tmp_path)
            if fresh and fresh[0].samples:
                break
            time.sleep(0.02)
        assert fresh and fresh[0].samples[0].value == 1
    finally:
        r.inc("bootsvc_bmc_requests_total", {"op": "power_on"})
        f.stop()
    fresh, _ = metrics.read_snapshots(tmp_path)
    assert fresh[0].samples[0].value == 2, "stop() writes the last counts"


def test_process_flusher_is_one_per_pid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config_mod.from_mapping({"state_dir": str(tmp_path)}, env={})
    monkeypatch.setattr(metrics, "_process_flusher", None)
    a = metrics.ensure_process_flusher(cfg, "http", interval=60)
    try:
        assert metrics.ensure_process_flusher(cfg, "http") is a
        assert a.path == tmp_path / "metrics" / f"http-pid{os.getpid()}.json" and a.path.exists()
    finally:
        a.stop()
        monkeypatch.setattr(metrics, "_process_flusher", None)


# ------------------------------------------------------------------------------------ rendering


def test_render_escapes_groups_and_parses() -> None:
    samples = webmetrics.with_labels([
        Sample("bootsvc_dhcp_dropped_total", (("reason", 'quote " back \\ nl \n end'),), 3, "counter"),
        Sample("bootsvc_nodes", (("kind", "dpu"), ("state", "registered")), 2, "gauge"),
        Sample("bootsvc_dhcp_dropped_total", (("reason", "rate_mac"),), 1.5, "counter"),
        Sample("bootsvc_bmc_request_seconds", (("op", "on"),), 2, "summary", "_count"),
        Sample("bootsvc_bmc_request_seconds", (("op", "on"),), 0.75, "summary", "_sum"),
        Sample("bootsvc_nodes", (("kind", "dpu"), ("state", "registered")), 9, "gauge"),  # duplicate series
        Sample("bootsvc_nodes", (("kind", "host"),), 1, "counter"),  # wrong type for the family
        Sample("bootsvc_odd", (), float("nan"), "gauge"),
        Sample("bootsvc_big", (), float("inf"), "gauge"),
    ], {"service": "dhcp", "instance": "0"})
    text = webmetrics.render(samples)
    fams = strict_parse(text)
    assert fams["bootsvc_dhcp_dropped_total"][0] == "counter"
    assert len(fams["bootsvc_nodes"][1]) == 1 and fams["bootsvc_nodes"][1][0].endswith(" 2")
    assert 'reason="quote \\" back \\\\ nl \\n end"' in text
    assert "bootsvc_odd{instance=\"0\",service=\"dhcp\"} NaN" in text and "+Inf" in text
    assert "bootsvc_dhcp_dropped_total{instance=\"0\",reason=\"rate_mac\",service=\"dhcp\"} 1.5" in text
    assert fams["bootsvc_bmc_request_seconds"] == ("summary", [
        'bootsvc_bmc_request_seconds_count{instance="0",op="on",service="dhcp"} 2',
        'bootsvc_bmc_request_seconds_sum{instance="0",op="on",service="dhcp"} 0.75'])
    ref = reference_parse(text)
    assert ref["bootsvc_dhcp_dropped"] == "counter" and ref["bootsvc_bmc_request_seconds"] == "summary"


def test_format_value() -> None:
    assert webmetrics.format_value(3) == "3"
    assert webmetrics.format_value(3.0) == "3"
    assert webmetrics.format_value(0.1) == "0.1"
    assert webmetrics.format_value(2.0**60) == repr(2.0**60)
    assert webmetrics.format_value(float("-inf")) == "-Inf"


# ------------------------------------------------------------------------------------ the endpoint


@pytest.fixture
def app_env(tmp_path: Path) -> Iterator[tuple[Flask, sessionmaker[Session], Path]]:
    cfg = config_mod.from_mapping({
        "database": {"url": f"sqlite:///{tmp_path / 'm.db'}"}, "state_dir": str(tmp_path / "state"),
        "security": {"node_key_ref": f"file:{tmp_path / 'node.key'}"},
        "images": {"catalog": str(tmp_path / "catalog.yaml")}}, env={})
    engine = db.make_engine(cfg.database.url)
    Base.metadata.create_all(engine)
    sessions = db.session_factory(engine)
    app = create_app(cfg, sessions)
    app.config.update(TESTING=True, BOOTSVC_METRICS_FLUSH=False)
    # this process's registry may hold counts from servers earlier tests ran in-process (TFTP, DHCP):
    # the endpoint exposes them, so start from a clean one
    metrics.counters.reset()
    yield app, sessions, tmp_path / "state" / "metrics"
    engine.dispose()


def test_metrics_endpoint_aggregates_processes_and_database(app_env: tuple[Flask, sessionmaker[Session], Path],
                                                            ) -> None:
    app, sessions, mdir = app_env
    with sessions() as s:
        host, dpu = inventory.enroll(s, [inventory.NodeSpec(name="h1", kind="host", serial="S1"),
                                         inventory.NodeSpec(name="d1", kind="dpu", serial="S2", host="h1")],
                                     actor="t")
        past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=2)
        lifecycle.apply(s, dpu, Trigger.PROVISION, actor="t", now=past)  # deadline (900 s) long passed
        lifecycle.apply(s, host, Trigger.PROVISION, actor="t")
        s.add(Lease(vrf="", network="oob", address="10.77.0.100", mac="02:00:00:00:00:01", state="bound",
                    expires_at=dt.datetime.now(dt.UTC)))
        s.commit()
    dhcp = Registry()
    dhcp.add_source(lambda: metrics.dhcp_counter_samples({"rx_discover": 5, "drop_rate_mac": 1}, "bxbr0"))
    Flusher(mdir, "dhcp", "0", registry=dhcp).flush()
    gone = metrics.encode([Sample("bootsvc_tftp_bytes_total", (), 99, "counter")], service="tftp", instance="0",
                          interval=5, now=time.time() - 7200)
    (mdir / "tftp-0.json").write_text(json.dumps(gone))
    client = app.test_client()
    client.get("/healthz")
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = r.get_data(as_text=True)
    fams = strict_parse(text)
    reference_parse(text)
    assert ('bootsvc_dhcp_messages_total{direction="in",instance="0",interface="bxbr0",service="dhcp",'
            'type="DISCOVER"} 5') in text
    assert 'bootsvc_dhcp_dropped_total{instance="0",interface="bxbr0",reason="rate_mac",service="dhcp"} 1' in text
    assert "bootsvc_tftp_bytes_total" not in fams, "a stale process's counters are not exposed"
    assert 'bootsvc_service_snapshot_age_seconds{instance="0",service="tftp"}' in text
    assert 'bootsvc_nodes{kind="dpu",state="dpu_booting"} 1' in text
    assert 'bootsvc_nodes{kind="host",state="host_waiting_dpu"} 1' in text
    assert 'bootsvc_nodes{kind="host",state="deployed"} 0' in text  # zero-filled
    assert 'bootsvc_nodes_overdue{kind="dpu",state="dpu_booting"} 1' in text
    age = next(line for line in fams["bootsvc_node_time_in_state_seconds_max"][1]
               if 'kind="dpu",state="dpu_booting"' in line)
    assert 7000 < float(age.rsplit(" ", 1)[1]) < 7400
    assert 'bootsvc_state_entries_total{kind="dpu",state="dpu_booting"} 1' in text
    assert 'bootsvc_leases{network="oob",state="bound",vrf=""} 1' in text
    assert "bootsvc_db_up 1" in text
    assert re.search(r'bootsvc_http_requests_total\{blueprint="health",code="200",instance="pid\d+",'
                     r'method="GET",service="http"\} 1', text)


def test_metrics_survive_a_dead_database(app_env: tuple[Flask, sessionmaker[Session], Path],
                                         tmp_path: Path) -> None:
    app, _, _ = app_env
    dead = sessionmaker(create_engine(f"sqlite:///{tmp_path}/no/such/dir/x.db"))
    app.config["SESSIONS"] = dead
    r = app.test_client().get("/metrics")
    text = r.get_data(as_text=True)
    assert r.status_code == 200 and "bootsvc_db_up 0" in text
    strict_parse(text)


def test_bmc_error_events_are_counted(app_env: tuple[Flask, sessionmaker[Session], Path]) -> None:
    app, sessions, _ = app_env
    with sessions() as s:
        (d,) = inventory.enroll(s, [inventory.NodeSpec(name="d1", kind="dpu", serial="S2")], actor="t")
        lifecycle.apply(s, d, Trigger.PROVISION, actor="t")
        lifecycle.apply(s, d, Trigger.BMC_ERROR, actor="t", error="refused")
        assert s.get(Node, d.id) is not None
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert 'bootsvc_bmc_error_events_total{kind="dpu"} 1' in text
    assert 'bootsvc_nodes{kind="dpu",state="bmc_failed"} 1' in text


def test_http_worker_publishes_only_under_gunicorn(app_env: tuple[Flask, sessionmaker[Session], Path],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    app, _, mdir = app_env
    del app.config[webmetrics.FLUSH_FLAG]
    monkeypatch.setattr(metrics, "_process_flusher", None)
    client = app.test_client()
    client.get("/healthz")  # werkzeug: one process, nothing to publish
    assert not mdir.exists()
    try:
        client.get("/healthz", environ_base={"SERVER_SOFTWARE": "gunicorn/23.0.0"})
        assert (mdir / f"http-pid{os.getpid()}.json").exists()
    finally:
        if metrics._process_flusher is not None:
            metrics._process_flusher[1].stop()
        monkeypatch.setattr(metrics, "_process_flusher", None)

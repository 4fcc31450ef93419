"""``GET /metrics``: Prometheus text exposition (format 0.0.4) for all of bootsvc's processes.

Owns: aggregating (1) this process's registry, (2) the snapshot files the other processes write
(``bootsvc.metrics``: DHCP, TFTP, DNS, conductor, the other gunicorn workers), each series labelled
with its ``service`` and ``instance``, and (3) gauges derived from the database (nodes per state,
time in state, overdue deadlines, state entries, BMC error events, leases); rendering them as text;
and counting HTTP responses and bytes of this app per blueprint (``after_app_request``).

Rendering is pure (``render``); the database part is cached for a few seconds so two Prometheus
servers scraping the same instance do not double the query load.

Exposition format reference: prometheus.io/docs/instrumenting/exposition_formats (text 0.0.4):
one ``# HELP`` and one ``# TYPE`` line per family, then all its samples together; label values
escape ``\\``, ``"`` and newline.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from bootsvc import metrics
from bootsvc.metrics import CATALOG, LabelKey, MetricType, Sample
from bootsvc.models import Event, Lease, Node
from bootsvc.states import ACTIVE_STATES, KINDS, states_for
from bootsvc.web import config_of, sessions_of

log = logging.getLogger("bootsvc.web.metrics")

bp = Blueprint("metrics", __name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DB_CACHE_SECONDS = 5.0
# app.config: True = always publish this process's counters to a snapshot file, False = never,
# unset = only under gunicorn (pre-forked workers: the one answering /metrics must see the others').
FLUSH_FLAG = "BOOTSVC_METRICS_FLUSH"

DB_CATALOG: dict[str, tuple[MetricType, str]] = {
    "bootsvc_nodes": ("gauge", "Nodes by kind and lifecycle state."),
    "bootsvc_node_time_in_state_seconds_max": (
        "gauge", "Longest time any node of this kind has been in this state."),
    "bootsvc_node_time_in_state_seconds_sum": (
        "gauge", "Total time the nodes of this kind have been in this state (divide by bootsvc_nodes)."),
    "bootsvc_nodes_overdue": (
        "gauge", "Nodes in an active state whose deadline has passed (the conductor should have acted)."),
    "bootsvc_state_entries_total": (
        "counter", "Times nodes entered a state (from the event log): boots per phase, failures per kind."),
    "bootsvc_bmc_error_events_total": ("counter", "bmc_error transitions recorded in the event log."),
    "bootsvc_leases": ("gauge", "DHCP leases by VRF, network and lease state."),
    "bootsvc_db_up": ("gauge", "1 if the database answered the metrics queries."),
    "bootsvc_metrics_db_query_seconds": ("gauge", "Time the last database metrics query took."),
    "bootsvc_service_snapshot_age_seconds": (
        "gauge", "Seconds since each process last published its counters (stale ones are not exposed)."),
    "bootsvc_http_requests_total": ("counter", "HTTP requests answered, by blueprint, method and status."),
    "bootsvc_http_response_bytes_total": (
        "counter", "HTTP response body bytes (Content-Length) by blueprint; counted when the response is "
                   "handed to the server, so an aborted download counts in full."),
}


# ---------------------------------------------------------------------------- rendering (pure)


def _escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(v: float) -> str:
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    if v.is_integer() and abs(v) < 2**53:
        return str(int(v))
    return repr(v)


@dataclass(frozen=True, slots=True)
class Labelled:
    """A sample with the labels the aggregator adds (service, instance) merged in."""

    sample: Sample
    labels: LabelKey


def with_labels(samples: Iterable[Sample], extra: Mapping[str, str]) -> list[Labelled]:
    out = []
    for s in samples:
        merged = dict(s.labels)
        merged.update(extra)
        out.append(Labelled(s, tuple(sorted(merged.items()))))
    return out


def render(samples: Sequence[Labelled], catalog: Mapping[str, tuple[MetricType, str]] | None = None) -> str:
    """Text exposition of ``samples``: grouped per family, families sorted by name, one HELP/TYPE each.

    A family whose samples disagree on type keeps the catalogue's type (or the first seen) and drops
    the others (logged), so one misbehaving process cannot make the whole scrape unparsable.
    """
    cat = {**CATALOG, **DB_CATALOG, **(catalog or {})}
    fams: dict[str, list[Labelled]] = defaultdict(list)
    ftype: dict[str, MetricType] = {}
    for ls in samples:
        name = ls.sample.name
        want = cat[name][0] if name in cat else ftype.get(name, ls.sample.mtype)
        if ls.sample.mtype != want:
            log.warning("metric %s: dropping a %s sample (family is a %s)", name, ls.sample.mtype, want)
            continue
        ftype[name] = want
        fams[name].append(ls)
    lines: list[str] = []
    for name in sorted(fams):
        help_text = cat[name][1] if name in cat else metrics._DEFAULT_HELP
        lines.append(f"# HELP {name} {_escape_help(help_text)}")
        lines.append(f"# TYPE {name} {ftype[name]}")
        seen: set[tuple[str, LabelKey]] = set()
        for ls in sorted(fams[name], key=lambda x: (x.labels, x.sample.suffix)):
            key = (ls.sample.suffix, ls.labels)
            if key in seen:  # two sources claimed the same series: keep the first, never emit twice
                continue
            seen.add(key)
            lbl = ",".join(f'{k}="{_escape_label(v)}"' for k, v in ls.labels)
            lines.append(f"{name}{ls.sample.suffix}{{{lbl}}} {format_value(ls.sample.value)}" if lbl
                         else f"{name}{ls.sample.suffix} {format_value(ls.sample.value)}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- database gauges


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)  # SQLite returns naive UTC


def db_samples(session: Session, now: dt.datetime) -> list[Sample]:
    """Gauges and counters derived from the database (pure SQL reads)."""
    out: list[Sample] = []
    count: dict[tuple[str, str], int] = defaultdict(int)
    age_max: dict[tuple[str, str], float] = defaultdict(float)
    age_sum: dict[tuple[str, str], float] = defaultdict(float)
    overdue: dict[tuple[str, str], int] = defaultdict(int)
    for kind, state, since, deadline in session.execute(
            select(Node.kind, Node.state, Node.state_since, Node.deadline)):
        k = (kind, state)
        count[k] += 1
        age = max(0.0, (now - _aware(since)).total_seconds()) if since is not None else 0.0
        age_max[k] = max(age_max[k], age)
        age_sum[k] += age
        if deadline is not None and state in ACTIVE_STATES and _aware(deadline) < now:
            overdue[k] += 1
    # Zero-fill every (kind, state) so a series does not vanish when its last node leaves the state.
    for kind in KINDS:
        for st in states_for(kind):
            count.setdefault((kind, st.value), 0)
    for (kind, state), n in sorted(count.items()):
        lk = (("kind", kind), ("state", state))
        out.append(Sample("bootsvc_nodes", lk, n, "gauge"))
        out.append(Sample("bootsvc_node_time_in_state_seconds_max", lk, age_max.get((kind, state), 0.0), "gauge"))
        out.append(Sample("bootsvc_node_time_in_state_seconds_sum", lk, age_sum.get((kind, state), 0.0), "gauge"))
        if state in ACTIVE_STATES:
            out.append(Sample("bootsvc_nodes_overdue", lk, overdue.get((kind, state), 0), "gauge"))
    entered = session.execute(
        select(Node.kind, Event.to_state, func.count()).select_from(Event)
        .join(Node, Node.id == Event.node_id)
        .where(Event.to_state.is_not(None),
               (Event.from_state.is_(None)) | (Event.from_state != Event.to_state))
        .group_by(Node.kind, Event.to_state))
    for kind, to_state, n in entered:
        out.append(Sample("bootsvc_state_entries_total", (("kind", kind), ("state", str(to_state))), n, "counter"))
    bmc: dict[str, int] = {str(kind): int(n) for kind, n in session.execute(
        select(Node.kind, func.count()).select_from(Event).join(Node, Node.id == Event.node_id)
        .where(Event.trigger == "bmc_error").group_by(Node.kind))}
    for kind in KINDS:
        out.append(Sample("bootsvc_bmc_error_events_total", (("kind", kind),), bmc.get(kind, 0), "counter"))
    for vrf, network, state, n in session.execute(
            select(Lease.vrf, Lease.network, Lease.state, func.count())
            .group_by(Lease.vrf, Lease.network, Lease.state)):
        out.append(Sample("bootsvc_leases", (("network", network), ("state", state), ("vrf", vrf)), n, "gauge"))
    return out


def _cached_db_samples(app: Flask) -> list[Sample]:
    cache: dict[str, Any] = app.extensions.setdefault("bootsvc_metrics", {})
    now = time.monotonic()
    if "db" in cache and now - cache["db_at"] < DB_CACHE_SECONDS:
        return list(cache["db"])
    t0 = time.perf_counter()
    try:
        with sessions_of(app)() as s:
            samples = db_samples(s, dt.datetime.now(dt.UTC))
        up = 1.0
    except Exception as e:  # still expose the process counters when the database is down
        log.warning("metrics: database query failed: %s", e)
        samples, up = [], 0.0
    samples.append(Sample("bootsvc_db_up", (), up, "gauge"))
    samples.append(Sample("bootsvc_metrics_db_query_seconds", (), time.perf_counter() - t0, "gauge"))
    cache["db"], cache["db_at"] = samples, now
    return list(samples)


# ---------------------------------------------------------------------------- routes and hooks


def _local_instance() -> str:
    return f"pid{os.getpid()}"


@bp.record_once
def _setup(state: Any) -> None:
    app: Flask = state.app

    @app.before_request
    def _start_flusher() -> None:
        # gunicorn builds the app in each worker after fork: start this worker's publisher lazily.
        # A single-process server (tests, the werkzeug dev server) reads its registry directly.
        flag = app.config.get(FLUSH_FLAG)
        if flag is None:
            flag = str(request.environ.get("SERVER_SOFTWARE", "")).startswith("gunicorn")
        if flag:
            metrics.ensure_process_flusher(config_of(app), "http")

    @app.after_request
    def _count(resp: Response) -> Response:
        try:
            bp_name: str = request.blueprint or "none"
            metrics.counters.inc("bootsvc_http_requests_total",
                                 {"blueprint": bp_name, "method": request.method, "code": resp.status_code})
            if resp.content_length:
                metrics.counters.inc("bootsvc_http_response_bytes_total", {"blueprint": bp_name},
                                     resp.content_length)
        except Exception:  # counting must never break a response
            log.exception("metrics: counting the response failed")
        return resp


@bp.get("/metrics")
def metrics_endpoint() -> Response:
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    config = config_of(app)
    directory = metrics.metrics_dir(config)
    own = metrics.snapshot_path(directory, "http", _local_instance())
    fresh, stale = metrics.read_snapshots(directory, skip=own)
    now = time.time()
    samples: list[Labelled] = with_labels(metrics.counters.snapshot(),
                                          {"service": "http", "instance": _local_instance()})
    for snap in fresh:
        samples += with_labels(snap.samples, {"service": snap.service, "instance": snap.instance})
    for snap in fresh + stale:
        samples += with_labels([Sample("bootsvc_service_snapshot_age_seconds", (),
                                       max(0.0, now - snap.updated_at), "gauge")],
                               {"service": snap.service, "instance": snap.instance})
    samples += with_labels(_cached_db_samples(app), {})
    return Response(render(samples), mimetype=None, content_type=CONTENT_TYPE)

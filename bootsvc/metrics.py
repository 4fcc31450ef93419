"""Process-local counters and how each process publishes them for ``GET /metrics``.

Owns: the in-process registry every service writes to (``counters.inc(name, labels, n)``,
``counters.set(...)`` for gauges, ``counters.observe(...)`` for count/sum summaries), the catalogue of
metric names with their Prometheus TYPE and HELP, and the snapshot files: each process writes its
whole registry to ``<state_dir>/metrics/<service>-<instance>.json`` every few seconds (atomically:
temp file + rename) and ``bootsvc.web.metrics`` reads them all and renders one exposition.

Usage from a service (DHCP, TFTP, DNS, conductor, gunicorn workers)::

    from bootsvc import metrics
    metrics.counters.inc("bootsvc_dhcp_messages_total", {"direction": "in", "type": "DISCOVER"})
    flusher = metrics.start(config, "dhcp", str(listener_index))   # once, at service start
    ...
    flusher.stop()                                                  # final flush at shutdown

Why snapshot files, not a table or prometheus_client's multiprocess mode:
- A ``service_counters`` table would put a write every few seconds per process on the database that
  is the arbiter of leases; on SQLite there is one writer at a time, so metrics would compete with
  DHCP ACKs (which must be durable before they are sent). Files cost the database nothing.
- prometheus_client's multiprocess mode needs ``PROMETHEUS_MULTIPROC_DIR`` set before import in
  every process, keeps one mmap file per pid forever (gunicorn worker restarts pile them up), has no
  notion of a dead process for gauges beyond its ``multiprocess_mode`` knobs, and cannot label a
  series with the service it came from. Our needs are a dict of floats per process.
- Metrics are per host by nature (Prometheus scrapes every bootsvc instance), and every process of
  one instance shares its filesystem, including those inside network namespaces (``ip netns exec``
  changes the network namespace only).

Each process's series carry ``service`` and ``instance`` labels, so every series is monotonic for the
life of one process and a restart is an ordinary counter reset, which ``rate()`` handles
(Prometheus counter semantics). Snapshots older than ``stale_after`` are left out of the exposition.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger("bootsvc.metrics")

MetricType = Literal["counter", "gauge", "summary"]
LabelKey = tuple[tuple[str, str], ...]

NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_INSTANCE_RE = re.compile(r"[^A-Za-z0-9_.-]")
RESERVED_LABELS = frozenset({"service", "instance"})  # added by the aggregator
MAX_SERIES_PER_METRIC = 2000  # a guard against a label that is really an id (a MAC, an address)
FORMAT_VERSION = 1

# Known metrics: TYPE and HELP. Other names may be used (``describe()`` them, or they get a generic
# HELP); a name's type is fixed by its first use.
CATALOG: dict[str, tuple[MetricType, str]] = {
    "bootsvc_dhcp_messages_total": (
        "counter", "DHCP messages by direction (in/out) and message type (RFC 2132 section 9.6)."),
    "bootsvc_dhcp_dropped_total": ("counter", "DHCP packets dropped without an answer, by reason."),
    "bootsvc_tftp_bytes_total": ("counter", "Bytes sent by the TFTP server."),
    "bootsvc_tftp_transfers_total": ("counter", "TFTP transfers, by result (ok, aborted, evicted)."),
    "bootsvc_tftp_refused_total": (
        "counter", "TFTP requests answered with an ERROR or ignored, by reason (busy, busy_client, "
        "busy_resources, identity, not_found, access, illegal, upload, unknown_tid, stray)."),
    "bootsvc_tftp_evicted_total": (
        "counter", "TFTP transfers never acknowledged by their client, dropped to admit a new request."),
    "bootsvc_tftp_os_errors_total": ("counter", "OS errors in the TFTP workers (EMFILE, ENOBUFS, ...), by errno."),
    "bootsvc_tftp_internal_errors_total": ("counter", "Unexpected exceptions caught in a TFTP worker, by place."),
    "bootsvc_http_bytes_total": ("counter", "Bytes of boot artifacts sent over HTTP, by kind."),
    "bootsvc_boots_total": (
        "counter", "Boot requests served, by phase (e.g. nbp, script, kernel, initrd, bfb, callback)."),
    "bootsvc_bmc_requests_total": ("counter", "BMC operations attempted, by operation."),
    "bootsvc_bmc_errors_total": ("counter", "BMC operations that failed, by operation and class."),
    "bootsvc_bmc_request_seconds": ("summary", "Time spent in BMC operations."),
    "bootsvc_fabric_session_drops_total": (
        "counter", "BGP sessions of DPU uplinks seen going from Established to down, by uplink (agent reports)."),
    "bootsvc_metrics_dropped_series_total": (
        "counter", "Samples refused because a metric exceeded its series limit (a label is too varied)."),
}

_DEFAULT_HELP = "bootsvc metric (no description registered)."


def describe(name: str, mtype: MetricType, help_text: str) -> None:
    """Register TYPE and HELP for a metric name (call at import time of the module that uses it)."""
    _check_name(name)
    CATALOG[name] = (mtype, help_text)


def _check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ValueError(f"bad metric name {name!r}: must match {NAME_RE.pattern}")


def _label_key(labels: Mapping[str, object] | None) -> LabelKey:
    if not labels:
        return ()
    key = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
    for k, _ in key:
        if not LABEL_RE.match(k) or k.startswith("__") or k in RESERVED_LABELS:
            raise ValueError(f"bad label name {k!r}: must match {LABEL_RE.pattern}, not start with '__', "
                             f"and not be one of {sorted(RESERVED_LABELS)}")
    return key


@dataclass(frozen=True, slots=True)
class Sample:
    """One series: ``name{labels} value`` of a family of type ``mtype``.

    For a summary, ``name`` is the family name and ``suffix`` is ``_count`` or ``_sum``.
    """

    name: str
    labels: LabelKey
    value: float
    mtype: MetricType
    suffix: str = ""


class Registry:
    """Thread-safe counters/gauges/summaries of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[tuple[str, str, LabelKey], float] = {}
        self._types: dict[str, MetricType] = {}
        self._series: dict[str, int] = {}
        self._sources: list[Callable[[], Iterable[Sample]]] = []

    def _typed(self, name: str, mtype: MetricType) -> None:
        seen = self._types.get(name)
        if seen is None:
            _check_name(name)
            declared = CATALOG.get(name)
            if declared is not None and declared[0] != mtype:
                raise ValueError(f"metric {name} is a {declared[0]}, not a {mtype}")
            self._types[name] = mtype
        elif seen != mtype:
            raise ValueError(f"metric {name} is a {seen}, not a {mtype}")

    def _bump(self, name: str, suffix: str, key: LabelKey, delta: float, absolute: bool = False) -> None:
        k = (name, suffix, key)
        if k not in self._values:
            if self._series.get(name, 0) >= MAX_SERIES_PER_METRIC:
                d = ("bootsvc_metrics_dropped_series_total", "", (("metric", name),))
                self._values[d] = self._values.get(d, 0.0) + 1
                self._types.setdefault("bootsvc_metrics_dropped_series_total", "counter")
                return
            if suffix in ("", "_count"):
                self._series[name] = self._series.get(name, 0) + 1
            self._values[k] = 0.0
        self._values[k] = delta if absolute else self._values[k] + delta

    def inc(self, name: str, labels: Mapping[str, object] | None = None, n: float = 1) -> None:
        """Add ``n`` (>= 0) to a counter."""
        if n < 0 or math.isnan(n):
            raise ValueError(f"counter {name} can only go up (got {n})")
        key = _label_key(labels)
        with self._lock:
            self._typed(name, "counter")
            self._bump(name, "", key, float(n))

    def set(self, name: str, labels: Mapping[str, object] | None, value: float) -> None:
        """Set a gauge."""
        key = _label_key(labels)
        with self._lock:
            self._typed(name, "gauge")
            self._bump(name, "", key, float(value), absolute=True)

    def observe(self, name: str, labels: Mapping[str, object] | None, value: float) -> None:
        """Record one observation of a summary (exposed as ``name_count`` and ``name_sum``)."""
        key = _label_key(labels)
        with self._lock:
            self._typed(name, "summary")
            self._bump(name, "_count", key, 1.0)
            if (name, "_count", key) in self._values:
                self._bump(name, "_sum", key, float(value))

    def get(self, name: str, labels: Mapping[str, object] | None = None, suffix: str = "") -> float:
        with self._lock:
            return self._values.get((name, suffix, _label_key(labels)), 0.0)

    def add_source(self, fn: Callable[[], Iterable[Sample]]) -> None:
        """A callable whose samples join every snapshot (for modules that keep their own counters)."""
        with self._lock:
            self._sources.append(fn)

    def snapshot(self) -> list[Sample]:
        with self._lock:
            out = [Sample(n, k, v, self._types[n], s) for (n, s, k), v in self._values.items()]
            sources = list(self._sources)
        for fn in sources:
            try:
                out.extend(fn())
            except Exception:  # a broken source must not stop the others from being published
                log.exception("metrics source %r failed", fn)
        return out

    def reset(self, *, sources: bool = True) -> None:
        """Forget the values (and the sources unless ``sources=False``): for tests, and for a forked
        child, which must not publish its parent's counts a second time."""
        with self._lock:
            self._values.clear()
            self._types.clear()
            self._series.clear()
            if sources:
                self._sources.clear()


counters = Registry()

describe("bootsvc_db_statements_total", "counter",
         "SQL statements this process sent to the database (one per cursor execute: a round trip).")


def _one_statement(*_args: Any, **_kw: Any) -> None:
    counters.inc("bootsvc_db_statements_total")


def count_db_statements(engine: Any) -> None:
    """Count every statement ``engine`` sends in ``bootsvc_db_statements_total`` (``bootsvc.db.make_engine``
    calls it for every engine; the aggregator adds the service and instance labels)."""
    from sqlalchemy import event  # here, not at the top: the registry itself needs no database library

    event.listen(engine, "before_cursor_execute", _one_statement)


# ---------------------------------------------------------------------------- snapshot files


def metrics_dir(config: Any) -> Path:
    """``<state_dir>/metrics`` of a ``bootsvc.config.Config``."""
    return Path(config.resolve(config.state_dir)) / "metrics"


def instance_name(text: str) -> str:
    return _INSTANCE_RE.sub("_", text)[:64] or "0"


def snapshot_path(directory: Path, service: str, instance: str) -> Path:
    return directory / f"{instance_name(service)}-{instance_name(instance)}.json"


def encode(samples: Iterable[Sample], *, service: str, instance: str, interval: float,
           now: float | None = None) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "service": service,
        "instance": instance,
        "pid": os.getpid(),
        "updated_at": time.time() if now is None else now,
        "interval": interval,
        "samples": [{"name": s.name, "suffix": s.suffix, "type": s.mtype, "labels": dict(s.labels),
                     "value": s.value} for s in samples],
    }


@dataclass(frozen=True, slots=True)
class Snapshot:
    service: str
    instance: str
    pid: int
    updated_at: float
    interval: float
    samples: tuple[Sample, ...]
    path: Path | None = None


def decode(data: Mapping[str, Any], path: Path | None = None) -> Snapshot:
    """Parse a snapshot document; raises ValueError on anything malformed."""
    if data.get("format") != FORMAT_VERSION:
        raise ValueError(f"unknown snapshot format {data.get('format')!r}")
    samples = []
    for raw in data["samples"]:
        name, suffix, mtype = str(raw["name"]), str(raw.get("suffix", "")), raw["type"]
        _check_name(name)
        if mtype not in ("counter", "gauge", "summary") or suffix not in ("", "_count", "_sum"):
            raise ValueError(f"bad sample type/suffix {mtype!r}/{suffix!r}")
        samples.append(Sample(name, _label_key(raw.get("labels") or {}), float(raw["value"]), mtype, suffix))
    return Snapshot(str(data["service"]), str(data["instance"]), int(data.get("pid", 0)),
                    float(data["updated_at"]), float(data.get("interval", 5.0)), tuple(samples), path)


def write_snapshot(directory: Path, service: str, instance: str, samples: Iterable[Sample],
                   interval: float) -> Path:
    """Atomically replace this process's snapshot file (readers see the old or the new, never half)."""
    directory.mkdir(parents=True, exist_ok=True)
    target = snapshot_path(directory, service, instance)
    doc = encode(samples, service=service, instance=instance, interval=interval)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, separators=(",", ":"))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def read_snapshots(directory: Path, *, now: float | None = None, stale_after: float = 60.0,
                   skip: Path | None = None, prune_after: float = 86400.0) -> tuple[list[Snapshot], list[Snapshot]]:
    """All snapshot files in ``directory`` as (fresh, stale). Unreadable files are logged and skipped.

    A snapshot is stale when it was not rewritten for ``max(stale_after, 5 * its interval)`` seconds:
    its process is gone (a recycled gunicorn worker, a stopped service) or stuck. Files not rewritten
    for ``prune_after`` seconds are deleted, so recycled workers' files do not pile up.
    """
    t = time.time() if now is None else now
    fresh: list[Snapshot] = []
    stale: list[Snapshot] = []
    if not directory.is_dir():
        return fresh, stale
    for p in sorted(directory.glob("*.json")):
        if skip is not None and p == skip:
            continue
        try:
            snap = decode(json.loads(p.read_text()), p)
        except FileNotFoundError:
            continue  # replaced or removed between glob and read
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable metrics snapshot %s: %s", p, e)
            continue
        age = t - snap.updated_at
        if age > prune_after:
            p.unlink(missing_ok=True)
            continue
        (stale if age > max(stale_after, 5 * snap.interval) else fresh).append(snap)
    return fresh, stale


class Flusher:
    """Writes one process's registry to its snapshot file every ``interval`` seconds, in a thread."""

    def __init__(self, directory: Path, service: str, instance: str, *, registry: Registry = counters,
                 interval: float = 5.0) -> None:
        self.directory, self.service, self.instance = directory, service, instance
        self.registry, self.interval = registry, interval
        self.path = snapshot_path(directory, service, instance)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def flush(self) -> Path | None:
        try:
            return write_snapshot(self.directory, self.service, self.instance, self.registry.snapshot(),
                                  self.interval)
        except OSError as e:  # a full disk must not take a protocol server down with it
            log.warning("cannot write metrics snapshot %s: %s", self.path, e)
            return None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.flush()

    def start(self) -> Flusher:
        self.flush()
        self._thread = threading.Thread(target=self._loop, name=f"metrics-{self.service}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and write a final snapshot (so counts up to shutdown are not lost)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1)
        self.flush()


def start(config: Any, service: str, instance: str, *, interval: float = 5.0,
          registry: Registry = counters) -> Flusher:
    """Start publishing ``registry`` as ``service``/``instance`` under the config's state_dir."""
    return Flusher(metrics_dir(config), service, instance, registry=registry, interval=interval).start()


_process_flusher: tuple[int, Flusher] | None = None
_process_lock = threading.Lock()


def ensure_process_flusher(config: Any, service: str, *, interval: float = 5.0) -> Flusher:
    """One flusher per process, started on first call (after a fork, the child starts its own).

    For processes that cannot call ``start`` at a clean start-up point, e.g. gunicorn workers, which
    build the Flask app after forking. The instance name is ``pid<pid>``.
    """
    global _process_flusher
    pid = os.getpid()
    with _process_lock:
        if _process_flusher is None or _process_flusher[0] != pid:
            if _process_flusher is not None:  # forked: the parent's counts are the parent's to publish
                counters.reset(sources=False)
            _process_flusher = (pid, start(config, service, f"pid{pid}", interval=interval))
        return _process_flusher[1]


# ---------------------------------------------------------------------------- adapters


def dhcp_counter_samples(flat: Mapping[str, int], interface: str = "") -> list[Sample]:
    """Map ``bootsvc.dhcp.server.DhcpService.counters()`` (flat ``rx_<type>``, ``tx_<type>``,
    ``drop_<reason>``, outcome names) onto the catalogue's DHCP families.

    Wire it in the DHCP process with
    ``counters.add_source(lambda: dhcp_counter_samples(svc.counters(), svc.listener.interface))``.
    """
    out: list[Sample] = []
    iface = (("interface", interface),) if interface else ()
    for key, n in flat.items():
        if key.startswith("rx_") or (key.startswith("tx_") and key not in ("tx_error", "tx_l2",
                                                                            "tx_l2_broadcast")):
            direction = "in" if key.startswith("rx_") else "out"
            lk = tuple(sorted((("direction", direction), ("type", key[3:].upper()), *iface)))
            out.append(Sample("bootsvc_dhcp_messages_total", lk, float(n), "counter"))
        elif key.startswith("drop_"):
            lk = tuple(sorted((("reason", key[5:]), *iface)))
            out.append(Sample("bootsvc_dhcp_dropped_total", lk, float(n), "counter"))
        elif key != "rx" and NAME_RE.match(key):
            lk = tuple(sorted((("event", key), *iface)))
            out.append(Sample("bootsvc_dhcp_events_total", lk, float(n), "counter"))
    return out


CATALOG["bootsvc_dhcp_events_total"] = (
    "counter", "Other DHCP server events: decision outcomes, lease commits, send errors, ...")
CATALOG["bootsvc_dns_events_total"] = (
    "counter", "DNS server events: udp_queries, tcp_queries, tcp_connections, tcp_refused (over the "
    "connection limit), dropped (no reply: not a query), errors.")

"""The supervisor behind ``bootsvc serve``: starts each protocol server as its own process.

Owns: which services run (one per configured listener, plus the conductor), starting each in its
listener's network namespace (``ip netns exec``), restarting a service that dies - with exponential
backoff, one log line per restart, counted in a status file that ``GET /health`` shows - while the
others keep serving, stopping all of them on SIGTERM/SIGINT, and making sure they never outlive it
(``PR_SET_PDEATHSIG``: the kernel sends each child SIGTERM when the supervisor dies, even by SIGKILL).
One ``serve`` per set of listeners: a second one on the same config finds the lock (``fcntl.flock``
on a file keyed on the listeners) and refuses, naming the running one, instead of half-starting next
to it. At start the open-file limit is raised to its hard limit (systemd's default soft limit is
1024; one HTTP slow client or TFTP transfer costs a descriptor or two). One process per service
keeps a TFTP or HTTP burst from starving DHCP of the GIL; they share state only through the database.
Each service process also gets the garbage collector's policy (``settle_heap``: start-up objects frozen,
higher young-generation threshold) and, for benchmarks only, its measurement (``GcStats``).

A service is a function ``run(config, listener_index, stop_event)``, reached through ``RUNNERS``; it
returns when ``stop_event`` is set (or, for gunicorn, on its own SIGTERM handling). The runners import
their server inside the function, a plain import, so each service process loads only what it runs (the
DHCP process never imports Flask or gunicorn: start-up time and memory per process). A server module
that does not import (renamed, missing from the installation) is not skipped: its process logs the
traceback and exits with ``EXIT_BROKEN``, and the supervisor then stops every service and exits with
that code and one line naming the service, since restarting cannot heal an installation.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import gc
import hashlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bootsvc import metrics
from bootsvc.config import Config

log = logging.getLogger("bootsvc.daemon")

BACKOFF_FIRST = 1.0  # seconds before the first restart; doubles per consecutive crash
BACKOFF_MAX = 60.0
STABLE_AFTER = 60.0  # a service that ran this long has its backoff reset
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
EARLY_TYPES_AFTER = 20.0  # seconds: GcStats counts the heap's types once this far into the run
EXIT_BROKEN = 70  # EX_SOFTWARE (sysexits.h): the service's code does not import; restarting cannot help

Runner = Callable[[Config, int, threading.Event], None]
GC_THRESHOLD = (10_000, 10, 10)  # gc.set_threshold of every service process (CPython: 700, 10, 10)
RESETTLE_AFTER = 30.0  # seconds after start: settle_heap freezes what the service's warm-up built
_SETTLE = False  # set by run_one: only a service process settles its heap (not a test calling a runner)


def settle_heap() -> None:
    """In a service process (``run_one``), once its runner has imported the service's code: configure
    the ORM mappers, then move every object that exists (modules, classes, functions, SQLAlchemy's
    mappers and caches: ~100 000-200 000 objects) into the collector's permanent generation
    (``gc.freeze``). A full collection walks every tracked object while holding the GIL; these never
    become garbage and a service runs for days, so each full collection would walk them again for
    nothing. What the service builds later (per-node caches, the DHCP lease index) is collected as
    before; the DHCP server and each HTTP worker freeze again once their own start-up state exists
    (``bootsvc.dhcp.server``, ``bootsvc.web.serve``). Forked workers (gunicorn's, TFTP's) inherit the
    frozen generation and the thresholds."""
    if not _SETTLE:
        return
    from sqlalchemy.orm import configure_mappers

    import bootsvc.models  # noqa: F401  (every mapped class, before configure_mappers)

    configure_mappers()
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLD)
    # Once more when the service has warmed up: its engine, sessions, compiled-statement cache and
    # the rest of what its first passes build stay for its life too (~60 000 objects in a conductor).
    # What is live then and becomes cyclic garbage later is never collected: a bounded, one-time cost.
    t = threading.Timer(RESETTLE_AFTER, _freeze)
    t.daemon = True
    t.start()


def _freeze() -> None:
    gc.collect()
    gc.freeze()


def _run_http(config: Config, index: int, stop: threading.Event) -> None:
    from bootsvc.web import serve

    settle_heap()
    serve.run(config, index, stop)


def _run_dhcp(config: Config, index: int, stop: threading.Event) -> None:
    from bootsvc.dhcp import server

    settle_heap()
    server.run(config, index, stop)


def _run_tftp(config: Config, index: int, stop: threading.Event) -> None:
    from bootsvc import tftp

    settle_heap()
    tftp.run(config, index, stop)


def _run_dns(config: Config, index: int, stop: threading.Event) -> None:
    from bootsvc import dns

    settle_heap()
    dns.run(config, index, stop)


def _run_conductor(config: Config, index: int, stop: threading.Event) -> None:
    from bootsvc import conductor

    settle_heap()
    conductor.run(config, index, stop)


RUNNERS: dict[str, Runner] = {
    "http": _run_http,
    "dhcp": _run_dhcp,
    "tftp": _run_tftp,
    "dns": _run_dns,
    "conductor": _run_conductor,
}


@dataclass(frozen=True)
class ServiceSpec:
    kind: str
    index: int
    netns: str | None

    @property
    def name(self) -> str:
        return f"{self.kind}[{self.index}]" + (f"@{self.netns}" if self.netns else "")


def planned_services(config: Config, only: set[str] | None = None) -> list[ServiceSpec]:
    specs: list[ServiceSpec] = []
    lst = config.listeners
    netns: dict[str, list[str | None]] = {
        "http": [x.netns for x in lst.http], "dhcp": [x.netns for x in lst.dhcp],
        "tftp": [x.netns for x in lst.tftp], "dns": [x.netns for x in lst.dns]}
    for kind, spaces in netns.items():
        for i, ns in enumerate(spaces):
            specs.append(ServiceSpec(kind, i, ns))
    specs.append(ServiceSpec("conductor", 0, None))
    if only is not None:
        specs = [s for s in specs if s.kind in only]
    return specs


class GcStats:
    """What the garbage collector cost this process, for a benchmark (env ``BOOTSVC_GC_STATS=DIR``):
    collections and CPU seconds per generation through ``gc.callbacks`` (the thread's CPU time
    between each collection's ``start`` and ``stop``: a collection holds the GIL), written to
    ``DIR/gc-<kind>-<pid>.json`` at most every ``every`` seconds from the callback itself (forked
    workers inherit the hook, and multiprocessing's workers end with ``os._exit``, which skips
    ``atexit``) and at exit with the tracked objects counted by type (one ``gc.get_objects()``
    walk, at exit only). Off by default: nothing is installed."""

    def __init__(self, directory: Path, kind: str, every: float = 5.0) -> None:
        self.directory, self.kind, self.every = directory, kind, every
        self.n = [0, 0, 0]
        self.cpu = [0.0, 0.0, 0.0]
        self.max_ms = [0.0, 0.0, 0.0]
        self.collected = [0, 0, 0]
        self._t0 = 0.0
        self._pid = os.getpid()
        self._born = time.monotonic()
        self._cpu0 = time.process_time()
        self._written = time.monotonic()
        self._early: dict[str, int] | None = None

    def install(self) -> None:
        gc.callbacks.append(self._callback)
        atexit.register(self.write, True)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.thread_time()
            return
        g = info["generation"]
        dt = time.thread_time() - self._t0
        if os.getpid() != self._pid:  # a forked worker: its own numbers from here on
            self._pid, self._born, self._cpu0 = os.getpid(), time.monotonic(), time.process_time()
            self.n, self.cpu, self.max_ms, self.collected = [0, 0, 0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0, 0, 0]
            self._early = None
        self.n[g] += 1
        self.cpu[g] += dt
        self.collected[g] += info.get("collected", 0)
        self.max_ms[g] = max(self.max_ms[g], dt * 1000)
        if time.monotonic() - self._written >= self.every:
            # the types once, early in the run (after start-up), to compare with those at exit
            early = self._early is None and time.monotonic() - self._born >= EARLY_TYPES_AFTER
            if early:
                self._early = _type_counts()
            self.write()

    def write(self, types: bool = False) -> None:
        if types:  # the last write (atexit): the interpreter's own final collections must not overwrite it
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._callback)
        self._written = time.monotonic()
        out: dict[str, Any] = {
            "kind": self.kind, "pid": os.getpid(), "ppid": os.getppid(),
            "uptime_s": round(time.monotonic() - self._born, 1),
            "process_cpu_s": round(time.process_time() - self._cpu0, 3),
            "collections": self.n, "cpu_s": [round(x, 4) for x in self.cpu],
            "max_ms": [round(x, 2) for x in self.max_ms], "collected": self.collected,
            "gc_count": list(gc.get_count()), "threshold": list(gc.get_threshold()),
            "frozen": gc.get_freeze_count()}
        with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out[line.split(":")[0]] = line.split(":")[1].strip()
        if self._early is not None:
            out["tracked_early"] = sum(self._early.values())
        if types:
            out["threads_cpu_s"] = _threads_cpu()
            counts = _type_counts()
            out["tracked"] = sum(counts.values())
            out["types"] = dict(sorted(counts.items(), key=lambda kv: -kv[1])[:40])
            if self._early is not None:
                early = self._early
                grew = {t: n - early.get(t, 0) for t, n in counts.items() if n - early.get(t, 0) > 0}
                out["types_grown"] = dict(sorted(grew.items(), key=lambda kv: -kv[1])[:40])
        path = self.directory / f"gc-{self.kind}-{os.getpid()}.json"
        with contextlib.suppress(OSError):
            path.write_text(json.dumps(out))


def _type_counts() -> dict[str, int]:
    """Objects the collector tracks, counted by type (one walk of the heap)."""
    counts: dict[str, int] = {}
    for o in gc.get_objects():
        t = type(o)
        name = f"{t.__module__}.{t.__qualname__}"
        counts[name] = counts.get(name, 0) + 1
    return counts


def _threads_cpu() -> dict[str, float]:
    """CPU seconds (user + system, /proc/self/task/<tid>/stat fields 14-15) of each live Python
    thread of this process, by thread name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for t in threading.enumerate():
        tid = t.native_id
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except (OSError, TypeError):
            continue
        name = t.name
        out[name] = round(out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick, 2)
    return out


def gc_stats_from_env(kind: str) -> GcStats | None:
    where = os.environ.get("BOOTSVC_GC_STATS")
    if not where:
        return None
    d = Path(where)
    with contextlib.suppress(OSError):
        d.mkdir(parents=True, exist_ok=True)
    stats = GcStats(d, kind)
    stats.install()
    return stats


def raise_nofile() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def listeners_key(config: Config, specs: list[ServiceSpec]) -> str:
    """What identifies one running ``serve``: the services it runs and their listeners (address,
    port, namespace). ``serve --only http`` and ``serve --only dhcp`` on one config may run side by
    side; the same services twice may not."""
    lst = config.listeners
    where: dict[str, list[str]] = {
        "http": [f"{x.address}:{x.port}@{x.netns}" for x in lst.http],
        "dhcp": [f"{x.interface}:{x.port}@{x.netns}" for x in lst.dhcp],
        "tftp": [f"{x.address}:{x.port}@{x.netns}" for x in lst.tftp],
        "dns": [f"{x.address}:{x.port}@{x.netns}" for x in lst.dns]}
    parts = sorted(f"{s.kind} {where[s.kind][s.index] if s.kind in where else ''}" for s in specs)
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def run_dir(config: Config) -> Path:
    return config.resolve(config.state_dir) / "run"


def services_status(config: Config) -> dict[str, Any]:
    """Every service the live ``serve`` supervisors of this state directory run (their status files;
    a file left by a supervisor that no longer exists is skipped)."""
    out: dict[str, Any] = {}
    for f in sorted(run_dir(config).glob("serve-*.json")):
        try:
            data = json.loads(f.read_text())
            os.kill(int(data["supervisor_pid"]), 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        out.update(data.get("services", {}))
    return out


class AlreadyRunning(RuntimeError):
    pass


def take_lock(path: Path) -> IO[str]:
    """Hold the serve lock ``path`` for the life of this process, or raise AlreadyRunning."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f = path.open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise AlreadyRunning(
            f"bootsvc serve is already running for these listeners (pid {holder}, lock {path}); "
            f"stop it first (kill -TERM {holder}) or give this one other listeners") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _die_with_parent() -> None:
    """``preexec_fn`` of each service: SIGTERM when the supervisor dies (prctl(2) PR_SET_PDEATHSIG;
    kept across execve, and ``ip netns exec`` execs the service in place). Runs between fork and exec:
    only async-signal-safe work - one prctl call, then a check that the parent is still there."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != _SUPERVISOR_PID:  # died before prctl took effect
        os._exit(1)


_LIBC: Any = None
_SUPERVISOR_PID = 0


def run_one(config: Config, kind: str, index: int) -> int:
    """Entry point of a service child process: run until SIGTERM/SIGINT."""
    raise_nofile()
    gc_stats_from_env(kind)
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("service %s[%d] got signal %d, stopping", kind, index, signum)
        stop.set()

    runner = RUNNERS[kind]
    global _SETTLE
    _SETTLE = True
    try:
        if kind == "http":  # gunicorn installs its own handlers; its workers start their own metrics flusher
            runner(config, index, stop)
            return 0
        signal.signal(signal.SIGTERM, _on_signal)
        signal.signal(signal.SIGINT, _on_signal)
        flusher = metrics.start(config, kind, str(index))
        try:
            runner(config, index, stop)
        finally:
            flusher.stop()
    except ImportError as e:
        log.critical("service %s[%d] cannot start: module %s does not import (%s); this bootsvc installation "
                     "is broken: reinstall it", kind, index, e.name or "?", e, exc_info=True)
        return EXIT_BROKEN
    return 0


@dataclass
class _Run:
    """What the supervisor knows of one service."""

    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_FIRST
    restart_at: float | None = None
    last_exit: int | None = None
    started_at: float = 0.0  # wall clock, for /health


class Supervisor:
    def __init__(self, config: Config, config_path: str | None, only: set[str] | None = None) -> None:
        self.config, self.config_path = config, config_path
        self.specs = planned_services(config, only)
        self.exit_code = 0
        self.runs: dict[ServiceSpec, _Run] = {s: _Run() for s in self.specs}
        key = listeners_key(config, self.specs)
        self.lock_path = run_dir(config) / f"serve-{key}.lock"
        self.status_path = run_dir(config) / f"serve-{key}.json"
        self._stop = threading.Event()
        self._lock: IO[str] | None = None

    @property
    def procs(self) -> dict[ServiceSpec, subprocess.Popen[bytes]]:
        return {s: r.proc for s, r in self.runs.items() if r.proc is not None}

    def _argv(self, spec: ServiceSpec) -> list[str]:
        argv = [sys.executable, "-m", "bootsvc"]
        if self.config_path:
            argv += ["--config", self.config_path]
        argv += ["run-service", spec.kind, "--index", str(spec.index)]
        if spec.netns:
            if not Path(f"/run/netns/{spec.netns}").exists():
                raise RuntimeError(f"{spec.name}: network namespace {spec.netns!r} does not exist "
                                   f"(create it, or remove 'netns' from the listener)")
            argv = ["ip", "netns", "exec", spec.netns, *argv]
        return argv

    def _spawn(self, spec: ServiceSpec) -> None:
        run = self.runs[spec]
        run.proc = subprocess.Popen(self._argv(spec), env=os.environ.copy(), preexec_fn=_die_with_parent)
        run.started, run.started_at, run.restart_at = time.monotonic(), time.time(), None
        log.info("service %s started pid=%d", spec.name, run.proc.pid)

    def start(self) -> None:
        global _LIBC, _SUPERVISOR_PID
        _SUPERVISOR_PID = os.getpid()
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
        except OSError as e:  # not glibc/musl: services then stop only by our SIGTERM
            log.warning("cannot load libc for prctl(PR_SET_PDEATHSIG): %s", e)
        for spec in self.specs:
            self._spawn(spec)
        self._write_status()

    def stop(self) -> None:
        self._stop.set()
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for spec, p in self.procs.items():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("service %s did not stop in time; killing", spec.name)
                p.kill()
                p.wait()

    def poll(self, now: float) -> None:
        """Notice dead services and restart those whose backoff has passed (one supervisor tick)."""
        changed = False
        for spec, run in self.runs.items():
            if run.proc is not None and run.restart_at is None:
                rc = run.proc.poll()
                if rc is None:
                    if now - run.started >= STABLE_AFTER:
                        run.backoff = BACKOFF_FIRST
                    continue
                if rc == EXIT_BROKEN:
                    run.last_exit, self.exit_code = rc, EXIT_BROKEN
                    log.critical("service %s cannot start: its code does not import (its log above names the "
                                 "module); stopping every service: reinstall bootsvc", spec.name)
                    self._stop.set()
                    return
                run.last_exit, run.restart_at = rc, now + run.backoff
                run.restarts += 1
                log.error("service %s exited with code %s after %.1f s; restart %d in %.0f s (the other "
                          "services keep running)", spec.name, rc, now - run.started, run.restarts, run.backoff)
                run.backoff = min(run.backoff * 2, BACKOFF_MAX)
                changed = True
            elif run.restart_at is not None and now >= run.restart_at:
                try:
                    self._spawn(spec)
                except (OSError, RuntimeError) as e:  # e.g. its namespace is gone: try again later
                    run.restart_at = now + run.backoff
                    log.error("service %s could not be restarted: %s; next try in %.0f s", spec.name, e,
                              run.backoff)
                changed = True
        if changed:
            self._write_status()

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        out: dict[str, Any] = {}
        for spec, run in self.runs.items():
            running = run.proc is not None and run.restart_at is None
            out[spec.name] = {"state": "running" if running else "restarting",
                              "pid": run.proc.pid if running and run.proc else None,
                              "restarts": run.restarts, "last_exit_code": run.last_exit,
                              "started_at": round(run.started_at, 3) if running else None,
                              "next_restart_in": round(max(0.0, run.restart_at - now), 1)
                              if run.restart_at is not None else None}
        return {"supervisor_pid": os.getpid(), "services": out}

    def _write_status(self) -> None:
        path = self.status_path
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.status()))
            tmp.replace(path)
        except OSError as e:
            log.warning("cannot write the service status file %s: %s", path, e)

    def run(self) -> int:
        """Hold the lock, start everything, restart what dies, stop everything on a signal."""
        self._lock = take_lock(self.lock_path)
        soft, _ = raise_nofile()
        log.info("serve: open-file limit %d; lock %s", soft, self.lock_path)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        try:
            self.start()
            while not self._stop.wait(0.2):
                self.poll(time.monotonic())
            self.stop()
            log.info("all services stopped")
        finally:
            with contextlib.suppress(OSError):
                self.status_path.unlink()
            self._lock.close()
        return self.exit_code

"""The supervisor behind ``bootsvc serve``: starts each protocol server as its own process.

Owns: which services run (one per configured listener, plus the conductor), starting each in its
listener's network namespace (``ip netns exec``), stopping all of them on SIGTERM/SIGINT, and
stopping the rest — with one clear log line — when any one dies. One process per service keeps a
TFTP or HTTP burst from starving DHCP of the GIL; they share state only through the database.

A service is a function ``run(config, listener_index, stop_event)`` named in ``RUNNERS``; it returns
when ``stop_event`` is set (or, for gunicorn, on its own SIGTERM handling).
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bootsvc.config import Config

log = logging.getLogger("bootsvc.daemon")

RUNNERS: dict[str, str] = {
    "http": "bootsvc.web.serve:run",
    "dhcp": "bootsvc.dhcp.server:run",
    "tftp": "bootsvc.tftp:run",
    "dns": "bootsvc.dns:run",
    "conductor": "bootsvc.conductor:run",
}

Runner = Callable[[Config, int, threading.Event], None]


def load_runner(kind: str) -> Runner:
    mod, _, fn = RUNNERS[kind].partition(":")
    runner: Runner = getattr(importlib.import_module(mod), fn)
    return runner


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


def available(kind: str) -> bool:
    mod = RUNNERS[kind].partition(":")[0]
    try:
        return importlib.util.find_spec(mod) is not None
    except ModuleNotFoundError:
        return False


def run_one(config: Config, kind: str, index: int) -> int:
    """Entry point of a service child process: run until SIGTERM/SIGINT."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: object) -> None:
        log.info("service %s[%d] got signal %d, stopping", kind, index, signum)
        stop.set()

    if kind == "http":  # gunicorn installs its own handlers; its workers start their own metrics flusher
        load_runner(kind)(config, index, stop)
        return 0
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    from bootsvc import metrics

    flusher = metrics.start(config, kind, str(index))
    try:
        load_runner(kind)(config, index, stop)
    finally:
        flusher.stop()
    return 0


class Supervisor:
    def __init__(self, config: Config, config_path: str | None, only: set[str] | None = None) -> None:
        self.config, self.config_path = config, config_path
        self.specs = [s for s in planned_services(config, only) if available(s.kind)]
        for s in planned_services(config, only):
            if not available(s.kind):
                log.warning("service %s is configured but not built into this bootsvc; skipping", s.name)
        self.procs: dict[ServiceSpec, subprocess.Popen[bytes]] = {}
        self._stop = threading.Event()

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

    def start(self) -> None:
        for spec in self.specs:
            self.procs[spec] = subprocess.Popen(self._argv(spec), env=os.environ.copy())
            log.info("service %s started pid=%d", spec.name, self.procs[spec].pid)

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

    def run(self) -> int:
        """Start everything, wait for a signal or a death, stop everything. Exit code for the CLI."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self.start()
        code = 0
        while not self._stop.wait(0.2):
            for spec, p in self.procs.items():
                rc = p.poll()
                if rc is not None:
                    log.error("service %s exited with code %s; stopping all services", spec.name, rc)
                    code = 1
                    self._stop.set()
                    break
        self.stop()
        log.info("all services stopped")
        return code

"""The TFTP service as ``bootsvc serve`` runs it: the root, the workers, their CPUs and limits.

Owns: assembling the root at start (:func:`prepare_root`), raising ``RLIMIT_NOFILE`` to its hard limit
(:func:`raise_nofile`: systemd's default soft limit is 1024, and every transfer holds descriptors),
and ``workers`` processes (``BOOTSVC_TFTP_WORKERS``, default = CPU count, max 4) sharing the port with
SO_REUSEPORT: the kernel spreads clients by 4-tuple hash, so a client's retransmitted RRQ reaches the
same worker. With one worker per CPU each is pinned to its CPU and takes the requests arriving there
(SO_INCOMING_CPU, :func:`pin`), so a lock-step client and its worker wake each other on one CPU. A
worker that dies is restarted; the listener-wide transfer cap is shared through one
``multiprocessing.Array`` entry per worker (bootsvc/tftp/service.py ``Slots``).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import resource
import signal
import threading
from pathlib import Path
from typing import Any

from bootsvc import metrics
from bootsvc.config import Config, Listener
from bootsvc.tftp.grub import make_generator
from bootsvc.tftp.paths import Resolver, ensure_root
from bootsvc.tftp.service import Slots, TftpService
from bootsvc.verified_catalog import load_verified_catalog

log = logging.getLogger("bootsvc.tftp")


def raise_nofile() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("tftp: cannot raise the open-file limit from %d to %d: %s", soft, hard, e)
    log.info("tftp: open-file limit %s", "unlimited" if soft == resource.RLIM_INFINITY else soft)
    return soft


def prepare_root(config: Config) -> Path:
    """Assemble the root from Debian's ipxe package and the catalog's arm64 NBP (kind nbp, role grub-arm64)."""
    root = config.resolve(config.boot.tftp_root)
    arm = None
    try:
        cat = load_verified_catalog(config)
        for img in cat.images:
            f = img.file("grub-arm64")
            if img.kind == "nbp" and f is not None and cat.usable(img):
                arm = f.path
    except Exception as e:  # the root is still useful without the arm64 NBP
        log.warning("tftp: no arm64 NBP from the catalog: %s", e)
    try:
        names = ensure_root(root, arm64_nbp=config.boot.arm64_nbp, arm64_src=arm)
    except PermissionError:
        names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    log.info("tftp root %s: %s", root, ", ".join(names) or "(empty)")
    return root


def priority() -> None:
    """``BOOTSVC_TFTP_NICE=N`` lowers the workers' nice value by N (needs CAP_SYS_NICE). One worker
    serves many lock-step transfers, so on a CPU-saturated host it competes, as one task, with every
    other process; a fork-per-transfer server (tftpd-hpa) gets one scheduler share per transfer."""
    n = int(os.environ.get("BOOTSVC_TFTP_NICE", "0") or 0)
    if n > 0:
        try:
            os.nice(-n)
        except OSError as e:
            log.warning("tftp: cannot raise priority by %d: %s", n, e.strerror)


def pin(index: int, workers: int) -> int | None:
    """Pin worker ``index`` to one CPU when there is one worker per CPU (``BOOTSVC_TFTP_PIN``, default
    on), and return that CPU for SO_INCOMING_CPU. TFTP is lock-step: every block wakes the client and
    every ACK wakes the worker. A worker serving clients on the other CPU pays a cross-CPU wake-up (an
    IPI, a VM exit on virtual machines) per block - a third of the worker's time under perf in
    bench/tftp - where tftpd-hpa's one child per client ends up beside its client. Steering each request
    to the worker on the CPU it arrived on keeps client and worker on one CPU."""
    if os.environ.get("BOOTSVC_TFTP_PIN", "1") != "1" or not hasattr(os, "sched_setaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if workers != len(cpus):
        return None
    cpu = cpus[index]
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError as e:
        log.warning("tftp: cannot pin worker %d to CPU %d: %s", index, cpu, e.strerror)
        return None
    return cpu


def service(config: Config, lst: Listener, root: Path, *, cpu: int | None = None,
            slots: Slots | None = None) -> TftpService:
    """A worker's service for ``lst`` with the generated files of this site's database."""
    generate, image_file = make_generator(config)
    t = config.tftp
    return TftpService(str(lst.address), lst.port, Resolver(root, generate, image_file), cpu=cpu,
                       timeout=t.timeout_seconds, retries=t.retries, max_transfers=t.max_transfers,
                       max_per_client=t.max_per_client, max_windowsize=t.max_windowsize, slots=slots)


class WorkerStop:
    """A forked worker's stop condition, looked at on the service's 0.25 s tick: the shared event the
    parent sets, SIGTERM/SIGINT sent to the worker itself, or the parent gone (reparented: a parent killed
    with SIGKILL never sets the event). Without it a worker keeps the handler it inherited from
    ``daemon.run_one``, which sets the parent's Event - a copy the worker never looks at - so SIGTERM did
    nothing and a killed parent left its workers serving forever. The handler only sets a flag: setting a
    multiprocessing Event there could deadlock on the lock ``is_set`` holds in the interrupted loop."""

    def __init__(self, shared: Any) -> None:
        self.shared, self.signalled, self.parent = shared, False, os.getppid()

    def on_signal(self, _signum: int, _frame: object) -> None:
        self.signalled = True

    def is_set(self) -> bool:
        return self.signalled or os.getppid() != self.parent or bool(self.shared.is_set())


def own_stop(shared: Any) -> WorkerStop:
    """In a freshly forked worker: its `WorkerStop` over ``shared``, handling SIGTERM and SIGINT."""
    mine = WorkerStop(shared)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, mine.on_signal)
    return mine


def _worker(config: Config, lst: Listener, root: Path, stop: Any, ready: Any, counts: Any, index: int = 0,
            workers: int = 1) -> None:
    stop = own_stop(stop)
    priority()
    cpu = pin(index, workers)
    flusher = metrics.ensure_process_flusher(config, "tftp")  # a forked worker publishes its own counts
    svc = service(config, lst, root, cpu=cpu, slots=Slots(counts, index))
    ready.set()
    try:
        svc.serve(stop)
    finally:
        flusher.stop()


def run(config: Config, listener_index: int, stop: threading.Event) -> None:
    """Service runner: ``workers`` processes serving ``config.listeners.tftp[listener_index]`` until
    ``stop`` is set."""
    lst = config.listeners.tftp[listener_index]
    raise_nofile()  # before the workers fork: they inherit it
    root = prepare_root(config)
    n = int(os.environ.get("BOOTSVC_TFTP_WORKERS", str(min(4, os.cpu_count() or 1))))
    log.info("tftp: listening on %s:%d with %d worker(s), root %s, at most %d transfers (%d per client)",
             lst.address, lst.port, n, root, config.tftp.max_transfers, config.tftp.max_per_client)
    if n <= 1:
        priority()
        service(config, lst, root).serve(stop)
        return
    mp = multiprocessing.get_context("fork")
    mstop = mp.Event()
    counts = mp.Array("l", n, lock=False)  # transfers per worker (service.Slots)

    def spawn(index: int) -> Any:
        ready = mp.Event()
        p = mp.Process(target=_worker, args=(config, lst, root, mstop, ready, counts, index, n), daemon=True,
                       name="bootsvc-tftp-worker")
        p.start()
        return p

    procs = [spawn(i) for i in range(n)]
    try:
        while not stop.wait(0.5):
            for i, p in enumerate(procs):
                if not p.is_alive():
                    log.error("tftp: worker pid %s exited with %s; restarting", p.pid, p.exitcode)
                    procs[i] = spawn(i)
    finally:
        mstop.set()
        for p in procs:
            p.join(timeout=3)
            if p.is_alive():
                p.terminate()
                p.join(timeout=2)

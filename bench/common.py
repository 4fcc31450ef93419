"""Plumbing the peer benchmarks share (bench/tftp, bench/http): commands inside the bench's own network
namespace, one cpuacct cgroup per server (so a forking server's reaped children count too), and one
teardown that leaves no process, namespace or cgroup behind, whatever went wrong before it.

The benches are scripts (``python bench/http/run.py``); they put the repository root on ``sys.path``
to import this module.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

CG_ROOT = Path("/sys/fs/cgroup/cpuacct")  # cgroup v1 cpuacct, as in the shared baselines


def sh(*a: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(a), capture_output=True, text=True, check=check)


def in_ns(ns: str, *a: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *a]


def cg_cpu(cg: Path) -> float:
    """CPU seconds of everything that ran in the cgroup (auto-reaped children included)."""
    return int((cg / "cpuacct.usage").read_text()) / 1e9


def in_cgroup(cg: Path, *cmd: str) -> list[str]:
    """``cmd`` run as a member of cgroup ``cg``. Join it before ``ip netns exec`` (which remounts /sys,
    hiding /sys/fs/cgroup); children inherit it."""
    return ["sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "sh", *cmd]


def start(ns: str, cmd: list[str], cg: Path, env: dict[str, str] | None = None, cwd: Path | None = None,
          log: Path | None = None) -> subprocess.Popen[bytes]:
    """``cmd`` in namespace ``ns`` and cgroup ``cg``, in its own session (so teardown can signal the
    whole group)."""
    cg.mkdir(exist_ok=True)
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    return subprocess.Popen(in_cgroup(cg, *in_ns(ns, *cmd)), start_new_session=True, stdout=out,
                            stderr=subprocess.STDOUT, env=env, cwd=cwd)


def teardown(ns: str, procs: Iterable[subprocess.Popen[bytes]], cgroups: Iterable[Path], grace: float = 10.0) -> None:
    """SIGTERM every process group, SIGKILL what is left after ``grace`` seconds, delete the namespace,
    SIGKILL whatever still runs in the cgroups, and remove them (retrying while exiting tasks still hold
    them)."""
    procs = list(procs)
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    sh("ip", "netns", "del", ns, check=False)
    for cg in cgroups:
        _kill_members(cg)  # e.g. clients a Ctrl-C left running: they are in no process group above
        for _ in range(50):
            try:
                cg.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # still has (exiting) tasks
                time.sleep(0.1)


def _kill_members(cg: Path) -> None:
    try:
        pids = [int(x) for x in (cg / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def summary(results: dict[str, Any]) -> None:
    """The one machine-readable line of a bench (``bench/run.py`` collects them)."""
    print("SUMMARY " + json.dumps(results), flush=True)

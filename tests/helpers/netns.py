"""Network namespaces a test owns (root only; tests marked ``netns``): unique names, loopback up,
veth pairs with addresses, commands and Python processes run inside, and deletion however the test ends.

Every name carries a random suffix, so two runs (or two helpers' tests) never share a namespace, and
nothing here touches an interface outside the namespaces it created. Servers started inside listen only
there. A test file that is also a script (``python this_file.py serve ...`` inside a namespace) is
started with `Netns.python`, which puts ``tests/`` and the repository on ``PYTHONPATH``, so the script
imports ``helpers.*`` and ``bootsvc`` exactly as pytest does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


def sh(*cmd: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output as text; a failure (with ``check``) names the command and its stderr."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def unique(prefix: str) -> str:
    """``prefix`` plus 6 random hex digits (interface names stay within IFNAMSIZ with a prefix of <= 9)."""
    return prefix + uuid.uuid4().hex[:6]


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with ``tests/`` and the repository first on PYTHONPATH."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS), str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


class Netns:
    """One namespace, loopback up, deleted on exit (``ip netns del`` also ends the processes whose
    only network it was once they exit; `popen` children are the caller's to stop)."""

    def __init__(self, prefix: str = "bt", *, name: str | None = None) -> None:
        # ``name``: one the caller made unique itself, e.g. several namespaces and their interfaces
        # sharing one random tag (``bd<tag>s``, ``bd<tag>c``, veth ``bd<tag>s0``) so a topology reads as one
        self.name = name or unique(prefix)

    def __enter__(self) -> Netns:
        return self.add()

    def add(self) -> Netns:
        """Create the namespace and bring its loopback up (what ``with`` does; for a fixture holding several)."""
        sh("ip", "netns", "add", self.name)
        try:
            self.ip("link", "set", "lo", "up")
        except BaseException:
            self.delete()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.delete()

    def delete(self) -> None:
        sh("ip", "netns", "del", self.name, check=False)

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NS ARGS``."""
        return sh("ip", "-n", self.name, *args, check=check)

    def run(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """A command inside the namespace, to completion."""
        return sh("ip", "netns", "exec", self.name, *argv, check=check, timeout=timeout)

    def popen(self, argv: Sequence[str], env: Mapping[str, str] | None = None, **kw: Any) -> subprocess.Popen[Any]:
        """A process inside the namespace (``ip netns exec`` execs it: the PID is the process's own)."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], env=child_env(env), **kw)

    def python(self, script: Path | str, *args: str, env: Mapping[str, str] | None = None,
               **kw: Any) -> subprocess.Popen[Any]:
        """``python SCRIPT ARGS`` inside the namespace, importing ``helpers`` and ``bootsvc`` as pytest does."""
        return self.popen([sys.executable, str(script), *args], env=env, **kw)


def veth(a: Netns, a_dev: str, b: Netns, b_dev: str, *, a_addr: str | None = None, b_addr: str | None = None,
         a_mac: str | None = None, b_mac: str | None = None) -> None:
    """A veth pair from ``a`` (``a_dev``) to ``b`` (``b_dev``), addresses (CIDR) and MACs as given, both up."""
    a.ip("link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b.name)
    for ns, dev, addr, mac in ((a, a_dev, a_addr, a_mac), (b, b_dev, b_addr, b_mac)):
        if mac:
            ns.ip("link", "set", dev, "address", mac)
        if addr:
            ns.ip("addr", "add", addr, "dev", dev)
        ns.ip("link", "set", dev, "up")

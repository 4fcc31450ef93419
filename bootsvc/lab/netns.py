"""Lab network topologies in Linux network namespaces (owned by the lab helper).

A :class:`Topology` describes namespaces, bridges, veth pairs, taps, addresses, routes and sysctls.
Every name is derived from a caller-given *prefix* (``bl`` for the lab's own tests, ``bb``/``ba``/``bu``
... for other helpers), so a lab can never touch a device it did not create:

* namespace ``<prefix>-<short>`` (e.g. ``bl1-prov``),
* device ``<prefix><short>`` (e.g. ``bl1br0``), at most 15 characters (``IFNAMSIZ`` - 1).

:class:`Lab` is the context manager that builds a topology and always tears it down again — recorded
child processes first (SIGTERM, then SIGKILL after a deadline), then anything still running inside the
lab's own namespaces, then the namespaces themselves (which destroys every device in them). Nothing is
ever created in the root namespace: there are no default routes and no link to the real interfaces, so
isolation holds by construction. :func:`sweep` removes what a crashed earlier run left behind under a
prefix (namespaces, ``/etc/netns/<ns>`` dirs, the PID state file).

One module (~590 lines) on purpose: the topology description, the commands it turns into, and the
Lab that runs and always tears them down (with the sweep after a crash) are one contract about names
and cleanup; kept together so the cleanup rules sit next to what they clean.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

log = logging.getLogger(__name__)

IFNAMSIZ_MAX = 15  # Linux IFNAMSIZ is 16 including the NUL byte
_PREFIX_RE = re.compile(r"^b[a-z][a-z0-9]{0,6}$")
_SUFFIX_RE = re.compile(r"^[a-z0-9][a-z0-9-]*$")
STATE_DIR_ENV = "BOOTSVC_LAB_STATE"
DEFAULT_STATE_DIR = Path("/run/bootsvc-lab")


class LabError(RuntimeError):
    """Raised when a topology is invalid or a namespace command fails."""


def _state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV, str(DEFAULT_STATE_DIR)))


def check_prefix(prefix: str) -> str:
    """Validate a lab prefix: starts with ``b``, lowercase alnum, 2..8 chars (leaves room for suffixes)."""
    if not _PREFIX_RE.match(prefix):
        raise LabError(f"invalid lab prefix {prefix!r}: want ^b[a-z][a-z0-9]{{0,6}}$")
    return prefix


@dataclass(frozen=True)
class Bridge:
    ns: str  # short namespace name
    name: str  # full device name
    addrs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Tap:
    ns: str
    name: str
    bridge: str | None = None  # full bridge name (same namespace)


@dataclass(frozen=True)
class VethEnd:
    ns: str
    name: str
    addrs: tuple[str, ...] = ()
    bridge: str | None = None
    mac: str | None = None


@dataclass(frozen=True)
class Veth:
    a: VethEnd
    b: VethEnd


@dataclass(frozen=True)
class Route:
    ns: str
    dest: str
    via: str | None = None
    dev: str | None = None


@dataclass
class Topology:
    """Declarative description of a lab network; build it with the methods, then ``Lab(topology)``."""

    prefix: str
    namespaces: list[str] = field(default_factory=list)  # short names
    bridges: list[Bridge] = field(default_factory=list)
    taps: list[Tap] = field(default_factory=list)
    veths: list[Veth] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    sysctls: list[tuple[str, str, str]] = field(default_factory=list)  # (short ns, key, value)

    def __post_init__(self) -> None:
        check_prefix(self.prefix)

    # ---- naming -------------------------------------------------------------------------------
    def ns_name(self, short: str) -> str:
        """Full namespace name for a short name (``prov`` -> ``bl1-prov``)."""
        if short not in self.namespaces:
            raise LabError(f"unknown namespace {short!r} (declare it with netns())")
        return f"{self.prefix}-{short}"

    def dev(self, suffix: str) -> str:
        """Full device name for a suffix (``br0`` -> ``bl1br0``); checks the 15-char limit."""
        if not _SUFFIX_RE.match(suffix):
            raise LabError(f"invalid device suffix {suffix!r}")
        name = self.prefix + suffix
        if len(name) > IFNAMSIZ_MAX:
            raise LabError(f"device name {name!r} longer than {IFNAMSIZ_MAX} chars")
        return name

    def _all_devs(self) -> list[str]:
        names = [b.name for b in self.bridges] + [t.name for t in self.taps]
        for v in self.veths:
            names += [v.a.name, v.b.name]
        return names

    def _add_dev_name(self, suffix: str) -> str:
        name = self.dev(suffix)
        if name in self._all_devs():
            raise LabError(f"device {name} declared twice")
        return name

    # ---- declaration --------------------------------------------------------------------------
    def netns(self, short: str) -> str:
        if not _SUFFIX_RE.match(short):
            raise LabError(f"invalid namespace name {short!r}")
        if short not in self.namespaces:
            self.namespaces.append(short)
        return self.ns_name(short)

    def bridge(self, ns: str, suffix: str, addrs: Sequence[str] = ()) -> str:
        self.ns_name(ns)
        _check_addrs(addrs)
        name = self._add_dev_name(suffix)
        self.bridges.append(Bridge(ns, name, tuple(addrs)))
        return name

    def tap(self, ns: str, suffix: str, bridge: str | None = None) -> str:
        self.ns_name(ns)
        name = self._add_dev_name(suffix)
        if bridge is not None:
            self._check_bridge(ns, bridge)
        self.taps.append(Tap(ns, name, bridge))
        return name

    def veth(
        self,
        a: tuple[str, str],
        b: tuple[str, str],
        *,
        a_addrs: Sequence[str] = (),
        b_addrs: Sequence[str] = (),
        a_bridge: str | None = None,
        b_bridge: str | None = None,
        b_mac: str | None = None,
    ) -> tuple[str, str]:
        """Add a veth pair; ``a``/``b`` are (short ns, device suffix). Returns the two device names."""
        (ans, asuf), (bns, bsuf) = a, b
        self.ns_name(ans)
        self.ns_name(bns)
        _check_addrs(a_addrs)
        _check_addrs(b_addrs)
        aname = self._add_dev_name(asuf)
        bname = self.dev(bsuf)
        if bname in self._all_devs() or bname == aname:
            raise LabError(f"device {bname} declared twice")
        if a_bridge:
            self._check_bridge(ans, a_bridge)
        if b_bridge:
            self._check_bridge(bns, b_bridge)
        self.veths.append(
            Veth(VethEnd(ans, aname, tuple(a_addrs), a_bridge), VethEnd(bns, bname, tuple(b_addrs), b_bridge, b_mac))
        )
        return aname, bname

    def route(self, ns: str, dest: str, *, via: str | None = None, dev: str | None = None) -> None:
        self.ns_name(ns)
        net = ipaddress.ip_network(dest, strict=True)
        if net.prefixlen == 0:
            # hard rule: a lab namespace never gets a default route (nothing may leave the lab)
            raise LabError("default routes are not allowed in a lab topology")
        self.routes.append(Route(ns, dest, via, dev))

    def sysctl(self, ns: str, key: str, value: str | int) -> None:
        self.ns_name(ns)
        if not key.startswith("net."):
            raise LabError(f"only per-netns net.* sysctls may be set, not {key}")
        self.sysctls.append((ns, key, str(value)))

    def _check_bridge(self, ns: str, bridge: str) -> None:
        if not any(b.name == bridge and b.ns == ns for b in self.bridges):
            raise LabError(f"bridge {bridge} not declared in namespace {ns}")

    # ---- commands -----------------------------------------------------------------------------
    def commands(self) -> list[list[str]]:
        """The `ip`/`sysctl` argv lists that build this topology, in order (pure; used by Lab.up)."""
        cmds: list[list[str]] = []
        for short in self.namespaces:
            cmds.append(["ip", "netns", "add", self.ns_name(short)])
        for short in self.namespaces:
            n = self.ns_name(short)
            cmds.append(["ip", "-n", n, "link", "set", "lo", "up"])
            # IPv6 DAD would delay every address by ~1 s and is pointless on a private segment
            cmds.append(["ip", "netns", "exec", n, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0"])
        for br in self.bridges:
            n = self.ns_name(br.ns)
            # forward_delay 0 + no STP: ports forward at once, so firmware DHCP isn't lost in
            # the 15 s listening/learning phases of 802.1D
            cmds.append(
                ["ip", "-n", n, "link", "add", br.name, "type", "bridge", "forward_delay", "0", "stp_state", "0"]
            )
        for tap in self.taps:
            cmds.append(["ip", "-n", self.ns_name(tap.ns), "tuntap", "add", "dev", tap.name, "mode", "tap"])
        for v in self.veths:
            cmds.append(
                ["ip", "-n", self.ns_name(v.a.ns), "link", "add", v.a.name, "type", "veth",
                 "peer", "name", v.b.name, "netns", self.ns_name(v.b.ns)]
            )
            if v.b.mac:
                cmds.append(["ip", "-n", self.ns_name(v.b.ns), "link", "set", v.b.name, "address", v.b.mac])
        for ns, key, value in self.sysctls:
            cmds.append(["ip", "netns", "exec", self.ns_name(ns), "sysctl", "-qw", f"{key}={value}"])
        for br in self.bridges:
            cmds += _addr_cmds(self.ns_name(br.ns), br.name, br.addrs)
            cmds.append(["ip", "-n", self.ns_name(br.ns), "link", "set", br.name, "up"])
        for tap in self.taps:
            n = self.ns_name(tap.ns)
            if tap.bridge:
                cmds.append(["ip", "-n", n, "link", "set", tap.name, "master", tap.bridge])
            cmds.append(["ip", "-n", n, "link", "set", tap.name, "up"])
        for v in self.veths:
            for end in (v.a, v.b):
                n = self.ns_name(end.ns)
                if end.bridge:
                    cmds.append(["ip", "-n", n, "link", "set", end.name, "master", end.bridge])
                cmds += _addr_cmds(n, end.name, end.addrs)
                cmds.append(["ip", "-n", n, "link", "set", end.name, "up"])
        for r in self.routes:
            cmd = ["ip", "-n", self.ns_name(r.ns), "route", "add", r.dest]
            if r.via:
                cmd += ["via", r.via]
            if r.dev:
                cmd += ["dev", r.dev]
            cmds.append(cmd)
        return cmds


def _check_addrs(addrs: Sequence[str]) -> None:
    for a in addrs:
        ipaddress.ip_interface(a)  # raises ValueError on garbage


def _addr_cmds(ns: str, dev: str, addrs: Sequence[str]) -> list[list[str]]:
    out = []
    for a in addrs:
        cmd = ["ip", "-n", ns, "addr", "add", a, "dev", dev]
        if ipaddress.ip_interface(a).version == 6:
            cmd.append("nodad")  # usable at once (no tentative state)
        out.append(cmd)
    return out


def _run(cmd: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(cmd), capture_output=True, text=True, check=False)
    if check and res.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip()}")
    return res


def list_namespaces(prefix: str) -> list[str]:
    """Namespaces named ``<prefix>-*`` that exist now."""
    check_prefix(prefix)
    res = _run(["ip", "-j", "netns", "list"], check=False)
    names: list[str] = []
    if res.returncode == 0 and res.stdout.strip():
        names = [str(e["name"]) for e in json.loads(res.stdout)]
    else:  # very old iproute2 without -j: "name (id: N)"
        res = _run(["ip", "netns", "list"], check=False)
        names = [line.split()[0] for line in res.stdout.splitlines() if line.strip()]
    return sorted(n for n in names if n.startswith(prefix + "-"))


def ns_pids(ns: str) -> list[int]:
    res = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _proc_start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a PID from a reused one."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie child still "exists"; treat it as gone
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


alive = _alive  # public name (other lab modules use it)


def kill_pids(pids: Sequence[int], *, grace: float = 3.0) -> None:
    """SIGTERM the given PIDs, wait up to ``grace`` seconds, SIGKILL the survivors."""
    live = [p for p in pids if _alive(p)]
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while live and time.monotonic() < deadline:
        live = [p for p in live if _alive(p)]
        if live:
            time.sleep(0.05)
    for p in live:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def _state_file(prefix: str) -> Path:
    return _state_dir() / f"{prefix}.json"


def sweep(prefix: str) -> list[str]:
    """Remove leftovers of a crashed run under ``prefix``: recorded PIDs, then processes inside the
    prefix's own namespaces, then the namespaces and their ``/etc/netns`` dirs. Returns removed ns."""
    check_prefix(prefix)
    sf = _state_file(prefix)
    if sf.exists():
        try:
            recorded = json.loads(sf.read_text()).get("pids", [])
        except (OSError, ValueError):
            recorded = []
        # only kill a recorded PID if it is still the same process (start time matches)
        kill_pids([int(p) for p, st in recorded if _proc_start_time(int(p)) == st])
        sf.unlink(missing_ok=True)
    removed = []
    for ns in list_namespaces(prefix):
        # every process in a namespace named with our prefix was started by a run of this lab
        kill_pids(ns_pids(ns))
        _run(["ip", "netns", "del", ns], check=False)
        removed.append(ns)
    for ns_dir in Path("/etc/netns").glob(f"{prefix}-*"):
        _rmtree(ns_dir)
    return removed


def _rmtree(p: Path) -> None:
    import shutil

    shutil.rmtree(p, ignore_errors=True)


class Lab:
    """Context manager: ``with Lab(topo) as lab: lab.popen("prov", [...])``. Always cleans up."""

    def __init__(self, topology: Topology, *, sweep_first: bool = True) -> None:
        self.topo = topology
        self.prefix = topology.prefix
        self._sweep_first = sweep_first
        self._procs: list[tuple[subprocess.Popen[Any], str]] = []
        self._extra_pids: list[int] = []
        self.up_seconds: float | None = None

    # ---- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.down()

    def up(self) -> None:
        if self._sweep_first:
            sweep(self.prefix)
        t0 = time.monotonic()
        try:
            for cmd in self.topo.commands():
                _run(cmd)
        except BaseException:
            self.down()
            raise
        self._write_state()
        self.up_seconds = time.monotonic() - t0

    def down(self) -> None:
        """Kill recorded processes, then stragglers in our namespaces, then delete the namespaces."""
        pids = [p.pid for p, _ in self._procs] + self._extra_pids
        kill_pids(pids)
        for p, _ in self._procs:
            with contextlib.suppress(Exception):
                p.wait(timeout=1)
        self._procs.clear()
        self._extra_pids.clear()
        for short in self.topo.namespaces:
            ns = self.topo.ns_name(short)
            left = ns_pids(ns)
            if left:
                log.warning("lab %s: processes still in %s: %s (killing)", self.prefix, ns, left)
                kill_pids(left)
            _run(["ip", "netns", "del", ns], check=False)
            _rmtree(Path("/etc/netns") / ns)
        _state_file(self.prefix).unlink(missing_ok=True)

    def _write_state(self) -> None:
        d = _state_dir()
        d.mkdir(parents=True, exist_ok=True)
        pids = [p.pid for p, _ in self._procs] + self._extra_pids
        state = {
            "namespaces": [self.topo.ns_name(s) for s in self.topo.namespaces],
            "pids": [[p, _proc_start_time(p)] for p in pids if _proc_start_time(p)],
        }
        tmp = _state_file(self.prefix).with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(_state_file(self.prefix))

    # ---- running things -----------------------------------------------------------------------
    def ns(self, short: str) -> str:
        return self.topo.ns_name(short)

    def _argv(self, ns: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(ns), *argv]

    def exec_in(
        self, ns: str, argv: Sequence[str], *, check: bool = True, timeout: float | None = 60,
        input: str | None = None, env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside namespace ``ns`` (short name) to completion; text output captured."""
        res = subprocess.run(
            self._argv(ns, argv), capture_output=True, text=True, timeout=timeout, input=input,
            env=dict(env) if env is not None else None, check=False,
        )
        if check and res.returncode != 0:
            raise LabError(f"[{ns}] {' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
        return res

    def popen(
        self, ns: str, argv: Sequence[str], *, stdout: int | IO[Any] | None = subprocess.DEVNULL,
        stderr: int | IO[Any] | None = subprocess.STDOUT, stdin: int | IO[Any] | None = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` in namespace ``ns``; the process is recorded and killed by ``down()``.

        ``ip netns exec`` execs the command after setns(2), so the returned PID is the command's own.
        """
        p = subprocess.Popen(
            self._argv(ns, argv), stdout=stdout, stderr=stderr, stdin=stdin,
            env=dict(env) if env is not None else None, cwd=cwd,
        )
        self._procs.append((p, " ".join(argv)))
        self._write_state()
        return p

    def add_tap(self, ns: str, suffix: str, bridge: str | None = None) -> str:
        """Add one more tap (for another VM) to a running lab; removed with the namespace."""
        name = self.topo.tap(ns, suffix, bridge)
        n = self.ns(ns)
        _run(["ip", "-n", n, "tuntap", "add", "dev", name, "mode", "tap"])
        if bridge:
            _run(["ip", "-n", n, "link", "set", name, "master", bridge])
        _run(["ip", "-n", n, "link", "set", name, "up"])
        return name

    def record_pid(self, pid: int) -> None:
        """Record a PID started elsewhere (e.g. a daemon's fork) so ``down()`` kills it."""
        self._extra_pids.append(pid)
        self._write_state()

    def stop(self, proc: subprocess.Popen[Any], *, grace: float = 3.0) -> int | None:
        """Stop one recorded process now (SIGTERM, then SIGKILL) and forget it."""
        kill_pids([proc.pid], grace=grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=grace)
        self._procs = [(p, d) for p, d in self._procs if p is not proc]
        self._write_state()
        return proc.returncode

    def links(self, ns: str) -> list[dict[str, Any]]:
        res = self.exec_in(ns, ["ip", "-j", "link", "show"])
        out: list[dict[str, Any]] = json.loads(res.stdout)
        return out


@contextlib.contextmanager
def lab(topology: Topology, *, sweep_first: bool = True) -> Iterator[Lab]:
    """Functional spelling of ``with Lab(topology)``."""
    with Lab(topology, sweep_first=sweep_first) as lab_:
        yield lab_


def root_links_with_prefix(prefix: str) -> list[str]:
    """Devices named with ``prefix`` in the *root* namespace (should always be empty)."""
    check_prefix(prefix)
    res = _run(["ip", "-j", "link", "show"], check=False)
    if res.returncode != 0 or not res.stdout.strip():
        return []
    return [str(e["ifname"]) for e in json.loads(res.stdout) if str(e.get("ifname", "")).startswith(prefix)]


def pxe_topology(prefix: str, *, relay: bool = False, taps: int = 1, v4_base: str = "10.77") -> Topology:
    """The standard PXE lab (as in the shared lab notes), parametrised by prefix and address base.

    ``prov`` namespace: bridge ``br0`` ``<base>.0.1/24`` + ``fd00:<a>:<b>:0::1/64`` and taps ``tap0..``.
    With ``relay``: ``dpu`` namespace with bridge ``br1`` ``<base>.2.1/24``, taps ``rtap0..``, and
    a routed veth ``vp`` (``<base>.1.1``) <-> ``vd`` (``<base>.1.2``); ip_forward on in ``dpu``.
    """
    a, b = v4_base.split(".")
    v6 = f"fd00:{int(a):x}:{int(b):x}"  # ULA; iPXE needs an RA source or it waits ~16 s
    t = Topology(prefix)
    t.netns("prov")
    br0 = t.bridge("prov", "br0", [f"{v4_base}.0.1/24", f"{v6}:0::1/64"])
    for i in range(taps):
        t.tap("prov", f"tap{i}", bridge=br0)
    if relay:
        t.netns("dpu")
        br1 = t.bridge("dpu", "br1", [f"{v4_base}.2.1/24", f"{v6}:2::1/64"])
        for i in range(taps):
            t.tap("dpu", f"rtap{i}", bridge=br1)
        t.veth(("prov", "vp"), ("dpu", "vd"), a_addrs=[f"{v4_base}.1.1/24"], b_addrs=[f"{v4_base}.1.2/24"])
        t.sysctl("dpu", "net.ipv4.ip_forward", 1)
        t.route("prov", f"{v4_base}.2.0/24", via=f"{v4_base}.1.2")
    return t


def socket_in_netns(ns: str, family: int, type_: int, proto: int = 0) -> Any:
    """Create a socket inside namespace ``ns`` (full name) without moving this process.

    setns(2) with CLONE_NEWNET only affects the calling thread, and a socket keeps the namespace it
    was created in, so a helper thread enters the namespace, creates the socket and ends; the socket
    then serves from any thread. Lets tests run an in-process HTTP server inside a lab namespace.
    """
    import ctypes
    import socket
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    result: dict[str, Any] = {}

    def worker() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, clone_newnet) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, os.strerror(err))
            finally:
                os.close(fd)
            result["sock"] = socket.socket(family, type_, proto)
        except BaseException as e:
            result["err"] = e

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    if "err" in result:
        raise LabError(f"socket in {ns}: {result['err']}")
    return result["sock"]

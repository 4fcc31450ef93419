"""What tests (and ``bootsvc lab exec|leaf|topology``) use to look at the lab's fabric.

Owns: running a command on a DPU VM (through its command console), running vtysh on the leaf,
capturing the leaf's links to a pcap, and the rack's fabric topology as data. The leaf itself (its
namespace, links and FRR) is :mod:`bootsvc.lab.leaf`; the rack is :mod:`bootsvc.lab.rack`.

DPU command console: each DPU VM has a virtio console (``hvc0``) on which the lab DOCA image runs a
root shell (``images/lab/rootfs/etc/bootsvc-lab/console-shell``); QEMU exposes its host side as the
unix socket ``<rack workdir>/<dpu>/console.sock``. :func:`dpu_exec` sends the command base64-encoded,
the guest runs it under ``timeout`` with its output in a file, and sends back the exit status and the
output base64-encoded between markers that only the guest's ``printf`` can produce (the command line
itself never contains them), so a shell echo, stale output of an earlier caller, or binary output
cannot be mistaken for the answer. Callers of one VM are serialised with a lock file next to the socket.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from bootsvc.config import Config
from bootsvc.lab import leaf, rack

VXLAN_FILTER = "udp port 4789"  # IANA VXLAN port (RFC 7348 section 5)


class FabricError(RuntimeError):
    """A lab fabric helper could not do what it was asked (the message says what and what to check)."""


@dataclass(frozen=True)
class ExecResult:
    rc: int
    output: str  # stdout and stderr, interleaved as the command wrote them


# ---------------------------------------------------------------------------------------------- topology
def topology(config: Config) -> dict[str, Any]:
    """The fabric of the rack that is up (or would be, with every configured pair), as JSON-able data."""
    plan, st = rack._current_plan(config)
    pairs = []
    for m in plan.machines:
        pairs.append({
            "pair": m.index, "tenant": m.tenant, "dpu": m.dpu.name, "host": m.host.name if m.host else None,
            "machine_netns": m.netns, "probe_netns": m.probe_netns, "probe_dev": m.probe_dev,
            "dpu_oob_ip": m.dpu_oob_ip, "dpu_uplink": leaf.DPU_UPLINK, "dpu_uplink_mac": m.dpu.nics[2][1],
            "leaf_dev": leaf.leaf_dev(plan.prefix, m.index),
            "console": str(rack.console_socket(plan, m.dpu)),
            "serial_log": str(plan.workdir / m.dpu.name / f"{m.dpu.name}.serial.log"),
        })
    return {"up": st is not None, "prefix": plan.prefix, "leaf_netns": f"{plan.prefix}-{leaf.LEAF}",
            "leaf_asn": leaf.LEAF_ASN, "leaf_router_id": leaf.LEAF_ROUTER_ID,
            "leaf_vty_socket": str(leaf.rundir(plan.prefix)), "dpu_asn_base": config.fabric.asn,
            "asn_per_dpu": config.fabric.asn_per_dpu, "uplinks": list(config.fabric.uplinks), "pairs": pairs}


# ---------------------------------------------------------------------------------------------- DPU console
@contextlib.contextmanager
def _vm_lock(path: Path, timeout: float) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FabricError(f"{path}: another caller holds the console for more than {timeout:.0f} s") \
                        from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def guest_script(command: str, nonce: str, timeout: int) -> str:
    """The line sent to the console shell (pure). The markers ``B<nonce>N``/``E<nonce>N`` come from
    ``printf`` and do not occur literally in this line."""
    b64 = base64.b64encode(command.encode()).decode()
    c, o = f"/tmp/.lab-cmd-{nonce}", f"/tmp/.lab-out-{nonce}"
    return (f"echo {b64} | base64 -d > {c}; timeout -s KILL {timeout} sh {c} > {o} 2>&1 < /dev/null; rc=$?; "
            f"printf '\\nB%sN\\n' {nonce}; base64 {o}; printf 'E%sN %s\\n' {nonce} $rc; rm -f {c} {o}\n")


def parse_answer(text: str, nonce: str) -> ExecResult | None:
    """The result in what the console sent so far (pure), or None while it is incomplete."""
    m = re.search(rf"B{nonce}N\r?\n(.*?)E{nonce}N (\d+)", text, re.S)
    if m is None:
        return None
    try:
        out = base64.b64decode("".join(m.group(1).split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise FabricError(f"garbled console answer ({e})") from None
    return ExecResult(int(m.group(2)), out.decode("utf-8", "replace"))


def dpu_exec(config: Config, dpu: str, command: str, *, timeout: float = 60.0) -> ExecResult:
    """Run ``command`` (``sh`` syntax) as root on DPU VM ``dpu`` (e.g. ``"dpu-1"``) and return its exit
    status and output. ``timeout``: the guest kills the command after that many seconds (rc 137); the
    answer is awaited ``timeout`` + 60 s (TCG). Raises :class:`FabricError` if the VM's console does not
    answer (VM off, still booting: see :func:`wait_console`)."""
    plan, _ = rack._current_plan(config)
    vm = plan.vm(dpu)
    if vm.role != "dpu":
        raise FabricError(f"{dpu} is a host VM; the command console is on the DPU VMs only")
    sock_path = rack.console_socket(plan, vm)
    nonce = secrets.token_hex(6)
    with _vm_lock(sock_path.with_name("console.lock"), timeout + 120.0):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(5.0)
            try:
                s.connect(str(sock_path))
            except OSError as e:
                raise FabricError(f"{dpu}: console {sock_path} not reachable ({e.strerror or e}); is the VM on?") \
                    from None
            s.sendall(guest_script(command, nonce, max(1, int(timeout))).encode())
            buf = b""
            deadline = time.monotonic() + timeout + 60.0
            while time.monotonic() < deadline:
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    raise FabricError(f"{dpu}: console closed (VM stopped?)")
                buf += chunk
                res = parse_answer(buf.decode("ascii", "replace"), nonce)
                if res is not None:
                    return res
            raise FabricError(f"{dpu}: no answer on the console within {timeout + 60:.0f} s "
                              f"(last output: {buf[-200:]!r})")
        finally:
            s.close()


def wait_console(config: Config, dpu: str, timeout: float) -> float:
    """Wait until ``dpu``'s console shell answers; returns the seconds it took."""
    t0 = time.monotonic()
    last: Exception | None = None
    while time.monotonic() - t0 < timeout:
        try:
            if dpu_exec(config, dpu, "true", timeout=10).rc == 0:
                return time.monotonic() - t0
        except FabricError as e:
            last = e
        time.sleep(2.0)
    raise FabricError(f"{dpu}: console not answering after {timeout:.0f} s ({last})")


def dpu_vtysh(config: Config, dpu: str, command: str, *, timeout: float = 60.0) -> str:
    """``vtysh -c COMMAND`` on a DPU VM; raises :class:`FabricError` with vtysh's output when it fails."""
    res = dpu_exec(config, dpu, f"vtysh -c {_sh_quote(command)}", timeout=timeout)
    if res.rc != 0:
        raise FabricError(f"{dpu}: vtysh -c {command!r} exited {res.rc}: {res.output.strip()[-300:]}")
    return res.output


def dpu_vtysh_json(config: Config, dpu: str, command: str, *, timeout: float = 60.0) -> Any:
    """``vtysh -c '... json'`` on a DPU VM, parsed."""
    return _json(dpu, command, dpu_vtysh(config, dpu, command, timeout=timeout))


# ---------------------------------------------------------------------------------------------- leaf
def leaf_vtysh(config: Config, command: str, *, timeout: float = 30.0) -> str:
    """``vtysh -c COMMAND`` on the leaf (in this machine's leaf namespace)."""
    plan, _ = rack._current_plan(config)
    try:
        res = subprocess.run([*leaf.vtysh_argv(plan.prefix), "-c", command], capture_output=True, text=True,
                             timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise FabricError(f"leaf: vtysh -c {command!r} took more than {timeout:.0f} s") from None
    if res.returncode != 0:
        raise FabricError(f"leaf: vtysh -c {command!r} exited {res.returncode}: "
                          f"{(res.stderr or res.stdout).strip()[-300:]} (is the lab up?)")
    return res.stdout


def leaf_vtysh_json(config: Config, command: str, *, timeout: float = 30.0) -> Any:
    return _json("leaf", command, leaf_vtysh(config, command, timeout=timeout))


def leaf_established(config: Config) -> dict[str, str]:
    """Leaf device -> BGP state of its unnumbered session (``Established`` when up)."""
    plan, _ = rack._current_plan(config)
    got = leaf.sessions(plan.prefix)
    if got is None:
        raise FabricError(f"leaf FRR in {plan.prefix}-{leaf.LEAF} does not answer (is the lab up?)")
    return got


class LeafCapture:
    """``dumpcap`` on leaf links into one pcapng (``with LeafCapture(config, path) as cap: ...``).

    ``devs``: leaf devices (default: every leaf link, see :func:`topology` ``leaf_dev``); ``bpf``: the
    capture filter (default VXLAN). A packet from DPU 1 to DPU 2 appears twice: in on ``bx1l``, out on
    ``bx2l`` (pcapng records the interface of each packet)."""

    def __init__(self, config: Config, pcap: Path, *, devs: Sequence[str] | None = None,
                 bpf: str = VXLAN_FILTER) -> None:
        plan, _ = rack._current_plan(config)
        self.ns = f"{plan.prefix}-{leaf.LEAF}"
        self.devs = list(devs) if devs else [leaf.leaf_dev(plan.prefix, m.index) for m in plan.machines]
        self.pcap = pcap
        self.bpf = bpf
        self._proc: subprocess.Popen[bytes] | None = None
        self._err = pcap.with_name(pcap.name + ".dumpcap.log")

    def start(self, timeout: float = 15.0) -> LeafCapture:
        self.pcap.parent.mkdir(parents=True, exist_ok=True)
        self.pcap.unlink(missing_ok=True)
        argv = ["ip", "netns", "exec", self.ns, "dumpcap", "-q"]
        for d in self.devs:
            argv += ["-i", d, "-f", self.bpf]
        argv += ["-w", str(self.pcap)]
        with self._err.open("wb") as err:
            self._proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        # dumpcap writes the pcapng section and interface blocks once every interface is open
        while not (self.pcap.exists() and self.pcap.stat().st_size > 0):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise FabricError(f"dumpcap on {self.ns} {','.join(self.devs)} did not start: "
                                  f"{self._err.read_text(errors='replace')[-300:]}")
            time.sleep(0.1)
        return self

    def stop(self) -> Path:
        p, self._proc = self._proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGINT)  # dumpcap flushes and closes the file on SIGINT
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return self.pcap

    def __enter__(self) -> LeafCapture:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------- helpers
def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


def _json(where: str, command: str, text: str) -> Any:
    try:
        return json.loads(text or "{}")
    except ValueError:
        raise FabricError(f"{where}: `{command}` is not JSON: {text[:200]!r}") from None

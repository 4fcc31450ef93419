"""`bootsvc serve`: the supervisor starts services, answers /healthz, stops cleanly, restarts a service
that crashed (the others keep serving; /health counts it), takes every service with it when it is
killed with SIGKILL (no orphan keeps the port), and refuses to start twice on the same listeners."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from helpers.procs import stop
from helpers.waits import wait_for

PORT = 18390


def wait_http(url: str, deadline_s: float) -> dict[str, object]:
    end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                data: dict[str, object] = json.loads(r.read())
                return data
        except OSError as e:
            last = e
            time.sleep(0.1)
    raise AssertionError(f"{url} not up within {deadline_s}s: {last}")


def port_free(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def start(tmp_path: Path, extra: str = "", second_port: bool = False) -> subprocess.Popen[str]:
    cfg = tmp_path / "c.yaml"
    more = f"    - {{address: 127.0.0.1, port: {PORT + 1}}}\n" if second_port else ""
    cfg.write_text(f"database: {{url: 'sqlite:///{tmp_path}/s.db'}}\nstate_dir: {tmp_path}\n"
                   f"listeners:\n  http:\n    - {{address: 127.0.0.1, port: {PORT}}}\n{more}{extra}")
    env = {**os.environ, "BOOTSVC_HTTP_WORKERS": "1"}
    subprocess.run([sys.executable, "-m", "bootsvc", "--config", str(cfg), "db", "upgrade"], check=True,
                   capture_output=True, env=env)
    return subprocess.Popen([sys.executable, "-m", "bootsvc", "--config", str(cfg), "serve", "--only", "http"],
                            stderr=subprocess.PIPE, text=True, env=env)


def stop_clean(p: subprocess.Popen[str]) -> str:
    """SIGTERM to ``bootsvc serve``; its stderr, once it exited with status 0 within 30 s."""
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    return err


def test_serve_health_and_clean_sigterm(tmp_path: Path) -> None:
    p = start(tmp_path)
    try:
        assert wait_http(f"http://127.0.0.1:{PORT}/healthz", 60) == {"status": "ok", "database": "ok"}
        with pytest.raises(urllib.error.HTTPError) as e:  # names and serials of every node: a read token
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/nodes", timeout=5)
        assert e.value.code == 401
        err = stop_clean(p)
    finally:
        if p.poll() is None:
            p.kill()
    assert "all services stopped" in err
    assert port_free(PORT)


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (from /proc: ppid is field 4 of /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def service_pid(sup: int, port: int) -> int:
    """The pid of the service process (child of the supervisor) that listens on ``port``."""
    for pid in Path("/proc").iterdir():
        if pid.name.isdigit():
            try:
                cmd = (pid / "cmdline").read_bytes().split(b"\0")
                ppid = int((pid / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == sup and b"run-service" in cmd and cmd[cmd.index(b"--index") + 1] == str(
                    0 if port == PORT else 1).encode():
                return int(pid.name)
    raise AssertionError(f"no service of supervisor {sup} for port {port}")


def test_kill_9_of_the_supervisor_takes_every_service_with_it(tmp_path: Path) -> None:
    p = start(tmp_path)
    tree: set[int] = set()
    try:
        wait_http(f"http://127.0.0.1:{PORT}/healthz", 60)
        tree = descendants(p.pid)
        assert len(tree) >= 2  # the HTTP service (gunicorn's master) and its worker
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=10)
        wait_for(lambda: not any(alive(x) for x in tree), 20, f"orphans {[x for x in tree if alive(x)]}")
        wait_for(lambda: port_free(PORT), 5, "port released")
    finally:
        if p.poll() is None:
            p.kill()
        for x in tree | descendants(p.pid):  # orphans, if the test failed, by the pids seen before
            if alive(x):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(x, signal.SIGKILL)


def test_a_crashed_service_is_restarted_and_the_others_keep_serving(tmp_path: Path) -> None:
    p = start(tmp_path, second_port=True)
    try:
        wait_http(f"http://127.0.0.1:{PORT}/healthz", 60)
        wait_http(f"http://127.0.0.1:{PORT + 1}/healthz", 60)
        victim = service_pid(p.pid, PORT + 1)
        os.kill(victim, signal.SIGKILL)
        # the other listener answers throughout, and reports the restart
        end = time.monotonic() + 60
        while True:
            h = wait_http(f"http://127.0.0.1:{PORT}/health", 2)
            svc = h["services"]  # type: ignore[index]
            assert isinstance(svc, dict)
            if svc["http[1]"]["restarts"] == 1 and svc["http[1]"]["state"] == "running":
                break
            assert time.monotonic() < end, h
            time.sleep(0.2)
        assert svc["http[0]"]["restarts"] == 0 and svc["http[1]"]["last_exit_code"] == -9
        assert h["status"] == "ok"
        assert wait_http(f"http://127.0.0.1:{PORT + 1}/healthz", 60)["status"] == "ok"
        assert service_pid(p.pid, PORT + 1) != victim
        err = stop_clean(p)
    finally:
        if p.poll() is None:
            p.kill()
    assert "service http[1] exited with code -9" in err and "restart 1 in 1 s" in err


def test_a_second_serve_on_the_same_listeners_refuses(tmp_path: Path) -> None:
    p = start(tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{PORT}/healthz", 60)
        second = subprocess.run([sys.executable, "-m", "bootsvc", "--config", str(tmp_path / "c.yaml"), "serve",
                                 "--only", "http"], capture_output=True, text=True, timeout=60)
        assert second.returncode != 0
        assert "already running for these listeners" in second.stderr and f"pid {p.pid}" in second.stderr
        assert "Address already in use" not in second.stderr
        assert wait_http(f"http://127.0.0.1:{PORT}/healthz", 5)["status"] == "ok"  # the first one is untouched
        # other services of the same config are another set: they may run beside it
        other = subprocess.Popen([sys.executable, "-m", "bootsvc", "--config", str(tmp_path / "c.yaml"), "serve",
                                  "--only", "conductor"], stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: "conductor[0]" in wait_http(f"http://127.0.0.1:{PORT}/health", 5)["services"],  # type: ignore[operator]
                     30, "the conductor's supervisor in /health")
            assert other.poll() is None
        finally:
            other.terminate()
            _, err = other.communicate(timeout=30)
        assert other.returncode == 0 and "already running" not in err, err
    finally:
        stop(p)

"""`bootsvc serve`: the supervisor starts services, answers /healthz, and stops cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

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


def start(tmp_path: Path, extra: str = "") -> subprocess.Popen[str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"database: {{url: 'sqlite:///{tmp_path}/s.db'}}\nstate_dir: {tmp_path}\n"
                   f"listeners:\n  http:\n    - {{address: 127.0.0.1, port: {PORT}}}\n{extra}")
    env = {**os.environ, "BOOTSVC_HTTP_WORKERS": "1"}
    subprocess.run([sys.executable, "-m", "bootsvc", "--config", str(cfg), "db", "upgrade"], check=True,
                   capture_output=True, env=env)
    return subprocess.Popen([sys.executable, "-m", "bootsvc", "--config", str(cfg), "serve", "--only", "http"],
                            stderr=subprocess.PIPE, text=True, env=env)


def test_serve_health_and_clean_sigterm(tmp_path: Path) -> None:
    p = start(tmp_path)
    try:
        assert wait_http(f"http://127.0.0.1:{PORT}/healthz", 60) == {"status": "ok", "database": "ok"}
        assert wait_http(f"http://127.0.0.1:{PORT}/nodes", 5) == {"total": 0, "items": []}
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "all services stopped" in err
    assert port_free(PORT)


def test_one_service_dying_stops_the_rest(tmp_path: Path) -> None:
    p = start(tmp_path)
    try:
        wait_http(f"http://127.0.0.1:{PORT}/healthz", 60)
        out = subprocess.run(["pgrep", "-f", "bootsvc-http|run-service http", "-P", str(p.pid)],
                             capture_output=True, text=True)
        child = int(out.stdout.split()[0])
        os.kill(child, signal.SIGKILL)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 1
    assert "exited with code" in err and "stopping all services" in err

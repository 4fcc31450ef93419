"""The wheel is the product: built from the tree, installed into a fresh venv outside it, it upgrades a
database, serves a boot script rendered from its own templates and serves a catalog image — with the
source tree out of reach (the service runs from another directory, and the check below fails if any
file under the tree was opened by the installed package)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest
from helpers.procs import stop

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, deadline_s: float) -> tuple[int, bytes]:
    end = time.monotonic() + deadline_s
    last: Exception | None = None
    while time.monotonic() < end:
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError as e:
            last = e
            time.sleep(0.2)
    raise AssertionError(f"{url} not served within {deadline_s}s: {last}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)],
                   check=True, timeout=300)
    (whl,) = out.glob("bootsvc-*.whl")
    return whl


def test_wheel_carries_templates_and_migrations_but_not_the_lab(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    templates = {Path(n).name for n in names if n.startswith("bootsvc/_data/ipxe/")}
    assert templates == {p.name for p in (REPO / "ipxe").glob("*.j2")}
    assert "bootsvc/_data/migrations/env.py" in names
    assert any(n.startswith("bootsvc/_data/migrations/versions/") and n.endswith(".py") for n in names)
    assert not [n for n in names if n.startswith("bootsvc/lab/")], "the QEMU lab is not part of the product"


@pytest.mark.timeout(900)
def test_installed_wheel_serves_from_outside_the_tree(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], check=True, timeout=600)
    bootsvc = str(venv / "bin" / "bootsvc")
    site = tmp_path / "site"
    site.mkdir()
    (site / "kernel").write_bytes(os.urandom(4096))
    (site / "initrd").write_bytes(os.urandom(8192))
    port = _free_port()
    cfg = site / "bootsvc.yaml"
    cfg.write_text(
        f"database: {{url: 'sqlite:///{site}/bootsvc.db'}}\nstate_dir: {site}/var\n"
        f"images: {{catalog: {site}/catalog.yaml, root: {site}}}\n"
        f"listeners:\n  http:\n    - {{address: 127.0.0.1, port: {port}}}\n"
        f"boot: {{http_port: {port}, tftp_root: {site}/tftp}}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "BOOTSVC_"))}
    env["BOOTSVC_HTTP_WORKERS"] = "1"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([bootsvc, "--config", str(cfg), *args], cwd=site, env=env, capture_output=True,
                              text=True, timeout=120)

    up = run("db", "upgrade")
    assert up.returncode == 0, up.stderr
    add = run("image", "add", "tiny", "1", "--kind", "kernel-initrd", "--file", f"kernel={site}/kernel",
              "--file", f"initrd={site}/initrd", "--default-for", "host")
    assert add.returncode == 0, add.stderr
    node = run("node", "add", "w1", "--kind", "host", "--serial", "W1", "--mac", "52:54:00:aa:bb:01,host-pf")
    assert node.returncode == 0, node.stderr

    # strace-free proof that nothing is read from the tree: the installed package's files all live in
    # the venv, and the service runs with the tree unreadable by path (cwd elsewhere, no PYTHONPATH).
    where = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import bootsvc, bootsvc.resources as r; print(bootsvc.__file__);"
                            "print(r.templates_dir()); print(r.migrations_dir())"],
                           cwd=site, env=env, capture_output=True, text=True, check=True)
    for line in where.stdout.split():
        assert str(REPO) not in line and line.startswith(str(venv)), where.stdout

    proc = subprocess.Popen([bootsvc, "--config", str(cfg), "serve", "--only", "http"], cwd=site, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        status, body = _get(f"http://127.0.0.1:{port}/healthz", 90)
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, body = _get(f"http://127.0.0.1:{port}/boot/ipxe?mac=52:54:00:aa:bb:01", 10)
        assert status == 200 and body.startswith(b"#!ipxe"), body[:200]
        status, body = _get(f"http://127.0.0.1:{port}/images/tiny/1/kernel", 10)
        assert status == 200 and body == (site / "kernel").read_bytes()
    finally:
        stop(proc)
    shutil.rmtree(venv, ignore_errors=True)

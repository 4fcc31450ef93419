"""The supervisor's wiring (bootsvc/daemon.py): each service kind reaches its server by a plain import,
and a server module that does not import stops `bootsvc serve` with one clear line and exit code 70
instead of being skipped as "unavailable" or restarted forever."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bootsvc import config as config_mod
from bootsvc import daemon

DAEMON = Path(daemon.__file__)
SERVERS = {"http": "bootsvc.web.serve", "dhcp": "bootsvc.dhcp.server", "tftp": "bootsvc.tftp",
           "dns": "bootsvc.dns", "conductor": "bootsvc.conductor"}


@pytest.mark.parametrize("kind", sorted(SERVERS))
def test_each_service_kind_runs_its_server(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = __import__(SERVERS[kind], fromlist=["run"])
    calls: list[tuple[object, int, threading.Event]] = []
    monkeypatch.setattr(mod, "run", lambda c, i, s: calls.append((c, i, s)))
    cfg, stop = config_mod.from_mapping({}, "<test>", env={}), threading.Event()
    daemon.RUNNERS[kind](cfg, 3, stop)
    assert calls == [(cfg, 3, stop)]


def test_planned_service_kinds_all_have_runners() -> None:
    cfg = config_mod.from_mapping({"listeners": {
        "http": [{"address": "127.0.0.1", "port": 8080}], "dns": [{"address": "127.0.0.1", "port": 5353}],
        "tftp": [{"address": "127.0.0.1", "port": 6969}]}}, "<test>", env={})
    assert {s.kind for s in daemon.planned_services(cfg)} <= set(daemon.RUNNERS) == set(SERVERS)


def test_no_module_is_loaded_by_its_name_as_a_string() -> None:
    """A string loader (importlib.import_module / find_spec) turned a renamed module into a service that
    silently did not run; plain imports fail where the name is wrong."""
    tree = ast.parse(DAEMON.read_text())
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {n for n in names if n.startswith("importlib")}
    assert "__import__" not in DAEMON.read_text()


def test_a_server_module_that_does_not_import_stops_serve_with_code_70(tmp_path: Path) -> None:
    """The DNS server's module is missing from this installation (a ``sitecustomize`` on PYTHONPATH makes
    `import bootsvc.dns` fail with ModuleNotFoundError in every process, as a deleted file would):
    `bootsvc serve` exits 70 on its own, names the service and says what to do."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text("import sys\nsys.modules['bootsvc.dns'] = None\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"database: {{url: 'sqlite:///{tmp_path}/s.db'}}\nstate_dir: {tmp_path}\n"
                   "listeners:\n  dns:\n    - {address: 127.0.0.1, port: 18453}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "site"),
                                                                      os.environ.get("PYTHONPATH")]))}
    p = subprocess.run([sys.executable, "-m", "bootsvc", "--config", str(cfg), "serve", "--only", "dns"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == daemon.EXIT_BROKEN, p.stderr
    assert "service dns[0] cannot start: module bootsvc.dns does not import" in p.stderr
    assert "stopping every service: reinstall bootsvc" in p.stderr


def test_a_service_process_freezes_its_start_up_heap_and_again_after_warm_up(tmp_path: Path) -> None:
    """settle_heap (a service process only): start-up objects go to the permanent generation, the
    service thresholds apply, and what the warm-up builds is frozen RESETTLE_AFTER later; a runner
    called outside run_one (a test) leaves the collector alone."""
    code = (
        "import gc, json, threading, time\n"
        "from bootsvc import daemon\n"
        "daemon.settle_heap()\n"
        "out = {'untouched': gc.get_freeze_count() == 0 and gc.get_threshold() == (700, 10, 10)}\n"
        "daemon._SETTLE, daemon.RESETTLE_AFTER = True, 0.3\n"
        "daemon.settle_heap()\n"
        "out['frozen'], out['threshold'] = gc.get_freeze_count(), list(gc.get_threshold())\n"
        "warm = [[i] for i in range(5000)]\n"
        "deadline = time.monotonic() + 30\n"
        "while gc.get_freeze_count() < out['frozen'] + 5000 and time.monotonic() < deadline:\n"
        "    time.sleep(0.05)\n"
        "out['refrozen'] = gc.get_freeze_count()\n"
        "print(json.dumps(out))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = __import__("json").loads(p.stdout)
    assert out["untouched"] is True
    assert out["frozen"] > 20_000 and out["threshold"] == list(daemon.GC_THRESHOLD)
    assert out["refrozen"] >= out["frozen"] + 5000


def test_gc_stats_are_off_by_default_and_written_per_process_with_types_at_exit(tmp_path: Path) -> None:
    """BOOTSVC_GC_STATS=DIR: one JSON file per process with collections and CPU per generation, and at
    exit the tracked objects by type (what grew since early in the run)."""
    assert daemon.gc_stats_from_env("x") is None or "BOOTSVC_GC_STATS" in os.environ
    code = (
        "import gc\n"
        "from bootsvc import daemon\n"
        "daemon.EARLY_TYPES_AFTER = 0.0\n"
        "s = daemon.gc_stats_from_env('conductor')\n"
        "s.every = 0.0\n"
        "gc.collect()\n"
        "class Grower: pass\n"
        "keep = [Grower() for _ in range(3000)]\n"
        "gc.collect()\n")
    env = {**os.environ, "BOOTSVC_GC_STATS": str(tmp_path / "gc")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    files = list((tmp_path / "gc").glob("gc-conductor-*.json"))
    assert len(files) == 1
    data = __import__("json").loads(files[0].read_text())
    assert data["collections"][2] >= 2 and data["cpu_s"][2] > 0
    assert data["types_grown"].get("__main__.Grower") == 3000
    assert data["tracked"] >= data["tracked_early"] + 3000 and "MainThread" in data["threads_cpu_s"]

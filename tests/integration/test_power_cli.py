"""`bootsvc power ...` / `bootsvc bmc check` through the real top-level `bootsvc` click group (in-process,
plus one real `python -m bootsvc` process for exit codes); nodes in SQLite, BMC = bootsvc.lab.bfbmc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from bootsvc import db, inventory, metrics
from bootsvc.cli import cli
from bootsvc.lab.bfbmc import BfBmcProcess, free_port
from bootsvc.models import Base, Event, Node

USER, PASSWORD = "root", "bp-cli-pass"
REF = "env:BP_CLI_USER:BP_CLI_PASS"


@pytest.fixture(scope="module")
def bf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BfBmcProcess]:
    with BfBmcProcess(tmp_path_factory.mktemp("bfbmc-cli"), user=USER, password=PASSWORD, power_delay=0.2) as p:
        yield p


@pytest.fixture(scope="module")
def url(bf: BfBmcProcess, tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite inventory for the module; schema from the models (migrations are tested elsewhere)."""
    dburl = f"sqlite:///{tmp_path_factory.mktemp('cli-db') / 'bootsvc.db'}"
    engine = db.make_engine(dburl)
    Base.metadata.create_all(engine)
    gone = f"http://127.0.0.1:{free_port(18050, 18089)}"  # nothing listens there
    with db.session_factory(engine)() as s:
        inventory.enroll(s, [
            inventory.NodeSpec(name="dpu-7", kind="dpu", serial="MT2334X07", bmc_address=bf.url,
                               bmc_credential_ref=REF),
            inventory.NodeSpec(name="dpu-nobmc", kind="dpu", serial="MT2334X08"),
            inventory.NodeSpec(name="dpu-gone", kind="dpu", serial="MT2334X09", bmc_address=gone,
                               bmc_credential_ref=REF),
        ], actor="test")
    engine.dispose()
    return dburl


@pytest.fixture(autouse=True)
def fresh(bf: BfBmcProcess, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("BP_CLI_USER", USER)
    monkeypatch.setenv("BP_CLI_PASS", PASSWORD)
    monkeypatch.delenv("BOOTSVC_CONFIG", raising=False)
    bf.reset()
    yield
    assert bf.stats()["sessions_open"] == 0


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def run(url: str, *args: str, code: int = 0) -> Result:
    """In-process through the real top-level `bootsvc` click group (fast); see also the subprocess test."""
    r = CliRunner().invoke(cli, ["--db", url, *args], catch_exceptions=False)
    res = Result(r.exit_code, r.stdout, r.stderr)
    assert res.returncode == code, (args, res.stdout, res.stderr)
    return res


def one_error_line(p: Result | subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_bmc_check_human_and_json(url: str, bf: BfBmcProcess) -> None:
    out = run(url, "bmc", "check", "dpu-7").stdout
    assert "login ok via session" in out and "redfish version: 1.17.0" in out
    assert "quirks:          nvidia-bluefield-bmc (" in out and "settings_resource=True" in out
    d = json.loads(run(url, "bmc", "check", "MT2334X07", "--json").stdout)  # by serial
    assert d["ok"] and d["node"] == "dpu-7" and d["auth"] == "session"
    assert d["quirks"] == ["nvidia-bluefield-bmc"] and d["quirk_flags"]["system_id"] == "Bluefield"
    assert d["power_state"] == "On"


def test_power_commands_drive_the_bmc(url: str, bf: BfBmcProcess) -> None:
    # the BF-24.10 capture's pending Settings: UefiHttp, Disabled
    assert run(url, "power", "status", "dpu-7").stdout.strip() == "dpu-7: On; boot override UefiHttp/Disabled"
    out = run(url, "power", "pxe-once", "dpu-7").stdout
    assert "next boot Pxe (Once); pending, applies at the next boot" in out
    assert bf.stats()["settings_boot"]["BootSourceOverrideTarget"] == "Pxe"
    # a DPU's power-off is not waited for (the Arm stays in standby, bluefieldbmcv2401)
    assert run(url, "power", "off", "dpu-7", "--wait", "5").stdout.startswith("dpu-7: off done; power is ")
    deadline = time.monotonic() + 5
    while bf.stats()["power_state"] != "Off":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    d = json.loads(run(url, "power", "cycle", "dpu-7", "--wait", "5", "--json").stdout)
    assert d == {"ok": True, "node": "dpu-7", "action": "cycle", "power": "On"}
    assert bf.stats()["resets"] == ["ForceOff", "On"]
    assert bf.stats()["live_boot"]["BootSourceOverrideTarget"] == "Pxe"  # applied at that boot


def _power_events(url: str, name: str) -> list[Event]:
    engine = db.make_engine(url)
    try:
        with db.session_factory(engine)() as s:
            return list(s.scalars(select(Event).join(Node).where(Node.name == name, Event.trigger == "power_action")
                                  .order_by(Event.id)))
    finally:
        engine.dispose()


def test_power_on_off_cycle_go_through_the_operations_layer(url: str, bf: BfBmcProcess) -> None:
    """The CLI's power actions are `operations.power`'s, like the API's and the UI's: one power_action
    event and one BMC request counted per command, and the same refusal for a node the conductor drives."""
    before = len(_power_events(url, "dpu-7"))
    sent = metrics.counters.get("bootsvc_bmc_requests_total", {"op": "power_on", "via": "cli"})
    d = json.loads(run(url, "power", "on", "dpu-7", "--wait", "5", "--json").stdout)
    assert d == {"ok": True, "node": "dpu-7", "action": "on", "power": "On"}
    evs = _power_events(url, "dpu-7")[before:]
    assert [(e.actor, e.detail) for e in evs] == [("cli", {"action": "on", "power_state": "On"})]
    assert metrics.counters.get("bootsvc_bmc_requests_total", {"op": "power_on", "via": "cli"}) == sent + 1
    # a failed BMC call is an event too, and exit 1
    run(url, "power", "cycle", "dpu-gone", "--wait", "1", code=1)
    assert [e.detail["action"] for e in _power_events(url, "dpu-gone")] == ["cycle"]
    # a node in an active state belongs to the conductor: refused (exit 2), nothing sent to its BMC
    engine = db.make_engine(url)
    with db.session_factory(engine)() as s:
        s.execute(update(Node).where(Node.name == "dpu-7").values(state="dpu_booting"))
        s.commit()
    resets = list(bf.stats()["resets"])
    try:
        p = run(url, "power", "off", "dpu-7", "--json", code=2)
        assert "dpu-7 is dpu_booting: bootsvc drives its power now" in one_error_line(p)
        assert json.loads(p.stdout)["kind"] == "conflict" and json.loads(p.stdout)["state"] == "dpu_booting"
        assert bf.stats()["resets"] == resets
    finally:
        with db.session_factory(engine)() as s:
            s.execute(update(Node).where(Node.name == "dpu-7").values(state="registered"))
            s.commit()
        engine.dispose()


def test_bad_input_exits_2_with_one_line(url: str) -> None:
    p = run(url, "power", "status", "nope", code=2)
    assert one_error_line(p) == "error: no node 'nope' (looked up by name, serial, id and MAC)"
    p = run(url, "power", "on", "dpu-nobmc", code=2)
    assert "dpu-nobmc has no BMC address" in one_error_line(p) and "bootsvc node set dpu-nobmc" in p.stderr


def test_bmc_failures_exit_1_with_one_line(url: str, bf: BfBmcProcess) -> None:
    p = run(url, "power", "on", "dpu-gone", "--json", code=1)
    assert "unreachable" in one_error_line(p)
    assert json.loads(p.stdout)["retryable"] is True
    bf.faults(auth_401=True)
    try:
        p = run(url, "bmc", "check", "dpu-7", "--json", code=1)
    finally:
        bf.clear_faults()
    assert "HTTP 401" in one_error_line(p) and PASSWORD not in p.stderr + p.stdout
    assert json.loads(p.stdout)["retryable"] is False


def test_real_process_exit_codes(url: str) -> None:
    env = {**os.environ, "BOOTSVC_DB_URL": url}
    ok = subprocess.run([sys.executable, "-m", "bootsvc", "power", "status", "MT2334X07", "--json"],
                        capture_output=True, text=True, env=env, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["power"] == "On"
    bad = subprocess.run([sys.executable, "-m", "bootsvc", "bmc", "check", "nope"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and one_error_line(bad).startswith("error: no node 'nope'")

"""The CLI as a user runs it (a real `bootsvc` process) on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers.cli import BIN
from helpers.cli import run_cli as run


def test_nodes_and_tenants_round_trip(any_db_url: str) -> None:
    url = any_db_url
    run(url, "db", "upgrade")
    run(url, "tenant", "add", "red", "--vrf", "red", "--l3vni", "5001", "--prefix", "10.0.0.0/24")
    run(url, "tenant", "add", "blue", "--vrf", "blue", "--l3vni", "5002", "--prefix", "10.0.0.0/24")
    tenants = json.loads(run(url, "tenant", "list", "--json").stdout)
    assert [(t["name"], t["vrf"], t["prefixes"]) for t in tenants] == [
        ("blue", "blue", "10.0.0.0/24"), ("red", "red", "10.0.0.0/24")]
    run(url, "node", "add", "host-a1", "--kind", "host", "--serial", "HS-001", "--rack", "a", "--slot", "1",
        "--mac", "AA-BB-CC-00-00-01,host-pf", "--tenant", "red", "--bmc", "https://192.0.2.10",
        "--bmc-credential", "host-bmc")
    run(url, "node", "add", "dpu-a1", "--kind", "dpu", "--serial", "MT2334X00001", "--rack", "a", "--slot", "1",
        "--mac", "aabb.cc00.0002,oob,10.77.0.50", "--host", "host-a1")
    shown = json.loads(run(url, "node", "show", "aa:bb:cc:00:00:02", "--json").stdout)
    assert shown["name"] == "dpu-a1" and shown["macs"] == [
        {"mac": "aa:bb:cc:00:00:02", "role": "oob", "ipv4": "10.77.0.50"}]
    host = json.loads(run(url, "node", "show", "HS-001", "--json").stdout)
    assert host["dpu_ids"] == [shown["id"]] and host["tenant"] == "red"
    assert shown["host_id"] == host["id"]
    listing = json.loads(run(url, "node", "list", "--kind", "dpu", "--json").stdout)
    assert listing["total"] == 1 and listing["items"][0]["serial"] == "MT2334X00001"
    human = run(url, "node", "list").stdout
    assert "host-a1" in human and "dpu-a1" in human and "NAME" in human
    moved = json.loads(run(url, "node", "provision", "dpu-a1", "--manual-power", "--json").stdout)
    assert (moved["from"], moved["to"]) == ("registered", "dpu_booting")
    events = json.loads(run(url, "node", "events", "dpu-a1", "--json").stdout)
    assert [e["trigger"] for e in events] == ["enrolled", "provision"]


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["node", "add", "x1", "--kind", "dpu", "--serial", "S", "--mac", "nonsense"], 2, "nics.0.mac: not a MAC"),
        (["node", "add", "Bad Name", "--kind", "dpu", "--serial", "S"], 2, "name:"),
        (["node", "add", "x2", "--kind", "host", "--serial", "S", "--tenant", "ghost"], 2, "no tenant named"),
        (["node", "show", "nope"], 2, "no node 'nope'"),
        (["node", "release", "nope"], 2, "no node"),
        (["tenant", "add", "t", "--vrf", "this-name-is-too-long", "--l3vni", "1"], 2, "vrf"),
    ],
)
def test_bad_input_is_one_clear_line_and_nonzero(sqlite_url: str, args: list[str], code: int, text: str) -> None:
    run(sqlite_url, "db", "upgrade")
    p = run(sqlite_url, *args, ok=False)
    assert p.returncode == code, p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and text in last, p.stderr
    assert "Traceback" not in p.stderr


def test_duplicate_and_illegal_transition(sqlite_url: str) -> None:
    run(sqlite_url, "db", "upgrade")
    run(sqlite_url, "node", "add", "d1", "--kind", "dpu", "--serial", "S1", "--mac", "52:54:00:00:00:09")
    p = run(sqlite_url, "node", "add", "d2", "--kind", "dpu", "--serial", "S2", "--mac", "52:54:00:00:00:09", ok=False)
    assert p.returncode == 2 and "already belongs" in p.stderr
    p = run(sqlite_url, "node", "retry", "d1", ok=False)
    assert p.returncode == 2 and "cannot take 'retry'" in p.stderr
    # only commands a tech can type are offered, never internal triggers such as install_done or timeout
    assert "commands allowed now: maintenance, provision, retire)" in p.stderr
    # nothing half-made by the failed enroll
    assert json.loads(run(sqlite_url, "node", "list", "--json").stdout)["total"] == 1


def test_bad_config_fails_at_start_naming_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("listeners:\n  http:\n    - {port: 0}\n")
    p = subprocess.run([*BIN, "--config", str(cfg), "node", "list"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2
    assert f"{cfg}: listeners.http.0.port" in p.stderr


def test_token_create_stores_only_a_hash(sqlite_url: str) -> None:
    run(sqlite_url, "db", "upgrade")
    out = json.loads(run(sqlite_url, "token", "create", "ci-bot", "--role", "automation", "--json").stdout)
    assert out["token"].startswith("bsv_")
    import sqlite3

    con = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    rows = con.execute("SELECT name, role, token_hash FROM api_tokens").fetchall()
    assert rows[0][:2] == ("ci-bot", "automation") and out["token"] not in rows[0][2]

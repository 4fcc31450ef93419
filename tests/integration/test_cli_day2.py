"""Day-2 commands as a tech runs them (a real `bootsvc` process on a fresh SQLite): correcting a typo,
deleting a mistaken enrollment, validated filters, provisioning pre-flight, and one clear line instead of
a traceback when the database was never initialised."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.cli import run_cli as run


@pytest.fixture()
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/day2.db"


def enroll(url: str) -> None:
    run(url, "db", "upgrade")
    run(url, "tenant", "add", "red", "--vrf", "red", "--l3vni", "5001", "--prefix", "10.0.0.0/24")
    run(url, "node", "add", "gpu-a01", "--kind", "host", "--serial", "HS200", "--mac", "58:a2:e1:00:00:01,host-pf",
        "--tenant", "red")
    run(url, "node", "add", "gpu-a01-dpu", "--kind", "dpu", "--serial", "MT1", "--mac", "58:a2:e1:00:01:00,oob",
        "--host", "gpu-a01")


def test_uninitialised_database_is_one_line_exit_2(url: str) -> None:
    p = run(url, "tenant", "add", "red", "--vrf", "red", "--l3vni", "5001", ok=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [
        f"error: the database {url} has no bootsvc schema yet: run `bootsvc db upgrade` first"]


def test_commands_print_no_lifecycle_log_lines_unless_verbose(url: str) -> None:
    enroll(url)
    quiet = run(url, "node", "provision", "gpu-a01-dpu", "--manual-power")
    assert quiet.stderr == "" and quiet.stdout.strip() == "gpu-a01-dpu: registered -> dpu_booting"
    loud = run(url, "-v", "node", "abort", "gpu-a01-dpu")
    assert "transition node=gpu-a01-dpu" in loud.stderr


def test_events_have_utc_z_timestamps(url: str) -> None:
    enroll(url)
    (ev,) = json.loads(run(url, "node", "events", "gpu-a01", "--json").stdout)
    assert ev["at"].endswith("Z") and len(ev["at"]) == len("2026-12-06T04:45:34Z")


def test_set_corrects_a_typo_validated_like_enroll(url: str) -> None:
    enroll(url)
    out = json.loads(run(url, "node", "set", "gpu-a01", "--serial", "HS201", "--rack", "b", "--slot", "4",
                         "--json").stdout)
    assert (out["serial"], out["rack"], out["slot"]) == ("HS201", "b", 4)
    bad = run(url, "node", "set", "gpu-a01", "--mac", "not-a-mac", ok=False)
    assert bad.returncode == 2 and "nics.0.mac" in bad.stderr
    dup = run(url, "node", "set", "gpu-a01", "--serial", "MT1", ok=False)
    assert dup.returncode == 2 and "a node with serial 'MT1' exists" in dup.stderr
    none = run(url, "node", "set", "gpu-a01", "--tenant", "blue", ok=False)
    assert none.returncode == 2 and "no tenant named 'blue'" in none.stderr
    # nothing half-applied by the refused edits, and the accepted one is in the history
    shown = json.loads(run(url, "node", "show", "gpu-a01", "--json").stdout)
    assert (shown["serial"], shown["tenant"], shown["macs"][0]["mac"]) == ("HS201", "red", "58:a2:e1:00:00:01")
    edits = [e for e in json.loads(run(url, "node", "events", "gpu-a01", "--json").stdout) if e["trigger"] == "edited"]
    assert edits[0]["detail"]["serial"] == {"from": "HS200", "to": "HS201"}


def test_set_refused_while_the_service_acts(url: str) -> None:
    enroll(url)
    run(url, "node", "provision", "gpu-a01-dpu", "--manual-power")
    p = run(url, "node", "set", "gpu-a01-dpu", "--mac", "58:a2:e1:00:01:09,oob", ok=False)
    assert p.returncode == 2 and "dpu_booting" in p.stderr and "abort" in p.stderr


def test_delete_frees_serial_and_macs(url: str) -> None:
    enroll(url)
    busy = run(url, "node", "delete", "gpu-a01", "--yes", ok=False)
    assert busy.returncode == 2 and "fronted by gpu-a01-dpu" in busy.stderr
    run(url, "node", "retire", "gpu-a01-dpu")
    run(url, "node", "delete", "gpu-a01-dpu", "--yes")
    run(url, "node", "delete", "gpu-a01", "--yes")
    run(url, "node", "add", "gpu-a01", "--kind", "host", "--serial", "HS200", "--mac", "58:a2:e1:00:00:01,host-pf")
    assert json.loads(run(url, "node", "list", "--json").stdout)["total"] == 1


def test_filters_are_validated(url: str) -> None:
    enroll(url)
    p = run(url, "node", "list", "--state", "deployd", ok=False)
    assert p.returncode == 2 and "'deployd' is not one of" in p.stderr
    p = run(url, "node", "list", "--tenant", "nope", ok=False)
    assert p.returncode == 2 and "no tenant named 'nope'" in p.stderr


def test_provision_preflight(url: str) -> None:
    enroll(url)
    run(url, "node", "add", "lonely", "--kind", "host", "--serial", "HS9", "--mac", "58:a2:e1:00:00:09,host-pf")
    p = run(url, "node", "provision", "gpu-a01-dpu", ok=False)
    assert p.returncode == 2 and "has no BMC" in p.stderr and "--manual-power" in p.stderr
    p = run(url, "node", "provision", "lonely", ok=False)
    assert p.returncode == 2 and "has no DPU" in p.stderr and "--no-dpu" in p.stderr
    assert json.loads(run(url, "node", "show", "lonely", "--json").stdout)["state"] == "registered"
    run(url, "node", "provision", "lonely", "--no-dpu")
    run(url, "node", "provision", "gpu-a01", "--json")  # it has a DPU: no flag needed


def test_node_add_help_documents_every_option_with_an_example() -> None:
    from bootsvc.cli import cli

    cmd = cli.commands["node"].commands["add"]  # type: ignore[attr-defined]
    undocumented = [p.name for p in cmd.params if getattr(p, "help", None) in (None, "")
                    and p.param_type_name == "option"]
    assert undocumented == []
    assert "Example" in (cmd.help or "") and "bootsvc node add" in (cmd.help or "")

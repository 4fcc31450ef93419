"""`bootsvc image add|list|verify` through the real CLI entry point (click's runner, no subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from bootsvc.cli import cli


def test_add_list_verify(tmp_path: Path) -> None:
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd.gz").write_bytes(b"i")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path}/state\nimages: {{catalog: {tmp_path}/cat/catalog.yaml}}\n")
    run = CliRunner().invoke
    r = run(cli, ["--config", str(cfg), "image", "add", "disc", "1", "--kind", "kernel-initrd",
                  "--file", f"kernel={tmp_path}/vmlinuz", "--file", f"initrd={tmp_path}/initrd.gz",
                  "--default-for", "discovery"])
    assert r.exit_code == 0, r.output
    r = run(cli, ["--config", str(cfg), "image", "add", "disc", "1", "--kind", "kernel-initrd",
                  "--file", f"kernel={tmp_path}/vmlinuz"])
    assert r.exit_code == 2 and "already in the catalog" in r.output
    r = run(cli, ["--config", str(cfg), "image", "add", "x", "1", "--kind", "iso", "--file", "k=/nope"])
    assert r.exit_code == 2
    r = run(cli, ["--config", str(cfg), "image", "list", "--json"])
    rows = json.loads(r.output)
    assert rows[0]["name"] == "disc" and rows[0]["default_for"] == ["discovery"]
    r = run(cli, ["--config", str(cfg), "image", "verify"])
    assert r.exit_code == 0 and "1 of 1 images verified" in r.output
    (tmp_path / "vmlinuz").write_bytes(b"changed")
    r = run(cli, ["--config", str(cfg), "image", "verify", "--json"])
    assert r.exit_code == 1
    assert any(not c["ok"] and "mismatch" in c["result"] for c in json.loads(r.output))

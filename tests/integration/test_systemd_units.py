"""The shipped systemd units pass `systemd-analyze verify` without a warning (unknown keys, bad values
and missing executables are reported there), with the unit's ExecStart pointed at this tree's bootsvc."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "config" / "systemd"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_units_verify_cleanly(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("bootsvc")
    assert exe.exists(), exe
    unit = tmp_path / "bootsvc.service"
    unit.write_text((UNITS / "bootsvc.service").read_text().replace("/opt/bootsvc/bin/bootsvc", str(exe)))
    dropin = tmp_path / "bootsvc.service.d"
    dropin.mkdir()
    shutil.copy(UNITS / "bootsvc-netns.conf", dropin / "netns.conf")
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    # verify only warns (rc 0) about unknown keys and bad values: a clean unit prints nothing about itself
    noise = [ln for ln in r.stderr.splitlines() if "bootsvc" in ln]
    assert noise == [], r.stderr
    text = unit.read_text()
    for key in ("LimitNOFILE=", "Restart=on-failure", "AmbientCapabilities=CAP_NET_BIND_SERVICE", "User=bootsvc"):
        assert key in text

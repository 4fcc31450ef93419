"""README.md's "Everyday commands" block runs as written, top to bottom, on a fresh SQLite: the same
commands a new user pastes, in a copy of the repository's layout (config/ and .venv/), with bash -e."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def everyday_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Everyday commands", 1)[1]
    m = re.search(r"```bash\n(.*?)```", section, re.S)
    assert m, "no bash block under 'Everyday commands'"
    return m.group(1)


def test_everyday_commands_run_as_written(tmp_path: Path) -> None:
    block = everyday_block()
    assert "bootsvc db upgrade" in block and "bootsvc node provision" in block
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "bootsvc.yaml", tmp_path / "config" / "bootsvc.yaml")
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))  # the venv these tests run in is what `make` built
    env = {k: v for k, v in os.environ.items() if not k.startswith("BOOTSVC_")}
    p = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    assert "Traceback" not in p.stderr and p.stderr == "", p.stderr
    assert (tmp_path / "var" / "bootsvc.db").exists()
    # what the block promises: the DPU is provisioning, the host waits for it, the token was printed once
    assert "gpu-a01-dpu: registered -> dpu_booting" in p.stdout
    assert "gpu-a01: registered -> host_waiting_dpu" in p.stdout
    assert re.search(r"gpu-a01\s+host\s+HS123\s+host_waiting_dpu\s+nimbus\s+a\s+2", p.stdout), p.stdout

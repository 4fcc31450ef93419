"""Run the real ``bootsvc`` command line as a user would: a new process, a database URL, no config file
from the environment; fails the test on a non-zero exit unless ``ok=False``."""

from __future__ import annotations

import os
import subprocess
import sys

BIN = [sys.executable, "-m", "bootsvc"]


def run_cli(url: str, *args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BOOTSVC_DB_URL": url}
    env.pop("BOOTSVC_CONFIG", None)
    p = subprocess.run([*BIN, *args], capture_output=True, text=True, env=env, timeout=60)
    if ok:
        assert p.returncode == 0, (args, p.stdout, p.stderr)
    return p

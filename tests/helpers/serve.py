"""Run a real ``bootsvc serve --only http`` for a test: schema first, then the server, ready when the
caller's probe says so; stopped (TERM, then KILL) however the test ends. Its output goes to
``<work>/serve.log``."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from helpers.procs import stop


@contextlib.contextmanager
def http_serve(cfg: Path, work: Path, ready: Callable[[], bool], env: Mapping[str, str],
               timeout: float = 60) -> Iterator[subprocess.Popen[bytes]]:
    full = {**os.environ, **env}
    subprocess.run([sys.executable, "-m", "bootsvc", "--config", str(cfg), "db", "upgrade"], check=True,
                   capture_output=True, env=full)
    with (work / "serve.log").open("wb") as log:
        p = subprocess.Popen([sys.executable, "-m", "bootsvc", "--config", str(cfg), "serve", "--only", "http"],
                             stdout=log, stderr=subprocess.STDOUT, env=full, cwd=work)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and p.poll() is None, (work / "serve.log").read_text()
            time.sleep(0.2)
        yield p
    finally:
        stop(p)

"""Stopping a child process a test started: SIGTERM first (the clean shutdown the test may be checking),
SIGKILL if it has not exited within the grace time, and always reaped, so no test leaves a process or
a zombie behind. Output pipes are drained while waiting (``communicate``), so a child blocked on a
full stdout/stderr pipe cannot turn a clean stop into a kill."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


def stop(p: subprocess.Popen[Any], grace: float = 30) -> None:
    """SIGTERM ``p`` if it still runs; SIGKILL after ``grace`` seconds; reap it either way."""
    if p.poll() is not None:
        return
    p.send_signal(signal.SIGTERM)
    try:
        p.communicate(timeout=grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()

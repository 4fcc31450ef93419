"""bootsvc's TFTP worker (`bootsvc.tftp.TftpService`) on loopback in a thread of the test process, for
the TFTP tests: ``addr`` is where to send requests, ``svc`` the service (counters, slots); `close`
stops it (also on leaving a ``with`` block)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType
from typing import Any

from bootsvc import tftp
from bootsvc.tftp.paths import Generator


class TftpServer:
    def __init__(self, root: Path, address: str = "127.0.0.1", port: int = 0, *, generator: Generator | None = None,
                 **kw: Any) -> None:
        self.svc = tftp.TftpService(address, port, tftp.Resolver(root, generator), **kw)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.svc.serve, args=(self.stop,), daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.svc.port

    @property
    def addr(self) -> tuple[str, int]:
        return (self.svc.address, self.svc.port)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)

    def __enter__(self) -> TftpServer:
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

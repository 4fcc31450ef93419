"""A loopback webhook subscriber for the outgoing-events tests: checks each POST's signature with
``bootsvc.events_out.verify`` and answers with the next scripted status (default 200)."""

from __future__ import annotations

import json
from typing import Any

from bootsvc.events_out import verify
from bootsvc.lab.bfbmc import free_port
from helpers.httpd import LoopbackHttpd, QuietHandler

SECRET = b"sub-s3cret"


class Receiver:
    """Loopback HTTP subscriber on 127.0.0.1; ``got`` holds the verified events, ``bad_sig`` counts the rest."""

    def __init__(self, secret: bytes = SECRET) -> None:
        self.got: list[dict[str, Any]] = []
        self.statuses: list[int] = []
        self.bad_sig = 0
        owner = self

        class H(QuietHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = verify(secret, self.headers["X-Bootsvc-Timestamp"], body, self.headers["X-Bootsvc-Signature"])
                code = owner.statuses.pop(0) if owner.statuses else 200
                if not ok:
                    owner.bad_sig += 1
                    code = 401
                elif code == 200:
                    owner.got.append({**json.loads(body), "_event": self.headers["X-Bootsvc-Event"]})
                self.send_response(code)
                self.end_headers()

        self.port = free_port(18150, 18199)
        self.srv = LoopbackHttpd(H, port=self.port)
        self.url = f"{self.srv.url}/hook"

    def close(self) -> None:
        self.srv.close()

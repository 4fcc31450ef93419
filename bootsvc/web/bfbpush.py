"""``GET /bfb-push/<token>/<name>.bfb``: the BFB a DPU's BMC pulls during a Redfish BFB push, with
that node's bf.cfg appended (bluefield-real.md §3.4: ``cat image.bfb bf.cfg``, bluefieldbsp4100
"Customizing BlueField Software Deployment"; DPF serves BFB+bf.cfg the same way).

Owns: checking the one-time URL the conductor hands the BMC (`bootsvc.power.bfbtoken`: HMAC-bound to
the node and its BMC host, expiring), refusing any source address but that BMC's (403, JSON), serving
it once (an event ``bfb_push_served`` per serve, checked under the node's row lock: a second fetch
gets 410), and streaming the catalog BFB (gunicorn's sendfile when available) followed by the
rendered bf.cfg bytes, with one Content-Length for both. The token is never logged; the node's secret
leaves only inside the body, as it does in ``/boot/bfcfg``.

bf.cfg rendering: ``bootsvc.render.bfcfg`` with the same inputs ``/boot/bfcfg`` uses
(`bootsvc.web.boot` helpers for the node secret and the agent install).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterator
from typing import IO, Any, NoReturn

from flask import Blueprint, Response, abort, current_app, request
from sqlalchemy import select, update

from bootsvc import auth_secrets, inventory, lifecycle, render
from bootsvc.models import Event, Node
from bootsvc.power import bfbtoken
from bootsvc.states import State
from bootsvc.web import boot as boot_web
from bootsvc.web import boot_guard, config_of, sessions_of

log = logging.getLogger("bootsvc.web.bfbpush")
bp = Blueprint("bfbpush", __name__)
ROLE = "boot"  # the DPU BMC pulls it from the boot plane
PUSH_STATES = frozenset({State.DPU_BOOTING, State.DPU_INSTALLING})
CHUNK = 1 << 20


def bmc_addresses(host: str) -> set[str]:
    """The IP addresses the BMC host names (a literal, or what the resolver says)."""
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        return {str(ai[4][0]) for ai in socket.getaddrinfo(host, None)}
    except OSError:
        return set()


def _key() -> bytes:
    return auth_secrets.read_ref(config_of(current_app).security.node_key_ref, create=True)


def _refuse(status: int, reason: str, node: str = "?") -> NoReturn:
    log.warning("bfb-push: refused %s to %s for node %s: %s", status, request.remote_addr, node, reason)
    abort(status, description=reason)


class _File:
    """The BFB file, noting whether a server asked for its descriptor (gunicorn does right before its
    sendfile, which uses explicit offsets and leaves no trace on the file object)."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f = f
        self.fd_taken = False

    def fileno(self) -> int:
        self.fd_taken = True
        return self.f.fileno()

    def read(self, n: int = -1) -> bytes:
        return self.f.read(n)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos, whence)

    def tell(self) -> int:
        return self.f.tell()

    def close(self) -> None:
        self.f.close()


class _Body:
    """BFB bytes then bf.cfg bytes. Iterated by any WSGI server; under gunicorn it is also its
    FileWrapper (see `_wrap`), so the BFB part goes out with sendfile and `close` sends the tail."""

    def __init__(self, f: IO[bytes], size: int, tail: bytes, sock: Any) -> None:
        self.filelike, self.size, self.tail, self.sock = _File(f), size, tail, sock
        self.blksize = CHUNK
        self.iterated = False
        self.tail_sent = False

    def __iter__(self) -> Iterator[bytes]:
        self.iterated = True
        while True:
            data = self.filelike.read(CHUNK)
            if not data:
                break
            yield data
        self.tail_sent = True
        yield self.tail

    def close(self) -> None:
        try:
            if not self.tail_sent and not self.iterated and self.filelike.fd_taken and self.sock is not None:
                # gunicorn sent the BFB with sendfile (which stops at the file's end, inside the
                # Content-Length announced for both); the bf.cfg follows on the same connection. Had
                # the sendfile failed, the connection is being dropped and this send fails too.
                self.tail_sent = True
                self.sock.sendall(self.tail)
        except OSError:
            pass  # the BMC went away; it retries the whole transfer
        finally:
            self.filelike.close()


def _wrap(body: _Body) -> Any:
    wrapper = request.environ.get("wsgi.file_wrapper")
    if body.sock is None or not isinstance(wrapper, type):
        return iter(body)

    class GunicornBody(wrapper):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__(body.filelike, CHUNK)
            self.close = body.close  # after gunicorn's __init__, which binds the file's close

        def __iter__(self) -> Iterator[bytes]:  # gunicorn iterates when it cannot sendfile (TLS)
            return iter(body)

        def __next__(self) -> bytes:  # pragma: no cover - gunicorn iterates via __iter__
            raise StopIteration

    return GunicornBody()


@bp.get("/bfb-push/<token>/<fname>")
def bfb_push(token: str, fname: str) -> Response:
    try:
        parsed = bfbtoken.parse(token)
    except bfbtoken.TokenError as e:
        _refuse(404, str(e))
    with sessions_of(current_app)() as s:
        node = s.get(Node, parsed.node_id)
        if node is None or node.kind != "dpu":
            _refuse(404, "no such push")
        host = bfbtoken.bmc_host(node.bmc_address or "")
        try:
            bfbtoken.check(_key(), token, host, now=time.time())
        except bfbtoken.TokenError as e:
            _refuse(403 if "expired" not in str(e) else 410, str(e), node.name)
        if request.remote_addr not in bmc_addresses(host):
            _refuse(403, "this URL is for the node's BMC only", node.name)
        if node.state not in PUSH_STATES:
            _refuse(409, f"node is {node.state}, not being provisioned", node.name)
        cat = boot_guard.state().catalog()
        img = cat.resolve(node.image, "dpu")
        f = img.file("bfb") if img is not None and cat.usable(img) else None
        if img is None or f is None or f.name != fname or not os.path.isfile(f.path):
            _refuse(404, "no usable BFB for this node in the image catalog", node.name)
        try:
            cfg = boot_web.render_bfcfg(node, cat, img).encode()
        except render.RenderError as e:
            log.error("bfb-push: cannot render bf.cfg for %s: %s", node.name, e)
            abort(500, description="cannot render this node's bf.cfg (see the server log)")
        size = os.path.getsize(f.path)
        if request.method == "HEAD":  # a size probe does not use the URL up
            s.rollback()
            resp = Response(b"", mimetype="application/octet-stream")
            resp.headers["Content-Length"] = str(size + len(cfg))
            resp.headers["Cache-Control"] = "no-store, private"
            return resp
        # Single use: lock the node row (no-op UPDATE, as lifecycle.record does), then look for an
        # earlier serve of this token; two racing fetches serialise on the lock.
        s.execute(update(Node).where(Node.id == node.id).values(version=Node.version)
                  .execution_options(synchronize_session=False))
        served = s.scalars(select(Event.detail).where(Event.node_id == node.id,
                                                      Event.trigger == "bfb_push_served")).all()
        if any(isinstance(d, dict) and d.get("issued") == parsed.issued_ms for d in served):
            s.rollback()
            _refuse(410, "this push URL was already used; bootsvc issues a new one for a new push", node.name)
        # The bf.cfg carries this generation's secret: the agent trades it at its first check-in, as
        # after /boot/bfcfg (bootsvc/web/agent_api.py).
        inventory.expose_install_secret(s, node.id)
        lifecycle.record(s, node, "bfb_push_served", actor="boot",
                         detail={"ip": request.remote_addr, "issued": parsed.issued_ms, "image": img.ref,
                                 "bytes": size + len(cfg)})
        name = node.name
    log.info("bfb-push: serving %s (%d bytes) + bf.cfg (%d bytes) to BMC %s of node %s", img.ref, size,
             len(cfg), request.remote_addr, name)
    fh = open(f.path, "rb")  # noqa: SIM115 - closed by the body's close()
    body = _Body(fh, size, cfg, request.environ.get("gunicorn.socket"))
    resp = Response(_wrap(body), mimetype="application/octet-stream", direct_passthrough=True)
    resp.headers["Content-Length"] = str(size + len(cfg))
    resp.headers["Cache-Control"] = "no-store, private"
    return resp

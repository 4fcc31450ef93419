"""bootsvc.web.boot through Flask's test client on SQLite: scripts by state, bf.cfg and its token,
install callbacks through the lifecycle, image downloads (Range/HEAD/ETag), refusals, and no secret
in any log line."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.boot import DPU2_IP, DPU2_MAC, DPU_MAC, HOST_MAC, Env, make_env, sha
from helpers.sql import statements
from sqlalchemy import select, update

from bootsvc.models import Event, Lease, Node


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    yield from make_env(tmp_path, f"sqlite:///{tmp_path}/db.sqlite")


def _script(env: Env, mac: str) -> str:
    r = env.client.get(f"/boot/ipxe?mac={mac}", headers={"Host": "10.77.0.1:8080"})
    assert r.status_code == 200 and r.mimetype == "text/plain"
    return r.get_data(as_text=True)


# ---------------------------------------------------------------- scripts
def test_script_follows_lifecycle(env: Env) -> None:
    assert "boots from local disk" in _script(env, DPU_MAC)  # registered
    env.trigger("dpu-1", "provision")
    s = _script(env, DPU_MAC.upper().replace(":", "-"))  # any MAC spelling
    assert "bootsvc.mode=dpu-install" in s and f"bootsvc.token={env.token('dpu-1')}" in s
    assert "http://10.77.0.1:8080/images/doca/1/vmlinuz" in s
    assert env.secret("dpu-1") not in s  # the agent secret never appears in a script
    env.trigger("host-1", "provision")
    assert "waits (its DPU has not applied the tenant policy yet)" in _script(env, HOST_MAC)


def test_unknown_mac_and_bad_requests(env: Env) -> None:
    assert "local disk" in _script(env, "52:54:00:ff:ff:ff") or "exit" in _script(env, "52:54:00:ff:ff:ff")
    assert env.client.get("/boot/ipxe?mac=zz").status_code == 400
    assert env.client.get("/boot/ipxe").status_code == 400
    r = env.client.get(f"/boot/ipxe?mac={DPU_MAC}", headers={"Host": "x;reboot"})
    assert r.status_code == 400 and r.is_json


def test_grub_over_http(env: Env) -> None:
    env.trigger("dpu-1", "provision")
    r = env.client.get(f"/boot/grub?mac={DPU_MAC}", headers={"Host": "10.77.0.1:8080"})
    # kernels and initrds over HTTP only (GRUB's http device on port 80, boot.grub_http_port)
    assert r.status_code == 200 and "linux (http,10.77.0.1)/images/doca/1/vmlinuz" in r.get_data(True)


# ---------------------------------------------------------------- bf.cfg
def test_bfcfg_served_even_if_the_installing_mark_hits_a_busy_database(env: Env,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """bf.cfg is marked served (committed) before the DPU is moved to dpu_installing; a busy database at
    that second step must not turn into a 500 followed by a 410 on every retry (seen in the storm bench)."""
    from sqlalchemy.exc import OperationalError

    from bootsvc import lifecycle as lc

    env.trigger("dpu-1", "provision")
    url = f"/boot/bfcfg/dpu-1?token={env.token('dpu-1')}"
    real_apply = lc.apply

    def busy(*a: object, **kw: object) -> object:
        if kw.get("actor") == "boot":
            raise OperationalError("UPDATE nodes", {}, Exception("database is locked"))
        return real_apply(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(lc, "apply", busy)
    r = env.client.get(url)
    assert r.status_code == 200 and "secret = " in r.get_data(as_text=True)
    assert env.node("dpu-1").state == "dpu_booting"  # not moved, and that is all
    assert env.client.get(url, environ_base={"REMOTE_ADDR": "10.77.0.66"}).status_code == 403  # another address
    r = env.client.get(url)  # the same installer again: the same bf.cfg (the answer may have been lost)
    assert r.status_code == 200 and env.node("dpu-1").state == "dpu_booting"


def test_bfcfg_mark_stands_when_the_move_to_installing_conflicts(env: Env,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """bf.cfg's mark and the move to dpu_installing share one transaction; when the move finds the node
    changed (lifecycle.apply rolls the transaction back), bf.cfg is still marked served and recorded
    (committed on its own), served once, and the node is left as the other writer put it."""
    from bootsvc import lifecycle as lc

    env.trigger("dpu-1", "provision")
    url = f"/boot/bfcfg/dpu-1?token={env.token('dpu-1')}"
    real_apply = lc.apply

    def conflict(s: Any, *a: Any, **kw: Any) -> Any:
        if kw.get("actor") == "boot":
            s.rollback()  # what apply does on a stale version
            raise lc.TransitionConflict("node changed")
        return real_apply(s, *a, **kw)

    monkeypatch.setattr(lc, "apply", conflict)
    r = env.client.get(url)
    assert r.status_code == 200 and "secret = " in r.get_data(as_text=True)
    n = env.node("dpu-1")
    assert n.state == "dpu_booting" and n.bfcfg_attempt
    with env.sessions() as s:
        served = s.scalars(select(Event.detail).where(Event.trigger == "bfcfg_served")).all()
    assert [d["attempt"] for d in served] == [n.bfcfg_attempt]
    monkeypatch.setattr(lc, "apply", real_apply)
    with env.sessions() as s:  # the agent traded the install secret: no fetch again
        s.execute(update(Node).where(Node.name == "dpu-1").values(agent_generation=n.secret_generation))
        s.commit()
    assert env.client.get(url).status_code == 410


def test_bfcfg_token_state_and_other_node(env: Env) -> None:
    url = "/boot/bfcfg/dpu-1"
    assert env.client.get(url).status_code == 401
    env.trigger("dpu-1", "provision")
    tok = env.token("dpu-1")
    assert env.client.get(f"{url}?token={'0' * 64}").status_code == 401
    assert env.client.get(f"{url}?token={env.secret('dpu-1')}").status_code == 401  # the secret is not a token
    r = env.client.get(f"{url}?token={tok}", headers={"Host": "10.77.0.1:8080"})
    assert r.status_code == 200, r.get_data(True)
    body = r.get_data(as_text=True)
    assert f"secret = {env.secret('dpu-1')}" in body and "ubuntu_PASSWORD='$6$s$hash'" in body
    assert "BOOTSVC_AGENT_URL=http://10.77.0.1:8080/images/bootsvc-agent/0.1/agent.whl" in body
    assert "host_port = eth1" in body and r.headers["Cache-Control"].startswith("no-store")
    # dpu-2 (not installing) with dpu-1's token, and dpu-1's token for dpu-2's bf.cfg
    d2 = {"REMOTE_ADDR": DPU2_IP}
    assert env.client.get(f"/boot/bfcfg/dpu-2?token={tok}", environ_base=d2).status_code == 401
    env.trigger("dpu-2", "provision")
    assert env.client.get(f"/boot/bfcfg/dpu-2?token={tok}", environ_base=d2).status_code == 401
    assert env.client.get(f"/boot/bfcfg/dpu-2?token={env.token('dpu-2')}", environ_base=d2).status_code == 200
    # a host has no bf.cfg (its DPU's address speaks for it); unknown and odd names get the same 401 as a
    # bad token (no name oracle)
    assert env.client.get(f"/boot/bfcfg/host-1?token={env.token('host-1')}").status_code == 404
    for name in ("nope", "DPU-1", "1"):
        assert env.client.get(f"/boot/bfcfg/{name}?token={tok}").status_code == 401
    assert env.client.get(f"/boot/bfcfg/..%2f..%2fetc?token={tok}").status_code in (401, 404)  # no route


def test_bfcfg_refused_from_another_nodes_address(env: Env) -> None:
    import datetime as dt

    env.trigger("dpu-1", "provision")
    with env.sessions() as s:
        d2 = s.scalars(select(Node).where(Node.name == "dpu-2")).one()
        s.add(Lease(vrf="", network="n", address="10.77.0.50", mac=DPU2_MAC, node_id=d2.id, state="bound",
                    expires_at=dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)))
        s.commit()
    r = env.client.get(f"/boot/bfcfg/dpu-1?token={env.token('dpu-1')}",
                       environ_base={"REMOTE_ADDR": "10.77.0.50"})
    assert r.status_code == 403


def test_bfcfg_not_served_after_install(env: Env) -> None:
    env.trigger("dpu-1", "provision", "install_started", "install_done")
    assert env.client.get(f"/boot/bfcfg/dpu-1?token={env.token('dpu-1')}").status_code == 409


def test_bfks(env: Env) -> None:
    env.trigger("dpu-1", "provision")
    r = env.client.get("/boot/bfks/dpu-1", headers={"Authorization": f"Bearer {env.token('dpu-1')}",
                                                     "Host": "10.77.0.1:8080"})
    assert r.status_code == 200 and "wget -q -O /etc/bf.cfg 'http://10.77.0.1:8080/boot/bfcfg/dpu-1?token=" in \
        r.get_data(True)


# ---------------------------------------------------------------- callbacks
def _cb(env: Env, name: str, body: Any, token: str | None = None, **kw: Any) -> Any:
    h = {"Authorization": f"Bearer {token if token is not None else env.token(name)}"}
    return env.client.post(f"/boot/callback/{name}", json=body, headers=h, **kw)


def test_callbacks_drive_the_lifecycle(env: Env) -> None:
    env.trigger("dpu-1", "provision")
    r = _cb(env, "dpu-1", {"event": "started", "token": "ignored"})
    assert r.status_code == 200 and r.json["state"] == "dpu_installing"
    for _ in range(3):  # repeated identical progress: one event, always 200
        r = _cb(env, "dpu-1", {"event": "progress", "percent": 40, "phase": "write"})
        assert r.status_code == 200 and r.json["state"] == "dpu_installing"
    assert _cb(env, "dpu-1", {"event": "progress", "percent": 80}).status_code == 200
    r = _cb(env, "dpu-1", {"event": "done"})
    assert r.status_code == 200 and r.json["state"] == "dpu_rebooting"
    assert _cb(env, "dpu-1", {"event": "done"}).json["duplicate"] is True  # installer retrying a lost reply
    r = _cb(env, "dpu-1", {"event": "started"})
    assert r.status_code == 409 and r.json["error"] == "illegal_transition" and "cannot take" in r.json["reason"]
    with env.sessions() as s:
        evs = s.scalars(select(Event).where(Event.trigger == "install_progress")).all()
        assert [e.detail.get("percent") for e in evs] == [40, 80]
        assert all("token" not in e.detail for e in s.scalars(select(Event)).all())
    assert env.node("dpu-1").state == "dpu_rebooting"


def test_failed_callback_records_reason(env: Env) -> None:
    env.trigger("dpu-1", "provision")
    r = _cb(env, "dpu-1", {"event": "failed", "reason": "sha256 mismatch"})
    assert r.status_code == 200 and r.json["state"] == "dpu_install_failed"
    n = env.node("dpu-1")
    assert n.last_error == "sha256 mismatch" and n.hint


def test_callback_auth_and_validation(env: Env) -> None:
    env.trigger("dpu-1", "provision")
    assert _cb(env, "dpu-1", {"event": "started"}, token="0" * 64).status_code == 401
    assert _cb(env, "dpu-1", {"event": "started"}, token=env.token("dpu-2")).status_code == 401
    assert env.client.post(f"/boot/callback/dpu-1?token={env.token('dpu-1')}",
                           json={"event": "started"}).status_code == 200  # ?token= works too
    assert _cb(env, "dpu-1", {"event": "reboot"}).status_code == 400
    assert _cb(env, "dpu-1", {"event": "progress", "percent": 101}).status_code == 400
    assert _cb(env, "dpu-1", ["event"]).status_code == 400
    r = env.client.post("/boot/callback/dpu-1", data=b"{" + b" " * (64 * 1024) + b"}",
                        headers={"Authorization": f"Bearer {env.token('dpu-1')}",
                                 "Content-Type": "application/json"})
    assert r.status_code == 413
    assert _cb(env, "nope", {"event": "started"}, token="x").status_code == 401  # same as a bad token


def test_host_callbacks(env: Env) -> None:
    env.trigger("host-1", "provision", "dpu_ready")
    assert "bootsvc.mode=host-install" in _script(env, HOST_MAC)
    assert _cb(env, "host-1", {"event": "started"}).json["state"] == "host_installing"
    assert _cb(env, "host-1", {"event": "done"}).json["state"] == "deployed"
    assert "local disk" in _script(env, HOST_MAC)


# ---------------------------------------------------------------- images
def test_image_download_range_head_etag(env: Env) -> None:
    url = "/images/doca/1/root.img.gz"
    r = env.client.get(url)
    assert r.status_code == 200 and r.data == env.disk and r.headers["ETag"] == f'"{sha(env.disk)}"'
    assert r.headers["Accept-Ranges"] == "bytes"
    r = env.client.get(url, headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.data == env.disk[100:200]
    assert r.headers["Content-Range"] == f"bytes 100-199/{len(env.disk)}"
    r = env.client.head(url)
    assert r.status_code == 200 and r.data == b"" and int(r.headers["Content-Length"]) == len(env.disk)
    r = env.client.get(url, headers={"If-None-Match": f'"{sha(env.disk)}"'})
    assert r.status_code == 304
    r = env.client.get(url + ".sha256")
    assert r.get_data(True) == f"{sha(env.disk)}  root.img.gz\n"
    assert env.client.get("/boot/agent.whl").data == b"wheel"


@pytest.mark.parametrize("path", [
    "/images/doca/1/../../catalog.yaml", "/images/doca/1/%2e%2e%2fcatalog.yaml", "/images/doca/1/",
    "/images/doca/", "/images/", "/images/doca/1/vmlinuz%00", "/images/doca/1/..%5ccatalog.yaml",
    "/images/broken/1/vmlinuz",  # fails verification: never served
    "/images/doca/2/vmlinuz", "/boot/nbp/../catalog.yaml", "/boot/nbp/link.efi", "/boot/nbp//etc/passwd",
    "/boot/nbp/%2e%2e/outside",
])
def test_traversal_and_unlisted_refused(env: Env, path: str) -> None:
    r = env.client.get(path, follow_redirects=True)  # werkzeug redirects "//" to "/": follow it
    assert r.status_code in (400, 404, 405), (path, r.status_code)
    assert b"secret outside" not in r.data and b"images:" not in r.data


def test_nbp_over_http(env: Env) -> None:
    r = env.client.get("/boot/nbp/snponly.efi")
    assert r.status_code == 200 and r.data == b"MZ-snp"
    # RFC 9110 like catalog files: a range, an unsatisfiable range with its size, a revalidation
    part = env.client.get("/boot/nbp/snponly.efi", headers={"Range": "bytes=3-"})
    assert part.status_code == 206 and part.data == b"snp" and part.headers["Content-Range"] == "bytes 3-5/6"
    bad = env.client.get("/boot/nbp/snponly.efi", headers={"Range": "bytes=10-"})
    assert bad.status_code == 416 and bad.headers["Content-Range"] == "bytes */6"
    same = env.client.get("/boot/nbp/snponly.efi", headers={"If-None-Match": r.headers["ETag"]})
    assert same.status_code == 304 and same.data == b""


# ---------------------------------------------------------------- secrets never logged
def test_no_secret_in_any_log_line(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    env.trigger("dpu-1", "provision")
    tok, sec = env.token("dpu-1"), env.secret("dpu-1")
    _script(env, DPU_MAC)
    env.client.get(f"/boot/bfcfg/dpu-1?token={tok}")
    env.client.get(f"/boot/bfcfg/dpu-1?token={tok[:-1]}0")
    env.client.get(f"/boot/bfks/dpu-1?token={tok}")
    env.client.get(f"/boot/grub?mac={DPU_MAC}")
    _cb(env, "dpu-1", {"event": "started", "token": tok})
    _cb(env, "dpu-1", {"event": "failed", "reason": "x"}, token=tok[:-1] + "0")
    _cb(env, "dpu-1", {"event": "failed", "reason": "disk gone"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert caplog.records, "expected some log lines"
    assert tok not in text and sec not in text and tok[:16] not in text and sec[:16] not in text


def test_a_repeated_callback_reads_no_nics(env: Env) -> None:
    """An installer retrying a lost reply (a duplicate) is answered from the node, the address test and
    the newest installer event: the node's NICs are read only when a state change needs them."""
    env.trigger("dpu-1", "provision")
    tok = env.token("dpu-1")
    assert _cb(env, "dpu-1", {"event": "started"}, tok).json["state"] == "dpu_installing"
    with statements(env.sessions) as stmts:
        r = _cb(env, "dpu-1", {"event": "started"}, tok)
    assert r.status_code == 200 and r.json["duplicate"] is True
    assert not any(x.lstrip().startswith("SELECT nics.") for x in stmts), stmts  # (the selectin load)
    assert len(stmts) == 2, stmts  # the node with the address test, the newest installer event


def test_script_cache_is_dropped_by_callbacks(env: Env) -> None:
    """With the per-worker cache on, a callback handled here changes the next script at once."""
    env.app.config["BOOT_NODE_CACHE_TTL"] = 60.0
    env.trigger("host-1", "provision", "dpu_ready")
    assert "bootsvc.mode=host-install" in _script(env, HOST_MAC)
    assert _cb(env, "host-1", {"event": "started"}).status_code == 200
    assert _cb(env, "host-1", {"event": "done"}).json["state"] == "deployed"
    assert "local disk" in _script(env, HOST_MAC)
    env.trigger("host-1", "release")  # behind the app's back: the cached script stays until the TTL
    assert "local disk" in _script(env, HOST_MAC)
    env.app.config["BOOT_NODE_CACHE_TTL"] = 0
    assert "being released" in _script(env, HOST_MAC)


def test_fast_path_serves_cached_script_without_flask(env: Env) -> None:
    env.app.config["BOOT_NODE_CACHE_TTL"] = 60.0
    env.trigger("dpu-1", "provision")
    first = env.client.get(f"/boot/ipxe?mac={DPU_MAC}", headers={"Host": "10.77.0.1:80"})
    assert first.status_code == 200
    mw = env.app.wsgi_app
    inner = mw.inner  # type: ignore[attr-defined]

    def boom(*_a: Any) -> Any:
        raise AssertionError("the fast path should have answered")

    mw.inner = boom  # type: ignore[attr-defined]
    try:
        again = env.client.get(f"/boot/ipxe?mac={DPU_MAC}", headers={"Host": "10.77.0.1:80"})
    finally:
        mw.inner = inner  # type: ignore[attr-defined]
    assert again.data == first.data and again.headers["Content-Type"] == first.headers["Content-Type"]
    assert again.headers["Cache-Control"] == "no-store"
    # other spellings, another Host, or an expired entry go through Flask
    mw.inner = boom  # type: ignore[attr-defined]
    try:
        with pytest.raises(AssertionError):
            env.client.get(f"/boot/ipxe?mac={DPU_MAC.upper()}", headers={"Host": "10.77.0.1:80"})
        with pytest.raises(AssertionError):
            env.client.get(f"/boot/ipxe?mac={DPU_MAC}", headers={"Host": "10.77.1.1:80"})
        env.app.config["BOOT_NODE_CACHE_TTL"] = 0
        with pytest.raises(AssertionError):
            env.client.get(f"/boot/ipxe?mac={DPU_MAC}", headers={"Host": "10.77.0.1:80"})
    finally:
        mw.inner = inner  # type: ignore[attr-defined]


def test_image_handed_to_the_servers_file_wrapper(env: Env) -> None:
    """send_file gives the open file to wsgi.file_wrapper: that is how gunicorn gets to sendfile(2)."""
    used: list[Any] = []

    class Wrapper:
        def __init__(self, f: Any, blksize: int = 8192) -> None:
            used.append(f)
            self.f = f

        def __iter__(self) -> Any:
            return iter(lambda: self.f.read(1 << 16), b"")

        def close(self) -> None:
            self.f.close()

    r = env.client.get("/images/doca/1/root.img.gz", environ_base={"wsgi.file_wrapper": Wrapper})
    assert r.status_code == 200 and r.data == env.disk
    assert len(used) == 1 and Path(used[0].name).name == "root.img.gz"


class _RecordingSock:
    """Stands in for ``environ["gunicorn.socket"]``: records TCP_CORK changes."""

    def __init__(self) -> None:
        self.cork: list[int] = []

    def setsockopt(self, level: int, opt: int, value: int) -> None:
        import socket

        if level == socket.IPPROTO_TCP and opt == socket.TCP_CORK:
            self.cork.append(value)


@pytest.mark.parametrize(("method", "headers", "corked"), [
    ("GET", {}, True),
    ("HEAD", {}, False),  # no body: the file is not even opened (bootsvc/web/files.py)
    ("GET", {"If-None-Match": "*"}, False),  # 304: no body either
    ("GET", {"Range": "bytes=0-9"}, True),  # 206: a seek, then gunicorn's sendfile of the range, corked
])
def test_image_corked_only_until_gunicorn_closes_it(env: Env, method: str, headers: dict[str, str],
                                                    corked: bool) -> None:
    """Whole-file downloads under gunicorn are sent with TCP_CORK (nginx's tcp_nopush), and the cork
    comes off when the server closes the body: a cork left on holds the tail of every response for
    the kernel's 200 ms (what Response.call_on_close would have done: gunicorn never calls it)."""
    from gunicorn.http.wsgi import FileWrapper

    sock = _RecordingSock()
    r = env.client.open("/images/doca/1/root.img.gz", method=method, headers=headers,
                        environ_base={"gunicorn.socket": sock, "wsgi.file_wrapper": FileWrapper})
    assert r.status_code in (200, 206, 304)
    r.close()
    assert sock.cork == ([1, 0] if corked else [])


def test_fast_path_hits_are_counted_in_flasks_series(env: Env) -> None:
    from bootsvc import metrics

    env.app.config["BOOT_NODE_CACHE_TTL"] = 60.0
    env.trigger("dpu-1", "provision")
    labels = {"blueprint": "boot", "method": "GET", "code": 200}
    assert env.client.get(f"/boot/ipxe?mac={DPU_MAC}", headers={"Host": "10.77.0.1:80"}).status_code == 200
    metrics.counters.snapshot()
    before = metrics.counters.get("bootsvc_http_requests_total", labels)
    for _ in range(3):  # fast path: batched, folded into the registry at the latest by the next snapshot
        assert env.client.get(f"/boot/ipxe?mac={DPU_MAC}", headers={"Host": "10.77.0.1:80"}).status_code == 200
    metrics.counters.snapshot()
    assert metrics.counters.get("bootsvc_http_requests_total", labels) == before + 3


def test_bfcfg_fetch_marks_the_install_started(env: Env) -> None:
    """NVIDIA's installer reports nothing: its bfks fetching bf.cfg is the sign it runs (the longer
    dpu_installing deadline applies from then on); a callback 'started' afterwards is a duplicate."""
    env.trigger("dpu-1", "provision")
    assert env.client.get(f"/boot/bfcfg/dpu-1?token={env.token('dpu-1')}").status_code == 200
    assert env.node("dpu-1").state == "dpu_installing"
    r = _cb(env, "dpu-1", {"event": "started", "phase": "bfb_pre_install"})
    assert r.status_code == 200 and r.json["state"] == "dpu_installing"
    assert _cb(env, "dpu-1", {"event": "done"}).json["state"] == "dpu_rebooting"


def test_forget_drops_only_that_nodes_cache_entries_while_others_are_added(env: Env) -> None:
    """A callback forgets its node's cached scripts and address checks by MAC (an index, not a scan of
    caches that hold an entry per booting node), safely while other threads add entries: iterating the
    caches raised "dictionary changed size during iteration" -> HTTP 500 on bf.cfg in a 1k storm."""
    import threading
    from types import SimpleNamespace
    from typing import cast

    from bootsvc.web.boot_guard import BootState

    st = cast(BootState, env.app.extensions["bootsvc_boot"])
    a, b = "52:54:00:aa:00:01", "52:54:00:aa:00:03"
    now = time.monotonic()
    st.put_script((a, "h", "10.0.0.1"), now, "A")
    st.put_script((b, "h", "10.0.0.2"), now, "B")
    sessions = env.sessions
    assert st.bound(sessions, a, "10.0.0.9", None, 60.0) is not None
    assert st.bound(sessions, b, "10.0.0.9", None, 60.0) is not None
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            st.put_script((f"02:00:00:00:{i >> 8 & 255:02x}:{i & 255:02x}", "h", "10.9.9.9"), now, "x")
            i += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        view: Any = SimpleNamespace(nics=[SimpleNamespace(mac=a)])
        for _ in range(200):
            st.forget(view)
    finally:
        stop.set()
        t.join(10)
    assert (a, "h", "10.0.0.1") not in st.scripts and (b, "h", "10.0.0.2") in st.scripts
    assert all(k[0] != a for k in list(st._bound)) and any(k[0] == b for k in list(st._bound))


def test_caches_drop_expired_entries_and_forget_still_finds_the_live_ones(env: Env) -> None:
    """BootState.expire (every PRUNE_SECONDS): entries older than the TTL leave every cache and index, so
    a worker holds what it answered in the last seconds, not an entry per node of the fleet; a node whose
    view expired while a script of its MAC still lives keeps its MACs, so a callback still drops that
    script at once; refilled sweep buckets go too."""
    from types import SimpleNamespace
    from typing import cast

    from bootsvc.web.boot_guard import PRUNE_SECONDS, BootState

    st = cast(BootState, env.app.extensions["bootsvc_boot"])
    a, b, c = "02:00:00:00:00:0a", "02:00:00:00:00:0b", "02:00:00:00:00:0c"
    now, old = time.monotonic(), time.monotonic() - 100.0
    view: Any = lambda i, mac: SimpleNamespace(id=i, nics=[SimpleNamespace(mac=mac)])  # noqa: E731
    st._keep_view(a, old, view(901, a))  # all expired
    st.put_script((a, "h", "10.0.0.1"), old, "A")
    st._keep_bound(a, "10.0.0.1", old, True)
    st._keep_view(b, now, view(902, b))  # all live
    st.put_script((b, "h", "10.0.0.2"), now, "B")
    st._keep_bound(b, "10.0.0.2", now, True)
    st._keep_view(c, old, view(903, c))  # the view expired, its script is fresh
    st.put_script((c, "h", "10.0.0.3"), now, "C")
    st._sweep["10.9.9.9"] = (0.0, old)  # refilled long ago
    st._sweep["10.9.9.8"] = (0.0, now)  # empty now
    st._pruned = now - PRUNE_SECONDS
    st.expire(now, 2.0)
    assert a not in st._nodes and (a, "h", "10.0.0.1") not in st.scripts and (a, "10.0.0.1") not in st._bound
    assert a not in st._script_keys and a not in st._bound_keys and 901 not in st._macs_of
    assert b in st._nodes and (b, "h", "10.0.0.2") in st.scripts and (b, "10.0.0.2") in st._bound
    assert c not in st._nodes and (c, "h", "10.0.0.3") in st.scripts and 903 in st._macs_of
    assert "10.9.9.9" not in st._sweep and "10.9.9.8" in st._sweep
    st.forget_node(903)  # a callback of node 903 in this worker
    assert (c, "h", "10.0.0.3") not in st.scripts
    st._keep_view(a, old, view(901, a))
    st.expire(now + 1.0, 2.0)  # not before PRUNE_SECONDS have passed
    assert a in st._nodes
    st.expire(now + PRUNE_SECONDS, 2.0)
    assert a not in st._nodes and b not in st._nodes


# ---------------------------------------------------------------- statements per request
@contextlib.contextmanager
def _commits(env: Env) -> Iterator[list[int]]:
    """How many transactions the app's engine commits while inside (one element per COMMIT)."""
    from sqlalchemy import event

    seen: list[int] = []
    engine = env.sessions.kw["bind"]

    def count(_c: Any) -> None:
        seen.append(1)

    event.listen(engine, "commit", count)
    try:
        yield seen
    finally:
        event.remove(engine, "commit", count)


def _reads(stmts: list[str], table: str) -> list[str]:
    return [x for x in stmts if x.startswith("SELECT") and f" FROM {table} " in f"{x.split(' WHERE ')[0]} "]


def test_boot_plane_requests_cost_a_fixed_few_statements(env: Env) -> None:
    """What each request of a pair's install reads and writes, so per-request cost cannot creep back:
    a script is one read (the node, its NICs and a host's DPU ids joined, and the address test); bfks
    and every callback read the node and the address test in one statement, without its NICs (the
    worker's caches are dropped by node id);
    a callback whose trigger cannot have led to the node's state looks for no repeat (no events read);
    a transition is lifecycle.apply's writes only; bf.cfg's mark, its record and the move to
    dpu_installing are one write transaction (one COMMIT: SQLite's one write lock taken once)."""
    env.app.config["BOOT_NODE_CACHE_TTL"] = 60.0  # as served: the caches on
    env.trigger("dpu-1", "provision")
    counts: dict[str, int] = {}
    with statements(env.sessions) as stmts:
        def run(label: str, fn: Any) -> Any:
            stmts.clear()
            r = fn()
            assert r.status_code == 200, (label, r.status_code, r.get_data(as_text=True))
            counts[label] = len(stmts)
            assert not [x for x in stmts if x.startswith("SELECT nics.")], (label, stmts)  # no NIC load
            assert len(_reads(stmts, "nodes")) <= 1, (label, stmts)  # one node read, DPUs' included
            return r

        g = run("grub", lambda: env.client.get(f"/boot/grub?mac={DPU_MAC}", headers={"Host": "10.77.0.1:8080"}))
        assert f"bootsvc.token={env.token('dpu-1')}" in g.get_data(as_text=True)
        tok = env.token("dpu-1")
        run("bfks", lambda: env.client.get(f"/boot/bfks/dpu-1?token={tok}"))
        stmts.clear()
        with _commits(env) as commits:
            assert env.client.get(f"/boot/bfcfg/dpu-1?token={tok}").status_code == 200
        counts["bfcfg"] = len(stmts)
        assert len(commits) == 1, stmts
        assert env.node("dpu-1").state == "dpu_installing"
        for ev in ("started", "done"):  # started: a repeat of bf.cfg's; done: a transition
            run(f"dpu {ev}", lambda ev=ev: _cb(env, "dpu-1", {"event": ev}, tok))
        assert not _reads(stmts, "events"), stmts  # done cannot repeat what left dpu_installing
        env.trigger("dpu-1", "agent_checkin")
        env.trigger("host-1", "provision", "dpu_ready")
        htok = env.token("host-1")
        s = run("host ipxe", lambda: env.client.get(f"/boot/ipxe?mac={HOST_MAC}", headers={"Host": "10.77.0.1:8080"},
                                                    environ_base={"REMOTE_ADDR": "10.77.0.11"}))
        assert "bootsvc.mode=host-install" in s.get_data(as_text=True)
        for ev in ("started", "done"):
            r = run(f"host {ev}", lambda ev=ev: _cb(env, "host-1", {"event": ev}, htok,
                                                    environ_base={"REMOTE_ADDR": "10.77.0.11"}))
            assert not r.json.get("duplicate"), r.json
            assert not _reads(stmts, "events"), stmts
        run("host done again", lambda: _cb(env, "host-1", {"event": "done"}, htok,
                                           environ_base={"REMOTE_ADDR": "10.77.0.11"}))
        assert len(_reads(stmts, "events")) == 1  # a possible repeat: the newest installer event decides
    assert counts == {"grub": 1, "bfks": 1, "bfcfg": 6, "dpu started": 2, "dpu done": 3, "host ipxe": 1,
                      "host started": 3, "host done": 3, "host done again": 2}, counts

"""bootsvc.web.serve: what each HTTP worker does once its app exists."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootsvc import config as cfgmod
from bootsvc.web import create_app
from bootsvc.web.serve import settle_heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # give the test process's objects back to the collector


def test_settle_heap_takes_the_built_app_out_of_full_collections(tmp_path: Path, unfrozen: None) -> None:
    cfg = cfgmod.from_mapping({"database": {"url": f"sqlite:///{tmp_path}/db.sqlite"},
                               "state_dir": str(tmp_path / "state"),
                               "security": {"node_key_ref": f"file:{tmp_path}/node.key"}}, env={})
    app = create_app(cfg)
    gc.collect()  # count what is alive, not garbage that earlier tests left for the collector
    before = len(gc.get_objects())
    assert before > 10_000  # Flask + SQLAlchemy + Jinja: what a full collection would walk per worker

    assert settle_heap(app) is app
    assert gc.get_freeze_count() >= before * 9 // 10
    assert len(gc.get_objects()) < before // 10
    # per-request garbage is still collected after the freeze
    junk: list[object] = []
    junk.append(junk)
    del junk
    assert gc.collect() >= 1


# ---------------------------------------------------------------- listener roles
def _cfg(tmp_path: Path, **extra: object) -> cfgmod.Config:
    (tmp_path / "catalog.yaml").write_text("images: []\n")
    return cfgmod.from_mapping({"database": {"url": f"sqlite:///{tmp_path}/db.sqlite"},
                                "state_dir": str(tmp_path / "state"),
                                "images": {"catalog": str(tmp_path / "catalog.yaml"), "root": str(tmp_path)},
                                "security": {"node_key_ref": f"file:{tmp_path}/node.key"}, **extra}, env={})


@pytest.fixture
def cfg(tmp_path: Path) -> cfgmod.Config:
    from bootsvc.db import make_engine
    from bootsvc.models import Base

    c = _cfg(tmp_path)
    Base.metadata.create_all(make_engine(c.database.url))
    return c


# one route per role; each must be 404 (not registered) on a listener without that role
ROUTES = {
    "boot": [("GET", "/boot/ipxe?mac=52:54:00:00:00:01"), ("POST", "/boot/discover"),
             ("POST", "/api/v1/agent/checkin"), ("GET", "/images/x/1/y")],
    "api": [("GET", "/api/v1/nodes"), ("GET", "/nodes")],
    "ui": [("GET", "/ui/login")],
    "webhook": [("POST", "/webhooks/onboard")],
    "metrics": [("GET", "/metrics")],
}


@pytest.mark.parametrize("roles", [{"boot"}, {"api", "ui", "webhook", "metrics"}, {"api"}, {"metrics"}])
def test_a_listener_serves_only_its_roles(cfg: cfgmod.Config, roles: set[str]) -> None:
    c = create_app(cfg, roles=roles).test_client()
    for role, routes in ROUTES.items():
        for method, path in routes:
            r = c.open(path, method=method, json={} if method == "POST" else None)
            if role in roles:
                assert r.status_code != 404 or path.startswith("/images/"), (role, path, r.status_code)
            else:
                assert r.status_code == 404, (role, path, r.status_code)
                assert r.get_json()["error"] == "not_found"  # JSON, same as any unknown path
    assert c.get("/healthz").status_code == 200  # monitoring reaches every listener


def test_default_roles_are_safe_for_each_kind_of_address() -> None:
    c = cfgmod.from_mapping({
        "networks": [{"name": "oob", "zone": 0, "cidr": "10.77.0.0/24", "boot_server": "10.77.0.1"},
                     {"name": "t", "zone": 1, "vrf": "", "cidr": "10.0.0.0/24", "boot_server": "172.20.0.10"}],
        "listeners": {"http": [
            {"address": "127.0.0.1", "port": 8080}, {"address": "10.77.0.1", "port": 8080},
            {"address": "10.77.0.5", "port": 80}, {"address": "0.0.0.0", "port": 80},
            {"address": "172.20.0.10", "port": 80}, {"address": "10.40.0.10", "port": 8443},
            {"address": "10.77.0.1", "port": 9090, "roles": ["metrics"]}]}}, env={})
    got = [sorted(c.http_roles(x)) for x in c.listeners.http]
    assert got == [["api", "boot", "metrics", "ui", "webhook"], ["boot"], ["boot"], ["boot"], ["boot"],
                   ["api", "metrics", "ui", "webhook"], ["metrics"]]


@pytest.mark.parametrize("path", ["config/lab.yaml", "config/site-example.yaml"])
def test_shipped_configs_keep_api_ui_webhook_metrics_off_zone_0(path: str) -> None:
    c = cfgmod.load(Path(__file__).parents[2] / path, env={})
    zone0 = [n for n in c.networks if n.zone == 0]
    boot_addrs = {n.boot_server for n in c.networks}
    for lst in c.listeners.http:
        roles = c.http_roles(lst)
        if lst.address in boot_addrs or any(lst.address in n.cidr for n in zone0):
            assert roles == {"boot"}, (path, lst)
        elif not lst.address.is_loopback:
            assert lst.tls is not None, (path, lst)  # API/UI off loopback: HTTPS
    assert any("boot" in c.http_roles(x) for x in c.listeners.http)
    assert any("api" in c.http_roles(x) for x in c.listeners.http)


# ---------------------------------------------------------------- the body guard
def test_json_depth_counts_nesting_outside_strings() -> None:
    from bootsvc.web import json_depth

    assert json_depth(b'{"a": [1, {"b": 2}]}', 32) == 0  # fewer openers than the limit: not counted
    assert json_depth(b"[" * 40 + b"]" * 40, 32) == 33  # counting stops past the limit
    assert json_depth(b'["' + b"[" * 100 + b'"]', 32) == 1  # brackets inside a string are text
    assert json_depth(b'[' * 5 + b'"\\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["' + b"]" * 5, 32) == 5


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/api/v1/agent/checkin"), ("POST", "/api/v1/agent/report"), ("POST", "/boot/callback/dpu-1"),
    ("POST", "/boot/discover"), ("POST", "/webhooks/onboard"), ("POST", "/api/v1/nodes"),
    ("PUT", "/api/v1/nodes/x/tenant"), ("POST", "/ui/login"),
])
def test_deep_json_is_a_400_with_a_reason_on_every_route(cfg: cfgmod.Config, method: str, path: str,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    c = create_app(cfg).test_client()
    for body in (DEEP, '{"a":' * 5000 + "1" + "}" * 5000):
        r = c.open(path, method=method, data=body, content_type="application/json")
        assert r.status_code == 400, (path, r.status_code, r.get_data()[:200])
        assert r.get_json() == {"error": "json_too_deep", "reason": "JSON nested deeper than 32 levels"}
    assert "Traceback" not in caplog.text and "unhandled error" not in caplog.text
    refusals = [x for x in caplog.records if "json_too_deep" in x.getMessage()]
    assert len(refusals) == 2 and all(x.exc_info is None for x in refusals)  # one line per request


def test_a_body_over_1_mib_is_413_json(cfg: cfgmod.Config) -> None:
    r = create_app(cfg).test_client().post("/boot/discover", data=b"[" + b" " * (1 << 20) + b"]",
                                           content_type="application/json")
    assert r.status_code == 413 and r.get_json()["error"] == "request_entity_too_large"


def test_a_superscript_digit_in_the_webhook_timestamp_is_a_400(tmp_path: Path) -> None:
    from bootsvc.db import make_engine
    from bootsvc.models import Base

    (tmp_path / "wh.secret").write_text("s3cret\n")
    (tmp_path / "wh.secret").chmod(0o600)
    c = _cfg(tmp_path, security={"node_key_ref": f"file:{tmp_path}/node.key",
                                 "webhook_secret_ref": f"file:{tmp_path}/wh.secret"})
    Base.metadata.create_all(make_engine(c.database.url))
    client = create_app(c).test_client()
    # superscript digits: str.isdigit() says yes, int() says no; sent as ISO-8859-1 bytes (RFC 9110 §5.5)
    for ts in ("1765000000\u00b2", "\u00b9\u00b2\u00b3"):
        r = client.post("/webhooks/onboard", data=b"{}", content_type="application/json",
                        headers={"X-Bootsvc-Timestamp": ts,
                                 "X-Bootsvc-Signature": "sha256=" + "0" * 64, "X-Bootsvc-Delivery": "d"})
        assert r.status_code == 400, (ts, r.status_code, r.get_data()[:200])
        assert "X-Bootsvc-Timestamp" in r.get_json()["reason"]


def test_serve_raises_the_open_file_limit_to_the_hard_limit() -> None:
    """systemd starts services with a soft RLIMIT_NOFILE of 1024; each slow HTTP client or TFTP
    transfer costs a descriptor or two, so the supervisor (and each service) lifts it first."""
    import subprocess
    import sys

    code = ("import resource; from bootsvc.daemon import raise_nofile; "
            "h = resource.getrlimit(resource.RLIMIT_NOFILE)[1]; "
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, h)); print(*raise_nofile(), h)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    soft, hard, hard_before = map(int, out.split())
    assert soft == hard == hard_before > 256


def test_a_boot_only_listener_still_counts_its_requests_for_metrics(cfg: cfgmod.Config) -> None:
    """/metrics is not served on a boot listener, but the boot plane's requests are still counted
    (and published by the worker), so /metrics on the management listener shows them."""
    from bootsvc import metrics

    c = create_app(cfg, roles={"boot"}).test_client()
    labels = {"blueprint": "boot", "method": "GET", "code": 200}
    before = metrics.counters.get("bootsvc_http_requests_total", labels)
    assert c.get("/boot/ipxe?mac=52:54:00:00:00:09").status_code == 200
    assert metrics.counters.get("bootsvc_http_requests_total", labels) == before + 1
    r = c.get("/metrics")
    assert r.status_code == 404 and r.get_json()["error"] == "not_found"

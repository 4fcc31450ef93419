"""schemathesis against the served OpenAPI document (in-process WSGI, bounded examples): no server
errors, and every response matches the documented status codes, content types and schemas.

Negative mode (data that violates the schema: wrong types, missing fields, bad headers) over the same
document - the API, the agent API, the webhook - and over a description of the boot plane written
here (scripts, bf.cfg, callbacks, discovery, images with Range/conditional headers, NBPs), which
has no OpenAPI document of its own: no 500, whatever arrives. The number of cases is printed.

BMCs are in-memory fakes (POWER_DRIVER_FACTORY), so generated power requests never leave the process.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from helpers.conductor import add_token, app_for, enroll_machine, make_db, site_config
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode, checks

from bootsvc.power.fake import FakePowerDriver

_tmp = Path(tempfile.mkdtemp(prefix="bo-schemathesis-"))
atexit.register(shutil.rmtree, _tmp, True)
(_tmp / "webhook.key").write_bytes(b"whsec")  # webhooks enabled (a missing secret is a deliberate 503)
_cfg = site_config(f"sqlite:///{_tmp}/db.sqlite", _tmp)
_sessions = make_db(_cfg)
enroll_machine(_sessions, "m1", host_bmc="fake://m1", dpu_bmc="fake://m1-dpu")
APP = app_for(_cfg, _sessions)
APP.config["POWER_DRIVER_FACTORY"] = lambda n, _c: FakePowerDriver(f"fake://{n.name}")
TOKEN = add_token(_sessions, "admin")

schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", APP)

CHECKS: list[Any] = [checks.not_a_server_error, checks.status_code_conformance, checks.content_type_conformance,
                     checks.response_schema_conformance]


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms(case: Any) -> None:
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=CHECKS)


def test_schema_is_valid_openapi() -> None:
    raw = APP.test_client().get("/api/v1/openapi.json").get_json()
    assert raw["openapi"] == "3.1.0" and len(raw["paths"]) > 20
    # schemathesis parsed it (it refuses invalid documents) and tests every operation but the document itself
    tested = {(op.ok().method.upper(), op.ok().path) for op in schema.get_all_operations()}
    documented = {(m.upper(), p) for p, ops in raw["paths"].items() for m in ops}
    assert documented - tested == {("GET", "/api/v1/openapi.json")}


# ---------------------------------------------------------------- negative mode, API + boot plane
COUNTS: dict[str, int] = {"api": 0, "boot": 0}
NEGATIVE_CHECKS: list[Any] = [checks.not_a_server_error]

neg_schema = schemathesis.openapi.from_wsgi("/api/v1/openapi.json", APP)
neg_schema.config.generation.update(modes=[GenerationMode.NEGATIVE])


@neg_schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_negative_no_server_error(case: Any) -> None:
    COUNTS["api"] += 1
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"}, checks=NEGATIVE_CHECKS)


def _str(**kw: Any) -> dict[str, Any]:
    return {"type": "string", **kw}


_COND = [{"name": h, "in": "header", "required": False, "schema": _str(pattern=p)} for h, p in (
    ("Range", r"^bytes=[0-9]{0,6}-[0-9]{0,6}(, ?[0-9]{0,4}-[0-9]{0,4})?$"), ("If-None-Match", r'^"[0-9a-f]{0,8}"$'),
    ("If-Match", r'^(\*|"[0-9a-f]{0,8}")$'), ("If-Range", r'^"[0-9a-f]{0,8}"$'),
    ("If-Modified-Since", r"^[A-Z][a-z]{2}, [0-9]{2} [A-Z][a-z]{2} [0-9]{4} [0-9:]{8} GMT$"))]
_MAC = {"name": "mac", "in": "query", "required": True, "schema": _str(pattern=r"^([0-9a-f]{2}:){5}[0-9a-f]{2}$")}
_NAME = {"name": "name", "in": "path", "required": True, "schema": _str(pattern=r"^[a-z0-9-]{1,20}$")}
_JSON = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["event"], "additionalProperties": False, "properties": {
        "event": {"enum": ["started", "progress", "done", "failed"]}, "mac": _str(), "token": _str(),
        "detail": {"type": "object"}, "mode": {"enum": ["install", "wipe"]}}}}}}
_ANY = {"200": {"description": "any"}}
BOOT_DOC: dict[str, Any] = {
    "openapi": "3.0.3", "info": {"title": "bootsvc boot plane (as the tests describe it)", "version": "1"},
    "paths": {
        "/boot/ipxe": {"get": {"parameters": [_MAC, *_COND], "responses": _ANY}},
        "/boot/grub": {"get": {"parameters": [_MAC], "responses": _ANY}},
        "/boot/bfcfg/{name}": {"get": {"parameters": [_NAME, {"name": "token", "in": "query", "required": True,
                                                              "schema": _str(minLength=8)}], "responses": _ANY}},
        "/boot/bfks/{name}": {"get": {"parameters": [_NAME], "responses": _ANY}},
        "/boot/callback/{name}": {"post": {"parameters": [_NAME], "requestBody": _JSON, "responses": _ANY}},
        "/boot/discover": {"post": {"requestBody": _JSON, "responses": _ANY}},
        "/boot/nbp/{fname}": {"get": {"parameters": [{**_NAME, "name": "fname"}, *_COND], "responses": _ANY}},
        "/images/{name}/{version}/{fname}": {"get": {"parameters": [
            _NAME, {**_NAME, "name": "version"}, {**_NAME, "name": "fname"}, *_COND], "responses": _ANY}},
        "/boot/agent.whl": {"get": {"parameters": _COND, "responses": _ANY}},
    },
}
BOOT_APP = app_for(_cfg, _sessions)
BOOT_APP.add_url_rule("/_test/boot-openapi.json", "boot_doc", lambda: BOOT_DOC)
boot_schema = schemathesis.openapi.from_wsgi("/_test/boot-openapi.json", BOOT_APP)
boot_schema.config.generation.update(modes=[GenerationMode.NEGATIVE])


@boot_schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_boot_plane_negative_no_server_error(case: Any) -> None:
    COUNTS["boot"] += 1
    case.call_and_validate(checks=NEGATIVE_CHECKS)


def test_negative_case_counts() -> None:
    """Runs after the two negative tests (file order): says how many cases they sent."""
    print(f"schemathesis negative mode: {COUNTS['api']} API/agent/webhook cases, {COUNTS['boot']} boot-plane "
          f"cases, no 5xx")
    if COUNTS["api"] == 0 and COUNTS["boot"] == 0:
        pytest.skip("the negative tests did not run in this session (-k/deselection)")
    assert COUNTS["api"] >= 100 and COUNTS["boot"] >= 50


pytestmark = pytest.mark.timeout(600)

"""schemathesis against the served OpenAPI document (in-process WSGI, bounded examples): no server
errors, and every response matches the documented status codes, content types and schemas.

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
from hypothesis import HealthCheck, settings
from schemathesis import checks
from test_conductor_support import add_token, app_for, enroll_machine, make_db, site_config

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


pytestmark = pytest.mark.timeout(600)

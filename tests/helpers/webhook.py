"""The onboarding webhook's test sender: the site secret, a valid payload, the BMC credential it names,
and ``post`` that signs a body as a real sender does (HMAC-SHA256 over "<timestamp>.<body>")."""

from __future__ import annotations

import json
import time
from typing import Any

from flask.testing import FlaskClient

from bootsvc.events_out import sign

SECRET = b"onboard-s3cret"

PAYLOAD: dict[str, Any] = {
    "serial": "SN-R07-S12", "rack": "r07", "slot": 12, "tenant": "acme",
    "host": {"bmc_address": "https://10.1.7.12", "macs": ["52:54:00:aa:07:12"], "bmc_credential": "lab"},
    "dpus": [{"serial": "MT2334XZ0001", "bmc_address": "https://10.1.7.112", "oob_mac": "52-54-00-bb-07-12"}],
}


# the site's BMC credential 'lab', bound to the BMC network of PAYLOAD's addresses
CREDS = {"lab": {"ref": "env:BOOTSVC_TEST_UNSET_U:BOOTSVC_TEST_UNSET_P", "networks": ["10.1.0.0/16"]}}


def post(c: FlaskClient, payload: Any, *, delivery: str = "d-1", ts: int | None = None, secret: bytes = SECRET,
         sig: str | None = None) -> Any:
    body = json.dumps(payload).encode()
    t = str(int(time.time()) if ts is None else ts)
    headers = {"Content-Type": "application/json", "X-Bootsvc-Timestamp": t,
               "X-Bootsvc-Signature": sig or sign(secret, t, body), "X-Bootsvc-Delivery": delivery}
    return c.post("/webhooks/onboard", data=body, headers=headers)

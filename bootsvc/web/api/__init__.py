"""REST API ``/api/v1``: nodes, machines, tenants, images, leases, events, subscribers, power.

A thin translator of `bootsvc.operations`: it validates requests (pydantic models in ``schemas``, which
also generate the OpenAPI document served at ``/api/v1/openapi.json``), checks roles per route
(``bootsvc.web.auth``), pages lists (limit/offset with ``total``), and maps an ``OpError``'s code to
HTTP (``invalid`` 400, ``forbidden`` 403, ``not_found`` 404, ``conflict`` 409 — an illegal transition
carries the node's ``state`` and the triggers ``allowed`` from it — and ``failed`` 502 for a BMC).

Intent, not work: provision/release/retry/... only apply a trigger; the conductor does the BMC work. The
one exception is ``POST /nodes/{ident}/power``: a synchronous power action, bounded by
``orchestration.power_timeout_seconds`` and refused (409) while the node is in an active state.

Modules: ``schemas`` (models), ``common`` (the blueprint, output shapes, pages), ``nodes`` (nodes,
node actions, power, events), ``machines`` (a host and its DPUs as one), ``catalog`` (tenants, images,
leases, subscribers).
"""

from __future__ import annotations

from typing import Any

from flask import jsonify

from bootsvc.web.api import catalog, machines, nodes
from bootsvc.web.api.common import bp
from bootsvc.web.openapi import document, operation

__all__ = ["bp", "catalog", "machines", "nodes"]


@bp.get("/openapi.json")
@operation("GET", "/api/v1/openapi.json", "This document", tag="meta", security=None,
           responses={200: ("OpenAPI 3.1 document", None)})
def openapi() -> Any:
    return jsonify(document())

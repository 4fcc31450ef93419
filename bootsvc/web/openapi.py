"""The OpenAPI 3.1 document of ``/api/v1`` (and the onboarding webhook), built from the routes.

Owns: the ``operation`` decorator every API route carries (method, path, summary, request/response
pydantic models, query parameters, security), request-body parsing that lists EVERY bad field
(``parse_body``), query-parameter parsing (``query``), and ``document()``: the OpenAPI 3.1 document
generated from exactly those declarations and the pydantic models' JSON Schemas (JSON Schema 2020-12,
which OpenAPI 3.1 uses as is), so the document cannot drift from what the code validates.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from flask import request
from pydantic import BaseModel, Field, ValidationError
from pydantic.json_schema import models_json_schema

from bootsvc.web.auth import ApiError

F = TypeVar("F", bound=Callable[..., Any])
M = TypeVar("M", bound=BaseModel)

REF = "#/components/schemas/{model}"


@dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    description: str = ""
    required: bool = False
    where: str = "query"  # query | path | header


@dataclass
class Operation:
    method: str
    path: str  # OpenAPI form: /api/v1/nodes/{ident}
    summary: str
    tag: str
    security: str | None  # "token" | "node" | "webhook" | None
    request: type[BaseModel] | None = None
    responses: dict[int, tuple[str, type[BaseModel] | None]] = field(default_factory=dict)
    params: tuple[Param, ...] = ()
    description: str = ""
    roles: tuple[str, ...] = ()


OPERATIONS: list[Operation] = []


class ErrorOut(BaseModel):
    error: str
    reason: str


class FieldError(BaseModel):
    field: str
    reason: str


class ConflictOut(BaseModel):
    error: str
    reason: str
    state: str | None = None
    allowed: list[str] = Field(default_factory=list, description="triggers allowed from `state`")


class ValidationErrorOut(BaseModel):
    error: str
    reason: str
    fields: list[FieldError]


def operation(method: str, path: str, summary: str, *, tag: str, security: str | None = "token",
              request_model: type[BaseModel] | None = None,
              responses: dict[int, tuple[str, type[BaseModel] | None]] | None = None,
              params: tuple[Param, ...] = (), description: str = "", roles: tuple[str, ...] = ()) -> \
        Callable[[F], F]:
    """Declare a route for the document. ``path`` uses Flask syntax (``<ident>``)."""
    oa_path = re.sub(r"<(?:[a-z]+:)?([A-Za-z_]+)>", r"{\1}", path)
    resp = dict(responses or {})
    if security is not None:
        resp.setdefault(401, ("missing or bad credentials", ErrorOut))
        if security == "token":
            resp.setdefault(403, ("the token's role may not do this", ErrorOut))
    if request_model is not None:
        resp.setdefault(400, ("malformed request; every bad field is listed", ValidationErrorOut))
    for p in params:
        if p.where == "query":
            resp.setdefault(400, ("malformed request; every bad field is listed", ValidationErrorOut))
    OPERATIONS.append(Operation(method.lower(), oa_path, summary, tag, security, request_model, resp, params,
                                description, roles))

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            return fn(*a, **kw)

        return cast(F, wrapper)

    return deco


def _loc(err: dict[str, Any]) -> str:
    return ".".join(str(p) for p in err.get("loc", ())) or "(body)"


def parse_body(model: type[M]) -> M:
    """The JSON body validated by ``model``; 400 listing every bad field otherwise."""
    data = request.get_json(silent=True)
    if data is None:
        raise ApiError(400, "bad_request", "the body must be a JSON document (Content-Type: application/json)",
                       fields=[{"field": "(body)", "reason": "not JSON"}])
    return validate(model, data)


def validate(model: type[M], data: Any) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        fields = [{"field": _loc(cast(dict[str, Any], x)), "reason": x["msg"]} for x in e.errors()]
        raise ApiError(400, "bad_request", f"{len(fields)} invalid field(s): "
                       + "; ".join(f"{f['field']}: {f['reason']}" for f in fields), fields=fields) from None


def query(model: type[M]) -> M:
    """Query parameters validated by ``model`` (each parameter given once)."""
    args: dict[str, Any] = {}
    for k in request.args:
        vals = request.args.getlist(k)
        args[k] = vals[0] if len(vals) == 1 else vals
    return validate(model, args)


def params_of(model: type[BaseModel]) -> tuple[Param, ...]:
    """Query parameters described by a pydantic model's fields (for the document)."""
    schema = model.model_json_schema()
    props: dict[str, Any] = schema.get("properties", {})
    req = set(schema.get("required", []))
    out = []
    for name, sch in props.items():
        s = {k: v for k, v in sch.items() if k not in ("title",)}
        # an optional query parameter is absent rather than null: document the non-null branch only
        alts = s.pop("anyOf", None)
        if alts is not None:
            real = [a for a in alts if a != {"type": "null"}]
            s = {**(real[0] if len(real) == 1 else {"anyOf": real}), **s}
        if s.get("default", 0) is None:
            del s["default"]
        out.append(Param(name, s, str(sch.get("description", "")), name in req))
    return tuple(out)


SECURITY_SCHEMES = {
    "apiToken": {"type": "http", "scheme": "bearer",
                 "description": "API token (`bootsvc token create`); roles admin, tech, automation, viewer "
                                "(read only), agent: docs/roles.md"},
    "nodeSecret": {"type": "http", "scheme": "bearer",
                   "description": "per-node secret (with header X-Bootsvc-Node: <node name>)"},
}


def document(title: str = "bootsvc API", version: str = "1") -> dict[str, Any]:
    models: list[tuple[type[BaseModel], Any]] = []
    seen: set[tuple[type[BaseModel], str]] = set()
    for op in OPERATIONS:
        for m, mode in ([(op.request, "validation")] if op.request else []) + \
                [(r[1], "serialization") for r in op.responses.values() if r[1] is not None]:
            assert m is not None
            if (m, mode) not in seen:
                seen.add((m, mode))
                models.append((m, mode))
    keys, defs = models_json_schema(models, ref_template=REF)
    components: dict[str, Any] = dict(defs.get("$defs", {}))
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        item: dict[str, Any] = {"summary": op.summary, "operationId": f"{op.method}_{op.path}".replace("/", "_")
                                .replace("{", "").replace("}", "").replace("-", "_").strip("_"),
                                "tags": [op.tag]}
        desc = op.description
        if op.roles:
            desc = (desc + "\n\n" if desc else "") + "Roles: " + ", ".join(op.roles) + "."
        if desc:
            item["description"] = desc
        if op.security == "token":
            item["security"] = [{"apiToken": []}]
        elif op.security == "node":
            item["security"] = [{"nodeSecret": []}]
        params: list[dict[str, Any]] = []
        for name in re.findall(r"{([A-Za-z_]+)}", op.path):
            params.append({"name": name, "in": "path", "required": True,
                           "schema": {"type": "string", "minLength": 1, "maxLength": 128,
                                      "pattern": "^[A-Za-z0-9][A-Za-z0-9:._-]*$"}})
        if op.security == "node":
            params.append({"name": "X-Bootsvc-Node", "in": "header", "required": True,
                           "schema": {"type": "string", "maxLength": 63}})
        for p in op.params:
            params.append({"name": p.name, "in": p.where, "required": p.required, "schema": p.schema,
                           **({"description": p.description} if p.description else {})})
        if params:
            item["parameters"] = params
        if op.request is not None:
            ref = keys[(op.request, "validation")]
            item["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
        responses: dict[str, Any] = {}
        for code, (text, model) in sorted(op.responses.items()):
            r: dict[str, Any] = {"description": text}
            if model is not None:
                r["content"] = {"application/json": {"schema": keys[(model, "serialization")]}}
            responses[str(code)] = r
        item["responses"] = responses
        paths.setdefault(op.path, {})[op.method] = item
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version,
                 "description": "Provision BlueField-3 DPUs and the hosts behind them. Errors are JSON "
                                "`{error, reason}`; illegal lifecycle transitions answer 409 with the "
                                "triggers allowed from the node's state."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": SECURITY_SCHEMES},
    }

"""``bootsvc power ...`` and ``bootsvc bmc ...`` commands (click groups ``power`` and ``bmc``).

Owns: translating the command line into `bootsvc.operations.power` for ``power on/off/cycle`` (the
operation's rules, ``power_action`` event and ``bootsvc_bmc_*`` metrics are the same for the API, the
UI and this CLI), and, for the read-only and diagnostic commands (``power status``, ``bmc check``) and
``power pxe-once``, looking a NODE (name, serial, id or MAC) up and asking its driver
(`bootsvc.power.driver_for`) directly; printing the result for a human or as ``--json``. Every failure
is one line on stderr (``error: ...``) and a non-zero exit: 1 = the BMC operation failed (``retryable``
says whether trying again may help), 2 = bad input or a refusal (unknown node, node without BMC fields,
a node the conductor is driving, bad config).

The groups run under the main ``bootsvc`` CLI, whose context object provides ``config`` and
``sessions()``; run on their own they read ``$BOOTSVC_CONFIG`` / ``$BOOTSVC_DB_URL``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Literal, NoReturn

import click
from sqlalchemy.exc import SQLAlchemyError

from bootsvc import config as config_mod
from bootsvc import db, inventory, operations
from bootsvc.power import driver_for
from bootsvc.power.base import BmcError, BootTarget, PowerDriver, dpu_advice

json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")
wait_option = click.option("--wait", type=float, default=120.0, show_default=True,
                           help="seconds to wait for the new power state (0 = return once accepted)")


def _fail(msg: str, code: int, as_json: bool = False, **extra: Any) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"ok": False, "error": msg, **extra}))
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def _context(ctx: click.Context) -> tuple[Any, Any]:
    """(config, sessionmaker) from the parent bootsvc CLI, or from the environment when standalone."""
    obj = ctx.find_root().obj
    if obj is not None and hasattr(obj, "sessions") and hasattr(obj, "config"):
        return obj.config, obj.sessions()
    try:
        cfg = config_mod.load(None)
    except config_mod.ConfigError as e:
        _fail(f"bad config: {e}", 2)
    url = os.environ.get("BOOTSVC_DB_URL") or cfg.database.url
    return cfg, db.session_factory(db.make_engine(url))


def _driver(ctx: click.Context, node_ref: str, as_json: bool) -> tuple[str, PowerDriver]:
    cfg, sessions = _context(ctx)
    try:
        with sessions() as s:
            node = inventory.node_by_name(s, node_ref)
    except Exception as e:  # database unreachable / not migrated: one line, not a traceback
        _fail(f"cannot read the node database: {type(e).__name__}: {str(e).splitlines()[0]}", 2, as_json)
    if node is None:
        _fail(f"no node {node_ref!r} (looked up by name, serial, id and MAC)", 2, as_json)
    try:
        return node.name, driver_for(node, cfg)
    except BmcError as e:
        _fail(str(e), 2, as_json)


def _run(as_json: bool, node: str, fn: Callable[[], dict[str, Any]], human: Callable[[dict[str, Any]], str]) -> None:
    try:
        data = fn()
    except BmcError as e:
        _fail(f"{node}: {e}", 1, as_json, retryable=e.retryable, maybe_applied=e.maybe_applied)
    data = {"ok": True, "node": node, **data}
    click.echo(json.dumps(data, default=str) if as_json else human(data))


@click.group()
def power() -> None:
    """Power and one-time boot control of nodes through their BMCs."""


@power.command()
@click.argument("node")
@json_option
@click.pass_context
def status(ctx: click.Context, node: str, as_json: bool) -> None:
    """Show a node's power state and boot override."""
    name, drv = _driver(ctx, node, as_json)

    def fn() -> dict[str, Any]:
        st = drv.power_state()
        b = drv.boot_override()
        return {"power": st.value, "boot_override": asdict(b)}

    _run(as_json, name, fn, lambda d: (
        f"{name}: {d['power']}; boot override {d['boot_override']['target']}/{d['boot_override']['enabled']}"))


def _power(ctx: click.Context, action: Literal["on", "off", "cycle"], node: str, wait: float, as_json: bool,
           graceful: bool = False) -> None:
    """on/off/cycle go through `operations.power`, like the API's and the UI's: the same refusals (an
    active node belongs to the conductor), the ``power_action`` event and the BMC metrics, once."""
    cfg, sessions = _context(ctx)
    op: operations.PowerAction = "graceful-off" if action == "off" and graceful else action
    try:
        with sessions() as s:
            n = operations.find_node(s, node)
            name = n.name
            state = operations.power(s, n, op, actor="cli", config=cfg, via="cli", wait=wait)
    except operations.OpError as e:
        _fail(str(e), 1 if e.code == "failed" or e.retryable else 2, as_json,
              **{**e.extra, "kind": e.kind, "retryable": e.retryable})
    except SQLAlchemyError as e:  # database unreachable / not migrated: one line, not a traceback
        _fail(f"cannot read the node database: {type(e).__name__}: {str(e).splitlines()[0]}", 2, as_json)
    data = {"ok": True, "node": name, "action": action, "power": state}
    click.echo(json.dumps(data) if as_json else f"{name}: {action} done; power is {state}")


@power.command("on")
@click.argument("node")
@wait_option
@json_option
@click.pass_context
def power_on(ctx: click.Context, node: str, wait: float, as_json: bool) -> None:
    """Power a node on."""
    _power(ctx, "on", node, wait, as_json)


@power.command("off")
@click.argument("node")
@click.option("--graceful", is_flag=True, help="GracefulShutdown first, ForceOff after the grace time")
@wait_option
@json_option
@click.pass_context
def power_off(ctx: click.Context, node: str, graceful: bool, wait: float, as_json: bool) -> None:
    """Power a node off (forced unless --graceful)."""
    _power(ctx, "off", node, wait, as_json, graceful)


@power.command("cycle")
@click.argument("node")
@wait_option
@json_option
@click.pass_context
def power_cycle(ctx: click.Context, node: str, wait: float, as_json: bool) -> None:
    """Power-cycle a node (switches it on if it is off)."""
    _power(ctx, "cycle", node, wait, as_json)


@power.command("pxe-once")
@click.argument("node")
@click.option("--http", "http_uri", metavar="URI", help="UEFI HTTP boot from URI instead of PXE")
@json_option
@click.pass_context
def pxe_once(ctx: click.Context, node: str, http_uri: str | None, as_json: bool) -> None:
    """Make the node's next boot a network boot (PXE, or UEFI HTTP with --http)."""
    name, drv = _driver(ctx, node, as_json)

    def fn() -> dict[str, Any]:
        b = drv.boot_once(BootTarget.HTTP if http_uri else BootTarget.PXE, uri=http_uri)
        return {"boot_override": asdict(b)}

    def human(d: dict[str, Any]) -> str:
        b = d["boot_override"]
        note = ""
        if b["pending"]:
            note += "; pending, applies at the next boot"
        if b["sticky"]:
            note += "; the BMC keeps it after use, bootsvc clears it once the node has booted"
        return f"{name}: next boot {b['target']} ({b['enabled']}){note}"

    _run(as_json, name, fn, human)


@click.group()
def bmc() -> None:
    """BMC diagnostics."""


@bmc.command()
@click.argument("node")
@json_option
@click.pass_context
def check(ctx: click.Context, node: str, as_json: bool) -> None:
    """Reach the node's BMC, log in, and show Redfish version, identity (with the evidence it matched
    on), quirks and, for a BlueField DPU, its mode, Secure Boot, OS state and whether a BFB push works."""
    name, drv = _driver(ctx, node, as_json)

    def fn() -> dict[str, Any]:
        info = drv.info()
        d = asdict(info)
        d["quirk_flags"] = dict(info.quirk_flags)
        d["power_state"] = info.power_state.value
        if info.dpu is not None:
            d["dpu"]["mode"] = info.dpu.mode.value
            d["dpu"]["advice"] = list(dpu_advice(info.dpu))
        return d

    def human(d: dict[str, Any]) -> str:
        flags = ", ".join(f"{k}={v}" for k, v in d["quirk_flags"].items()) or "none"
        lines = [
            f"node:            {name}",
            f"bmc:             {d['address']} (reachable, login ok via {d['auth']})",
            f"redfish version: {d['redfish_version'] or '?'}",
            f"identified as:   {d['kind'] or '?'}",
            *[f"  evidence:      {e}" for e in d["evidence"]],
            f"vendor/model:    {d['vendor'] or '?'} / {d['model'] or '?'}",
            f"bmc firmware:    {d['firmware'] or '?'}",
            f"system:          {d['system_path']} (power {d['power_state']})",
            f"manager:         {d['manager_path'] or '-'}",
            f"quirks:          {', '.join(d['quirks']) or 'none'} ({flags})",
        ]
        dpu = d.get("dpu")
        if dpu:
            sb = {True: "enabled", False: "disabled", None: "unknown"}[dpu["secure_boot"]]
            lines += [
                f"dpu mode:        {dpu['mode']}",
                f"secure boot:     {sb}" + (f" (current boot: {dpu['secure_boot_current']})"
                                            if dpu["secure_boot_current"] else ""),
                f"dpu os:          {dpu['os_version'] or '?'} (BootProgress.OemLastState "
                f"{dpu['os_state'] or '-'})",
                f"rshim:           host {dpu['host_rshim'] or '?'}, bmc "
                f"{ {True: 'enabled', False: 'disabled', None: '?'}[dpu['bmc_rshim']] }",
                f"bfb push:        {'HTTP ok' if dpu['http_push'] else 'refused'} "
                f"(BMC takes {', '.join(dpu['update_protocols']) or 'nothing'})",
                *[f"  note:          {a}" for a in dpu["advice"]],
            ]
        return "\n".join(lines)

    _run(as_json, name, fn, human)

"""The ``bootsvc`` command line (click).

Owns: argument parsing and human/JSON output for serve, db, node, tenant and token commands, and
mounting the other areas' command groups (leases, power, bmc, lab). Machine operations are
`bootsvc.operations`'; this module translates them. Every failure is one clear line on stderr and a
non-zero exit code: 1 = the operation failed and trying again may help (a BMC, a concurrent change),
2 = refused (bad input, unknown node, not allowed in this state). About 530 lines: the command tree of
the core groups reads top to bottom; the other areas' groups live in their own cli modules.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from bootsvc import auth_secrets, db, images_cli, inventory, operations, retention, views
from bootsvc.cli_context import Ctx, fail, pass_ctx
from bootsvc.dhcp import cli as dhcp_cli
from bootsvc.models import ApiToken, Event, Tenant, UiSession
from bootsvc.power import cli as power_cli
from bootsvc.states import State, Trigger

F = TypeVar("F", bound=Callable[..., Any])


def table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    out = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in out)


def op_fail(e: operations.OpError) -> NoReturn:
    """An operations refusal as one line and its exit code (the code decides, not the text)."""
    fail(str(e), 1 if e.code == "failed" or e.retryable else 2)


def emit(as_json: bool, data: Any, human: Callable[[], str]) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else human())


json_option = click.option("--json", "as_json", is_flag=True, help="machine-readable output")


@click.group()
@click.option("--config", "config_path", envvar="BOOTSVC_CONFIG", type=click.Path(dir_okay=False),
              help="site config YAML (default: $BOOTSVC_CONFIG or built-in safe defaults)")
@click.option("--db", "db_url", envvar="BOOTSVC_DB_URL", help="database URL (overrides the config)")
@click.option("-v", "--verbose", is_flag=True)
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, db_url: str | None, verbose: bool) -> None:
    """bootsvc: provision BlueField-3 DPUs and the hosts behind them."""
    # Services log one INFO line per decision; a one-shot command prints its own result on stdout and
    # keeps the lifecycle's INFO lines off the terminal unless -v asks for them.
    services = ctx.invoked_subcommand in ("serve", "run-service", "lab")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO if services else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s", stream=sys.stderr)
    logging.getLogger("alembic").setLevel(logging.DEBUG if verbose else logging.WARNING)
    ctx.obj = Ctx(config_path, db_url)




# ---------------------------------------------------------------- serve
@cli.command()
@click.option("--only", help="comma-separated services to run (http,dhcp,tftp,dns,conductor)")
@pass_ctx
def serve(c: Ctx, only: str | None) -> None:
    """Run bootsvc's services until SIGTERM/SIGINT."""
    from bootsvc.daemon import Supervisor

    try:
        sup = Supervisor(c.config, c.config_path, set(only.split(",")) if only else None)
        sys.exit(sup.run())
    except RuntimeError as e:
        fail(str(e))


@cli.command("run-service", hidden=True)
@click.argument("kind")
@click.option("--index", type=int, default=0)
@pass_ctx
def run_service(c: Ctx, kind: str, index: int) -> None:
    """Run one service in this process (used by `serve`)."""
    from bootsvc.daemon import run_one

    sys.exit(run_one(c.config, kind, index))


# ---------------------------------------------------------------- db
@cli.group("db")
def db_group() -> None:
    """Database schema (Alembic)."""


@db_group.command("upgrade")
@click.argument("revision", default="head")
@pass_ctx
def db_upgrade(c: Ctx, revision: str) -> None:
    """Migrate the database to REVISION (default: head)."""
    try:
        db.upgrade(c.url, revision)
    except Exception as e:
        fail(f"upgrade failed: {e}")
    click.echo(f"database at {db.current(c.url)}")


@db_group.command("downgrade")
@click.argument("revision", default="base")
@pass_ctx
def db_downgrade(c: Ctx, revision: str) -> None:
    """Migrate the database down to REVISION (default: base, i.e. empty)."""
    try:
        db.downgrade(c.url, revision)
    except Exception as e:
        fail(f"downgrade failed: {e}")
    click.echo(f"database at {db.current(c.url) or 'base'}")


@db_group.command("check")
@pass_ctx
def db_check(c: Ctx) -> None:
    """Fail if the models and the migrations disagree, or the database is not at head."""
    try:
        db.check(c.url)
    except Exception as e:
        fail(f"schema drift or database not at head: {e}")
    click.echo("models, migrations and database agree")


@db_group.command("prune")
@json_option
@pass_ctx
def db_prune(c: Ctx, as_json: bool) -> None:
    """Expire leases past their time and delete history older than `retention:` in the config (the
    conductor also does this every retention.interval_seconds)."""
    with c.sessions()() as s:
        r = retention.prune(s, c.config.retention)
    d = dataclasses.asdict(r)
    emit(as_json, d, lambda: "pruned: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d.items()))


# ---------------------------------------------------------------- node
@cli.group("node")
def node_group() -> None:
    """Inventory of DPUs and hosts."""


def _node_dict(n: Any) -> dict[str, Any]:
    v = inventory.node_view(n)
    return {
        "id": v.id, "name": v.name, "kind": v.kind, "serial": v.serial, "state": v.state, "arch": v.arch,
        "vendor": v.vendor, "model": v.model, "rack": v.rack, "slot": v.slot,
        "tenant": v.tenant.name if v.tenant else None, "host_id": v.host_id, "dpu_ids": list(v.dpu_ids),
        "macs": [{"mac": x.mac, "role": x.role, "ipv4": x.ipv4} for x in v.nics],
        "bmc_address": v.bmc_address, "bmc_driver": v.bmc_driver, "bmc_credential_ref": v.bmc_credential_ref,
        "provision_method": v.provision_method, "image": v.image, "attempts": v.attempts,
        "deadline": views.iso_utc(v.deadline), "last_error": v.last_error,
        "hint": v.hint, "version": v.version,
    }


def _parse_mac(value: str) -> inventory.NicSpec:
    parts = value.split(",")
    mac = parts[0]
    role = parts[1] if len(parts) > 1 else "oob"
    ipv4 = parts[2] if len(parts) > 2 else None
    return inventory.NicSpec(mac=mac, role=role, ipv4=ipv4)


@node_group.command("add")
@click.argument("name")
@click.option("--kind", type=click.Choice(["dpu", "host"]), required=True,
              help="dpu: a BlueField DPU (its OOB port is on Zone 0); host: the server behind one")
@click.option("--serial", required=True, help="the serial number on the label (unique)")
@click.option("--mac", "macs", multiple=True,
              help="MAC[,ROLE[,IPV4]], repeatable; ROLE is oob (default), host-pf or bmc; IPV4 reserves "
                   "that address for it")
@click.option("--rack", help="rack name, as the UI's rack view groups machines")
@click.option("--slot", type=int, help="slot (U) in the rack, 0-1000")
@click.option("--vendor", help="vendor, for people (the BMC's own answer decides quirks)")
@click.option("--model", help="model, for people")
@click.option("--arch", help="CPU architecture (default: aarch64 for a DPU, x86_64 for a host)")
@click.option("--tenant", help="for a host: the tenant whose VRF it boots into (see `bootsvc tenant list`)")
@click.option("--host", help="for a DPU: the host it fronts (name or serial)")
@click.option("--bmc", "bmc_address", help="BMC URL, e.g. https://10.0.0.5")
@click.option("--bmc-driver", default="redfish", type=click.Choice(["redfish", "fake"]),
              help="redfish (real BMCs) or fake (tests)")
@click.option("--bmc-credential", "bmc_credential_ref", help="name of a credential in the config")
@click.option("--insecure-bmc", is_flag=True, help="do not verify the BMC's TLS certificate (labs only)")
@click.option("--method", "provision_method", default="pxe", type=click.Choice(["pxe", "redfish"]),
              help="how a DPU gets its BFB: pxe (network boot) or redfish (its BMC pulls BFB + bf.cfg)")
@click.option("--image", help="catalog image name[:version] (default: the catalog's default for the kind)")
@json_option
@pass_ctx
def node_add(c: Ctx, /, name: str, kind: str, serial: str, macs: tuple[str, ...], as_json: bool,
             insecure_bmc: bool, **kw: Any) -> None:
    """Enroll a node.

    \b
    Example (a host and the BlueField-3 in front of it):
      bootsvc node add gpu-a01 --kind host --serial HS123 --rack a --slot 1 \\
          --mac 58:a2:e1:00:00:01,host-pf --tenant nimbus
      bootsvc node add gpu-a01-dpu --kind dpu --serial MT2334X00001 --host gpu-a01 \\
          --mac 58:a2:e1:00:01:00,oob --bmc https://192.0.2.10 --bmc-credential dpu-bmc --method redfish
    """
    spec = inventory.NodeSpec(name=name, kind=kind, serial=serial, nics=[_parse_mac(m) for m in macs],
                              bmc_verify_tls=not insecure_bmc, **kw)
    with c.sessions()() as s:
        try:
            (n,) = operations.enroll(s, [spec], actor="cli")
        except operations.OpError as e:
            op_fail(e)
        d = _node_dict(n)
    emit(as_json, d, lambda: f"enrolled {d['kind']} {d['name']} (serial {d['serial']}), state {d['state']}")


@node_group.command("list")
@click.option("--kind", type=click.Choice(["dpu", "host"]))
@click.option("--state", type=click.Choice([st.value for st in State]), help="only nodes in this state")
@click.option("--tenant", help="only nodes of this tenant (must exist)")
@click.option("--rack")
@click.option("--limit", type=click.IntRange(1, 10000), default=500)
@json_option
@pass_ctx
def node_list(c: Ctx, kind: str | None, state: str | None, tenant: str | None, rack: str | None,
              limit: int, as_json: bool) -> None:
    """List nodes."""
    with c.sessions()() as s:
        if tenant and s.scalars(select(Tenant).where(Tenant.name == tenant)).first() is None:
            fail(f"no tenant named {tenant!r} (see `bootsvc tenant list`)", 2)
        rows, total = inventory.list_nodes(s, kind=kind, state=state, tenant=tenant, rack=rack, limit=limit)
        items = [_node_dict(n) for n in rows]
    for i in items:
        i["macs_text"] = " ".join(m["mac"] for m in i["macs"])
    emit(as_json, {"total": total, "items": items},
         lambda: table(items, ["name", "kind", "serial", "state", "tenant", "rack", "slot", "macs_text"]))


def _get(s: Session, ident: str) -> Any:
    try:
        return operations.find_node(s, ident)
    except operations.OpError as e:
        op_fail(e)


@node_group.command("show")
@click.argument("ident")
@json_option
@pass_ctx
def node_show(c: Ctx, ident: str, as_json: bool) -> None:
    """Show one node (by name, serial, id or MAC)."""
    with c.sessions()() as s:
        d = _node_dict(_get(s, ident))

    def human() -> str:
        lines = [f"{k:>18}: {v}" for k, v in d.items() if k != "macs"]
        lines += [f"{'nic':>18}: {m['mac']} {m['role']} {m['ipv4'] or ''}" for m in d["macs"]]
        return "\n".join(lines)

    emit(as_json, d, human)


@node_group.command("events")
@click.argument("ident")
@click.option("--limit", type=click.IntRange(1, 100000), default=50)
@json_option
@pass_ctx
def node_events(c: Ctx, ident: str, limit: int, as_json: bool) -> None:
    """The node's event log, oldest first."""
    with c.sessions()() as s:
        n = _get(s, ident)
        evs = list(s.scalars(select(Event).where(Event.node_id == n.id).order_by(Event.id.desc()).limit(limit)))
        items = [{"at": views.iso_utc(e.at), "from": e.from_state, "to": e.to_state,
                  "trigger": e.trigger, "actor": e.actor, "detail": e.detail} for e in reversed(evs)]
    emit(as_json, items, lambda: table(items, ["at", "from", "to", "trigger", "actor", "detail"]))


_SET_OPTIONS = (
    ("--name", "name", str, "new name (a DNS label)"),
    ("--serial", "serial", str, "new serial number"),
    ("--rack", "rack", str, "rack"), ("--slot", "slot", int, "slot in the rack"),
    ("--vendor", "vendor", str, "vendor"), ("--model", "model", str, "model"), ("--arch", "arch", str, "arch"),
    ("--tenant", "tenant", str, "tenant name ('' for none)"),
    ("--host", "host", str, "for a DPU: the host it fronts ('' for none)"),
    ("--bmc", "bmc_address", str, "BMC URL ('' for none)"),
    ("--bmc-driver", "bmc_driver", click.Choice(["redfish", "fake"]), "BMC driver"),
    ("--bmc-credential", "bmc_credential_ref", str, "name of a credential in the config"),
    ("--method", "provision_method", click.Choice(["pxe", "redfish"]), "how a DPU is installed"),
    ("--image", "image", str, "catalog image name[:version] ('' for the default)"),
)


@node_group.command("set")
@click.argument("ident")
@click.option("--mac", "macs", multiple=True, help="replace ALL the node's NICs: MAC[,ROLE[,IPV4]], repeatable")
@click.option("--verify-bmc-tls/--insecure-bmc", "bmc_verify_tls", default=None,
              help="verify the BMC's TLS certificate (--insecure-bmc: labs only)")
@json_option
@pass_ctx
def node_set(c: Ctx, /, ident: str, macs: tuple[str, ...], bmc_verify_tls: bool | None, as_json: bool,
             **fields: Any) -> None:
    """Correct a node's enrollment, validated like `node add`.

    Refused while the service acts on the node; on a deployed or policy-enforcing node only rack, slot,
    vendor and model may change. Example: bootsvc node set gpu-a01 --serial HS124 --rack b --slot 4
    """
    changes: dict[str, Any] = {k: (v or None) if isinstance(v, str) else v
                               for k, v in fields.items() if v is not None}
    if macs:
        changes["nics"] = [_parse_mac(m) for m in macs]
    if bmc_verify_tls is not None:
        changes["bmc_verify_tls"] = bmc_verify_tls
    with c.sessions()() as s:
        n = _get(s, ident)
        try:
            operations.edit_node(s, n, changes, actor="cli")
        except operations.OpError as e:
            op_fail(e)
        d = _node_dict(n)
    emit(as_json, d, lambda: f"{d['name']}: updated {', '.join(sorted(changes))}")


for _flag, _dest, _type, _help in _SET_OPTIONS:
    node_set = click.option(_flag, _dest, type=_type, default=None, help=_help)(node_set)


@node_group.command("delete")
@click.argument("ident")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@pass_ctx
def node_delete(c: Ctx, ident: str, yes: bool) -> None:
    """Delete a registered or retired node with its history, freeing its name, serial and MACs."""
    with c.sessions()() as s:
        n = _get(s, ident)
        name = n.name
        if not yes and not click.confirm(f"delete {name} and its event history?", default=False):
            fail("not deleted", 1)
        try:
            operations.delete_node(s, n, actor="cli")
        except operations.OpError as e:
            op_fail(e)
    click.echo(f"deleted {name}")


def _transition_command(trigger: Trigger, help_text: str) -> None:
    @node_group.command(trigger.value.replace("_", "-"), help=help_text)
    @click.argument("ident")
    @click.option("--reason", default=None)
    @json_option
    @pass_ctx
    def cmd(c: Ctx, ident: str, reason: str | None, as_json: bool, manual_power: bool = False,
            no_dpu: bool = False) -> None:
        with c.sessions()() as s:
            n = _get(s, ident)
            try:
                ev = operations.transition(s, n, trigger, actor="cli", config=c.config,
                                           detail={"reason": reason} if reason else None,
                                           manual_power=manual_power, no_dpu=no_dpu)
            except operations.OpError as e:
                op_fail(e)
            d = {"node": n.name, "from": ev.from_state, "to": ev.to_state}
        emit(as_json, d, lambda: f"{d['node']}: {d['from']} -> {d['to']}")

    if trigger in (Trigger.PROVISION, Trigger.REPROVISION):
        click.option("--manual-power", is_flag=True,
                     help="a DPU without a BMC: you power it on yourself")(cmd)
        click.option("--no-dpu", is_flag=True,
                     help="a host the site declares DPU-less (no tenant isolation by a DPU)")(cmd)


for _t, _h in ((Trigger.PROVISION, "Start provisioning (the conductor carries it out)."),
               (Trigger.RELEASE, "Release the node: power off, wipe, back to available."),
               (Trigger.RETRY, "Retry from a failure state."),
               (Trigger.REPROVISION, "Start over from a resting or failed state."),
               (Trigger.MAINTENANCE, "Put the node in maintenance (nothing acts on it)."),
               (Trigger.MAINTENANCE_DONE, "Take the node out of maintenance."),
               (Trigger.ABORT, "Stop an in-progress flow; the node goes to maintenance."),
               (Trigger.RETIRE, "Retire the node for good.")):
    _transition_command(_t, _h)


# ---------------------------------------------------------------- tenant
@cli.group("tenant")
def tenant_group() -> None:
    """Tenants and their VRFs."""


@tenant_group.command("add")
@click.argument("name")
@click.option("--vrf", required=True)
@click.option("--l3vni", type=int, required=True)
@click.option("--prefix", "prefixes", multiple=True)
@click.option("--table", type=int)
@json_option
@pass_ctx
def tenant_add(c: Ctx, name: str, vrf: str, l3vni: int, prefixes: tuple[str, ...], table: int | None,
               as_json: bool) -> None:
    """Add a tenant."""
    with c.sessions()() as s:
        try:
            t = operations.add_tenant(s, name, vrf, l3vni, prefixes, table)
        except operations.OpError as e:
            op_fail(e)
        d = {"name": t.name, "vrf": t.vrf, "l3vni": t.l3vni, "prefixes": t.prefixes}
    emit(as_json, d, lambda: f"tenant {d['name']} (VRF {d['vrf']}, L3 VNI {d['l3vni']}) added")


@tenant_group.command("list")
@json_option
@pass_ctx
def tenant_list(c: Ctx, as_json: bool) -> None:
    """List tenants."""
    with c.sessions()() as s:
        items = [{"name": t.name, "vrf": t.vrf, "l3vni": t.l3vni, "table": t.table,
                  "prefixes": ",".join(t.prefixes or [])} for t in s.scalars(select(Tenant).order_by(Tenant.name))]
    emit(as_json, items, lambda: table(items, ["name", "vrf", "l3vni", "table", "prefixes"]))


@tenant_group.command("sync")
@pass_ctx
def tenant_sync(c: Ctx) -> None:
    """Create the tenants the config declares and the database lacks."""
    with c.sessions()() as s:
        n = inventory.sync_tenants(s, c.config)
    click.echo(f"{n} tenant(s) created from {c.config.source}")


# ---------------------------------------------------------------- token
@cli.group("token")
def token_group() -> None:
    """API bearer tokens."""


@token_group.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(["admin", "tech", "automation", "viewer", "agent"]), required=True)
@click.option("--expires-in", "days", type=click.IntRange(0, 3650), default=None,
              help="days until it expires (default: security.token_ttl_days; 0 = never)")
@json_option
@pass_ctx
def token_create(c: Ctx, name: str, role: str, days: int | None, as_json: bool) -> None:
    """Create a token; it is shown once and only its hash is stored."""
    tok = auth_secrets.new_token()
    ttl = c.config.security.token_ttl_days if days is None else days
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=ttl) if ttl else None
    with c.sessions()() as s:
        if s.scalars(select(ApiToken).where(ApiToken.name == name)).first() is not None:
            fail(f"a token named {name!r} exists", 2)
        s.add(ApiToken(name=name, role=role, token_hash=auth_secrets.hash_token(tok), expires_at=expires))
        s.commit()
    until = f"expires {expires.isoformat(timespec='seconds')}" if expires else "never expires"
    emit(as_json, {"name": name, "role": role, "token": tok, "expires_at": expires},
         lambda: f"token {name} ({role}, {until}): {tok}\nstore it now: it is not shown again")


def _token_status(t: ApiToken, now: dt.datetime) -> str:
    if t.revoked:
        return "revoked"
    exp = t.expires_at
    if exp is not None and (exp if exp.tzinfo else exp.replace(tzinfo=dt.UTC)) <= now:
        return "expired"
    return "active"


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else (t if t.tzinfo else t.replace(tzinfo=dt.UTC)).isoformat(timespec="seconds")


@token_group.command("list")
@click.option("--all", "show_all", is_flag=True, help="also revoked and expired tokens")
@json_option
@pass_ctx
def token_list(c: Ctx, show_all: bool, as_json: bool) -> None:
    """List usable tokens (names, roles, expiry; never the token)."""
    now = dt.datetime.now(dt.UTC)
    with c.sessions()() as s:
        items = [{"name": t.name, "role": t.role, "status": _token_status(t, now), "created": _iso(t.created_at),
                  "expires": _iso(t.expires_at) or "never", "revoked_at": _iso(t.revoked_at)}
                 for t in s.scalars(select(ApiToken).order_by(ApiToken.name))]
    if not show_all:
        items = [x for x in items if x["status"] == "active"]
    emit(as_json, items, lambda: table(items, ["name", "role", "status", "created", "expires"]))


@token_group.command("revoke")
@click.argument("name")
@pass_ctx
def token_revoke(c: Ctx, name: str) -> None:
    """Revoke a token now: the API refuses it and its UI sessions end."""
    with c.sessions()() as s:
        t = s.scalars(select(ApiToken).where(ApiToken.name == name)).first()
        if t is None:
            fail(f"no token named {name!r} ('bootsvc token list --all' shows them)", 2)
        now = dt.datetime.now(dt.UTC)
        if not t.revoked:
            t.revoked, t.revoked_at = True, now
        ended = 0
        for u in s.scalars(select(UiSession).where(UiSession.token_id == t.id, UiSession.ended_at.is_(None))):
            u.ended_at = now
            ended += 1
        s.commit()
    click.echo(f"token {name} revoked; {ended} UI session(s) ended")


# ---------------------------------------------------------------- docs
@cli.command("lifecycle-diagram")
@click.option("--kind", type=click.Choice(["dpu", "host"]))
def lifecycle_diagram(kind: str | None) -> None:
    """Print the lifecycle transition table as a Mermaid diagram."""
    from bootsvc.states import mermaid

    click.echo(mermaid(kind), nl=False)  # type: ignore[arg-type]


# Other areas' command groups. Plain imports: a renamed module fails here, loudly, instead of its commands
# vanishing. The one exception is the QEMU lab, a development tool that the product's wheel does not ship
# (pyproject.toml excludes bootsvc/lab): `bootsvc lab` exists only in a source checkout.
cli.add_command(dhcp_cli.leases)
cli.add_command(power_cli.power)
cli.add_command(power_cli.bmc)
cli.add_command(images_cli.image)
try:
    from bootsvc.lab import cli as lab_cli
except ModuleNotFoundError as _e:  # only "there is no lab here", never a broken import inside the lab
    if _e.name not in ("bootsvc.lab", "bootsvc.lab.cli"):
        raise
else:
    cli.add_command(lab_cli.lab)


def main() -> None:
    cli(prog_name="bootsvc")

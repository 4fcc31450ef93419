"""``bootsvc leases list|show|release`` (click group ``leases``), plus ``leases discovered``.

Owns: reading the ``leases`` table for people (a table by default, ``--json`` for scripts) and the
administrative release of a lease. A released lease frees its address for others at once; a client
that still thinks it owns it will be NAKed at its next RENEW and start over (RFC 2131 §4.3.2).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import Any

import click
from sqlalchemy import or_, select

from bootsvc.models import Discovered, Lease, Node

__all__ = ["leases"]


def _sessions(ctx: click.Context) -> Any:
    obj = ctx.find_root().obj
    if obj is None or not hasattr(obj, "sessions"):  # used standalone (tests): no root Ctx
        raise click.UsageError("run as `bootsvc leases ...`")
    return obj.sessions()


def _aware(t: dt.datetime) -> dt.datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=dt.UTC)


def _row(lease: Lease, node: str | None, now: dt.datetime) -> dict[str, Any]:
    exp = _aware(lease.expires_at)
    state = lease.state
    if state == "bound" and exp <= now:
        state = "expired"  # expiry is lazy in the table; show what it means
    return {
        "vrf": lease.vrf, "network": lease.network, "address": lease.address, "mac": lease.mac,
        "state": state, "expires_at": exp.isoformat(timespec="seconds"),
        "remaining_s": max(0, int((exp - now).total_seconds())) if state == "bound" else 0,
        "node": node, "hostname": lease.hostname, "client_id": lease.client_id, "relay": lease.relay,
        "circuit_id": lease.circuit_id, "remote_id": lease.remote_id,
        "updated_at": _aware(lease.updated_at).isoformat(timespec="seconds"),
    }


def _table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    if not rows:
        click.echo("(no leases)")
        return
    w = {c: max(len(c), *(len("" if r[c] is None else str(r[c])) for r in rows)) for c in cols}
    click.echo("  ".join(c.upper().ljust(w[c]) for c in cols))
    for r in rows:
        click.echo("  ".join(("-" if r[c] in (None, "") else str(r[c])).ljust(w[c]) for c in cols))


@click.group("leases")
def leases() -> None:
    """DHCP leases (bootsvc's own DHCP server)."""


@leases.command("list")
@click.option("--vrf", default=None, help="only this VRF ('' = default/Zone 0)")
@click.option("--network", default=None)
@click.option("--state", type=click.Choice(["bound", "expired", "released", "declined", "all"]),
              default="bound", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
@click.option("--limit", type=int, default=1000, show_default=True)
@click.pass_context
def list_cmd(ctx: click.Context, vrf: str | None, network: str | None, state: str, as_json: bool,
             limit: int) -> None:
    """List leases (bound and unexpired by default)."""
    now = dt.datetime.now(dt.UTC)
    with _sessions(ctx)() as s:
        q = select(Lease, Node.name).outerjoin(Node, Node.id == Lease.node_id)
        if vrf is not None:
            q = q.where(Lease.vrf == vrf)
        if network:
            q = q.where(Lease.network == network)
        if state in ("released", "declined"):
            q = q.where(Lease.state == state)
        elif state in ("bound", "expired"):
            q = q.where(Lease.state == "bound")
        rows = [_row(lease, name, now) for lease, name in s.execute(q.order_by(Lease.vrf, Lease.network,
                                                                                 Lease.address))]
    if state in ("bound", "expired"):
        rows = [r for r in rows if r["state"] == state]
    rows = rows[:limit]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    _table(rows, ["vrf", "network", "address", "mac", "client_id", "state", "remaining_s", "node", "relay"])


def _find(s: Any, ident: str, vrf: str | None) -> list[Lease]:
    q = select(Lease).where(or_(Lease.address == ident, Lease.mac == ident.lower()))
    if vrf is not None:
        q = q.where(Lease.vrf == vrf)
    return list(s.scalars(q.order_by(Lease.updated_at.desc())))


@leases.command("show")
@click.argument("ident")
@click.option("--vrf", default=None, help="disambiguate an address that exists in several VRFs")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def show_cmd(ctx: click.Context, ident: str, vrf: str | None, as_json: bool) -> None:
    """Show the lease(s) of an address or a MAC."""
    now = dt.datetime.now(dt.UTC)
    with _sessions(ctx)() as s:
        found = _find(s, ident, vrf)
        rows = []
        for lease in found:
            node = s.get(Node, lease.node_id) if lease.node_id is not None else None
            rows.append(_row(lease, node.name if node else None, now))
    if not rows:
        click.echo(f"error: no lease for {ident}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(rows if len(rows) > 1 else rows[0], indent=1))
        return
    for r in rows:
        for k, v in r.items():
            click.echo(f"{k:12s} {'-' if v in (None, '') else v}")
        click.echo("")


@leases.command("release")
@click.argument("ident")
@click.option("--vrf", default=None)
@click.option("--yes", is_flag=True, help="do not ask")
@click.pass_context
def release_cmd(ctx: click.Context, ident: str, vrf: str | None, yes: bool) -> None:
    """Release the bound lease of an address or MAC (frees the address at once)."""
    with _sessions(ctx)() as s:
        found = [x for x in _find(s, ident, vrf) if x.state == "bound"]
        if not found:
            click.echo(f"error: no bound lease for {ident}", err=True)
            sys.exit(1)
        if len(found) > 1:
            vrfs = sorted({x.vrf for x in found})
            if len(vrfs) > 1 and vrf is None:
                click.echo(f"error: {ident} matches {len(found)} bound leases (in VRFs {vrfs}); pass --vrf",
                           err=True)
            else:  # one MAC, several client identifiers (RFC 2131 §2): each is its own client
                click.echo(f"error: {ident} holds {len(found)} bound leases (client identifiers "
                           f"{', '.join(x.client_id or '-' for x in found)}); release by address: "
                           f"{', '.join(x.address for x in found)}", err=True)
            sys.exit(2)
        lease = found[0]
        if not yes and not click.confirm(f"release {lease.address} ({lease.mac}, vrf {lease.vrf or '-'})?"):
            sys.exit(1)
        now = dt.datetime.now(dt.UTC)
        lease.state = "released"
        lease.expires_at = now
        lease.updated_at = now
        s.commit()
    click.echo(f"released {lease.address} ({lease.mac})")


@leases.command("discovered")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def discovered_cmd(ctx: click.Context, as_json: bool) -> None:
    """Unknown MACs that PXE-booted (dhcp.unknown_clients: discover), for enrollment."""
    with _sessions(ctx)() as s:
        rows = [{"mac": d.mac, "arch": d.arch, "vendor_class": d.vendor_class, "address": d.address,
                 "network": d.network, "relay": d.relay, "circuit_id": d.circuit_id, "uuid": d.uuid,
                 "seen": d.seen_count, "last_seen": _aware(d.last_seen).isoformat(timespec="seconds")}
                for d in s.scalars(select(Discovered).order_by(Discovered.last_seen.desc()))]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    _table(rows, ["mac", "arch", "vendor_class", "address", "relay", "circuit_id", "seen", "last_seen"])

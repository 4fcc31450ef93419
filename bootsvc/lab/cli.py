"""``bootsvc lab``: the QEMU rack in network namespaces (owned by the capstone).

Commands: ``up`` (namespaces, bridges, taps, the leaf's FRR, BMC emulators; VMs stay off until a BMC
powers them on),
``down`` (stops everything the lab started and removes its namespaces; checks nothing is left),
``status``, ``boot NAME`` (one-time network boot + power on through the VM's BMC, without bootsvc's
conductor), ``demo`` (``make demo``: the whole flow, see ``bootsvc.lab.demo``), and for the fabric
(``bootsvc.lab.fabric``): ``topology``, ``exec DPU -- CMD`` (a command on a DPU VM) and ``leaf -- CMD``
(a command in the leaf's namespace, e.g. vtysh).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from bootsvc import images
from bootsvc.cli_context import Ctx, fail, pass_ctx
from bootsvc.images_cli import write_catalog
from bootsvc.lab import artifacts, leaf, netns


@click.group("lab")
def lab() -> None:
    """The QEMU lab rack (network namespaces, DPU + host VMs, BMC emulators). Needs root."""


def _root() -> None:
    from bootsvc.lab.demo import ensure_root

    ensure_root()


@lab.command("up")
@click.option("--pairs", "--machines", "pairs", type=click.IntRange(1, 9), default=None,
              help="use the first N DPU + host pairs of config lab.machines (default: all)")
@pass_ctx
def up_cmd(c: Ctx, pairs: int | None) -> None:
    """Create the rack (sweeps a previous one first): namespaces, the leaf, BMC emulators; VMs stay off."""
    from bootsvc.lab import rack

    _root()
    try:
        r = rack.up(c.config, machines=pairs)
    except (rack.RackError, RuntimeError) as e:
        fail(str(e))
    spaces = ", ".join(r.lab.topo.ns_name(s) for s in r.lab.topo.namespaces)
    click.echo(f"lab {r.plan.prefix} up in {r.up_seconds:.1f} s: {spaces}")
    for vm in r.plan.vms():
        click.echo(f"  {vm.name:<7} {vm.role:<4} {vm.kind:<11} {vm.mac}  BMC {r.plan.bmc_url(vm)}")
    click.echo(f"  leaf: FRR AS {leaf.LEAF_ASN} in {r.plan.prefix}-{leaf.LEAF}, links "
               + ", ".join(f"{leaf.leaf_dev(r.plan.prefix, m.index)}->{m.dpu.name}:{leaf.DPU_UPLINK}"
                           for m in r.plan.machines))
    click.echo(f"  BMC credentials: {r.plan.cred_file} (user:password)")
    click.echo("  next: `bootsvc lab boot NAME` powers a VM on, or run the conductor (`bootsvc serve`)")


@lab.command("down")
@pass_ctx
def down_cmd(c: Ctx) -> None:
    """Stop everything the lab started and delete its namespaces; fail if anything is left."""
    from bootsvc.lab import rack

    _root()
    removed = rack.down(c.config)
    left = rack.leftovers(c.config)
    click.echo(f"removed: {', '.join(removed) or 'nothing'}")
    if any(left.values()):
        fail(f"left behind: {json.dumps(left)}")
    click.echo("nothing left behind")


@lab.command("status")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def status_cmd(c: Ctx, as_json: bool) -> None:
    """Namespaces, BMCs and VM power states."""
    from bootsvc.lab import rack

    st = rack.status(c.config)
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    click.echo(f"lab {st['prefix']}: {'up' if st['up'] else 'down'}; namespaces: {', '.join(st['namespaces']) or '-'}")
    if st.get("leaf"):
        ses = st["leaf"]["sessions"]
        click.echo(f"  leaf    {st['leaf']['netns']} AS {st['leaf']['asn']}: " + (
            ", ".join(f"{d} {state}" for d, state in sorted(ses.items())) if ses is not None else "FRR not answering"))
    for v in st["vms"]:
        click.echo(f"  {v['name']:<7} {v['role']:<4} {v['kind']:<11} {v['mac']}  BMC {v['bmc']} "
                   f"{'alive' if v['bmc_alive'] else 'DEAD'}  power {v.get('power')}  override {v.get('boot')}")


@lab.command("boot")
@click.argument("name")
@click.option("--disk", is_flag=True, help="boot from disk instead of a one-time network boot")
@pass_ctx
def boot_cmd(c: Ctx, name: str, disk: bool) -> None:
    """Power VM NAME on (or reset it) through its BMC with a one-time PXE boot (bypasses the conductor)."""
    from bootsvc.lab import rack
    from bootsvc.power.base import BmcError

    _root()
    try:
        how = rack.boot(c.config, name, target="disk" if disk else "pxe")
    except (rack.RackError, BmcError) as e:
        fail(str(e))
    click.echo(f"{name}: {'disk' if disk else 'one-time PXE'} boot, power {how}")


@lab.command("catalog")
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--doca/--no-doca", default=False, help="also build/register the lab DOCA image (slow cold)")
@click.option("--agent-wheel", type=click.Path(exists=True, dir_okay=False))
@click.option("--cache", default=None, help="lab artifact cache (default: $BOOTSVC_LAB_CACHE)")
def catalog_cmd(out: str, doca: bool, agent_wheel: str | None, cache: str | None) -> None:
    """Write a catalog of the QEMU lab's artifacts (bootsvc.lab.artifacts) to OUT."""
    arts = artifacts.build_artifacts(cache)
    d = artifacts.build_doca_image(cache) if doca else None
    cat = images.lab_catalog(arts, d, Path(agent_wheel) if agent_wheel else None)
    write_catalog(Path(out), cat)
    click.echo(f"wrote {len(cat.images)} lab images to {out}")


@lab.command("topology")
@pass_ctx
def topology_cmd(c: Ctx) -> None:
    """The fabric as JSON: the leaf, and per pair its DPU, host, tenant, leaf device and console."""
    from bootsvc.lab import fabric

    click.echo(json.dumps(fabric.topology(c.config), indent=2))


@lab.command("exec", context_settings={"ignore_unknown_options": True})
@click.argument("dpu")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--timeout", type=float, default=60.0, help="seconds the command may run on the DPU")
@pass_ctx
def exec_cmd(c: Ctx, dpu: str, command: tuple[str, ...], timeout: float) -> None:
    """Run COMMAND as root on DPU VM DPU (its command console), e.g.
    ``bootsvc lab exec dpu-1 -- vtysh -c 'show bgp summary'``. Exits with the command's status."""
    import shlex

    from bootsvc.lab import fabric, rack

    _root()
    try:
        res = fabric.dpu_exec(c.config, dpu, shlex.join(command), timeout=timeout)
    except (fabric.FabricError, rack.RackError) as e:
        fail(str(e))
    click.echo(res.output, nl=False)
    sys.exit(res.rc)


@lab.command("leaf", context_settings={"ignore_unknown_options": True})
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@pass_ctx
def leaf_cmd(c: Ctx, command: tuple[str, ...]) -> None:
    """Run COMMAND in the leaf's namespace; ``vtysh`` is pointed at the leaf's FRR, e.g.
    ``bootsvc lab leaf -- vtysh -c 'show bgp l2vpn evpn summary'``."""
    import subprocess

    from bootsvc.lab import rack

    _root()
    plan, _ = rack._current_plan(c.config)
    ns = f"{plan.prefix}-{leaf.LEAF}"
    if ns not in netns.list_namespaces(plan.prefix):
        fail(f"the lab's leaf namespace {ns} does not exist: bring the lab up first (bootsvc lab up)")
    argv = list(command)
    if argv[0] == "vtysh":
        argv = [*leaf.vtysh_argv(plan.prefix), *argv[1:]]
    sys.exit(subprocess.run(["ip", "netns", "exec", ns, *argv], check=False).returncode)


@lab.command("demo")
@click.option("--pairs", "--machines", "pairs", type=click.IntRange(1, 9), default=1,
              help="how many DPU + host pairs of config lab.machines to provision (default 1)")
@click.option("--host-vms", type=click.IntRange(0, 9), default=None,
              help="how many pairs (the first) boot their host VM; the others' DPUs are provisioned alone "
                   "(default: all)")
@click.option("--timeout", type=float, default=1500.0, help="seconds for provisioning to finish")
@click.option("--no-serve", is_flag=True, help="tear down right after provisioning (no waiting for Ctrl-C)")
@pass_ctx
def demo_cmd(c: Ctx, pairs: int, host_vms: int | None, timeout: float, no_serve: bool) -> None:
    """The whole flow: artifacts, rack, db upgrade, inventory, serve, provision DPU + host, UI until Ctrl-C."""
    from bootsvc.lab.demo import run_demo

    _root()
    if not c.config_path:
        fail("lab demo needs --config (e.g. config/lab.yaml)", 2)
    sys.exit(run_demo(c.config, c.config_path, machines=pairs, timeout=timeout, serve_forever=not no_serve,
                      out=lambda s: click.echo(s), host_vms=host_vms))

"""Who may import what (docs/architecture.md): pure modules stay pure, servers stay apart."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "bootsvc"

PURE = ["states", "bootplan", "render", "dhcp/packet", "dhcp/decide", "power/base", "orchestrate", "policy", "views"]
IMPURE = {"socket", "flask", "sqlalchemy", "tftpy", "redfish", "requests", "urllib.request", "http.client",
          "http.server", "subprocess", "werkzeug", "gunicorn", "dnslib", "scapy", "threading", "selectors", "asyncio",
          "bootsvc.db", "bootsvc.lifecycle", "bootsvc.inventory"}
SERVERS = {"dhcp/server": "bootsvc.dhcp", "tftp": "bootsvc.tftp", "dns": "bootsvc.dns"}
NEVER_FROM_SERVERS = {"bootsvc.power", "bootsvc.conductor"}


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("mod", PURE)
def test_pure_modules_do_no_io(mod: str) -> None:
    path = PKG / f"{mod}.py"
    if not path.exists():
        pytest.skip(f"{mod} not present")
    bad = {i for i in imports(path) if any(i == p or i.startswith(p + ".") for p in IMPURE)}
    assert not bad, f"bootsvc/{mod}.py is pure but imports {sorted(bad)}"


@pytest.mark.parametrize("mod", sorted(SERVERS))
def test_protocol_servers_do_not_import_each_other_power_or_conductor(mod: str) -> None:
    path = PKG / f"{mod}.py"
    if not path.exists():
        pytest.skip(f"{mod} not present")
    own = SERVERS[mod]
    others = {v for k, v in SERVERS.items() if k != mod}
    for i in imports(path):
        assert not any(i == o or i.startswith(o + ".") for o in others | NEVER_FROM_SERVERS if o != own), (
            f"bootsvc/{mod}.py imports {i}")


def test_only_lifecycle_assigns_node_state() -> None:
    offenders = []
    for path in PKG.rglob("*.py"):
        if path.name == "lifecycle.py" or "agent" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    if isinstance(t, ast.Attribute) and t.attr == "state" and isinstance(t.value, ast.Name) and (
                            t.value.id in {"node", "n", "dpu", "host"}):
                        offenders.append(f"{path.relative_to(PKG)}:{node.lineno}")
    assert not offenders, f"only lifecycle.apply may change node state: {offenders}"

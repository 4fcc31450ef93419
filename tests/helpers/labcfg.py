"""The lab's site config (config/lab.yaml) re-pointed at one e2e test: its namespace prefix, its ports,
and private state under the test's directory (database, catalog, TFTP root, node key, the BMC
credential file, the rack's workdir), so two lab tests never share a namespace, a port or a file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from bootsvc import config as config_mod
from bootsvc.config import Config

ROOT = Path(__file__).resolve().parents[2]


def lab_tree(tmp: Path, *, prefix: str, bmc_base: int, http_port: int, cred_name: str = "lab-bmc",
             boot_role_in_netns: bool = True) -> dict[str, Any]:
    """config/lab.yaml as a dict, with this test's ``prefix`` (namespaces ``<prefix>-prov``, bridge
    ``<prefix>br0``), BMC emulator ports from ``bmc_base``, bootsvc's loopback HTTP on ``http_port``,
    the BMC credential ``cred_name`` in ``tmp/rack/bmc.cred``; the listeners inside the provisioning
    namespace serve the boot role only when ``boot_role_in_netns``, otherwise every role."""
    tree: dict[str, Any] = yaml.safe_load((ROOT / "config" / "lab.yaml").read_text())
    ns = f"{prefix}-prov"
    tree["database"] = {"url": f"sqlite:///{tmp / 'lab.db'}"}
    tree["state_dir"] = str(tmp / "state")
    tree["images"] = {"catalog": str(tmp / "state" / "catalog.yaml"), "root": str(tmp / "state")}
    tree["boot"]["tftp_root"] = str(tmp / "state" / "tftp")
    tree["security"]["node_key_ref"] = f"file:{tmp / 'state' / 'node.key'}"
    tree["bmc_credentials"] = {cred_name: {"ref": f"file:{tmp / 'rack' / 'bmc.cred'}",
                                           "networks": [{"cidr": "127.0.0.0/8", "lab": True}]}}

    def roles() -> dict[str, Any]:  # a list per listener: a shared one would dump as a YAML anchor
        return {"roles": ["boot"]} if boot_role_in_netns else {}

    tree["listeners"] = {
        "http": [{"address": "127.0.0.1", "port": http_port},
                 {"address": "10.77.0.1", "port": 8080, "netns": ns, **roles()},
                 {"address": "10.77.0.1", "port": 80, "netns": ns, **roles()}],
        "dhcp": [{"interface": f"{prefix}br0", "address": "10.77.0.1", "netns": ns}],
        "tftp": [{"address": "10.77.0.1", "port": 69, "netns": ns}],
        "dns": [{"address": "10.77.0.1", "port": 53, "netns": ns}],
    }
    tree["lab"] = {**tree["lab"], "prefix": prefix, "bmc_port_base": bmc_base, "workdir": str(tmp / "rack")}
    return tree


def write_config(tree: dict[str, Any], path: Path) -> tuple[Config, Path]:
    """``tree`` written to ``path`` as YAML and loaded as bootsvc loads it."""
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return config_mod.load(path), path

"""Files the TFTP root does not hold: per-node GRUB configs from the database, and catalog images.

Owns: ``grub/grub.cfg-<mac>`` (what the lab GRUB image asks for, ``images/lab/grub-early.cfg``; also
``grub/grub.cfg-01-aa-bb-...``), ``grub/grub.cfg`` (the fallback GRUB loads when no per-MAC file is
served) and the HTTP base URL a config points at.

Identity: a per-node config is served only to the address DHCP leased (or reserved) for that node,
looked up with :func:`bootsvc.inventory.node_by_ip`. A per-node config carries the node's boot token
for install actions, and even without a token it tells which image and action a node is in, so any
other source gets ERROR 2 "Access violation" rather than a token-less config (counted as
``bootsvc_tftp_refused_total{reason="identity"}``). GRUB then finds no per-MAC file and loads
``grub/grub.cfg``, which boots from local disk (the service counts and logs the refusal). The one
proof of identity on Zone 0 before the token is the address the DHCP server handed to that MAC
(docs/security.md for the threat model).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Callable
from pathlib import Path

from bootsvc import auth_secrets, inventory, render
from bootsvc.config import Config
from bootsvc.db import make_engine, session_factory
from bootsvc.tftp.packet import ERR_ACCESS, Refused
from bootsvc.tftp.paths import Generator
from bootsvc.verified_catalog import load_verified_catalog

log = logging.getLogger("bootsvc.tftp")

_GRUB_MAC = re.compile(r"^grub/grub\.cfg-(?:01-)?([0-9a-fA-F]{2}(?:[:-][0-9a-fA-F]{2}){5})$")


def http_base_for(config: Config, client_ip: str) -> str:
    """http://<boot_server>:<port> for a client: the boot_server of the network holding its address."""
    try:
        ip: ipaddress.IPv4Address | None = ipaddress.IPv4Address(client_ip)
    except ValueError:
        ip = None
    port = config.boot.http_port
    for n in config.networks:
        if ip is not None and ip in n.cidr and n.boot_server is not None:
            return f"http://{n.boot_server}:{port}"
    for n in config.networks:
        if n.boot_server is not None:
            return f"http://{n.boot_server}:{port}"
    lst = config.listeners.http[0] if config.listeners.http else None
    return f"http://{lst.address if lst else '127.0.0.1'}:{lst.port if lst else port}"


def make_generator(config: Config) -> tuple[Generator, Callable[[str, str, str], Path | None]]:
    """GRUB configs from the database, and catalog lookups, for the TFTP resolver."""
    sessions = session_factory(make_engine(config.database.url))
    catalog = load_verified_catalog(config)
    key_box: list[bytes] = []
    discovery = config.dhcp.unknown_clients == "discover"

    def key() -> bytes:
        if not key_box:
            key_box.append(auth_secrets.read_ref(config.security.node_key_ref, create=True))
        return key_box[0]

    def generate(rel: str, client_ip: str) -> bytes | None:
        base = http_base_for(config, client_ip)
        if rel == "grub/grub.cfg":
            # reached only when no per-MAC file is served (grub-early.cfg tests -f first)
            ctx = render.BootContext(base, "00:00:00:00:00:00")
            d = render.Decision(render.Action.LOCAL, "no configuration for this machine")
            return render.grub_config(d, ctx, None, http_port=config.boot.http_port,
                                      grub_port=config.boot.grub_http_port).encode()
        m = _GRUB_MAC.match(rel)
        if not m:
            return None
        mac = inventory.normalize_mac(m.group(1))
        with sessions() as s:
            node = inventory.node_by_mac(s, mac)
            holder = inventory.node_by_ip(s, client_ip) if node is not None else None
        if node is not None and (holder is None or holder.id != node.id):
            log.warning("tftp: grub config for %s (node %s) refused to %s: not the address leased or reserved "
                        "for this node (%s)", mac, node.name, client_ip,
                        f"held by node {holder.name}" if holder is not None else "no lease")
            raise Refused(ERR_ACCESS, "Access violation", "identity")
        decision = render.decide(node, catalog, discovery=discovery)
        if node is None and decision.action is not render.Action.DISCOVERY:
            return None  # unknown: let GRUB fall back to grub/grub.cfg
        token = None
        if node is not None and decision.action in render.TOKEN_ACTIONS:
            token = render.boot_token(auth_secrets.node_secret(key(), node.id, node.secret_generation))
        try:
            body = render.grub_config(decision, render.BootContext(base, mac, token), node,
                                      http_port=config.boot.http_port, grub_port=config.boot.grub_http_port)
        except render.RenderError as e:
            log.error("tftp: cannot render GRUB config for %s: %s", mac, e)
            body = render.grub_config(render.Decision(render.Action.HOLD, "configuration error"),
                                      render.BootContext(base, mac), node, http_port=config.boot.http_port,
                                      grub_port=config.boot.grub_http_port)
        log.info("tftp: grub config for %s node=%s action=%s to %s", mac, node.name if node else "-",
                 decision.action.value, client_ip)
        return body.encode()

    def image_file(name: str, version: str, fname: str) -> Path | None:
        f = catalog.lookup_file(name, version, fname)
        return f.path if f is not None else None

    return generate, image_file
